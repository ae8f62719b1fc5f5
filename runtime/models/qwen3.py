"""Qwen3: Llama's blocks with a per-head RMSNorm on q and k before rotary, no biases unless configured."""

from __future__ import annotations

import torch
from xinf_sglang.kernels.norm import qk_rms_norm

from ..layers import RMSNorm
from ..model_loader.model_config import ModelConfig
from ..tp.distributed import TPInfo
from .blocks import Attention
from .decoder import DecoderLM


class Qwen3Attention(Attention):
    """Attention whose q and k heads are RMS-normalised (one ``head_dim`` weight each, shared by all heads)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPInfo, qkv_bias: bool) -> None:
        super().__init__(cfg, layer_id, tp, qkv_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One launch for both on CUDA, reading the strided views of the qkv output (no copies).
        return qk_rms_norm(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)


class Qwen3ForCausalLM(DecoderLM):
    """Qwen3 (dense)."""

    attention_cls = Qwen3Attention
