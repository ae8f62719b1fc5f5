"""`SparseMoeBlock`: the feed-forward sublayer of a sparse layer: router, routed experts and a shared expert every
token goes through (Qwen2-MoE scales it by ``sigmoid(shared_expert_gate(h))``; DeepSeek's shared experts, one MLP
``n_shared_experts`` times as wide, are not gated).

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
from ..quantization.base import FLOAT32, UNQUANTIZED
from ..weights import empty_parameter
from .experts import FusedExperts
from .router import select_experts


class SparseMoeBlock(nn.Module):
    """Routed experts (+ an optional gated shared expert) under HF's names: ``gate``, ``experts``,
    ``shared_expert``, ``shared_expert_gate``."""

    def __init__(self, hidden_size: int, moe: MoEConfig, tp: TPInfo, shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.moe = moe
        # The router, replicated; DeepSeek's is float32 (stored so: a step casts only h).
        self.gate = LinearBase(hidden_size, moe.num_experts, False, tp, FLOAT32 if moe.router_float32 else UNQUANTIZED)
        # DeepSeek-V3's learned bias on the scores that choose the experts (not on their weights)
        self.e_score_correction_bias = empty_parameter(moe.num_experts) if moe.topk_method == "noaux_tc" else None
        self.experts = FusedExperts(moe.num_experts, hidden_size, moe.intermediate_size, tp)
        self.shared_expert = shared_expert
        gated = shared_expert is not None and moe.shared_expert_gated
        self.shared_expert_gate = LinearBase(hidden_size, 1, False, tp) if gated else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.gate(h)
        weights, ids = select_experts(logits, self.moe, self.e_score_correction_bias)
        out = self.experts.partial(h, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert.partial(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            out = out + shared
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
