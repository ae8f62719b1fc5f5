"""The MLA step's query and new cache rows assembled in one launch (DeepSeek, absorbed weights; see attention/mla.py).

Between the projections and the attention an MLA layer builds two tensors: the query in latent space,
``q = [q_latent | rope(q_pe)]`` per head, and the new tokens' cache rows, ``[rms_norm(latent) | rope(k_pe)]``. As
torch ops that is two copies that de-interleave the rope dims (V2's pairs are ``(0, 1), (2, 3), ...``), a rotary
launch, the latent norm and two concatenations per layer, each a few microseconds at decode: ``mla_prep`` does
all of it in one launch. Program ``(t, h)`` for ``h < H`` writes head ``h`` of token ``t``'s query; program
``(t, H)`` its cache row. The rope dims are read through the de-interleaving permutation (position ``j`` of the
rotate-half layout is dim ``2j`` for ``j < R/2``, ``2(j - R/2) + 1`` after), so nothing is copied first.
Numerics equal the torch sequence's, rounding for rounding (``mla_prep_ref``): rotary as
``kernels.rotary.rope_rotate``, the norm as ``rms_norm_ref``.
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from .norm import rms_norm_ref
from .pdl import pdl_kwargs
from .rotary import apply_rotary_ref

__all__ = ["mla_prep", "mla_prep_ref", "mla_prep_triton"]


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """``(0, 1), (2, 3), ...`` pairs -> rotate-half's ``(0, R/2), (1, R/2 + 1), ...``."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def mla_prep_ref(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                 interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [T, H, Dv + R], rows [T, 1, Dv + R])`` from ``q_latent [T, H, Dv]`` (the absorbed query), ``q_pe [T, H,
    R]`` (its rope part, not rotated), ``kv_a [T, Dv + R]`` (``kv_a_proj_with_mqa``'s output: the latent, then
    the rope key), ``cos/sin [T, R]``, the latent norm's ``norm_weight [Dv]`` and ``eps``; ``interleave``: the
    rope dims pair up as ``(0, 1), (2, 3), ...`` (re-laid out as rotate-half's pairs before rotating)."""
    dv = q_latent.shape[-1]
    latent, k_pe = kv_a.split([dv, kv_a.shape[-1] - dv], dim=-1)
    k_pe = k_pe[:, None, :]
    if interleave:
        q_pe, k_pe = _deinterleave(q_pe), _deinterleave(k_pe)
    q_pe, k_pe = apply_rotary_ref(q_pe, k_pe, cos, sin)
    rows = torch.cat([rms_norm_ref(latent, norm_weight, eps)[0][:, None, :], k_pe], dim=-1)
    return torch.cat([q_latent, q_pe], dim=-1), rows


if triton is not None:
    from .pdl import pdl_wait

    @triton.jit
    def _rope(X, c, s, R: tl.constexpr, INTERLEAVE: tl.constexpr, DT: tl.constexpr):
        """The ``R`` rope dims at ``X`` rotated (rotate-half layout; ``INTERLEAVE``: read through the
        de-interleaving permutation), each product and the sum rounded to ``DT`` as ``rope_rotate`` does."""
        HALF: tl.constexpr = R // 2
        j = tl.arange(0, R)
        lower = j < HALF
        partner = tl.where(lower, j + HALF, j - HALF)
        if INTERLEAVE:
            src = tl.where(lower, 2 * j, 2 * (j - HALF) + 1)
            src_p = tl.where(lower, 2 * j + 1, 2 * (j - HALF))  # partner's source: perm(j + R/2), perm(j - R/2)
        else:
            src, src_p = j, partner
        x = tl.load(X + src).to(tl.float32)
        xp = tl.load(X + src_p).to(tl.float32)
        xp = tl.where(lower, -xp, xp)
        return ((x * c).to(DT).to(tl.float32) + (xp * s).to(DT).to(tl.float32)).to(DT)

    @triton.jit
    def _mla_prep_kernel(QL, QPE, KVA, COS, SIN, W, QO, ROWS, H, sql_t, sql_h, sqp_t, sqp_h, skv_t, scs_t, eps,
                         DV: tl.constexpr, R: tl.constexpr, INTERLEAVE: tl.constexpr, BLOCK_DV: tl.constexpr,
                         USE_PDL: tl.constexpr):
        # Program (t, h): head h of token t's query (h < H) or token t's cache row (h == H).
        pdl_wait(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK_DV)
        d_ok = d < DV
        j = tl.arange(0, R)
        c = tl.load(COS + t * scs_t + j).to(tl.float32)
        s = tl.load(SIN + t * scs_t + j).to(tl.float32)
        if h < H:
            dst = QO + (t * H + h) * (DV + R)
            tl.store(dst + d, tl.load(QL + t * sql_t + h * sql_h + d, mask=d_ok), mask=d_ok)
            rot = _rope(QPE + t * sqp_t + h * sqp_h, c, s, R, INTERLEAVE, QO.dtype.element_ty)
            tl.store(dst + DV + j, rot)
        else:
            dst = ROWS + t * (DV + R)
            x = tl.load(KVA + t * skv_t + d, mask=d_ok, other=0.0)
            v = x.to(tl.float32)
            v = v * tl.rsqrt(tl.sum(v * v, axis=0) / DV + eps)
            v = v.to(x.dtype).to(tl.float32)  # the cast before the weight multiply, as rms_norm_ref
            w = tl.load(W + d, mask=d_ok, other=0.0).to(tl.float32)
            tl.store(dst + d, (w * v).to(ROWS.dtype.element_ty), mask=d_ok)
            tl.store(dst + DV + j, _rope(KVA + t * skv_t + DV, c, s, R, INTERLEAVE, ROWS.dtype.element_ty))


def mla_prep_triton(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with the contract of ``mla_prep_ref``: any token / head strides with a unit last stride
    (``q_latent`` is typically a transposed bmm output, ``q_pe`` a slice of the q projection); one launch."""
    if triton is None:
        raise RuntimeError("triton is not installed; use mla_prep_ref")
    t, heads, dv = q_latent.shape
    r = q_pe.shape[-1]
    if q_pe.shape[:2] != (t, heads) or kv_a.shape != (t, dv + r) or cos.shape != (t, r) or sin.shape != (t, r):
        raise ValueError(f"q_latent {tuple(q_latent.shape)}, q_pe {tuple(q_pe.shape)}, kv_a {tuple(kv_a.shape)}, "
                         f"cos {tuple(cos.shape)} do not fit [T, H, Dv], [T, H, R], [T, Dv + R], [T, R]")
    if r & (r - 1) or norm_weight.shape != (dv,) or q_latent.dtype != q_pe.dtype or cos.dtype != q_pe.dtype:
        raise ValueError(f"the rope dim {r} must be a power of two, the norm weight [{dv}], q and cos one dtype")
    q_latent, q_pe, kv_a, cos, sin = (x if x.stride(-1) == 1 else x.contiguous()
                                      for x in (q_latent, q_pe, kv_a, cos, sin))
    if sin.stride(0) != cos.stride(0):  # one row stride for both
        cos, sin = cos.contiguous(), sin.contiguous()
    q = torch.empty((t, heads, dv + r), dtype=q_latent.dtype, device=q_latent.device)
    rows = torch.empty((t, 1, dv + r), dtype=torch.promote_types(norm_weight.dtype, kv_a.dtype), device=kv_a.device)
    if t > 0:
        _mla_prep_kernel[(t, heads + 1)](
            q_latent, q_pe, kv_a, cos, sin, norm_weight.contiguous(), q, rows, heads, q_latent.stride(0),
            q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), kv_a.stride(0), cos.stride(0), float(eps),
            DV=dv, R=r, INTERLEAVE=interleave, BLOCK_DV=triton.next_power_of_2(dv), num_warps=4,
            **pdl_kwargs(q.device),
        )
    return q, rows


def mla_prep(q_latent: torch.Tensor, q_pe: torch.Tensor, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             norm_weight: torch.Tensor, eps: float, interleave: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching MLA query / cache-row assembly: Triton for CUDA tensors when triton is installed, the torch
    reference elsewhere (the CPU's path). Contract as ``mla_prep_ref``."""
    if q_latent.is_cuda and triton is not None:
        return mla_prep_triton(q_latent, q_pe, kv_a, cos, sin, norm_weight, eps, interleave)
    return mla_prep_ref(q_latent, q_pe, kv_a, cos, sin, norm_weight, eps, interleave)
