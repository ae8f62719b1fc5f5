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
    def rope_rotate(X, offs_d, mask, half, c, s, DT: tl.constexpr):
        """``x * cos + rotate_half(x) * sin`` of the head vectors at ``X + offs_d`` (``X`` a pointer or a column of
        row pointers, ``offs_d`` the full head dim; ``c/s`` float32 cos/sin over the full head dim, broadcastable),
        returned in ``DT``. Each product and the sum are rounded to ``DT`` in the reference's order, so half
        precision matches ``apply_rotary_ref`` bit for bit. Shared by the rotary kernel and the decode kernel
        (which rotates the new token's q and k itself)."""
        lower = offs_d < half
        # rotate_half: the lower half takes -x[d + half], the upper half x[d - half].
        partner = tl.where(lower, offs_d + half, offs_d - half)
        x = tl.load(X + offs_d, mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(X + partner, mask=mask, other=0.0).to(tl.float32)
        xp = tl.where(lower, -xp, xp)
        return ((x * c).to(DT).to(tl.float32) + (xp * s).to(DT).to(tl.float32)).to(DT)

    @triton.jit
    def _rotary_kernel(
        Q, K, COS, SIN, QO, KO,
        sq_t, sq_h, sk_t, sk_h, sc_t, ss_t, sqo_t, sqo_h, sko_t, sko_h,
        n_q_heads, n_kv_heads, head_dim,
        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        pdl_wait(USE_PDL)
        tok = tl.program_id(0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < head_dim
        half = head_dim // 2
        # Both halves of cos/sin are loaded (not assumed equal) so any per-token table matches the reference.
        c = tl.load(COS + tok * sc_t + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        s = tl.load(SIN + tok * ss_t + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        hq = tl.arange(0, BLOCK_HQ)[:, None]
        mask_q = (hq < n_q_heads) & mask_d[None, :]
        q = rope_rotate(Q + tok * sq_t + hq * sq_h, offs_d[None, :], mask_q, half, c, s, QO.dtype.element_ty)
        tl.store(QO + tok * sqo_t + hq * sqo_h + offs_d[None, :], q, mask=mask_q)
        hk = tl.arange(0, BLOCK_HK)[:, None]
        mask_k = (hk < n_kv_heads) & mask_d[None, :]
        k = rope_rotate(K + tok * sk_t + hk * sk_h, offs_d[None, :], mask_k, half, c, s, KO.dtype.element_ty)
        tl.store(KO + tok * sko_t + hk * sko_h + offs_d[None, :], k, mask=mask_k)


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
        _rotary_kernel[(t,)](
            q, k, cos, sin, q_out, k_out,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            n_q, n_kv, d,
            BLOCK_HQ=triton.next_power_of_2(n_q), BLOCK_HK=triton.next_power_of_2(n_kv),
            BLOCK_D=triton.next_power_of_2(d), num_warps=4, **pdl_kwargs(q.device),
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
