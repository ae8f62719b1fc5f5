"""The blocks every supported family is built from: attention, the gated MLP and the pre-norm decoder layer.

Families differ in small hooks (`Attention.normalize_qk`, biases), chosen in their own files (llama.py, qwen2.py,
qwen3.py). Attention goes through the backend seam, so the same blocks run on the torch reference, the CPU
kernel and the Triton kernels.
"""

from __future__ import annotations

import torch
from torch import nn


from ..layers.attention.backend import AttentionBackend
from ..tp.distributed import TPInfo
from ..model_executor.forward_batch import ForwardBatch
from ..layers import MergedColumnParallelLinear, QKVParallelLinear, RMSNorm, RowParallelLinear
from ..model_loader.model_config import ModelConfig
from ..model_loader.quant_config import linear_method


class Attention(nn.Module):
    """Self-attention over the KV pool: fused q/k/v projection, rotary + store-KV + attention behind the backend,
    output projection. Holds this rank's heads."""

    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPInfo, qkv_bias: bool) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        prefix = f"model.layers.{layer_id}.self_attn"
        qkv = linear_method(cfg.quantization, prefix, ("q_proj", "k_proj", "v_proj"))
        o = linear_method(cfg.quantization, f"{prefix}.o_proj")
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, qkv_bias, tp,
                                          qkv, f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.attention_bias, tp, o,
                                        f"{prefix}.o_proj")

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the family does to ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` before rotary: nothing here."""
        return q, k

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, attn: AttentionBackend
    ) -> torch.Tensor:
        n = h.shape[0]
        q, k, v = self.qkv_proj(h).split(self.qkv_proj.output_sizes, dim=-1)
        q = q.reshape(n, self.qkv_proj.num_heads, self.head_dim)
        k = k.reshape(n, self.qkv_proj.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.qkv_proj.num_kv_heads, self.head_dim)
        q, k = self.normalize_qk(q, k)
        o = attn.forward(q, k, v, cos, sin, self.layer_id, batch)  # rotary and store-KV happen behind the seam
        return self.o_proj(o.reshape(n, -1))


class MLP(nn.Module):
    """``down(silu(gate(h)) * up(h))`` with gate and up in one GEMM, ``intermediate_size`` wide (the config's
    unless given: a shared expert has its own). ``prefix``: its checkpoint module name (``model.layers.3.mlp``),
    which picks the linears' quantization method."""

    def __init__(self, cfg: ModelConfig, tp: TPInfo, intermediate_size: int | None = None, prefix: str = "") -> None:
        super().__init__()
        size = intermediate_size or cfg.intermediate_size
        gate_up = linear_method(cfg.quantization, prefix, ("gate_proj", "up_proj"))
        down = linear_method(cfg.quantization, f"{prefix}.down_proj")
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], cfg.mlp_bias, tp, gate_up,
                                                       f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, cfg.mlp_bias, tp, down, f"{prefix}.down_proj")

    def partial(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output (before the all-reduce), for callers that sum several first."""
        return self.down_proj.partial(self.gate_up_proj.silu_mul(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_mul(h))


class DecoderLayer(nn.Module):
    """Pre-norm residual layer: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``."""

    def __init__(self, self_attn: Attention, mlp: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        batch: ForwardBatch, attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp output, residual)``: the residual add of each sublayer is fused into the next norm,
        ``(norm(h + residual), h + residual)``, so the caller adds the last one in the final norm."""
        if residual is None:
            residual = h
            h, _ = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, cos, sin, batch, attn)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual
