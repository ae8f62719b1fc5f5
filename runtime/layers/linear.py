"""Linear layers that know their tensor-parallel shard and load it from a full checkpoint tensor.

- Column-parallel (`QKVParallelLinear`, `MergedColumnParallelLinear`): each rank holds a slice of the output
  features, so no communication; several checkpoint projections are stacked into one GEMM, each in its own rows
  (``shard_ids`` names them). Q heads are split evenly; KV heads too, or replicated when there are fewer KV
  heads than ranks (each rank keeps the one its query heads read).
- Row-parallel (`RowParallelLinear`): each rank holds a slice of the input features and multiplies the matching
  slice of the activation; the partial outputs are summed over ranks (`runtime.distributed.all_reduce`, the
  identity at size 1). The bias is added once, on rank 0.

The forward of every layer is ``kernels.linear`` (a bandwidth-bound Triton kernel for decode-sized batches on
CUDA, ``F.linear`` otherwise). Parameters keep the names ``weight`` and ``bias``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from xinf_sglang.kernels import linear

from ..tp.distributed import ShardRange, TPInfo, all_reduce
from .weights import ShardId, default_weight_loader, empty_parameter, load_slice


class LinearBase(nn.Module):
    """``x @ weight.T + bias`` with ``weight [out, in]`` of this rank's shard; one checkpoint tensor per parameter
    unless a subclass stacks several (``shard_ids``)."""

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo) -> None:
        super().__init__()
        self.tp = tp
        self.weight = empty_parameter(out_features, in_features)
        self.bias = empty_parameter(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class _Slot:
    """Where one stacked checkpoint tensor lands: parameter rows ``[offset, offset + rows)`` take rows
    ``[start, start + rows)`` of the checkpoint tensor, which has ``full`` rows."""

    offset: int
    rows: int
    start: int
    full: int


def _stack(parts: Sequence[tuple[ShardId, ShardRange, int]], unit: int) -> dict[ShardId, _Slot]:
    """Slots for ``(shard_id, this rank's range, full count)`` parts stacked in order, ``unit`` rows per item."""
    slots, offset = {}, 0
    for shard_id, part, total in parts:
        slots[shard_id] = _Slot(offset, part.size * unit, part.start * unit, total * unit)
        offset += part.size * unit
    return slots


class _ColumnParallelLinear(LinearBase):
    """Output features split over ranks, stacked from several checkpoint tensors (one `_Slot` each)."""

    def __init__(self, in_features: int, slots: dict[ShardId, _Slot], bias: bool, tp: TPInfo) -> None:
        super().__init__(in_features, sum(s.rows for s in slots.values()), bias, tp)
        self.slots = slots
        self.shard_ids = tuple(slots)
        self.output_sizes = tuple(s.rows for s in slots.values())  # this rank's width of each stacked part

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> None:
        """Copy this rank's rows of the full checkpoint tensor ``shard_id`` into its rows of ``param``."""
        slot = self.slots[shard_id]
        load_slice(param.data.narrow(0, slot.offset, slot.rows), loaded, 0, slot.start, slot.full)


class MergedColumnParallelLinear(_ColumnParallelLinear):
    """Projections of one input stacked in one GEMM (gate and up); checkpoint tensor ``i`` is shard ``i``, each
    split evenly over the ranks."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool, tp: TPInfo) -> None:
        parts = [(i, tp.shard(n, f"output size {n} of a merged projection"), n) for i, n in enumerate(output_sizes)]
        super().__init__(in_features, _stack(parts, unit=1), bias, tp)


class QKVParallelLinear(_ColumnParallelLinear):
    """q, k and v projections in one GEMM, split by heads: rows ``[q | k | v]`` of this rank's heads."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TPInfo
    ) -> None:
        q = tp.shard(num_heads, "num_attention_heads")
        kv = tp.kv_head_shard(num_kv_heads)
        parts = [("q", q, num_heads), ("k", kv, num_kv_heads), ("v", kv, num_kv_heads)]
        super().__init__(hidden_size, _stack(parts, unit=head_dim), bias, tp)
        self.num_heads, self.num_kv_heads = q.size, kv.size  # this rank's


class RowParallelLinear(LinearBase):
    """Input features split over ranks (o_proj, down_proj); the outputs of the ranks are summed."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo) -> None:
        shard = tp.shard(in_features, f"input size {in_features} of a row-parallel projection")
        super().__init__(shard.size, out_features, bias, tp)
        self.input_shard = shard
        self.full_in_features = in_features

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        """The weight: this rank's input columns of the full tensor; the bias: whole (it is added once)."""
        if param is self.bias:
            default_weight_loader(param, loaded)
        else:
            load_slice(param.data, loaded, 1, self.input_shard.start, self.full_in_features)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output from its slice of the input; the sum over ranks is the full output."""
        return linear(x, self.weight, self.bias if self.tp.rank == 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.partial(x), self.tp)
