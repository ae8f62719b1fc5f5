"""Rotary position embedding (neox / "rotate half" layout, as Llama and Qwen use).

``apply_rotary_ref`` is the ground truth (and the CPU path); ``apply_rotary_triton`` rotates q and k of one token
in one program (one launch for both). RoPE scaling variants such as Llama 3's only change ``inv_freq``, which is
computed on the host, so the kernel just consumes the per-token cos/sin rows.
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from .pdl import pdl_kwargs

if triton is not None:
    from .pdl import pdl_wait


def rotary_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[T, head_dim]`` for ``positions`` (computed in float32 like HF, then cast)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` by the per-token ``cos/sin [T, D]``."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


if triton is not None:

    @triton.jit
    def _rotate_heads(
        X, OUT, tok, sx_t, sx_h, so_t, so_h, n_heads, c1, c2, s1, s2, half,
        BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        """Rotate all heads of one token: ``out = x * cos + rotate_half(x) * sin`` on a [heads, half] tile."""
        heads = tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (heads < n_heads) & (cols < half)
        x_ptr = X + tok * sx_t + heads * sx_h + cols
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
        dt = OUT.dtype.element_ty
        # Each product and the sum rounded to the output dtype, in the reference's order.
        o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        o_ptr = OUT + tok * so_t + heads * so_h + cols
        tl.store(o_ptr, o1.to(dt), mask=mask)
        tl.store(o_ptr + half, o2.to(dt), mask=mask)

    @triton.jit
    def _rotary_kernel(
        Q, K, COS, SIN, QO, KO,
        sq_t, sq_h, sk_t, sk_h, sc_t, ss_t, sqo_t, sqo_h, sko_t, sko_h,
        n_q_heads, n_kv_heads, half,
        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        pdl_wait(USE_PDL)
        tok = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_HALF)[None, :]
        cmask = cols < half
        # Both halves of cos/sin are loaded (not assumed equal) so any per-token table matches the reference.
        c1 = tl.load(COS + tok * sc_t + cols, mask=cmask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + tok * sc_t + half + cols, mask=cmask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + tok * ss_t + cols, mask=cmask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + tok * ss_t + half + cols, mask=cmask, other=0.0).to(tl.float32)
        _rotate_heads(Q, QO, tok, sq_t, sq_h, sqo_t, sqo_h, n_q_heads, c1, c2, s1, s2, half, BLOCK_HQ, BLOCK_HALF)
        _rotate_heads(K, KO, tok, sk_t, sk_h, sko_t, sko_h, n_kv_heads, c1, c2, s1, s2, half, BLOCK_HK, BLOCK_HALF)


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with the contract of ``apply_rotary_ref``; one launch, one program per token.

    ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` may be strided views (e.g. slices of a fused qkv projection) as long as
    the last dim is contiguous; ``cos/sin [T, D]``. Returns new tensors of dtype ``promote(q.dtype, cos.dtype)``;
    the inputs are not modified.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use apply_rotary_ref")
    t, n_q, d = q.shape
    if k.dim() != 3 or k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"k must be [T={t}, Hkv, D={d}], got {tuple(k.shape)}")
    if cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"cos/sin must be [T={t}, D={d}], got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if d % 2:
        raise ValueError(f"head_dim must be even for the rotate-half layout, got {d}")
    q, k, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, cos, sin))
    n_kv = k.shape[1]
    q_out = torch.empty((t, n_q, d), dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)
    k_out = torch.empty((t, n_kv, d), dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
    if t > 0:
        half = d // 2
        _rotary_kernel[(t,)](
            q, k, cos, sin, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            n_q, n_kv, half,
            BLOCK_HQ=triton.next_power_of_2(n_q), BLOCK_HK=triton.next_power_of_2(n_kv),
            BLOCK_HALF=triton.next_power_of_2(half), num_warps=4, **pdl_kwargs(q.device),
        )
    return q_out, k_out


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching rotary: Triton for CUDA tensors (when triton is installed), the reference elsewhere.

    ``q [T, Hq, D]``, ``k [T, Hkv, D]``, ``cos/sin [T, D]`` (from ``rotary_cos_sin``) -> rotated ``(q, k)``.
    """
    if q.is_cuda and triton is not None:
        return apply_rotary_triton(q, k, cos, sin)
    return apply_rotary_ref(q, k, cos, sin)
