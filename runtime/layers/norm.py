"""RMSNorm, optionally fused with the residual add of the sublayer before it."""

from __future__ import annotations

import torch
from torch import nn

from xinf_sglang.kernels import rms_norm
from xinf_sglang.kernels.cpu.elementwise import DTYPES as CPU_DTYPES, rms_norm_rows

from .weights import empty_parameter


class RMSNorm(nn.Module):
    """``norm(x + residual) * weight``; replicated on every tensor-parallel rank (no ``weight_loader`` of its own)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = empty_parameter(dim)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(norm(x + residual) * weight, x + residual)``; the second item is None without a residual."""
        if x.is_cpu and x.dim() == 2 and x.dtype is self.weight.dtype and x.dtype in CPU_DTYPES:
            # the decode step's rows: straight to the C++ kernel (the dispatcher's checks were ~3% of a batch-1 step)
            return rms_norm_rows(x, self.weight, self.eps, residual)
        return rms_norm(x, self.weight, self.eps, residual)
