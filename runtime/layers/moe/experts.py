"""`FusedExperts`: the routed experts of one sparse layer as two stacked weights, and how checkpoint tensors of
every layout the Hub ships fill them.

Weights: ``w13_weight [E, 2 * I, H]`` (rows ``[0, I)`` the gate projection, ``[I, 2I)`` the up projection) and
``w2_weight [E, H, I]``, where ``I`` is this rank's slice of the expert width: tensor parallelism splits every
expert along its intermediate dimension exactly like a dense MLP (column-parallel gate/up, row-parallel down),
so the layer's output is a partial sum that the caller all-reduces once, together with any shared expert.

Checkpoint layouts (`expert_parameter_of` names the shard each fills):
- per expert, as HF checkpoints store them: ``experts.{e}.gate_proj|up_proj|down_proj.weight`` (Qwen) and
  ``experts.{e}.w1|w3|w2.weight`` (Mixtral) -> shards ``gate.e`` / ``up.e`` / ``down.e``;
- stacked 3-D, as GGUF stores them (the GGUF reader's names): ``experts.gate_proj|up_proj|down_proj`` -> every
  expert's shard of that projection;
- fused, transformers 5's in-memory layout: ``experts.gate_up_proj [E, 2I, H]`` and ``experts.down_proj``.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from xinf_sglang.kernels import fused_experts

from ...tp.distributed import TPInfo
from ..weights import ShardId, empty_parameter, load_slice

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_STACKED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj)$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down",
         "gate_up_proj": "gate_up"}


def expert_parameter_of(name: str) -> tuple[str, ShardId] | None:
    """The `FusedExperts` parameter and shard a checkpoint tensor fills; None when ``name`` is not an expert's."""
    match = _PER_EXPERT.match(name) or _STACKED.match(name)
    if match is None:
        return None
    part = _PART[match["proj"]]
    param = "w2_weight" if part == "down" else "w13_weight"
    shard = f"{part}.{match['e']}" if "e" in match.groupdict() else part
    return f"{match['prefix']}.{param}", shard


class FusedExperts(nn.Module):
    """``num_experts`` gated MLPs (SiLU) of width ``intermediate_size``; holds this rank's slice of each."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPInfo) -> None:
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.full_intermediate = intermediate_size
        self.shard = tp.shard(intermediate_size, f"moe intermediate size {intermediate_size}")
        width = self.shard.size
        self.w13_weight = empty_parameter(num_experts, 2 * width, hidden_size)
        self.w2_weight = empty_parameter(num_experts, hidden_size, width)
        experts = range(num_experts)
        self.param_shard_ids = {
            "w13_weight": tuple(f"{p}.{e}" for p in ("gate", "up") for e in experts),
            "w2_weight": tuple(f"down.{e}" for e in experts),
        }

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> list[str]:
        """Copy this rank's slice of one checkpoint tensor (any layout above; ``loaded`` may be a `LazyTensor`,
        read only where the slice lies); return the shards it filled."""
        part, _, expert = str(shard_id).partition(".")
        if expert:  # one expert's [out, in]: its matrix of the stack
            dst, experts, axis = param.data[int(expert)], [int(expert)], 0
        elif loaded.shape[0] != self.num_experts:
            raise ValueError(f"has {loaded.shape[0]} experts, the model expects {self.num_experts}")
        else:  # every expert's, stacked [E, out, in]
            dst, experts, axis = param.data, list(range(self.num_experts)), 1
        width, start, full = self.shard.size, self.shard.start, self.full_intermediate
        if part == "down":  # [.., H, I]: this rank's columns
            load_slice(dst, loaded, axis + 1, start, full)
        elif part == "gate_up":  # [E, 2I, H]: the gate half, then the up half
            load_slice(dst.narrow(axis, 0, width), loaded.narrow(axis, start, width), axis, 0, width)
            load_slice(dst.narrow(axis, width, width), loaded.narrow(axis, full + start, width), axis, 0, width)
        else:  # gate or up [.., I, H]: this rank's rows, into the gate or the up half
            load_slice(dst.narrow(axis, 0 if part == "gate" else width, width), loaded, axis, start, full)
        parts = ("gate", "up") if part == "gate_up" else (part,)
        return [f"{p}.{e}" for p in parts for e in experts]

    def partial(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``sum_k weights[:, k] * expert_{ids[:, k]}(h)``; the sum over ranks is the output.

        Only the experts some token was routed to are read (the fused kernel on CUDA, a loop over the hit
        experts on the CPU)."""
        return fused_experts(h, self.w13_weight, self.w2_weight, weights, ids)
