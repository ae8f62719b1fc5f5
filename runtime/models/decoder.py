"""`DecoderLM`: the decoder-only causal LM the supported families share (embeddings, decoder layers, final norm,
LM head tied to the embeddings if configured), and how checkpoint tensors map onto its parameters.

A family (one file each: llama.py, qwen2.py, qwen3.py) subclasses it and picks its blocks (`attention_cls`,
`qkv_bias`, or `make_layer` for a different layer); the registry (registry.py) names the class per HF
architecture. Loading is generic (loader.py): `parameter_of` maps a checkpoint name to a parameter and a shard,
and the layer owning that parameter copies its own slice (runtime/layers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import ClassVar

import torch
from torch import nn

from ..layers import (
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    ShardId,
    VocabParallelEmbedding,
)
from ..layers.attention.backend import AttentionBackend
from ..layers.moe.experts import expert_parameter_of
from ..layers.moe.sparse_block import SparseMoeBlock
from ..layers.rope import rope_inv_freq
from ..model_executor.forward_batch import ForwardBatch
from ..model_loader.model_config import ModelConfig
from ..model_loader.quant_config import vocab_qtype
from ..tp.distributed import TPInfo
from .blocks import MLP, Attention, DecoderLayer

PACKED_MODULES: Mapping[str, tuple[str, ShardId]] = MappingProxyType({
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
})
"""Checkpoint module name -> (the fused module holding it, its shard there)."""

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Checkpoint tensors that carry nothing the model needs."""


class Backbone(nn.Module):
    """Embeddings, layers and final norm under HF's parameter names (``model.embed_tokens.weight``, ...)."""

    def __init__(self, cfg: ModelConfig, tp: TPInfo, make_layer: Callable[[int], DecoderLayer]) -> None:
        super().__init__()
        qtype = vocab_qtype(cfg.quantization, "model.embed_tokens")
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, qtype)
        self.layers = nn.ModuleList(make_layer(i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderLM(nn.Module):
    """A Llama-shaped causal LM holding the shard of rank ``tp``.

    Subclasses set ``attention_cls`` (Qwen3's adds q/k norms), ``qkv_bias`` (True: q/k/v biases whatever the
    config says, as Qwen2), ``checkpoint_renames`` or override `make_layer`. A mixture-of-experts config
    (``cfg.moe``) makes its sparse layers' feed-forward a `SparseMoeBlock`.
    """

    attention_cls: ClassVar[type[Attention]] = Attention
    qkv_bias: ClassVar[bool] = False
    packed_modules: ClassVar[Mapping[str, tuple[str, ShardId]]] = PACKED_MODULES
    checkpoint_renames: ClassVar[Mapping[str, str]] = MappingProxyType({})
    """Checkpoint module names the family spells differently from ours (Mixtral's ``.block_sparse_moe.``)."""

    def __init__(self, cfg: ModelConfig, tp: TPInfo = TPInfo()) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.model = Backbone(cfg, tp, self.make_layer)
        # Tied: no module of its own, the embedding table is read as the head (and stored once).
        self.lm_head = None if cfg.tie_word_embeddings else ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, tp, vocab_qtype(cfg.quantization, "lm_head"))
        self.rotary = RotaryEmbedding(rope_inv_freq(cfg.rope, cfg.head_dim), cfg.rope.cos_sin_scale())

    def make_layer(self, layer_id: int) -> DecoderLayer:
        """Decoder layer ``layer_id``: the family's attention and the gated MLP (or the experts)."""
        qkv_bias = self.qkv_bias or self.cfg.attention_bias or self.cfg.qkv_bias
        attention = self.attention_cls(self.cfg, layer_id, self.tp, qkv_bias)
        return DecoderLayer(attention, self.make_mlp(layer_id), self.cfg)

    def make_mlp(self, layer_id: int) -> nn.Module:
        """The feed-forward of layer ``layer_id``: routed experts (+ a shared expert) in a sparse layer of a
        mixture-of-experts model, the dense gated MLP otherwise."""
        moe = self.cfg.moe
        prefix = f"model.layers.{layer_id}.mlp"
        if moe is None or not moe.is_sparse(layer_id):
            return MLP(self.cfg, self.tp, prefix=prefix)
        width = moe.shared_expert_intermediate_size
        shared = MLP(self.cfg, self.tp, width, f"{prefix}.shared_expert") if width else None
        return SparseMoeBlock(self.cfg.hidden_size, moe, self.tp, shared)

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Run the new tokens of ``batch``; return float32 logits ``[B, vocab]`` of each request's last token."""
        h = self.model.embed_tokens(batch.input_ids)
        cos, sin = self.rotary(batch.positions, h.dtype)
        residual = None
        for layer in self.model.layers:
            h, residual = layer(h, residual, cos, sin, batch, attn)
        h, _ = self.model.norm(h, residual)
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.logits(h[batch.logits_indices]).float()

    def parameter_of(self, name: str) -> tuple[str, ShardId] | None:
        """The parameter and shard a checkpoint tensor fills (``...q_proj.weight`` -> ``(...qkv_proj.weight,
        "q")``); None for tensors the model does not take (ignored suffixes, a tied ``lm_head.weight``)."""
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and self.lm_head is None):
            return None
        for theirs, ours in self.checkpoint_renames.items():
            name = name.replace(theirs, ours)
        expert = expert_parameter_of(name)
        if expert is not None:
            return expert
        module, _, leaf = name.rpartition(".")
        parent, _, child = module.rpartition(".")
        if child not in self.packed_modules:
            return name, None
        fused, shard_id = self.packed_modules[child]
        return f"{parent}.{fused}.{leaf}", shard_id
