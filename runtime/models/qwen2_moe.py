"""Qwen1.5-MoE / Qwen2-MoE (Qwen2-57B-A14B): Llama's attention with q/k/v biases (``qkv_bias``), routed experts
(top-k softmax, renormalised only with ``norm_topk_prob``) plus a shared expert of its own width scaled by a
per-token ``sigmoid(shared_expert_gate(h))``."""

from __future__ import annotations

from .decoder import DecoderLM


class Qwen2MoeForCausalLM(DecoderLM):
    """Qwen2-MoE: the shared expert comes with ``shared_expert_intermediate_size`` in ``cfg.moe``."""
