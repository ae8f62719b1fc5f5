"""The Triton kernels of multi-head latent attention (MLA; the launchers and the contract are in mla.py).

MLA's cache holds one row per token shared by every head: ``[latent (Dv) | rope key (Dpe)]``, ``Dk = Dv + Dpe``
(DeepSeek: 512 + 64). Scores are ``q[:Dv] . latent + q[Dv:] . rope key`` and the value is the latent itself, so a
program loads each tile of cache rows once and uses it three times for a whole block of heads: two score matmuls
(the latent part and the rope part, kept apart so neither is padded to the next power of two: 576 would be 1024)
and the output matmul with the same latent tile. The heads of a block are the M dimension of the matmuls.

- ``mla_decode_kernel``: split-KV flash decoding, grid ``(head blocks, splits, B)``. A program attends one range of
  positions of one request for ``BLOCK_H`` heads; with several splits each writes its normalised partial output and
  log-sum-exp, takes a ticket, and the last one merges them (as decode_attention_kernel.py does, without a second
  launch). Head blocks vary fastest in the launch order, so the programs that read the same rows run together and
  the rows come from L2 for all but the first.
- ``mla_extend_kernel``: causal attention of each request's new tokens over its prefix and themselves, grid
  ``(token blocks x head blocks, B)``. The M rows of a program are ``BLOCK_T`` tokens x ``BLOCK_H`` heads (heads
  fastest): with many heads a program takes one token's heads, so short extends do not waste rows on padding.
"""

from __future__ import annotations

try:  # triton is optional (absent on macOS / Windows): then only the references run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

if triton is not None:
    from ..pdl import pdl_wait
    from .decode_attention_kernel import _split_len
    from .pool_layout import pool_tile_slots

__all__ = ["PDL_EARLY_READS", "mla_decode_kernel", "mla_extend_kernel"]

# Pointer arguments of mla_decode_kernel read before its PDL wait: step inputs no kernel of the forward writes
# (tests/test_mla_kernels.py checks nothing else is touched before the wait). The cache rows are not among them:
# this step's row is stored by the kernel just before (forward_mla's index_copy_).
PDL_EARLY_READS = ("SEQ_LENS", "REQ_IDX")


if triton is not None:

    @triton.jit
    def _load_q(q_ptr, mask_rows, dv, dpe, BLOCK_DV: tl.constexpr, BLOCK_DPE: tl.constexpr):
        """The latent part ``[M, BLOCK_DV]`` and the rope part ``[M, BLOCK_DPE]`` of the query rows ``q_ptr [M, 1]``
        (zeros where ``mask_rows`` is false: padded heads or tokens give finite scores and are never stored)."""
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_pe = tl.arange(0, BLOCK_DPE)
        q_lat = tl.load(q_ptr + offs_dv[None, :], mask=mask_rows[:, None] & (offs_dv < dv)[None, :], other=0.0)
        q_pe = tl.load(q_ptr + dv + offs_pe[None, :], mask=mask_rows[:, None] & (offs_pe < dpe)[None, :], other=0.0)
        return q_lat, q_pe

    @triton.jit
    def mla_attend_tile(
        q_lat, q_pe, m, l, acc, KB, slots, sk_s, mask_n, visible, dv, dpe, qk_scale,
        BLOCK_DV: tl.constexpr, BLOCK_DPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One online-softmax step over the cache rows at ``slots`` (``mask_n`` marks the real ones): scores from
        the latent and rope parts, then the latent tile again as the value. ``m``/``l``/``acc`` are the running max,
        sum and output in float32 (base 2); ``visible [M, N]`` must be false where ``mask_n`` is. The caller
        guarantees every row sees a position in its first tile, so ``m`` is finite afterwards."""
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_pe = tl.arange(0, BLOCK_DPE)
        rows = KB + slots[:, None] * sk_s
        k_lat = tl.load(rows + offs_dv[None, :], mask=mask_n[:, None] & (offs_dv < dv)[None, :], other=0.0)
        k_pe = tl.load(rows + dv + offs_pe[None, :], mask=mask_n[:, None] & (offs_pe < dpe)[None, :], other=0.0)
        s = tl.dot(q_lat, tl.trans(k_lat), input_precision=DOT_PRECISION)
        s = tl.dot(q_pe, tl.trans(k_pe), acc=s, input_precision=DOT_PRECISION)
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_lat.dtype), k_lat, input_precision=DOT_PRECISION)
        return m_new, l, acc

    @triton.jit
    def mla_decode_kernel(
        Q, KB, REQ_TO_TOKEN, REQ_IDX, SEQ_LENS, MID_O, MID_LSE, COUNTERS, OUT,
        qk_scale,  # sm_scale * log2(e): scores live in base 2 so the softmax uses exp2
        sq_b, sq_h, sk_s, s_rt, smo_b, smo_h, smo_s, sml_b, sml_h, so_b, so_h,
        num_heads, dv, dpe, num_head_blocks, num_splits, min_split_tokens,
        BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DPE: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        # Before the PDL wait only the lengths and request rows (PDL_EARLY_READS): enough to know the split's range
        # and to let the programs of unused splits exit without waiting.
        hb = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        seq_len = tl.load(SEQ_LENS + b)
        split_len = _split_len(seq_len, num_splits, min_split_tokens, BLOCK_N)
        used = tl.cdiv(seq_len, split_len)
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)
        if (start < end) | ((seq_len == 0) & (split == 0)):
            row = tl.load(REQ_IDX + b).to(tl.int64)
            pdl_wait(USE_PDL)
            _mla_decode_program(
                Q, KB, REQ_TO_TOKEN, MID_O, MID_LSE, COUNTERS, OUT, qk_scale, sq_b, sq_h, sk_s, s_rt,
                smo_b, smo_h, smo_s, sml_b, sml_h, so_b, so_h, num_heads, dv, dpe, num_head_blocks,
                b, hb, split, row, seq_len, used, start, end,
                BLOCK_H, BLOCK_DV, BLOCK_DPE, BLOCK_N, BLOCK_S, DOT_PRECISION,
            )

    @triton.jit
    def _mla_decode_program(
        Q, KB, REQ_TO_TOKEN, MID_O, MID_LSE, COUNTERS, OUT, qk_scale, sq_b, sq_h, sk_s, s_rt,
        smo_b, smo_h, smo_s, sml_b, sml_h, so_b, so_h, num_heads, dv, dpe, num_head_blocks,
        b, hb, split, row, seq_len, used, start, end,
        BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DPE: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """The part of a ``mla_decode_kernel`` program after its PDL wait: positions ``[start, end)`` of request
        ``b`` for heads ``hb * BLOCK_H + [0, BLOCK_H)``, or the zeros of an empty row (``seq_len == 0``)."""
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = heads < num_heads
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_hv = mask_h[:, None] & (offs_dv < dv)[None, :]
        out_ptr = OUT + b * so_b + heads[:, None] * so_h + offs_dv[None, :]
        if seq_len == 0:  # an empty padded row: zeros rather than 0/0
            tl.store(out_ptr, tl.zeros([BLOCK_H, BLOCK_DV], tl.float32).to(OUT.dtype.element_ty), mask=mask_hv)
        else:
            q_lat, q_pe = _load_q(Q + b * sq_b + heads[:, None] * sq_h, mask_h, dv, dpe, BLOCK_DV, BLOCK_DPE)
            m = tl.full([BLOCK_H], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_H], tl.float32)
            acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
            # Every tile holds >= 1 position of the split, so m is finite after the first one.
            for n0 in range(start, end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < end
                slots = pool_tile_slots(REQ_TO_TOKEN, row, s_rt, offs_n, mask_n)
                m, l, acc = mla_attend_tile(
                    q_lat, q_pe, m, l, acc, KB, slots, sk_s, mask_n, mask_n[None, :], dv, dpe, qk_scale,
                    BLOCK_DV, BLOCK_DPE, DOT_PRECISION,
                )
            if used == 1:
                tl.store(out_ptr, (acc / l[:, None]).to(OUT.dtype.element_ty), mask=mask_hv)
            else:
                mo_ptr = MID_O + b * smo_b + heads[:, None] * smo_h + offs_dv[None, :]
                ml_ptr = MID_LSE + b * sml_b + heads * sml_h
                tl.store(mo_ptr + split * smo_s, acc / l[:, None], mask=mask_hv)
                tl.store(ml_ptr + split, m + tl.log2(l), mask=mask_h)
                # acq_rel: this program's partial writes happen before its ticket; the last ticket's holder sees
                # every other program's writes.
                counter = COUNTERS + b * num_head_blocks + hb
                ticket = tl.atomic_add(counter, 1, sem="acq_rel")
                if ticket == used - 1:
                    _merge_splits(mo_ptr, ml_ptr, smo_s, out_ptr, used, mask_h, mask_hv, BLOCK_H, BLOCK_DV, BLOCK_S)
                    tl.atomic_xchg(counter, 0)  # ready for the next launch (and the next layer, and a graph replay)

    @triton.jit
    def _merge_splits(
        mo_ptr, ml_ptr, smo_s, out_ptr, used, mask_h, mask_hv,
        BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Log-sum-exp merge of the ``used`` partial outputs ``mo_ptr + s * smo_s`` (normalised, float32) with their
        base-2 log-sum-exps ``ml_ptr + s`` into ``out_ptr``. ``.cg`` loads: the partials were written by other
        programs, possibly on other SMs, so they must come from L2, not a stale L1 line."""
        offs_s = tl.arange(0, BLOCK_S)
        s_used = offs_s < used
        lse = tl.load(ml_ptr[:, None] + offs_s[None, :], mask=mask_h[:, None] & s_used[None, :], other=0.0,
                      cache_modifier=".cg")
        lse = tl.where(s_used[None, :], lse, float("-inf"))
        weights = tl.exp2(lse - tl.max(lse, 1)[:, None])  # [BLOCK_H, BLOCK_S], 0 for unused splits
        res = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
        for sp in range(0, used):
            o = tl.load(mo_ptr + sp * smo_s, mask=mask_hv, other=0.0, cache_modifier=".cg")
            w = tl.sum(tl.where(offs_s[None, :] == sp, weights, 0.0), 1)
            res += w[:, None] * o
        tl.store(out_ptr, (res / tl.sum(weights, 1)[:, None]).to(out_ptr.dtype.element_ty), mask=mask_hv)

    @triton.jit
    def mla_extend_kernel(
        Q, KB, OUT, REQ_TO_TOKEN, REQ_IDX, SEQ_LENS, EXT_LENS, EXT_START,
        qk_scale,  # sm_scale * log2(e)
        sq_t, sq_h, sk_s, so_t, so_h, s_rt, num_heads, dv, dpe, num_head_blocks,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DPE: tl.constexpr,
        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        pdl_wait(USE_PDL)
        # Axis 0 is (token block, head block), head blocks fastest: one token's heads need 4-8 programs at 128 heads,
        # so a long extend would pass the 65535 limit of the grid's other axes.
        hb = tl.program_id(0) % num_head_blocks
        t0 = (tl.program_id(0) // num_head_blocks) * BLOCK_T
        b = tl.program_id(1).to(tl.int64)
        ext_len = tl.load(EXT_LENS + b)
        if t0 < ext_len:  # the grid covers the longest extend; shorter requests' extra blocks do nothing
            seq_len = tl.load(SEQ_LENS + b)
            start = tl.load(EXT_START + b)
            row = tl.load(REQ_IDX + b).to(tl.int64)
            prefix = seq_len - ext_len
            # Row r of the matmuls is token t0 + r // BLOCK_H, head hb * BLOCK_H + r % BLOCK_H.
            offs_r = tl.arange(0, BLOCK_T * BLOCK_H)
            tok = t0 + offs_r // BLOCK_H
            heads = hb * BLOCK_H + offs_r % BLOCK_H
            mask_r = (tok < ext_len) & (heads < num_heads)
            q_rows = (start + tok).to(tl.int64)
            q_lat, q_pe = _load_q(Q + q_rows[:, None] * sq_t + heads[:, None] * sq_h, mask_r, dv, dpe,
                                  BLOCK_DV, BLOCK_DPE)
            q_pos = prefix + tok
            # Keys past the block's last token are invisible to the whole block: stop there.
            end = prefix + tl.minimum(t0 + BLOCK_T, ext_len)
            m = tl.full([BLOCK_T * BLOCK_H], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_T * BLOCK_H], tl.float32)
            acc = tl.zeros([BLOCK_T * BLOCK_H, BLOCK_DV], tl.float32)
            for n0 in range(0, end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < end
                # Position 0 is visible to every row and lies in the first tile, so m is finite from then on.
                visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
                slots = pool_tile_slots(REQ_TO_TOKEN, row, s_rt, offs_n, mask_n)
                m, l, acc = mla_attend_tile(
                    q_lat, q_pe, m, l, acc, KB, slots, sk_s, mask_n, visible, dv, dpe, qk_scale,
                    BLOCK_DV, BLOCK_DPE, DOT_PRECISION,
                )
            offs_dv = tl.arange(0, BLOCK_DV)
            tl.store(
                OUT + q_rows[:, None] * so_t + heads[:, None] * so_h + offs_dv[None, :],
                (acc / l[:, None]).to(OUT.dtype.element_ty),
                mask=mask_r[:, None] & (offs_dv < dv)[None, :],
            )
