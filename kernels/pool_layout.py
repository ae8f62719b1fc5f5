"""The token-pool layout the attention kernels share, the one check of it that their launchers run, and the
step both kernels repeat over it: attend one tile of pool positions with an online softmax.

``q [N, Hq, D]``; ``k_buffer`` and ``v_buffer`` ``[num_slots, Hkv, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA).
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the references run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

if triton is not None:

    @triton.jit
    def pool_tile_slots(REQ_TO_TOKEN, row, s_rt, offs_n, mask_n):
        """The pool slots of positions ``offs_n`` of request table row ``row`` (0 where ``mask_n`` is false)."""
        return tl.load(REQ_TO_TOKEN + row * s_rt + offs_n, mask=mask_n, other=0).to(tl.int64)

    @triton.jit
    def load_pool_rows(BUF, slots, kvh, s_s, s_h, mask_n, offs_d, mask_d):
        """K or V ``[N, D]`` of KV head ``kvh`` at ``slots`` (zeros where ``mask_n`` is false)."""
        mask = mask_n[:, None] & mask_d[None, :]
        return tl.load(BUF + slots[:, None] * s_s + kvh * s_h + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _scores_step(q, m, l, k, visible, qk_scale, DOT_PRECISION: tl.constexpr):
        """The first half of an online-softmax tile: new running max and sum, the tile's probabilities ``p`` and
        the factor ``alpha`` that rescales what was accumulated before."""
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        return m_new, l * alpha + tl.sum(p, 1), p, alpha

    @triton.jit
    def attend_kv_tile(q, m, l, acc, k, v, visible, qk_scale, DOT_PRECISION: tl.constexpr):
        """One tile of the online softmax: ``k/v [N, D]`` of the tile's positions.

        ``q [M, D]`` (scaled by ``qk_scale``, base 2), running max ``m [M]``, sum ``l [M]`` and output ``acc [M, D]``
        in float32; ``visible [M, N]`` (or broadcastable) marks the (query, position) pairs that count, and must be
        false where the tile has no position. Returns the updated ``(m, l, acc)``. The caller guarantees ``m`` is
        finite after its first tile (that tile has a visible position in every row), so later fully masked rows add
        exp2(-inf) = 0.
        """
        m, l, p, alpha = _scores_step(q, m, l, k, visible, qk_scale, DOT_PRECISION)
        return m, l, acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)

    @triton.jit
    def attend_pool_tile(
        q, m, l, acc, REQ_TO_TOKEN, row, s_rt, KB, VB, kvh, sk_s, sk_h, sv_s, sv_h,
        offs_n, mask_n, visible, offs_d, mask_d, qk_scale, DOT_PRECISION: tl.constexpr,
    ):
        """``attend_kv_tile`` over the pool positions ``offs_n`` of request table row ``row``; ``visible`` must be
        false where ``mask_n`` is. V is loaded after the scores, as the pipelined loops were tuned with."""
        slots = pool_tile_slots(REQ_TO_TOKEN, row, s_rt, offs_n, mask_n)
        k = load_pool_rows(KB, slots, kvh, sk_s, sk_h, mask_n, offs_d, mask_d)
        m, l, p, alpha = _scores_step(q, m, l, k, visible, qk_scale, DOT_PRECISION)
        v = load_pool_rows(VB, slots, kvh, sv_s, sv_h, mask_n, offs_d, mask_d)
        return m, l, acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)


def check_attention_shapes(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> tuple[int, int, int]:
    """Return ``(N, Hq, Hkv)`` after checking the shared layout; raise ``ValueError`` saying what does not fit."""
    n, n_q, d = q.shape
    n_kv = k_buffer.shape[1]
    if n_kv < 1 or n_q % n_kv:
        raise ValueError(f"query heads ({n_q}) must be a multiple of KV heads ({n_kv})")
    if k_buffer.shape[2] != d or v_buffer.shape != k_buffer.shape:
        raise ValueError(f"k/v buffers {tuple(k_buffer.shape)} / {tuple(v_buffer.shape)} do not match q head_dim {d}")
    return n, n_q, n_kv
