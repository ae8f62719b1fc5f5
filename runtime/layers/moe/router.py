"""Top-k routing: which experts each token goes to, and with what weight.

Scores are float32 whatever the model's dtype (as HF computes them): softmax over the experts (Qwen-MoE, Mixtral,
DeepSeek-V2) or an independent sigmoid per expert (DeepSeek-V3). The choice is greedy top-k, or grouped: the experts
are split into ``n_group`` groups, only the best ``topk_group`` groups are eligible (a group's score is its best
expert for V2's ``group_limited_greedy``, the sum of its best two, with the correction bias, for V3's
``noaux_tc``), then top-k among those. V3 chooses with ``score + e_score_correction_bias`` but weights with the bare
score. The weights are renormalised to sum to 1 when ``norm_topk_prob`` says so (Mixtral always), then multiplied
by ``routed_scaling_factor``.
"""

from __future__ import annotations

import torch

from xinf_sglang.kernels.moe import fused_topk, fused_topk_ref

from ...model_loader.moe_config import MoEConfig


def select_experts(
    router_logits: torch.Tensor, moe: MoEConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights float32 [T, top_k], expert ids int32 [T, top_k])`` from the router's ``[T, num_experts]`` logits:
    greedy routing in one launch on CUDA (``kernels.moe.fused_topk``), grouped routing through its torch
    reference with the groups' mask."""
    args = (moe.top_k, moe.scoring, correction_bias, moe.norm_topk_prob, moe.routed_scaling_factor)
    if moe.topk_method == "greedy":
        return fused_topk(router_logits, *args)
    return fused_topk_ref(router_logits, *args, keep=lambda choice: _keep_best_groups(choice, moe))


def _keep_best_groups(choice: torch.Tensor, moe: MoEConfig) -> torch.Tensor:
    """``choice`` with the experts outside the ``topk_group`` best groups masked out (0 for V2's method, as HF
    masks its non-negative softmax scores; -inf for V3's, whose biased scores may be negative)."""
    grouped = choice.view(-1, moe.n_group, moe.num_experts // moe.n_group)
    if moe.topk_method == "group_limited_greedy":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = torch.topk(group_scores, moe.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    fill = 0.0 if moe.topk_method == "group_limited_greedy" else float("-inf")
    return grouped.masked_fill(~keep[..., None], fill).view_as(choice)
