"""Qwen2 (and Qwen2.5): Llama's blocks with q/k/v biases always (the output projection has none)."""

from __future__ import annotations

from .decoder import DecoderLM


class Qwen2ForCausalLM(DecoderLM):
    """Qwen2: q/k/v biases whatever ``attention_bias`` says; small models tie their embeddings."""

    qkv_bias = True
