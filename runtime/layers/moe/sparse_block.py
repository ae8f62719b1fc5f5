"""`SparseMoeBlock`: the feed-forward sublayer of a sparse layer: router, routed experts and, for Qwen2-MoE, a
shared expert every token goes through, scaled by ``sigmoid(shared_expert_gate(h))``.

Under tensor parallelism the routed experts and the shared expert each produce a partial sum (their down
projections are row-parallel); the block adds them and all-reduces once. The router and the shared expert's gate
are replicated, so every rank routes the same way.
"""

from __future__ import annotations

import torch
from torch import nn
from xinf_sglang.kernels.moe import moe_workspace_bytes

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


def workspace_bytes_per_token(moe: MoEConfig, hidden_size: int, dtype: torch.dtype, tp: TPInfo) -> int:
    """Temporaries one prefill token costs in a sparse layer (for the memory plan): the fused experts' workspace
    (gate/up outputs of its ``top_k`` copies, float32 partial sums, routing buffers; kernels/moe) at this rank's
    expert width, plus the shared expert's gate/up output."""
    tokens = 4096  # the routing buffers' padding is per expert, not per token: amortise it over a large chunk
    width = tp.shard(moe.intermediate_size, "moe intermediate size").size
    routed = moe_workspace_bytes(tokens, moe.top_k, width, hidden_size, dtype, moe.num_experts)
    shared = 3 * moe.shared_expert_intermediate_size * torch.empty((), dtype=dtype).element_size()
    return -(-routed // tokens) + shared


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(total, active per token)`` parameters of ``model`` (this rank's shard): a token reads ``top_k`` of the
    ``num_experts`` routed experts of each sparse layer and every other weight."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(
        round((b.experts.w13_weight.numel() + b.experts.w2_weight.numel()) * (1 - b.moe.active_fraction()))
        for b in model.modules() if isinstance(b, SparseMoeBlock)
    )
    return total, total - inactive
