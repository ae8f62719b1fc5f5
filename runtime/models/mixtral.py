"""Mixtral (8x7B, 8x22B): Llama/Mistral attention and, in every layer, experts under ``block_sparse_moe`` with
top-2 routing renormalised over the chosen two; experts stored as ``w1`` (gate), ``w3`` (up), ``w2`` (down)."""

from __future__ import annotations

from types import MappingProxyType

from .llama import MistralForCausalLM


class MixtralForCausalLM(MistralForCausalLM):
    """Mixtral: its checkpoint's ``block_sparse_moe`` is our ``mlp``."""

    checkpoint_renames = MappingProxyType({".block_sparse_moe.": ".mlp."})
