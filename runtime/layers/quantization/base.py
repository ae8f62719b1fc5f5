"""The seam between a linear layer and its weight format: a `LinearMethod` says which parameters a linear stores
and how they map onto the layer's logical weight ``W [out, in]`` (`ParamLayout`), and computes ``x @ W.T + b``
from them.

A linear layer (``layers/linear.py``) never looks inside a format: it creates the parameters its method lists,
and its ``weight_loader`` slices every checkpoint tensor from the layout alone (the output features of a
column-parallel shard, the input features of a row-parallel one, a stacked projection's rows), refusing by name a
shard that does not start on a pack / group / block boundary. A new format is one `LinearMethod` subclass (its
parameters, ``apply``, ``dequantize``) plus its ``quantization_config`` reading in ``model_loader/quant_config.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from xinf_sglang.kernels import linear, silu_and_mul
from xinf_sglang.kernels.cpu import linear16 as cpu_linear16

from ..weights import ShardId


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ParamLayout:
    """One stored parameter of a linear layer and how it lies over the logical weight ``W [out, in]``.

    ``output_dim`` / ``input_dim``: the stored dimension that runs along W's output / input features (None: the
    parameter does not vary along them, e.g. a GPTQ ``g_idx`` has no output dim). ``output_span`` /
    ``input_span``: how many of W's features one stored element covers along that dim: 1 for a plain weight,
    the pack factor for packed ints (AWQ's 8 outputs per int32), the group or block size for scales and zeros.
    A piece of W that starts at a multiple of the span maps to stored elements ``[start / span, ceil(end /
    span))``. ``dtype`` None: the model's dtype (cast with the model); else kept as stored. ``scalar`` True: the
    checkpoint may give one value for the whole tensor (a per-tensor scale), broadcast over the output features.
    ``parts``: in a layer that stacks several checkpoint projections, the ones this parameter holds, in order
    (None: all of them); a format whose projections may be stored differently keeps them apart (GGUF).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None
    output_dim: int | None = None
    input_dim: int | None = None
    output_span: int = 1
    input_span: int = 1
    scalar: bool = False
    parts: tuple[ShardId, ...] | None = None

    def span(self, dim: int) -> int:
        """W features per stored element along stored dim ``dim`` (the output or the input dim)."""
        return self.output_span if dim == self.output_dim else self.input_span

    def stored(self, dim: int, start: int, size: int, full: int) -> tuple[int, int, int]:
        """``(start, size, full)`` in stored elements along ``dim`` for W's features ``[start, start + size)`` of
        ``full``; the caller has checked the alignment (`misalignment`)."""
        span = self.span(dim)
        return start // span, cdiv(start + size, span) - start // span, cdiv(full, span)

    def misalignment(self, dim: int | None, start: int, size: int, full: int) -> str | None:
        """Why W's features ``[start, start + size)`` of ``full`` along ``dim`` cannot be cut out of this
        parameter (a boundary inside one stored element), or None."""
        span = 1 if dim is None else self.span(dim)
        if span == 1 or (start % span == 0 and (size % span == 0 or start + size == full)):
            return None
        what = "output" if dim == self.output_dim else "input"
        return (f"{self.name} stores {span} {what} features per element, but a shard takes {what} features "
                f"[{start}, {start + size}) of {full}")


class LinearMethod(ABC):
    """How a linear layer stores its weight and multiplies by it. Stateless apart from the format's settings:
    one object may serve every layer of a model."""

    name: str = "?"

    @abstractmethod
    def layouts(self, in_features: int, out_features: int) -> list[ParamLayout]:
        """The parameters of a layer whose shard of W is ``[out_features, in_features]`` (bias excluded: the
        layer owns it, dense, in the model's dtype)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [..., in] @ W.T (+ bias)`` -> ``[..., out]`` in ``x.dtype``, from the layer's parameters."""

    @abstractmethod
    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """W ``[out, in]`` in float32 (tests, and models that fold a weight into another one)."""

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``silu(y[..., :out/2]) * y[..., out/2:]`` of ``y = apply(...)``: a gate/up projection's SwiGLU. Formats
        whose decode GEMV fuses it override this."""
        return silu_and_mul(self.apply(layer, x, bias))

    def stacked_layouts(self, in_features: int, parts: Sequence[tuple[ShardId, int]]) -> list[ParamLayout]:
        """The parameters of a layer that stacks checkpoint projections ``parts`` (``(shard id, this rank's
        output features)`` in order): by default `layouts` over all of them; a format may store some parts in
        parameters of their own (`ParamLayout.parts`)."""
        return self.layouts(in_features, sum(rows for _, rows in parts))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once every parameter is loaded (repacking for a kernel, checks); nothing by default."""

    def row_parallel_problem(self) -> str | None:
        """Why this format cannot split a layer over input features (tensor parallelism), or None."""
        return None

    def describe(self) -> str:
        """The format in a startup-log line (``awq 4-bit, group 128``)."""
        return self.name

    dummy_scale: float = 0.0025
    """Scales of dummy weights (``load_format="dummy"``): with random 4-bit codes, W stays within ~0.02."""

    def init_dummy(self, layer: nn.Module, gen: torch.Generator) -> None:
        """Random stored weights for benchmarks at real shapes: random bits in integer tensors (packed codes,
        zeros), uniform [-1, 1] in float8 weights, ``dummy_scale`` in float scales, group 0 in a ``g_idx``."""
        for param in layer.parameters():
            if not getattr(param, "keeps_dtype", False):
                continue  # the bias, drawn with the dense weights
            if param.param_layout.name == "g_idx":
                param.data.zero_()
            elif not param.is_floating_point():
                param.data.random_(generator=gen)
            elif param.element_size() == 1:
                param.data.copy_(torch.empty(param.shape, device=param.device).uniform_(-1, 1, generator=gen))
            else:
                param.data.fill_(self.dummy_scale)


class UnquantizedLinearMethod(LinearMethod):
    """Today's dense layer: ``weight [out, in]`` in the model's dtype, ``kernels.linear``."""

    name = "dense"

    def __init__(self, keep_layout: bool = False) -> None:
        self.keep_layout = keep_layout  # never packed: a model reads this layer's ``weight [out, in]`` itself

    def init_dummy(self, layer: nn.Module, gen: torch.Generator) -> None:
        """Nothing: dense weights are drawn with the rest of the model."""

    def layouts(self, in_features: int, out_features: int) -> list[ParamLayout]:
        return [ParamLayout("weight", (out_features, in_features), output_dim=0, input_dim=1)]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, layer.weight, bias)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return linear(x, layer.weight, bias, silu_mul=True)  # the skinny GEMM's epilogue does the SwiGLU at decode

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.float()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """A bfloat16 weight on a CPU with AVX-512 BF16 is packed for the register-blocked kernel, which beats
        oneDNN at every batch size (issue 35): the packed copy replaces ``weight`` (RSS: the same bytes, plus
        the padding of N to 16 and K to 2), and the layer switches to `PackedBF16LinearMethod`."""
        if not self.keep_layout and cpu_linear16.can_pack(layer.weight):
            layer.packed_shape = tuple(layer.weight.shape)  # W's [out, in]
            packed = nn.Parameter(cpu_linear16.pack(layer.weight.data), requires_grad=False)
            packed.param_layout, packed.keeps_dtype = layer.weight.param_layout, layer.weight.keeps_dtype
            layer.weight = packed
            layer.quant_method = PACKED_BF16


class PackedBF16LinearMethod(UnquantizedLinearMethod):
    """A dense bfloat16 layer on the CPU whose ``weight`` is packed (`cpu_linear16.pack`, ``[ceil(out / 16),
    ceil(in / 2), 16, 2]``) and W's ``packed_shape`` kept on the layer; only ever set by the dense method's
    `process_weights_after_loading`."""

    name = "dense bfloat16, packed for the CPU"

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return cpu_linear16.linear_packed(x, layer.weight, layer.packed_shape[0], bias)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return silu_and_mul(self.apply(layer, x, bias))

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return cpu_linear16.unpack(layer.weight, *layer.packed_shape).float()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Nothing: packed already."""


class Float32LinearMethod(UnquantizedLinearMethod):
    """A dense layer stored and computed in float32 whatever the model's dtype: DeepSeek's router (HF casts its
    input and its weight to float32 on every call). Stored in float32 once; at decode on CUDA the skinny kernel
    x is cast and cuBLAS runs the GEMV (the weight's cast per call is gone; the skinny kernel, which can cast x
    itself, measured slower at this shape)."""

    name = "dense float32"

    def init_dummy(self, layer: nn.Module, gen: torch.Generator) -> None:
        """Drawn like the model's dense weights (the model-wide draw skips parameters that keep their dtype)."""
        layer.weight.data.uniform_(-0.02, 0.02, generator=gen)

    def layouts(self, in_features: int, out_features: int) -> list[ParamLayout]:
        return [ParamLayout("weight", (out_features, in_features), dtype=torch.float32, output_dim=0, input_dim=1)]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # kernels.linear computes a float32 weight in float32 (x cast first)
        return linear(x, layer.weight, None if bias is None else bias.float())


UNQUANTIZED = UnquantizedLinearMethod()
AS_STORED = UnquantizedLinearMethod(keep_layout=True)  # DeepSeek's kv_b_proj: its weight is absorbed, never called
PACKED_BF16 = PackedBF16LinearMethod()
FLOAT32 = Float32LinearMethod()
