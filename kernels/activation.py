"""SiLU-and-mul, the gate of the SwiGLU MLP.

``silu_and_mul_ref`` is the ground truth (and the CPU path); ``silu_and_mul_triton`` reads gate and up once and
writes the product, instead of the three passes (silu, mul, the chunk copies) of the eager version.
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


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up = cat([gate, up], -1)``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


if triton is not None:

    @triton.jit
    def silu_mul(g, u, DT: tl.constexpr):
        """``silu(g) * u`` of float32 ``g`` / ``u`` (values of dtype ``DT``) in ``DT``, rounded twice like the
        reference in that dtype: the silu, then the product. Shared by every kernel that ends in SwiGLU."""
        s = (g / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
        return (s * u).to(DT)

    @triton.jit
    def _silu_and_mul_kernel(GU, OUT, stride_gu, stride_o, d, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * stride_gu + d + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * stride_o + cols, silu_mul(g, u, OUT.dtype.element_ty), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton launcher with the contract of ``silu_and_mul_ref``: ``gate_up [..., 2H]`` -> new ``[..., H]``."""
    if triton is None:
        raise RuntimeError("triton is not installed; use silu_and_mul_ref")
    two_h = gate_up.shape[-1]
    if two_h % 2:
        raise ValueError(f"last dim of gate_up must be even, got {two_h}")
    d = two_h // 2
    gu = gate_up.reshape(-1, two_h)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    m = gu.shape[0]
    out = torch.empty((m, d), dtype=gate_up.dtype, device=gate_up.device)
    if m > 0 and d > 0:
        block = min(triton.next_power_of_2(d), 1024)
        _silu_and_mul_kernel[(m, triton.cdiv(d, block))](
            gu, out, gu.stride(0), out.stride(0), d, BLOCK=block, num_warps=4, **pdl_kwargs(gate_up.device)
        )
    return out.view(*gate_up.shape[:-1], d)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Dispatching SiLU-and-mul: Triton for CUDA tensors (when triton is installed), the C++ kernel for
    float32, bfloat16 and float16 CPU rows (``cpu_elementwise``), the reference elsewhere.

    ``gate_up [..., 2H]`` (gate first, then up) -> ``silu(gate) * up`` ``[..., H]`` in the input dtype.
    """
    if gate_up.is_cuda and triton is not None:
        return silu_and_mul_triton(gate_up)
    if cpu_elementwise.supports_silu_and_mul(gate_up):
        return cpu_elementwise.silu_and_mul_cpu_unchecked(gate_up)
    return silu_and_mul_ref(gate_up)
