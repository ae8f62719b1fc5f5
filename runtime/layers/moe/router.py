"""Top-k routing of the softmax-scored families (Qwen2-MoE, Qwen3-MoE, Mixtral): each token goes to the ``top_k``
experts of highest router probability, weighted by those probabilities, renormalised to sum to 1 when the family
says so. Scores are float32 whatever the model's dtype (as HF computes them), so bf16 logits that tie after
rounding still rank the way the reference does."""

from __future__ import annotations

import torch


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in float32, the ``top_k`` largest, optionally renormalised."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
