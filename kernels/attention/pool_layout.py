"""The token-pool layout the attention kernels share, the one check of it that their launchers run, the
step both kernels repeat over it (attend one tile of pool positions with an online softmax), and the launch
choices both launchers make the same way (output buffer, tile sizes, matmul precision, score scale).

``q [N, Hq, D]``; ``k_buffer`` and ``v_buffer`` ``[num_slots, Hkv, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA).
"""

from __future__ import annotations

import math

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


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a contiguous last dim: kernels index rows by stride but read along the last dim directly (a copy
    only when it is not contiguous; strided views of a fused projection pass as they are)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_output(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """The output buffer ``[N, Hq, D]`` of ``q``'s shape and dtype: ``out`` after checking it, or a new one."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be [{', '.join(map(str, q.shape))}] with a contiguous last dim")
    return out


def check_tile_sizes(**tiles: int) -> None:
    """Raise ValueError unless every tile size (by argument name) is a power of two >= 16 (``tl.dot``'s minimum)."""
    if any(x < 16 or x & (x - 1) for x in tiles.values()):
        names, values = " / ".join(tiles), " / ".join(map(str, tiles.values()))
        raise ValueError(f"{names} must be powers of two >= 16, got {values}")


def head_block(head_dim: int) -> int:
    """``BLOCK_D``: the head dim rounded up to a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """``DOT_PRECISION`` of the kernels' matmuls: fp32 must not silently drop to TF32 (10-bit mantissa)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def log2_scale(sm_scale: float) -> float:
    """``qk_scale``: ``sm_scale * log2(e)``, so scores live in base 2 and the softmax uses exp2."""
    return float(sm_scale) * math.log2(math.e)
