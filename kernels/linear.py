"""Linear layers with few rows ("skinny" GEMMs): ``y [M, N] = x [M, K] @ W[N, K]^T (+ bias)`` for small M.

At decode with a small batch every projection is memory-bound: the weight matrix is read once for a handful of
rows, so what matters is streaming W at the card's bandwidth and not paying for extra launches around it.
``linear_triton`` gives each program a strip of ``BLOCK_N`` output columns and streams the strip's ``BLOCK_N x K``
weights through a pipelined loop (no split-K reduce pass). The same kernel can compute its input rows on the fly
from what precedes the projection in a decoder layer, which removes one launch and one round trip of the
activations per fused op:

* ``norm_linear``: RMSNorm with the residual add, then the projection (the qkv and gate_up projections);
* ``silu_mul_linear``: SiLU-and-mul of the gate/up rows, then the projection (the down projection).

Each has a ``*_ref`` (the unfused torch ops: the ground truth) and a ``*_triton`` launcher; the undecorated name
dispatches: the fused kernel for CUDA half-precision inputs of at most ``SKINNY_MAX_M`` rows, the separate
kernels (cuBLAS for the matmul) for everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .activation import silu_and_mul, silu_and_mul_ref
from .norm import rms_norm, rms_norm_ref

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

# Up to this many rows the Triton kernel is used (decode batches up to 8, padded CUDA-graph batches included);
# beyond it the matmul starts to be compute-shaped and cuBLAS's tensor-core tiles win.
SKINNY_MAX_M = 8
SKINNY_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch shape of ``linear_triton``: columns per program, K per loop step, warps, pipeline depth."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4


def skinny_config(n: int, k: int) -> SkinnyConfig:
    """The launch shape for an ``N x K`` weight (the same for every M up to ``SKINNY_MAX_M``).

    From the sweeps of scripts/gpu_tune.py on an H100 and an H200 at Llama-3.1-8B shapes (docs/PERFORMANCE.md):
    up to N = 8192 (qkv, o_proj, down) 32-column strips, so even N = 4096 gives ~1 program per SM per wave, with a
    5-deep pipeline; wide matrices (gate_up, LM head) 64-column strips and 3 stages. 256-wide K steps, except
    128 for qkv-like shapes. Each choice was within ~2% of the best shape of its weight on both cards.
    """
    if n > 8192:
        return SkinnyConfig(block_n=64, block_k=256, num_warps=4, num_stages=3)
    return SkinnyConfig(block_n=32, block_k=256 if k >= 8192 or n <= 4096 else 128, num_warps=4, num_stages=5)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T + bias[N]``: ``torch.nn.functional.linear``."""
    return F.linear(x, weight, bias)


# What the skinny kernel computes from its input rows before the matmul (one kernel serves all three).
PLAIN, RMS_NORM, SILU_MUL = 0, 1, 2


def norm_linear_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(rms_norm(x + residual) * norm_weight), x + residual)``; without a residual the second item is x.

    The pre-norm of a decoder sublayer followed by its first projection, with the residual stream it updates.
    """
    h, new_residual = rms_norm_ref(x, norm_weight, eps, residual)
    return linear_ref(h, weight, bias), (x if residual is None else new_residual)


def silu_mul_linear_ref(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(silu(gate) * up)`` with ``gate_up = cat([gate, up], -1)``: the SwiGLU MLP's down projection."""
    return linear_ref(silu_and_mul_ref(gate_up), weight, bias)


if triton is not None:

    @triton.jit
    def _skinny_linear_kernel(
        X, W, BIAS, Y, R, NORM_W, NEW_R,
        M, N, K,
        sx_m, sw_n, sy_m, sr_m, snr_m,
        eps,
        PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        mask_n = offs_n < N
        w_ptr = W + offs_n[:, None].to(tl.int64) * sw_n + tl.arange(0, BLOCK_K)[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        sum_sq = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            # Padded rows (M < BLOCK_M, the matmul's minimum) and the K tail are zeros; they add nothing.
            if EVEN_K:
                mask_x = mask_m[:, None]
                if EVEN_N:
                    w = tl.load(w_ptr)
                else:
                    w = tl.load(w_ptr, mask=mask_n[:, None], other=0.0)
            else:
                mask_x = mask_m[:, None] & (offs_k < K)[None, :]
                w = tl.load(w_ptr, mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
            x = tl.load(X + offs_m[:, None] * sx_m + offs_k[None, :], mask=mask_x, other=0.0)
            if PROLOGUE == 1:  # RMS_NORM of (x + residual), the row scale applied after the loop
                if HAS_RESIDUAL:
                    r = tl.load(R + offs_m[:, None] * sr_m + offs_k[None, :], mask=mask_x, other=0.0)
                    # One rounding of the exact sum to the input dtype, as the reference's add in that dtype.
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
                    if pid == 0:  # one program writes the updated residual stream
                        tl.store(NEW_R + offs_m[:, None] * snr_m + offs_k[None, :], x, mask=mask_x)
                xf = x.to(tl.float32)
                sum_sq += tl.sum(xf * xf, 1)
                nw = tl.load(NORM_W + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                x = (xf * nw[None, :]).to(X.dtype.element_ty)
            elif PROLOGUE == 2:  # SILU_MUL: X is [M, 2K] = cat(gate, up)
                u = tl.load(X + offs_m[:, None] * sx_m + K + offs_k[None, :], mask=mask_x, other=0.0)
                g = x.to(tl.float32)
                # silu rounded to the input dtype, then the product: the two roundings of the reference.
                s = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty).to(tl.float32)
                x = (s * u.to(tl.float32)).to(X.dtype.element_ty)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
            w_ptr += BLOCK_K
        if PROLOGUE == 1:
            # rms_norm(x) * nw @ W^T == rsqrt(mean(x^2) + eps) * ((x * nw) @ W^T): the row scale commutes with
            # the matmul, so one pass over x suffices (the roundings differ from the two-kernel path only at
            # the level of the accumulation order).
            acc = acc * tl.rsqrt(sum_sq / K + eps)[:, None]
        if HAS_BIAS:
            # Added in float32 before the one rounding to the output dtype, as cuBLAS's bias epilogue does.
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptr = Y + offs_m[:, None] * sy_m + offs_n[None, :]
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _rows(t: torch.Tensor, k: int) -> torch.Tensor:
    t2 = t.reshape(-1, k)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: SkinnyConfig | None,
    *,
    prologue: int = PLAIN,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    new_residual: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """Check the shapes shared by every prologue and launch; ``x2`` is ``[M, K]`` (``[M, 2K]`` for SILU_MUL)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use the *_ref functions")
    n, k = weight.shape
    m = x2.shape[0]
    if x2.dtype != weight.dtype:
        raise ValueError(f"input dtype {x2.dtype} differs from the weight's {weight.dtype}")
    if m > 16:
        raise ValueError(f"the skinny linear kernel handles at most 16 rows, got {m}; use linear_ref")
    if weight.stride(-1) != 1:
        raise ValueError("weight must have a contiguous last dim")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    cfg = config or skinny_config(n, k)
    r = residual if residual is not None else x2
    nr = new_residual if new_residual is not None else x2
    _skinny_linear_kernel[(triton.cdiv(n, cfg.block_n),)](
        x2, weight, bias if bias is not None else weight, y, r, norm_weight if norm_weight is not None else weight, nr,
        m, n, k,
        x2.stride(0), weight.stride(0), y.stride(0), r.stride(0), nr.stride(0),
        float(eps),
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0, EVEN_N=n % cfg.block_n == 0,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        BLOCK_M=16, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """Triton launcher with the contract of ``linear_ref`` for ``x [..., K]`` with at most 16 rows in all.

    ``weight [N, K]`` needs a contiguous last dim and x's dtype; ``bias [N]`` optional. float32 is computed in
    IEEE float32 (no TF32). ``config`` overrides ``skinny_config(N, K)`` (the GPU tuning script uses it).
    Returns a new ``[..., N]`` tensor in x's dtype.
    """
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    return _launch(_rows(x, k), weight, bias, config).view(*x.shape[:-1], n)


def norm_linear_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: SkinnyConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with the contract of ``norm_linear_ref``: RMSNorm (with the residual add) fused into the
    prologue of the skinny linear kernel, so the normalised rows never go through memory. ``x [M, K]``,
    ``residual`` like x or None, ``norm_weight [K]`` in x's dtype, at most 16 rows."""
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if norm_weight.shape != (k,) or norm_weight.dtype != x.dtype:
        raise ValueError(f"norm_weight must be [{k}] in {x.dtype}, got {tuple(norm_weight.shape)} {norm_weight.dtype}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    x2 = _rows(x, k)
    r2 = _rows(residual, k) if residual is not None else None
    new_r = torch.empty_like(x2) if residual is not None else None
    y = _launch(
        x2, weight, bias, config,
        prologue=RMS_NORM, residual=r2, norm_weight=norm_weight.contiguous(), new_residual=new_r, eps=eps,
    )
    return y, (new_r if new_r is not None else x)


def silu_mul_linear_triton(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """Triton launcher with the contract of ``silu_mul_linear_ref``: SiLU-and-mul fused into the prologue of the
    skinny linear kernel. ``gate_up [M, 2K]``, ``weight [N, K]``, at most 16 rows."""
    n, k = weight.shape
    if gate_up.dim() != 2 or gate_up.shape[1] != 2 * k:
        raise ValueError(f"gate_up must be [M, {2 * k}], got {tuple(gate_up.shape)}")
    return _launch(_rows(gate_up, 2 * k), weight, bias, config, prologue=SILU_MUL)


def _skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the skinny kernel serves ``x @ weight^T``: CUDA, half precision, at most SKINNY_MAX_M rows."""
    return (
        x.is_cuda
        and triton is not None
        and x.dtype in SKINNY_DTYPES
        and x.dtype == weight.dtype
        and x.numel() <= SKINNY_MAX_M * x.shape[-1]
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatching linear layer: the skinny Triton kernel for CUDA half-precision inputs of at most
    ``SKINNY_MAX_M`` rows (decode at small batch), ``F.linear`` for everything else. Contract as ``linear_ref``."""
    if _skinny(x, weight):
        return linear_triton(x, weight, bias)
    return linear_ref(x, weight, bias)


def norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching pre-norm + projection, contract as ``norm_linear_ref``: one fused kernel where the skinny
    kernel applies (and the norm weight has x's dtype), else the RMSNorm kernel followed by ``linear``."""
    if _skinny(x, weight) and norm_weight.dtype == x.dtype and x.dim() == 2:
        return norm_linear_triton(x, residual, norm_weight, eps, weight, bias)
    h, new_residual = rms_norm(x, norm_weight, eps, residual)
    return linear(h, weight, bias), (x if residual is None else new_residual)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatching SwiGLU down projection, contract as ``silu_mul_linear_ref``: one fused kernel where the skinny
    kernel applies, else the SiLU-and-mul kernel followed by ``linear``."""
    if _skinny(gate_up, weight) and gate_up.dim() == 2:
        return silu_mul_linear_triton(gate_up, weight, bias)
    return linear(silu_and_mul(gate_up), weight, bias)
