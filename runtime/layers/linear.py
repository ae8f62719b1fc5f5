"""Linear layers that know their tensor-parallel shard and load it from a full checkpoint tensor.

- Column-parallel (`QKVParallelLinear`, `MergedColumnParallelLinear`): each rank holds a slice of the output
  features, so no communication; several checkpoint projections are stacked into one GEMM, each in its own rows
  (``shard_ids`` names them). Q heads are split evenly; KV heads too, or replicated when there are fewer KV
  heads than ranks (each rank keeps the one its query heads read).
- Row-parallel (`RowParallelLinear`): each rank holds a slice of the input features and multiplies the matching
  slice of the activation; the partial outputs are summed over ranks (`runtime.distributed.all_reduce`, the
  identity at size 1). The bias is added once, on rank 0.

What a layer stores and how it multiplies is its `LinearMethod` (``quantization/``): the dense method keeps
``weight [out, in]`` and runs ``kernels.linear`` (a bandwidth-bound Triton kernel for decode-sized batches on
CUDA, ``F.linear`` otherwise); a quantized one stores packed weights, scales and zeros. The loaders below cut every
parameter from its `ParamLayout` alone (which stored dim runs along W's output / input features and how many
features one element spans), so they serve every format; a shard boundary inside a pack, group or block is
refused by name when the layer is built. A format may store some stacked parts in a parameter of their own
(`ParamLayout.parts`: GGUF's projections of different block types). The bias is always dense, in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..tp.distributed import ShardRange, TPInfo, all_reduce
from .quantization.base import UNQUANTIZED, LinearMethod, ParamLayout
from .weights import ShardId, load_slice


class LinearBase(nn.Module):
    """``x @ W.T + bias`` with W this rank's ``[out, in]`` shard, stored as ``method`` lays it out (for the dense
    method: ``weight [out, in]``); one checkpoint tensor per parameter unless a subclass stacks several
    (``shard_ids``, with this rank's output features of each in ``parts``). ``prefix`` (the checkpoint module name)
    only names the layer in errors."""

    shard_ids: tuple[ShardId, ...] = (None,)

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo,
                 method: LinearMethod = UNQUANTIZED, prefix: str = "",
                 parts: Sequence[tuple[ShardId, int]] = ()) -> None:
        super().__init__()
        self.tp = tp
        self.quant_method = method
        self.prefix = prefix
        try:
            layouts = method.stacked_layouts(in_features, parts) if parts else method.layouts(in_features,
                                                                                            out_features)
        except ValueError as exc:
            self.refuse(str(exc))
        if bias:
            layouts.append(ParamLayout("bias", (out_features,), output_dim=0))
        else:
            self.bias = None
        for layout in layouts:
            self.register_parameter(layout.name, _parameter(layout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def refuse(self, problem: str) -> None:
        raise ConfigError(f"{self.prefix or type(self).__name__} ({self.quant_method.describe()}): {problem}")


_ALIGN = ("sglite needs every tensor-parallel shard and stacked projection to start on a pack, group or block "
          "boundary (try another tp_size)")


def _parameter(layout: ParamLayout) -> nn.Parameter:
    """Uninitialised and frozen (the loader or the dummy initialiser writes it); a parameter with a dtype of its
    own is marked so that casting the model to its dtype leaves it as stored (``model_loader.cast_model``)."""
    param = nn.Parameter(torch.empty(layout.shape, dtype=layout.dtype), requires_grad=False)
    param.param_layout = layout
    param.keeps_dtype = layout.dtype is not None
    return param


def _broadcast(layout: ParamLayout, loaded, full_out: int):
    """A per-tensor value (``scalar`` layouts) as the full per-output-feature tensor the slicing expects."""
    if not layout.scalar or (len(loaded.shape) > 0 and loaded.shape[0] != 1):
        return loaded
    value = loaded.read() if hasattr(loaded, "read") else loaded
    shape = [1] * len(layout.shape)
    shape[layout.output_dim] = full_out
    return value.reshape(-1)[:1].reshape([1] * len(shape)).expand(shape)


@dataclass(frozen=True)
class _Slot:
    """Where one stacked checkpoint tensor lands: rows ``[offset, offset + rows)`` of W take rows
    ``[start, start + rows)`` of the checkpoint's W, which has ``full`` rows."""

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

    def __init__(self, in_features: int, slots: dict[ShardId, _Slot], bias: bool, tp: TPInfo,
                 method: LinearMethod, prefix: str) -> None:
        total = sum(s.rows for s in slots.values())
        super().__init__(in_features, total, bias, tp, method, prefix, [(i, s.rows) for i, s in slots.items()])
        self.slots = slots
        self.shard_ids = tuple(slots)
        self.output_sizes = tuple(s.rows for s in slots.values())  # this rank's width of each stacked part
        # parameters that hold some of the parts only (`ParamLayout.parts`): what the loader must fill in each
        self.param_shard_ids = {p.param_layout.name: p.param_layout.parts for p in self.parameters()
                                if p.param_layout.parts is not None}
        for param in self.parameters():
            layout = param.param_layout
            for shard_id in layout.parts or self.shard_ids:
                s, (offset, rows) = slots[shard_id], self.placement(layout, shard_id)
                problem = (layout.misalignment(layout.output_dim, s.start, s.rows, s.full)
                           or layout.misalignment(layout.output_dim, offset, s.rows, rows))
                if problem:
                    self.refuse(f"{problem} (part {shard_id!r}); {_ALIGN}")

    def placement(self, layout: ParamLayout, shard_id: ShardId) -> tuple[int, int]:
        """``(first row, rows)``: where part ``shard_id`` starts among the W rows a parameter of ``layout`` holds,
        and how many rows it holds (all parts, or its `ParamLayout.parts`)."""
        ids = layout.parts or self.shard_ids
        rows = [self.slots[i].rows for i in ids]
        return sum(rows[:ids.index(shard_id)]), sum(rows)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> None:
        """Copy this rank's rows of the full checkpoint tensor ``shard_id`` into its rows of ``param``; a
        parameter without an output dim (a GPTQ ``g_idx``) is the same for every part and is copied whole."""
        slot, layout = self.slots[shard_id], param.param_layout
        dim = layout.output_dim
        if dim is None:
            self._load_shared(param, loaded, shard_id)
            return
        loaded = _broadcast(layout, loaded, slot.full)
        start, size, full = layout.stored(dim, slot.start, slot.rows, slot.full)
        offset = self.placement(layout, shard_id)[0] // layout.span(dim)
        load_slice(param.data.narrow(dim, offset, size), loaded, dim, start, full)


    def _load_shared(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId) -> None:
        """A parameter every stacked part must agree on (the parts share their input): the first part's copy;
        another part that differs is refused (one layer has one ``g_idx``)."""
        seen = self.__dict__.setdefault("_shared_loaded", {})
        if param.param_layout.name not in seen:
            load_slice(param.data, loaded, 0, 0, param.shape[0])
            seen[param.param_layout.name] = shard_id
            return
        mine = loaded.narrow(0, 0, loaded.shape[0]) if hasattr(loaded, "read") else loaded
        if not torch.equal(mine.to(param.device), param.data):
            raise ValueError(f"differs from the {param.param_layout.name} of part {seen[param.param_layout.name]!r} "
                             "stacked in the same layer (the stacked projections must share it)")


class MergedColumnParallelLinear(_ColumnParallelLinear):
    """Projections of one input stacked in one GEMM (gate and up); checkpoint tensor ``i`` is shard ``i``, each
    split evenly over the ranks."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool, tp: TPInfo,
                 method: LinearMethod = UNQUANTIZED, prefix: str = "") -> None:
        parts = [(i, tp.shard(n, f"output size {n} of a merged projection"), n) for i, n in enumerate(output_sizes)]
        super().__init__(in_features, _stack(parts, unit=1), bias, tp, method, prefix)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of a ``[gate | up]`` pair (this rank's halves): the SwiGLU input of a down projection,
        in one kernel where the method's GEMV has it in its epilogue."""
        return self.quant_method.apply_silu_mul(self, x, self.bias)


class QKVParallelLinear(_ColumnParallelLinear):
    """q, k and v projections in one GEMM, split by heads: rows ``[q | k | v]`` of this rank's heads."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TPInfo,
        method: LinearMethod = UNQUANTIZED, prefix: str = "",
    ) -> None:
        q = tp.shard(num_heads, "num_attention_heads")
        kv = tp.kv_head_shard(num_kv_heads)
        parts = [("q", q, num_heads), ("k", kv, num_kv_heads), ("v", kv, num_kv_heads)]
        super().__init__(hidden_size, _stack(parts, unit=head_dim), bias, tp, method, prefix)
        self.num_heads, self.num_kv_heads = q.size, kv.size  # this rank's


class RowParallelLinear(LinearBase):
    """Input features split over ranks (o_proj, down_proj); the outputs of the ranks are summed."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo,
                 method: LinearMethod = UNQUANTIZED, prefix: str = "") -> None:
        shard = tp.shard(in_features, f"input size {in_features} of a row-parallel projection")
        super().__init__(shard.size, out_features, bias, tp, method, prefix)
        self.input_shard = shard
        self.full_in_features = in_features
        problems = [method.row_parallel_problem() if tp.size > 1 else None]
        problems += [p.param_layout.misalignment(p.param_layout.input_dim, shard.start, shard.size, in_features)
                     for p in self.parameters()]
        for problem in filter(None, problems):
            self.refuse(f"{problem}; {_ALIGN}")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        """This rank's input features of the full tensor; a parameter without an input dim (the bias, which is
        added once) whole."""
        layout = param.param_layout
        loaded = _broadcast(layout, loaded, param.shape[layout.output_dim]) if layout.scalar else loaded
        dim = layout.input_dim
        if dim is None:
            load_slice(param.data, loaded, 0, 0, param.shape[0])
            return
        start, _, full = layout.stored(dim, self.input_shard.start, self.input_shard.size, self.full_in_features)
        load_slice(param.data, loaded, dim, start, full)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output from its slice of the input; the sum over ranks is the full output."""
        return self.quant_method.apply(self, x, self.bias if self.tp.rank == 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.partial(x), self.tp)
