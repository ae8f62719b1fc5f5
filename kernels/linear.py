"""Linear layers with few rows ("skinny" GEMMs): ``y [M, N] = x [M, K] @ W[N, K]^T (+ bias)`` for small M.

At decode with a small batch every projection is memory-bound: the weight matrix is read once for a handful of
rows, so the only thing that matters is streaming W at the card's bandwidth. For some of these shapes cuBLAS
picks split-K tiles plus a separate reduce launch (o_proj and down of an 8B model). ``linear_triton`` gives each
program a strip of ``BLOCK_N`` output columns and streams the strip's ``BLOCK_N x K`` weights through a pipelined
loop, with no reduction pass. Measured per weight against cuBLAS in docs/perf-history.md: up to 12% faster on
an H100, within +-3% on an H200 except o_proj (15% faster).

``linear_ref`` (``F.linear``) is the ground truth and the path for every other case; ``linear`` dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from .cpu import linear as cpu_linear
from .cpu import linear16 as cpu_linear16
from .activation import silu_and_mul
from .pdl import pdl_kwargs

if triton is not None:
    from .activation import silu_mul
    from .pdl import pdl_wait, prefetch_l2

# Up to this many rows the Triton kernel is used (decode batches up to 8, padded CUDA-graph batches included);
# beyond it the matmul starts to be compute-shaped and cuBLAS's tensor-core tiles win.
SKINNY_MAX_M = 8
SKINNY_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch shape of ``linear_triton``: columns per program, K per loop step, warps, pipeline depth, and how
    many K steps of its weight strip a program pulls into L2 before it waits for the previous kernel (PDL only,
    kernels/pdl.py). Two steps measured best in a chain of whole decode layers on an H200 (`sglite bench
    kernels --sweep chain`): 2% faster than none; prefetching 8-32 MB per launch was slower than none
    (docs/perf-history.md).
    Also measured and dropped there: tensor-descriptor (TMA) weight loads, and an L2 evict-first hint on the
    weight stream (triton 3.6 does not put it on the asynchronous copies)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    prefetch_steps: int = 2


def skinny_config(n: int, k: int) -> SkinnyConfig:
    """The launch shape for an ``N x K`` weight (the same for every M up to ``SKINNY_MAX_M``).

    From the launch-shape sweeps (now ``sglite bench kernels --sweep linear``) on an H100 and an H200 at Llama-3.1-8B
    shapes (docs/perf-history.md):
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


if triton is not None:

    @triton.jit
    def _skinny_linear_kernel(
        X, W, BIAS, Y,
        M, N, K,
        sx_m, sw_n, sy_m,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PREFETCH_STEPS: tl.constexpr, LINE: tl.constexpr, GLU: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        # GLU: N is the gate half's width (W holds 2N rows, [gate | up]); a program streams its gate strip and the
        # matching up strip and writes Y [M, N] = silu(gate) * up (the SwiGLU of a gate/up projection).
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        # The weights are never written: while the previous kernel finishes, warm L2 with the first K steps of
        # this program's strip (one address per cache line, clamped into the matrix).
        lines_n = tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * sw_n
        for step in tl.static_range(PREFETCH_STEPS):
            lines_k = tl.minimum(step * BLOCK_K + tl.arange(0, BLOCK_K // LINE) * LINE, K - 1)
            prefetch_l2(W + lines_n + lines_k[None, :], USE_PDL)
        pdl_wait(USE_PDL)
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        x_ptr = X + offs_m[:, None] * sx_m + offs_k[None, :]
        w_ptr = W + offs_n[:, None].to(tl.int64) * sw_n + offs_k[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # GLU only (dead code otherwise)
        for k0 in range(0, K, BLOCK_K):
            # Padded x rows (M < BLOCK_M, the matmul's minimum) are zeros; their outputs are never stored.
            if EVEN_K:
                x = tl.load(x_ptr, mask=mask_m[:, None], other=0.0)
                if EVEN_N:
                    w = tl.load(w_ptr)
                else:
                    w = tl.load(w_ptr, mask=mask_n[:, None], other=0.0)
            else:
                mask_k = (k0 + offs_k) < K
                x = tl.load(x_ptr, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = tl.load(w_ptr, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            x = x.to(W.dtype.element_ty)  # a float32 weight (DeepSeek's router) takes half-precision x exactly
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
            if GLU:
                if EVEN_K:
                    w_up = tl.load(w_ptr + N * sw_n, mask=mask_n[:, None], other=0.0)
                else:
                    w_up = tl.load(w_ptr + N * sw_n, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=DOT_PRECISION)
            x_ptr += BLOCK_K
            w_ptr += BLOCK_K
        if HAS_BIAS:
            # Added in float32 before the one rounding to the output dtype, as cuBLAS's bias epilogue does.
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if GLU:
                acc_up += tl.load(BIAS + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptr = Y + offs_m[:, None] * sy_m + offs_n[None, :]
        if GLU:  # gate and up rounded to the dtype first, as the unfused path stores them
            dt = Y.dtype.element_ty
            out = silu_mul(acc.to(dt).to(tl.float32), acc_up.to(dt).to(tl.float32), dt)
        else:
            out = acc.to(Y.dtype.element_ty)
        tl.store(y_ptr, out, mask=mask_m[:, None] & mask_n[None, :])


def _check_skinny(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool) -> None:
    """ValueError unless ``linear_triton`` takes the call (its docstring)."""
    n, k = weight.shape
    mixed = weight.dtype == torch.float32 and x.dtype in SKINNY_DTYPES
    if x.shape[-1] != k or (x.dtype != weight.dtype and not mixed):
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not fit weight {tuple(weight.shape)} {weight.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if x.numel() > 16 * k:
        raise ValueError(f"linear_triton handles at most 16 rows, got {x.numel() // k}; use linear_ref")
    if weight.stride(-1) != 1:
        raise ValueError("weight must have a contiguous last dim")
    if silu_mul and n % 2:
        raise ValueError(f"silu_mul needs an even number of output features ([gate | up]), got {n}")


def linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: SkinnyConfig | None = None,
    silu_mul: bool = False,
) -> torch.Tensor:
    """Triton launcher with the contract of ``linear_ref`` for ``x [..., K]`` with at most 16 rows in all.

    ``weight [N, K]`` and ``x`` need a contiguous last dim and the same dtype, or a float32 weight with half-precision
    ``x`` (cast exactly in the kernel; the result is float32: DeepSeek's router); ``bias [N]`` optional. float32 is
    computed in IEEE float32 (no TF32). ``config`` overrides ``skinny_config(N, K)`` (the GPU tuning script uses
    it). Returns a new ``[..., N]`` tensor in x's dtype; ``silu_mul`` (a ``[gate | up]`` weight): ``[..., N / 2]``,
    SiLU-and-mul of the halves in the kernel's epilogue, each program streaming a gate strip and its up strip.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use linear_ref")
    _check_skinny(x, weight, bias, silu_mul)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_n = n // 2 if silu_mul else n
    y = torch.empty((m, out_n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if m > 0:
        cfg = config or skinny_config(n, k)
        block_n = max(16, cfg.block_n // 2) if silu_mul else cfg.block_n  # two strips a program: half as wide
        _skinny_linear_kernel[(triton.cdiv(out_n, block_n),)](
            x2, weight, bias if bias is not None else weight, y,
            m, out_n, k,
            x2.stride(0), weight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0, EVEN_N=out_n % block_n == 0,
            DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
            BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=cfg.block_k,
            PREFETCH_STEPS=min(cfg.prefetch_steps, triton.cdiv(k, cfg.block_k)),
            LINE=max(1, min(cfg.block_k, 128 // weight.element_size())), GLU=silu_mul,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_kwargs(x.device),
        )
    return y.view(*x.shape[:-1], out_n)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           silu_mul: bool = False) -> torch.Tensor:
    """Dispatching linear layer: the skinny Triton kernel for CUDA half-precision inputs of at most
    ``SKINNY_MAX_M`` rows (decode at small batch), the threaded CPU kernels for CPU inputs of at most 16 rows
    (``cpu_linear``: float32; ``cpu_linear16``: bfloat16 / float16), ``F.linear`` for everything else. Contract as
    ``linear_ref``; ``silu_mul`` (a ``[gate | up]`` weight): SiLU-and-mul of the result's halves, ``[..., N / 2]``,
    in the skinny kernel's epilogue where it runs. A float32 weight with a half-precision ``x`` (DeepSeek's router)
    computes in float32: x is cast first (``linear_triton`` also takes that pair, casting in the kernel, but is
    slower there than cuBLAS)."""
    # A float32 weight (DeepSeek's router) goes to cuBLAS after one cast of x: the skinny kernel's float32 path
    # (an IEEE tl.dot padded to 16 rows) took ~70 us a call on an H100 at [64, 2048], cuBLAS a few (2026-12-07).
    if x.is_cuda and triton is not None and x.dtype in SKINNY_DTYPES and weight.dtype == x.dtype and (
        x.numel() <= SKINNY_MAX_M * x.shape[-1]
    ):
        return linear_triton(x, weight, bias, silu_mul=silu_mul)
    if weight.dtype == torch.float32 and x.dtype != torch.float32:
        x = x.float()
    if x.is_cuda:
        y = linear_ref(x, weight, bias)
    elif cpu_linear.supports(x, weight, bias):
        y = cpu_linear.linear_cpu(x, weight, bias)
    elif cpu_linear16.supports(x, weight, bias):
        y = cpu_linear16.linear16_checked(x, weight, bias)
    else:
        y = linear_ref(x, weight, bias)
    return silu_and_mul(y) if silu_mul else y
