"""Rotary position embedding tables (the rotation itself runs behind the attention-backend seam, fused with
storing K/V on the GPU and CPU backends)."""

from __future__ import annotations

import torch
from torch import nn

from xinf_sglang.kernels import rotary_cos_sin


class RotaryEmbedding(nn.Module):
    """cos/sin rows of a batch's positions from fixed inverse frequencies (rope scaling variants only change
    ``inv_freq``, see ``runtime.models.rope``). The same on every tensor-parallel rank."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[T, head_dim]`` in ``dtype`` (computed in float32 like HF)."""
        return rotary_cos_sin(self.inv_freq, positions, dtype)
