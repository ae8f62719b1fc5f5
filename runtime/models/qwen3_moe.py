"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B, Qwen3-Coder-480B): Qwen3's attention (q/k norms), experts with top-k
softmax routing (renormalised when ``norm_topk_prob``), no shared expert; ``decoder_sparse_step`` /
``mlp_only_layers`` pick the layers that stay dense (runtime/model_loader/moe_config.py)."""

from __future__ import annotations

from .qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Qwen3-MoE: the decoder builds the sparse layers from ``cfg.moe``."""
