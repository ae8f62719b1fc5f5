"""Decode attention: one new query token per request against its whole KV history in the token pool.

Layout shared with the runtime: ``k_buffer/v_buffer [num_slots, Hkv, D]`` (slot 0 is the dummy slot padded
rows write to), ``req_to_token [rows, context_len]`` maps (request row, position) -> slot. Position
``seq_lens[b] - 1`` is the step's own token. Either its K/V is already in the pool (stored by ``store_kv``), or
the caller hands it over as a ``NewToken`` before rotary: the kernel then rotates q and k itself, stores the K/V
at ``NewToken.loc`` and attends to it from registers, so rotary, store-KV and attention are one launch instead of
three (at batch 1 the launches, not the bytes, are what attention costs).

The Triton path is split-KV "flash decoding" in one launch, grid ``(B, Hkv, num_splits)``: a program reads one
contiguous range of positions ("split") of one request for one KV head, once, and attends all the query heads of
that KV group to it (GQA: the group is the M dimension of the matmul). A request that uses one split writes its
output directly. Otherwise each program writes its split's normalised partial output and log-sum-exp, then takes
a ticket from a per-(request, KV head) counter; the program that draws the last ticket merges the partials of
all splits and resets the counter to 0 for the next launch (the counter's atomic add orders the partial writes
before the merge reads them). A separate merge launch would cost a few microseconds per layer, which at batch 1
is more than the merge itself.

Why split: at decode the batch gives only ``B * Hkv`` programs (8 for Llama-3-8B at batch 1, on a GPU with 132
SMs), and each would stream the whole history alone. Splitting the positions makes enough programs to keep every
SM reading memory. ``decode_num_splits`` picks the count from the batch size; each request then uses only as many
of those splits as its own length warrants (at least ``min_split_tokens`` positions per split), the others exit at
once, so the grid does not depend on the sequence lengths (what CUDA graphs need).

With programmatic dependent launch (kernels/pdl.py) a program reads the step's inputs that no kernel of the
forward writes (``PDL_EARLY_READS``: lengths, request rows, the slot table) before its wait, and at small batches
loads the K/V of its first history tile into registers: the history was stored by earlier steps. After the wait
it only has q and the new token to read before the math. Everything else, and every write, comes after the wait.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .pool_layout import check_attention_shapes
from .rotary import apply_rotary_ref, apply_rotary_triton
from .store_kv import store_kv_ref, store_kv_triton

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from .pdl import pdl_kwargs

if triton is not None:
    from .pdl import pdl_wait
    from .pool_layout import attend_kv_tile, attend_pool_tile, load_pool_rows, pool_tile_slots
    from .rotary import rope_rotate

# Kernel pointer arguments read before the PDL wait (tests/test_kernels.py checks that nothing else is touched
# before the wait): step inputs written before the forward and never during it, and the K/V pool, read there only
# at the positions before seq_len - 1, which earlier steps stored (a decode step writes only its own token's slot).
PDL_EARLY_READS = ("SEQ_LENS", "REQ_IDX", "REQ_TO_TOKEN", "KB", "VB")

# Programs per SM the split heuristic aims for. Several waves of short programs beat one wave of long ones: with
# histories of mixed lengths the longest request's program otherwise sets the step time alone (on an H100 with
# 78 requests of 1..6000 tokens, 4 splits per request instead of 1 took a step from 413 to 375 us;
# scripts/gpu_tune.py, docs/PERFORMANCE.md).
DECODE_PROGRAMS_PER_SM = 16
# A split shorter than this costs more in its own merge (partials written, a ticket, the last program reading
# them back) than it saves; requests shorter than this use one split. 512 was tried (one split for the 128-384
# token histories of benchmark (a)): faster in a chain of decode layers at a fixed 384-token history, but
# batch-1 decode of Llama-3.1-8B on an H200 went from 222.2 to 219.8 tok/s, and a 1024-token history at batch 1
# from 13.4 to 18.5 us (docs/PERFORMANCE.md).
DECODE_MIN_SPLIT_TOKENS = 128
# Upper bound on splits: bounds the merge loop and the intermediate buffers.
DECODE_MAX_SPLITS = 64
# Batches up to this size are latency-bound (the kernel sits on each layer's critical path with little to read);
# larger ones are bandwidth-bound. The launch shape differs (decode_launch_shape).
DECODE_SMALL_BATCH = 8
# H100 and H200 SXM; used when the device cannot be asked (the CPU interpreter).
DEFAULT_NUM_SMS = 132


@dataclass(frozen=True)
class NewToken:
    """The decode step's own token of each request, not yet rotated nor stored: ``k/v [B, Hkv, D]`` (strided views
    of a fused qkv projection are fine), its rotary ``cos/sin [B, D]`` (``rotary_cos_sin`` at position
    ``seq_lens - 1``), and the pool slot ``loc [B]`` it goes to, which ``req_to_token`` already maps that position
    to (as for every position). With it, decode attention takes q before rotary."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    loc: torch.Tensor


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    new_token: NewToken | None = None,
) -> torch.Tensor:
    """``q [B, Hq, D]`` -> ``o [B, Hq, D]``; request b attends to positions ``[0, seq_lens[b])``.

    Query heads are grouped per KV head (GQA: head h uses KV head ``h // (Hq // Hkv)``). Computed in float32.
    With ``new_token``: q and ``new_token.k`` are rotated first (``apply_rotary_ref``) and every row's token K/V
    stored at ``new_token.loc`` (``store_kv_ref``).
    """
    if new_token is not None:
        q, k = apply_rotary_ref(q, new_token.k, new_token.cos, new_token.sin)
        store_kv_ref(k_buffer, v_buffer, new_token.loc, k, new_token.v)
    bs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    max_len = int(seq_lens.max())
    slots = req_to_token[req_pool_indices, :max_len].long()
    k = k_buffer[slots].to(torch.float32)  # [B, L, Hkv, D]
    v = v_buffer[slots].to(torch.float32)
    qg = q.view(bs, num_kv_heads, group, head_dim).to(torch.float32)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * sm_scale
    pad = torch.arange(max_len, device=q.device)[None, :] >= seq_lens[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgl,blhd->bhgd", scores.softmax(-1), v)
    return out.reshape(bs, num_q_heads, head_dim).to(q.dtype)


def decode_num_splits(
    batch_size: int,
    num_kv_heads: int,
    num_sms: int = DEFAULT_NUM_SMS,
    max_seq_len: int | None = None,
    min_split_tokens: int = DECODE_MIN_SPLIT_TOKENS,
    max_splits: int = DECODE_MAX_SPLITS,
) -> int:
    """How many KV splits the kernel launches per (request, KV head); at least 1, at most ``max_splits``.

    Aims at ``DECODE_PROGRAMS_PER_SM * num_sms`` programs in all: a small batch gets many splits, a batch that
    already fills the GPU gets one. With ``max_seq_len`` (a host int, when known without a device sync) the count
    is also capped at ``ceil(max_seq_len / min_split_tokens)`` so no program is launched only to exit. Leave it None
    for CUDA graphs: the count then depends on the batch size only.
    """
    if batch_size < 1 or num_kv_heads < 1 or num_sms < 1 or min_split_tokens < 1 or max_splits < 1:
        raise ValueError("batch_size, num_kv_heads, num_sms, min_split_tokens and max_splits must be >= 1")
    splits = math.ceil(DECODE_PROGRAMS_PER_SM * num_sms / (batch_size * num_kv_heads))
    if max_seq_len is not None:
        splits = min(splits, math.ceil(max(max_seq_len, 1) / min_split_tokens))
    return max(1, min(splits, max_splits))


def decode_launch_shape(batch_size: int) -> tuple[int, int]:
    """``(num_warps, num_stages)`` of the decode kernel for a batch of ``batch_size`` rows.

    Measured on an H200 (docs/PERFORMANCE.md), end to end and in the layer chain of scripts/gpu_tune.py:
    - At batch 1 a handful of programs is on each layer's critical path, and 8 warps (more loads in flight per
      program) were faster: Llama-3.1-8B decode 223.4-223.8 tok/s against 222.1-222.9 with 4.
    - At batch 8, 4 warps were faster end to end: 1666-1672 tok/s against 1618-1619 with 8.
    - At batch 32-128, with 1-6000-token histories, the kernel is bandwidth-bound alone. There 4 warps with a 2-deep
      pipeline were 4-6% faster than 3 stages, and 8 warps were 3-5% slower.
    """
    if batch_size == 1:
        return 8, 3
    return (4, 3) if batch_size <= DECODE_SMALL_BATCH else (4, 2)


def num_sms_of(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; ``DEFAULT_NUM_SMS`` for anything else."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


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
    def _decode_kernel(
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
        """The part of a ``_decode_kernel`` program after its PDL wait: one split of request ``b``, KV head
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


def decode_intermediate_buffers(
    batch_size: int, num_q_heads: int, num_splits: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate ``(mid_o [B, Hq, S, D], mid_lse [B, Hq, S])`` float32 for ``decode_attention_triton``."""
    mid_o = torch.empty((batch_size, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((batch_size, num_q_heads, num_splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse


def decode_split_counters(batch_size: int, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 ``[B * Hkv]`` ticket counters for ``decode_attention_triton``; every launch leaves them zeroed,
    so one buffer serves every layer and step (and a CUDA graph)."""
    return torch.zeros(batch_size * num_kv_heads, dtype=torch.int32, device=device)


def decode_attention_triton(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    *,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    split_counters: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    new_token: NewToken | None = None,
    min_split_tokens: int = DECODE_MIN_SPLIT_TOKENS,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    early_tile: bool | None = None,
    one_launch: bool | None = None,
) -> torch.Tensor:
    """Split-KV decode attention with the contract of ``decode_attention_ref``; returns ``o [B, Hq, D]``.

    ``q [B, Hq, D]`` (last dim contiguous), pool buffers ``[num_slots, Hkv, D]``, ``req_to_token [rows, ctx]``
    int32/int64, ``req_pool_indices`` / ``seq_lens [B]`` int64 on the device. ``Hq`` must be a multiple of ``Hkv``.
    Every request needs ``seq_lens[b] >= 1`` for a meaningful output (a row with 0 gets zeros, not NaN).
    ``new_token`` (rotary + store-KV in the same launch): its k and cos/sin in q's dtype, ``loc`` int32/int64.

    Split count: ``num_splits`` fixed by the caller, else ``decode_num_splits(B, Hkv, SMs, max_seq_len)``;
    ``num_warps`` / ``num_stages`` default to ``decode_launch_shape(B)``. ``early_tile``: load each program's
    first history tile into registers before the PDL wait (positions stored by earlier steps: no kernel of the
    step writes them), so only q and the new token are read after it; by default for batches of at most
    ``DECODE_SMALL_BATCH`` rows, the ones where the kernel is on the critical path.

    ``new_token`` is handled in the same launch for batches of at most ``DECODE_SMALL_BATCH`` rows; larger
    batches run the rotary and store-KV kernels first and then attend over the pool (measured faster there:
    docs/PERFORMANCE.md). ``one_launch`` overrides that choice (a tuning switch); the contract is the same
    either way.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use decode_attention_ref")
    bs, n_q, n_kv = check_attention_shapes(q, k_buffer, v_buffer)
    d = q.shape[2]
    if req_pool_indices.shape != (bs,) or seq_lens.shape != (bs,):
        raise ValueError(f"req_pool_indices / seq_lens must be [{bs}]")
    if min_split_tokens < 1:
        raise ValueError(f"min_split_tokens must be >= 1, got {min_split_tokens}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    new_token = _checked_new_token(new_token, q, n_kv)
    small = bs <= DECODE_SMALL_BATCH
    if new_token is not None and not (small if one_launch is None else one_launch):
        q, k = apply_rotary_triton(q, new_token.k, new_token.cos, new_token.sin)
        store_kv_triton(k_buffer, v_buffer, new_token.loc, k, new_token.v)
        new_token = None
    if out is None:
        out = torch.empty((bs, n_q, d), dtype=q.dtype, device=q.device)
    elif out.shape != (bs, n_q, d) or out.stride(-1) != 1:
        raise ValueError(f"out must be [{bs}, {n_q}, {d}] with a contiguous last dim")
    if bs == 0:
        return out
    if num_splits is None:
        num_splits = decode_num_splits(bs, n_kv, num_sms_of(q.device), max_seq_len, min_split_tokens)
    if not 1 <= num_splits <= DECODE_MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {DECODE_MAX_SPLITS}], got {num_splits}")
    if mid_o is None or mid_lse is None:
        mid_o, mid_lse = decode_intermediate_buffers(bs, n_q, num_splits, d, q.device)
    if (
        mid_o.dtype != torch.float32 or mid_lse.dtype != torch.float32
        or mid_o.dim() != 4 or mid_o.shape[0] < bs or mid_o.shape[1] != n_q or mid_o.shape[2] < num_splits
        or mid_o.shape[3] != d or mid_o.stride(-1) != 1
        or mid_lse.dim() != 3 or mid_lse.shape[0] < bs or mid_lse.shape[1] != n_q or mid_lse.shape[2] < num_splits
        or mid_lse.stride(-1) != 1
    ):
        raise ValueError(
            f"mid_o must be float32 [>={bs}, {n_q}, >={num_splits}, {d}] and mid_lse float32 "
            f"[>={bs}, {n_q}, >={num_splits}], got {tuple(mid_o.shape)} {mid_o.dtype} / "
            f"{tuple(mid_lse.shape)} {mid_lse.dtype}"
        )
    full_precision = q.dtype == torch.float32
    if block_n is None:
        # 128-position half-precision tiles measured best on Hopper (scripts/gpu_tune.py); fp32 tiles are twice
        # the bytes, so they stay small enough for the pipeline stages to fit in shared memory.
        block_n = 32 if full_precision else 128
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    group = n_q // n_kv
    block_d = max(16, triton.next_power_of_2(d))
    # tl.dot needs M >= 16: small groups are padded with zero query rows (free: decode is bandwidth-bound).
    block_g = max(16, triton.next_power_of_2(group))
    # fp32 must not silently drop to TF32 (10-bit mantissa) in the matmuls.
    precision = "ieee" if full_precision else "tf32"
    if split_counters is None:
        split_counters = decode_split_counters(bs, n_kv, q.device)
    elif split_counters.dtype != torch.int32 or split_counters.numel() < bs * n_kv:
        raise ValueError(f"split_counters must be int32 with >= {bs * n_kv} elements (decode_split_counters)")
    default_warps, default_stages = decode_launch_shape(bs)
    # Without a new token its pointer arguments are never read: q stands in for them.
    nt = new_token or NewToken(q, q, q[:, 0], q[:, 0], seq_lens)
    _decode_kernel[(bs, n_kv, num_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse, split_counters, out,
        nt.k, nt.v, nt.cos, nt.sin, nt.loc,
        float(sm_scale) * math.log2(math.e),
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0), nt.k.stride(0), nt.k.stride(1), nt.v.stride(0), nt.v.stride(1),
        nt.cos.stride(0), nt.sin.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        group, d, n_kv, num_splits, min_split_tokens,
        BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_S=triton.next_power_of_2(num_splits),
        EARLY_TILE=small if early_tile is None else early_tile,
        NEW_TOKEN=new_token is not None, DOT_PRECISION=precision,
        num_warps=num_warps or default_warps, num_stages=num_stages or default_stages, **pdl_kwargs(q.device),
    )
    return out


def _checked_new_token(new_token: NewToken | None, q: torch.Tensor, n_kv: int) -> NewToken | None:
    """``new_token`` with contiguous last dims, after checking it fits ``q``; ValueError saying what does not."""
    if new_token is None:
        return None
    bs, _, d = q.shape
    k, v, cos, sin, loc = new_token.k, new_token.v, new_token.cos, new_token.sin, new_token.loc
    if k.shape != (bs, n_kv, d) or v.shape != (bs, n_kv, d):
        raise ValueError(f"new_token k/v must be [{bs}, {n_kv}, {d}], got {tuple(k.shape)} / {tuple(v.shape)}")
    if cos.shape != (bs, d) or sin.shape != (bs, d) or loc.shape != (bs,):
        raise ValueError(
            f"new_token cos/sin must be [{bs}, {d}] and loc [{bs}], got {tuple(cos.shape)} / {tuple(sin.shape)} / "
            f"{tuple(loc.shape)}"
        )
    if not k.dtype == cos.dtype == sin.dtype == q.dtype:
        raise ValueError(
            f"new_token k and cos/sin must have q's dtype {q.dtype} (the rotation rounds to it), got {k.dtype} / "
            f"{cos.dtype} / {sin.dtype}"
        )
    if d % 2:
        raise ValueError(f"head_dim must be even for the rotate-half layout, got {d}")
    k, v, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v, cos, sin))
    return NewToken(k, v, cos, sin, loc)


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    new_token: NewToken | None = None,
) -> torch.Tensor:
    """Dispatching decode attention: Triton (split-KV, split count from the batch size) for CUDA tensors when
    triton is installed, the reference elsewhere. Contract as ``decode_attention_ref``."""
    args = (q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, sm_scale)
    if q.is_cuda and triton is not None:
        return decode_attention_triton(*args, new_token=new_token)
    return decode_attention_ref(*args, new_token)
