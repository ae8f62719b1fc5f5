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
    def load_pool_tile(REQ_TO_TOKEN, row, s_rt, KB, VB, kvh, sk_s, sk_h, sv_s, sv_h, offs_n, mask_n, offs_d, mask_d):
        """K and V ``[N, D]`` of KV head ``kvh`` at pool positions ``offs_n`` of request table row ``row`` (zeros where
        ``mask_n`` is false)."""
        slots = tl.load(REQ_TO_TOKEN + row * s_rt + offs_n, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(KB + slots[:, None] * sk_s + kvh * sk_h + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VB + slots[:, None] * sv_s + kvh * sv_h + offs_d[None, :], mask=kv_mask, other=0.0)
        return k, v

    @triton.jit
    def attend_kv_tile(q, m, l, acc, k, v, visible, qk_scale, DOT_PRECISION: tl.constexpr):
        """One tile of the online softmax: ``k/v [N, D]`` of the tile's positions.

        ``q [M, D]`` (scaled by ``qk_scale``, base 2), running max ``m [M]``, sum ``l [M]`` and output ``acc [M, D]``
        in float32; ``visible [M, N]`` (or broadcastable) marks the (query, position) pairs that count, and must be
        false where the tile has no position. Returns the updated ``(m, l, acc)``. The caller guarantees ``m`` is
        finite after its first tile (that tile has a visible position in every row), so later fully masked rows add
        exp2(-inf) = 0.
        """
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return m_new, l, acc

    @triton.jit
    def attend_pool_tile(
        q, m, l, acc, REQ_TO_TOKEN, row, s_rt, KB, VB, kvh, sk_s, sk_h, sv_s, sv_h,
        offs_n, mask_n, visible, offs_d, mask_d, qk_scale, DOT_PRECISION: tl.constexpr,
    ):
        """``attend_kv_tile`` over the pool positions ``offs_n`` of request table row ``row`` (``load_pool_tile``);
        ``visible`` must be false where ``mask_n`` is."""
        k, v = load_pool_tile(REQ_TO_TOKEN, row, s_rt, KB, VB, kvh, sk_s, sk_h, sv_s, sv_h, offs_n, mask_n, offs_d, mask_d)
        return attend_kv_tile(q, m, l, acc, k, v, visible, qk_scale, DOT_PRECISION)


def check_attention_shapes(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> tuple[int, int, int]:
    """Return ``(N, Hq, Hkv)`` after checking the shared layout; raise ``ValueError`` saying what does not fit."""
    n, n_q, d = q.shape
    n_kv = k_buffer.shape[1]
    if n_kv < 1 or n_q % n_kv:
        raise ValueError(f"query heads ({n_q}) must be a multiple of KV heads ({n_kv})")
    if k_buffer.shape[2] != d or v_buffer.shape != k_buffer.shape:
        raise ValueError(f"k/v buffers {tuple(k_buffer.shape)} / {tuple(v_buffer.shape)} do not match q head_dim {d}")
    return n, n_q, n_kv
