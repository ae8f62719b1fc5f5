"""Rotary position embedding tables (the rotation itself runs behind the attention-backend seam, fused with
storing K/V on the GPU and CPU backends)."""

from __future__ import annotations

import torch
from torch import nn

from xinf_sglang.kernels import rotary_cos_sin


class RotaryEmbedding(nn.Module):
    """cos/sin rows of a batch's positions from fixed inverse frequencies (rope scaling variants only change
    ``inv_freq``, see ``runtime.models.rope``). The same on every tensor-parallel rank."""

    def __init__(self, inv_freq: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = scale  # YaRN's attention factor on cos and sin (1 otherwise)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[T, head_dim]`` in ``dtype`` (computed in float32 like HF)."""
        if self.scale == 1.0:
            return rotary_cos_sin(self.inv_freq, positions, dtype)
        cos, sin = rotary_cos_sin(self.inv_freq, positions, torch.float32)
        return (cos * self.scale).to(dtype), (sin * self.scale).to(dtype)
