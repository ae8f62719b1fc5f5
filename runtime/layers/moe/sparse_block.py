"""`SparseMoeBlock`: the feed-forward sublayer of a sparse layer: router, routed experts and, for Qwen2-MoE, a
shared expert every token goes through, scaled by ``sigmoid(shared_expert_gate(h))``.

Under tensor parallelism the routed experts and the shared expert each produce a partial sum (their down
projections are row-parallel); the block adds them and all-reduces once. The router and the shared expert's gate
are replicated, so every rank routes the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from ...model_loader.moe_config import MoEConfig
from ...tp.distributed import TPInfo, all_reduce
from ..linear import LinearBase
from .experts import FusedExperts
from .router import select_experts


class SparseMoeBlock(nn.Module):
    """Routed experts (+ an optional gated shared expert) under HF's names: ``gate``, ``experts``,
    ``shared_expert``, ``shared_expert_gate``."""

    def __init__(self, hidden_size: int, moe: MoEConfig, tp: TPInfo, shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.moe = moe
        self.gate = LinearBase(hidden_size, moe.num_experts, False, tp)  # the router, replicated
        self.experts = FusedExperts(moe.num_experts, hidden_size, moe.intermediate_size, tp)
        self.shared_expert = shared_expert
        self.shared_expert_gate = LinearBase(hidden_size, 1, False, tp) if shared_expert is not None else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(h), self.moe.top_k, self.moe.norm_topk_prob)
        out = self.experts.partial(h, weights, ids)
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(h))
            out = out + gate * self.shared_expert.partial(h)
        return all_reduce(out, self.tp)
