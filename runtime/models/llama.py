"""Llama and Mistral: the shared blocks as they are (q/k/v/o biases only with ``attention_bias``, embeddings
untied unless the config ties them)."""

from __future__ import annotations

from .decoder import DecoderLM


class LlamaForCausalLM(DecoderLM):
    """Llama 2 / 3 / 3.1 (rope scaling variants come from the config, runtime/layers/rope.py)."""


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama's layout; its sliding window bounds the context length (runtime/engine/engine.py)."""
