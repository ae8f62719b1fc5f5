"""RMSNorm, optionally fused with the residual add that precedes it.

``rms_norm_ref`` is the ground truth (and the CPU path); ``rms_norm_triton`` is one Triton program per row that
does the residual add, the float32 reduction and the weight multiply in a single pass over memory.
``qk_rms_norm`` is Qwen3's per-head norm of q and k in one launch, read straight from the fused qkv output.
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from .cpu import elementwise as cpu_elementwise
from .pdl import pdl_kwargs

if triton is not None:
    from .pdl import pdl_wait


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(norm(x + residual) * weight, x + residual)``; the second item is None without a residual.

    Same arithmetic as HF's LlamaRMSNorm: the sum and the normalisation in float32, the cast back to the
    input dtype before the weight is applied (that order matters for bit-parity in half precision).
    """
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype), residual


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        X, R, W, OUT, NEW_R,
        stride_x, stride_r, stride_o, stride_nr,
        n_cols, eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        pdl_wait(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            # The reference adds in the input dtype: one rounding of the exact sum, which an fp32 add + cast gives.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(NEW_R + row * stride_nr + cols, x, mask=mask)
        h = x.to(tl.float32)
        var = tl.sum(h * h, axis=0) / n_cols
        h = h * tl.rsqrt(var + eps)
        # Cast to the input dtype before the weight multiply, as the reference (and HF) do.
        h = h.to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * stride_o + cols, (w * h).to(OUT.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View ``t [..., N]`` as ``[M, N]`` with a unit stride on the last dim (copies only when it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton launcher with the contract of ``rms_norm_ref``.

    ``x [..., N]`` (any float dtype), ``weight [N]``, optional ``residual`` shaped like ``x``. Returns new tensors
    ``(out, new_residual)``: ``out`` has dtype ``promote(weight.dtype, x.dtype)`` like the reference, ``new_residual``
    (``x + residual`` in x's dtype) is None without a residual. Inputs are not modified.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use rms_norm_ref")
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight must have shape ({n},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    x2 = _rows(x)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        r2 = _rows(residual)
        new_r = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:  # never read: HAS_RESIDUAL=False compiles the residual branch away
        r2, new_r = x2, out
    if m > 0:
        block = triton.next_power_of_2(n)
        # One row per program; wide rows get more warps so each thread keeps a few elements in registers.
        num_warps = min(max(block // 512, 1), 16)
        _rms_norm_kernel[(m,)](
            x2, r2, weight.contiguous(), out, new_r,
            x2.stride(0), r2.stride(0), out.stride(0), new_r.stride(0),
            n, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps, **pdl_kwargs(x.device),
        )
    out = out.view(x.shape)
    return out, (new_r.view(x.shape) if residual is not None else None)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatching RMSNorm: Triton for CUDA tensors (when triton is installed), the fused C++ kernel for
    float32, bfloat16 and float16 CPU rows (``cpu_elementwise``), the reference elsewhere.

    Same contract as ``rms_norm_ref``: returns ``(norm(x + residual) * weight, x + residual or None)``.
    """
    if x.is_cuda and triton is not None:
        return rms_norm_triton(x, weight, eps, residual)
    if cpu_elementwise.supports_rms_norm(x, weight, residual):
        return cpu_elementwise.rms_norm_cpu_unchecked(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


if triton is not None:

    @triton.jit
    def _qk_norm_kernel(Q, K, WQ, WK, QO, KO, q_heads, k_heads, sq_t, sq_h, sk_t, sk_h, eps, D: tl.constexpr,
                        BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        # Program (token, head): heads [0, q_heads) are q's, the rest k's; outputs are contiguous [T, heads, D].
        pdl_wait(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        if head < q_heads:
            src, w_ptr, dst = Q + t * sq_t + head * sq_h, WQ, QO + (t * q_heads + head) * D
        else:
            kh = head - q_heads
            src, w_ptr, dst = K + t * sk_t + kh * sk_h, WK, KO + (t * k_heads + kh) * D
        x = tl.load(src + cols, mask=mask, other=0.0)
        h = x.to(tl.float32)
        h = h * tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
        h = h.to(x.dtype).to(tl.float32)  # the cast before the weight multiply, as rms_norm_ref
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + cols, (w * h).to(QO.dtype.element_ty), mask=mask)


def qk_rms_norm(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(q, q_weight)[0], rms_norm(k, k_weight)[0])`` for ``q [T, Hq, D]`` and ``k [T, Hk, D]`` (views of
    a fused qkv output). CUDA: ``qk_rms_norm_triton``, one launch for both and no copy of the strided views
    (Qwen3's q/k norms were two copies and two norms per layer); otherwise two ``rms_norm`` calls."""
    if q.is_cuda and triton is not None:
        return qk_rms_norm_triton(q, k, q_weight, k_weight, eps)
    return rms_norm(q, q_weight, eps)[0], rms_norm(k, k_weight, eps)[0]


def qk_rms_norm_triton(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of ``qk_rms_norm``: ``q [T, Hq, D]`` and ``k [T, Hk, D]`` with any token / head strides
    (copied only if the last one is not 1), one program per (token, head); new contiguous outputs, each equal
    to ``rms_norm_ref``'s first output."""
    if triton is None:
        raise RuntimeError("triton is not installed; use rms_norm_ref")
    d = q.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[-1] != d:
        raise ValueError(f"q must be [T, Hq, D] and k [T, Hk, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q_weight.shape != (d,) or k_weight.shape != (d,) or q_weight.dtype != k_weight.dtype or q.dtype != k.dtype:
        raise ValueError(f"q_weight and k_weight must be [{d}] of one dtype, q and k of one dtype")
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    dtype = torch.promote_types(q_weight.dtype, q.dtype)
    q_out = torch.empty(q.shape, dtype=dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=dtype, device=k.device)
    if q.shape[0] > 0:
        _qk_norm_kernel[(q.shape[0], q.shape[1] + k.shape[1])](
            q, k, q_weight.contiguous(), k_weight.contiguous(), q_out, k_out, q.shape[1], k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), float(eps), D=d, BLOCK=triton.next_power_of_2(d),
            num_warps=1, **pdl_kwargs(q.device),
        )
    return q_out, k_out
