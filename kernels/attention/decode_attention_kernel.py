"""The Triton kernel of decode attention (the launcher and the contract are in decode_attention.py).

Split-KV "flash decoding" in one launch, grid ``(B, Hkv, num_splits)``: a program reads one contiguous range of
positions ("split") of one request for one KV head, once, and attends all the query heads of that KV group to it
(GQA: the group is the M dimension of the matmul). A request that uses one split writes its output directly.
Otherwise each program writes its split's normalised partial output and log-sum-exp, then takes a ticket from a
per-(request, KV head) counter; the program that draws the last ticket merges the partials of all splits and
resets the counter to 0 for the next launch (the counter's atomic add orders the partial writes before the merge
reads them). A separate merge launch would cost a few microseconds per layer, which at batch 1 is more than the
merge itself.

With programmatic dependent launch (kernels/pdl.py) a program reads the step's inputs that no kernel of the
forward writes (``PDL_EARLY_READS``: lengths, request rows, the slot table) before its wait, and at small batches
loads the K/V of its first history tile into registers: the history was stored by earlier steps. After the wait
it only has q and the new token to read before the math. Everything else, and every write, comes after the wait.
"""

from __future__ import annotations

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

if triton is not None:
    from ..pdl import pdl_wait
    from .pool_layout import attend_kv_tile, attend_pool_tile, load_pool_rows, pool_tile_slots
    from ..rotary import rope_rotate

__all__ = ["PDL_EARLY_READS", "decode_kernel"]

# Kernel pointer arguments read before the PDL wait (tests/test_kernels.py checks that nothing else is touched
# before the wait): step inputs written before the forward and never during it, and the K/V pool, read there only
# at the positions before seq_len - 1, which earlier steps stored (a decode step writes only its own token's slot).
PDL_EARLY_READS = ("SEQ_LENS", "REQ_IDX", "REQ_TO_TOKEN", "KB", "VB")


if triton is not None:

    @triton.jit
    def _split_len(seq_len, num_splits, min_split_tokens, BLOCK_N: tl.constexpr):
        """Positions per split of one request: its length spread over the splits it uses, rounded up to whole
        BLOCK_N tiles (so only a split's last tile is partial). Every program derives the split layout from this."""
        n = tl.maximum(tl.minimum(num_splits, tl.cdiv(seq_len, min_split_tokens)), 1)
        per = tl.cdiv(tl.cdiv(seq_len, n), BLOCK_N) * BLOCK_N
        return tl.maximum(per, BLOCK_N)

    @triton.jit
    def _new_token_kv(
        K_NEW, V_NEW, LOC, KB, VB, b, kvh, skn_b, skn_h, svn_b, svn_h, sk_s, sk_h, sv_s, sv_h,
        offs_d, mask_d, head_dim, c, s, store, DT: tl.constexpr,
    ):
        """This step's token of request ``b``, KV head ``kvh``: k rotated by ``c/s`` (in ``DT``, then the pool
        dtype) and v, stored at slot ``LOC[b]`` if ``store`` (one program per token stores it). Returns them
        (``[D]``) for the softmax."""
        k = rope_rotate(K_NEW + b * skn_b + kvh * skn_h, offs_d, mask_d, head_dim // 2, c, s, DT)
        k = k.to(KB.dtype.element_ty)
        v = tl.load(V_NEW + b * svn_b + kvh * svn_h + offs_d, mask=mask_d, other=0.0).to(VB.dtype.element_ty)
        slot = tl.load(LOC + b).to(tl.int64)
        mask_st = tl.where(store, mask_d, False)
        tl.store(KB + slot * sk_s + kvh * sk_h + offs_d, k, mask=mask_st)
        tl.store(VB + slot * sv_s + kvh * sv_h + offs_d, v, mask=mask_st)
        return k, v

    @triton.jit
    def _attend_one(q, m, l, acc, k, v, qk_scale):
        """The online-softmax step of ``attend_kv_tile`` for a single position held in registers (``k/v [D]``);
        ``m`` may still be -inf (an empty history): ``exp2(-inf)`` then zeroes the empty running state."""
        s = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1) * qk_scale
        m_new = tl.maximum(m, s)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l = l * alpha + p
        pv = p.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
        return m_new, l, acc * alpha[:, None] + pv

    @triton.jit
    def decode_kernel(
        Q, KB, VB, REQ_TO_TOKEN, REQ_IDX, SEQ_LENS, MID_O, MID_LSE, COUNTERS, OUT, K_NEW, V_NEW, COS, SIN, LOC,
        qk_scale,  # sm_scale * log2(e): scores live in base 2 so the softmax uses exp2
        sq_b, sq_h, sk_s, sk_h, sv_s, sv_h, s_rt, skn_b, skn_h, svn_b, svn_h, sc_b, ss_b,
        smo_b, smo_h, smo_s, sml_b, sml_h, so_b, so_h,
        group, head_dim, num_kv_heads, num_splits, min_split_tokens,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
        EARLY_TILE: tl.constexpr, NEW_TOKEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        # Before the PDL wait, only what no kernel of the forward writes (PDL_EARLY_READS): the lengths, the request
        # rows, the slots of the history and, with EARLY_TILE, the K/V of its first tile (positions stored by
        # earlier steps). This overlaps the kernel before (the qkv projection when NEW_TOKEN) instead of following it.
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(SEQ_LENS + b)
        split_len = _split_len(seq_len, num_splits, min_split_tokens, BLOCK_N)
        used = tl.cdiv(seq_len, split_len)
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)
        # Splits a request does not use end here, before waiting: they touch nothing, and a program that exits
        # lets the next kernel launch as surely as one that passed its wait, without holding an SM slot.
        if (start < end) | ((seq_len == 0) & (split == 0)):
            row = tl.load(REQ_IDX + b).to(tl.int64)
            hist_end = tl.minimum(end, seq_len - 1)  # position seq_len - 1 is this step's token
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < head_dim
            if EARLY_TILE:
                # The split's first history tile, positions [start, first_end): stored by earlier steps, so its K/V
                # are loaded into registers now and the loads overlap the kernel before.
                first_end = tl.minimum(start + BLOCK_N, hist_end)
                offs_p = start + tl.arange(0, BLOCK_N)
                mask_p = offs_p < first_end
                slots0 = pool_tile_slots(REQ_TO_TOKEN, row, s_rt, offs_p, mask_p)
                k0 = load_pool_rows(KB, slots0, kvh, sk_s, sk_h, mask_p, offs_d, mask_d)
                v0 = load_pool_rows(VB, slots0, kvh, sv_s, sv_h, mask_p, offs_d, mask_d)
            else:
                first_end = start
                k0 = tl.zeros([BLOCK_N, BLOCK_D], KB.dtype.element_ty)
                v0 = tl.zeros([BLOCK_N, BLOCK_D], VB.dtype.element_ty)
            pdl_wait(USE_PDL)
            _decode_program(
                Q, KB, VB, REQ_TO_TOKEN, MID_O, MID_LSE, COUNTERS, OUT, K_NEW, V_NEW, COS, SIN, LOC,
                qk_scale, sq_b, sq_h, sk_s, sk_h, sv_s, sv_h, s_rt, skn_b, skn_h, svn_b, svn_h, sc_b, ss_b,
                smo_b, smo_h, smo_s, sml_b, sml_h, so_b, so_h, group, head_dim, num_kv_heads,
                b, kvh, split, row, seq_len, used, start, end, hist_end, first_end, k0, v0, offs_d, mask_d,
                BLOCK_G, BLOCK_D, BLOCK_N, BLOCK_S, NEW_TOKEN, DOT_PRECISION,
            )

    @triton.jit
    def _decode_program(
        Q, KB, VB, REQ_TO_TOKEN, MID_O, MID_LSE, COUNTERS, OUT, K_NEW, V_NEW, COS, SIN, LOC,
        qk_scale, sq_b, sq_h, sk_s, sk_h, sv_s, sv_h, s_rt, skn_b, skn_h, svn_b, svn_h, sc_b, ss_b,
        smo_b, smo_h, smo_s, sml_b, sml_h, so_b, so_h, group, head_dim, num_kv_heads,
        b, kvh, split, row, seq_len, used, start, end, hist_end, first_end, k0, v0, offs_d, mask_d,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
        NEW_TOKEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """The part of a ``decode_kernel`` program after its PDL wait: one split of request ``b``, KV head
        ``kvh`` (positions ``[start, end)``), or the zeros of an empty row. ``k0/v0`` hold the K/V of positions
        ``[start, first_end)``, loaded before the wait (none when ``first_end == start``)."""
        offs_g = tl.arange(0, BLOCK_G)
        mask_g = offs_g < group
        heads = kvh * group + offs_g
        mask_gd = mask_g[:, None] & mask_d[None, :]
        out_ptr = OUT + b * so_b + heads[:, None] * so_h + offs_d[None, :]
        if NEW_TOKEN:
            c = tl.load(COS + b * sc_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            s = tl.load(SIN + b * ss_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if seq_len == 0:  # an empty padded row: zeros rather than 0/0; its token is stored like any row's
            tl.store(out_ptr, tl.zeros([BLOCK_G, BLOCK_D], tl.float32).to(OUT.dtype.element_ty), mask=mask_gd)
            if NEW_TOKEN:
                _new_token_kv(
                    K_NEW, V_NEW, LOC, KB, VB, b, kvh, skn_b, skn_h, svn_b, svn_h, sk_s, sk_h, sv_s, sv_h,
                    offs_d, mask_d, head_dim, c, s, split == 0, Q.dtype.element_ty,
                )
        else:
            q_ptr = Q + b * sq_b + heads[:, None] * sq_h
            # Padded query rows (group < BLOCK_G, the matmul's minimum M) are zeros: finite scores, never stored.
            if NEW_TOKEN:
                q = rope_rotate(q_ptr, offs_d[None, :], mask_gd, head_dim // 2, c[None, :], s[None, :],
                                Q.dtype.element_ty)
                # The step's own token, read together with q; the split that holds it stores it in the pool
                # and attends to it after the history.
                holds_token = end == seq_len
                k_new, v_new = _new_token_kv(
                    K_NEW, V_NEW, LOC, KB, VB, b, kvh, skn_b, skn_h, svn_b, svn_h, sk_s, sk_h, sv_s, sv_h,
                    offs_d, mask_d, head_dim, c, s, holds_token, Q.dtype.element_ty,
                )
                loop_end = hist_end  # the step's own token is not in the pool yet
            else:
                q = tl.load(q_ptr + offs_d[None, :], mask=mask_gd, other=0.0)
                loop_end = end  # the step's own token was stored by the kernel before this one
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
            if start < first_end:
                m, l, acc = attend_kv_tile(q, m, l, acc, k0, v0, (start + tl.arange(0, BLOCK_N) < first_end)[None, :],
                                           qk_scale, DOT_PRECISION)
            # The rest of the split (all of it when nothing was loaded early). Every tile holds >= 1 valid
            # position, so m is finite after the first one.
            for n0 in range(first_end, loop_end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < loop_end
                m, l, acc = attend_pool_tile(
                    q, m, l, acc, REQ_TO_TOKEN, row, s_rt, KB, VB, kvh, sk_s, sk_h, sv_s, sv_h,
                    offs_n, mask_n, mask_n[None, :], offs_d, mask_d, qk_scale, DOT_PRECISION,
                )
            if NEW_TOKEN:
                if holds_token:
                    m, l, acc = _attend_one(q, m, l, acc, k_new, v_new, qk_scale)
            if used == 1:
                tl.store(out_ptr, (acc / l[:, None]).to(OUT.dtype.element_ty), mask=mask_gd)
            else:
                mo_ptr = MID_O + b * smo_b + heads[:, None] * smo_h + offs_d[None, :]
                ml_ptr = MID_LSE + b * sml_b + heads * sml_h
                tl.store(mo_ptr + split * smo_s, acc / l[:, None], mask=mask_gd)
                tl.store(ml_ptr + split, m + tl.log2(l), mask=mask_g)
                # acq_rel: this program's partial writes happen before its ticket; the last ticket's holder sees
                # every other program's writes.
                counter = COUNTERS + b * num_kv_heads + kvh
                ticket = tl.atomic_add(counter, 1, sem="acq_rel")
                if ticket == used - 1:
                    # Every split's log-sum-exp in one load (the merge sits on the critical path of the layer),
                    # then the partial outputs weighted by exp2(lse - max).
                    offs_s = tl.arange(0, BLOCK_S)
                    s_used = offs_s < used
                    lse = tl.load(ml_ptr[:, None] + offs_s[None, :], mask=mask_g[:, None] & s_used[None, :],
                                  other=0.0, cache_modifier=".cg")
                    lse = tl.where(s_used[None, :], lse, float("-inf"))
                    weights = tl.exp2(lse - tl.max(lse, 1)[:, None])  # [BLOCK_G, BLOCK_S], 0 for unused splits
                    res = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
                    for sp in range(0, used):
                        o = tl.load(mo_ptr + sp * smo_s, mask=mask_gd, other=0.0, cache_modifier=".cg")
                        w = tl.sum(tl.where(offs_s[None, :] == sp, weights, 0.0), 1)
                        res += w[:, None] * o
                    tl.store(out_ptr, (res / tl.sum(weights, 1)[:, None]).to(OUT.dtype.element_ty), mask=mask_gd)
                    tl.atomic_xchg(counter, 0)  # ready for the next launch
