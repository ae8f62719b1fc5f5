"""DeepSeek-V2 / V2-Lite / V3 / R1 and Moonlight: multi-head latent attention (MLA) and DeepSeek-MoE.

Attention runs with absorbed weights (DeepSeek-V2 paper, appendix): the up-projection ``kv_b_proj`` is split per
head into ``W_UK [nope, kv_lora]`` and ``W_UV [v, kv_lora]``; the query's no-rope part is multiplied into the latent
space (``q_nope @ W_UK``), attention runs against the cached rows ``[c_kv | k_pe]`` as multi-query attention with
one KV head (the latent also serves as the value), and the output is brought back with ``W_UV`` before
``o_proj``. The cache therefore holds ``kv_lora_rank + qk_rope_head_dim`` elements per token and layer
(`MLAKVPool`), and prefill and decode share one code path. Rotary touches only the ``qk_rope_head_dim`` part; DeepSeek
pairs its dimensions as ``(0, 1), (2, 3), ...``: both q and k are de-interleaved before the rotate-half rotation,
which changes no dot product, so the cache keeps the de-interleaved key.

Tensor parallelism splits the heads (``q_proj`` / ``q_b_proj`` / ``kv_b_proj`` by head, ``o_proj`` by input); the
latent projection ``kv_a_proj_with_mqa`` and the cache are replicated on every rank. The MoE layers are
`SparseMoeBlock` with DeepSeek's routing (runtime/layers/moe/router.py) and ungated shared experts; the first
``first_k_dense_replace`` layers are dense. V3's multi-token-prediction layers (past ``num_hidden_layers``) are
not loaded: they serve speculative decoding, which sglite does not do.
"""

from __future__ import annotations

import re
from types import MappingProxyType

import torch
from torch import nn
from xinf_sglang.kernels.mla_prep import mla_prep

from ..layers import (
    LinearBase,
    MergedColumnParallelLinear,
    RMSNorm,
    RowParallelLinear,
    ShardId,
)
from ..layers.attention.backend import AttentionBackend
from ..layers.quantization.base import AS_STORED
from ..model_executor.forward_batch import ForwardBatch
from ..model_loader.model_config import ModelConfig
from ..tp.distributed import TPInfo
from .blocks import DecoderLayer
from .decoder import PACKED_MODULES, DecoderLM

LATENT_NORM_EPS = 1e-6  # HF's DeepSeek norms of the q and kv latents use the RMSNorm default, not rms_norm_eps
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class MLAttention(nn.Module):
    """Multi-head latent attention of one layer, this rank's heads."""

    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPInfo) -> None:
        super().__init__()
        mla = cfg.mla
        self.mla, self.layer_id = mla, layer_id
        self.num_heads = tp.shard(cfg.num_heads, "num_attention_heads").size
        q_out = [cfg.num_heads * mla.qk_head_dim]
        if mla.q_lora_rank is None:
            self.q_proj = MergedColumnParallelLinear(cfg.hidden_size, q_out, False, tp)
        else:
            self.q_a_proj = LinearBase(cfg.hidden_size, mla.q_lora_rank, cfg.attention_bias, tp)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = MergedColumnParallelLinear(mla.q_lora_rank, q_out, False, tp)
        self.kv_a_proj_with_mqa = LinearBase(cfg.hidden_size, mla.cache_dim, cfg.attention_bias, tp)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        kv_out = [cfg.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim)]
        self.kv_b_proj = MergedColumnParallelLinear(mla.kv_lora_rank, kv_out, False, tp, AS_STORED)  # read as is
        self.o_proj = RowParallelLinear(cfg.num_heads * mla.v_head_dim, cfg.hidden_size, cfg.attention_bias, tp)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, attn: AttentionBackend
    ) -> torch.Tensor:
        mla, n, heads = self.mla, h.shape[0], self.num_heads
        q = self.q_proj(h) if mla.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(h))[0])
        q_nope, q_pe = q.view(n, heads, mla.qk_head_dim).split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], -1)
        w_uk, w_uv = self._absorbed()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [n, heads, kv_lora]
        # [q_latent | rope(q_pe)] and the cache rows [norm(latent) | rope(k_pe)]: one launch on CUDA
        q, cache_rows = mla_prep(q_latent, q_pe, self.kv_a_proj_with_mqa(h), cos, sin, self.kv_a_layernorm.weight,
                                 self.kv_a_layernorm.eps, mla.rope_interleave)
        o = attn.forward_mla(q, cache_rows, self.layer_id, batch)
        o = torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [n, heads, v_head_dim]
        return self.o_proj(o.reshape(n, heads * mla.v_head_dim))

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK [heads, nope, kv_lora]`` and ``W_UV [heads, v, kv_lora]``: views of ``kv_b_proj``'s weight."""
        mla = self.mla
        w = self.kv_b_proj.weight.view(self.num_heads, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank)
        return w[:, : mla.qk_nope_head_dim], w[:, mla.qk_nope_head_dim :]


class DeepseekV2ForCausalLM(DecoderLM):
    """DeepSeek-V2 / V2-Lite (softmax routing, greedy or group-limited); V3 and R1 subclass it."""

    packed_modules = MappingProxyType({
        **{k: v for k, v in PACKED_MODULES.items() if k in ("gate_proj", "up_proj")},
        # single projections split by head: a merged linear of one part (shard 0)
        "q_proj": ("q_proj", 0), "q_b_proj": ("q_b_proj", 0), "kv_b_proj": ("kv_b_proj", 0),
    })
    checkpoint_renames = MappingProxyType({
        ".shared_experts.": ".shared_expert.",
        ".gate.e_score_correction_bias": ".e_score_correction_bias",
    })

    def make_layer(self, layer_id: int) -> DecoderLayer:
        return DecoderLayer(MLAttention(self.cfg, layer_id, self.tp), self.make_mlp(layer_id), self.cfg)

    def parameter_of(self, name: str) -> tuple[str, ShardId] | None:
        """As `DecoderLM.parameter_of`; tensors of layers past ``num_hidden_layers`` (V3's multi-token prediction
        module) are skipped."""
        layer = _LAYER.match(name)
        if layer is not None and int(layer.group(1)) >= self.cfg.num_layers:
            return None
        return super().parameter_of(name)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 / R1 / V3.1 and Moonlight: sigmoid routing with a correction bias over expert groups."""
