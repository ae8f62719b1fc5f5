"""GPTQ (v1 checkpoint format), 4- or 8-bit, symmetric or not: ``qweight`` int32 ``[in/p, out]`` (``p = 32 /
bits`` input features per int32), ``qzeros`` int32 ``[groups, out/p]`` storing ``zero - 1``, ``scales`` float16
``[groups, out]`` and ``g_idx`` int32 ``[in]`` (the group of each input feature: ``k // group`` unless the
checkpoint was quantized in activation order, ``desc_act``). Definitions in ``kernels/quant/reference.py``.

The GPU runs the dequantizing Triton GEMM / GEMV (4- and 8-bit, ``kernels/quant``); the CPU the reference,
dequantizing one layer at a time on the fly, so the weights stay 4 / 8 bits in memory. ``g_idx`` is passed to the
kernel only when it is not ``k // group`` (activation order), since the plain grouping is faster.
"""

from __future__ import annotations

import torch
from torch import nn
from xinf_sglang.kernels.quant import dequantize_gptq, int4_linear

from .awq import int_layouts
from .base import LinearMethod, ParamLayout


class GPTQLinearMethod(LinearMethod):
    """GPTQ v1 weights of ``bits`` (4 or 8) with ``group_size`` input features per scale (-1: one group).
    ``desc_act``: groups follow ``g_idx``, so an input feature's scale may lie anywhere: the scales are not cut
    along the input features, and a row-parallel split (tensor parallelism) is refused."""

    name = "gptq"

    def __init__(self, bits: int, group_size: int, desc_act: bool, sym: bool) -> None:
        self.bits, self.group_size, self.desc_act, self.sym = bits, group_size, desc_act, sym
        self.pack = 32 // bits

    def layouts(self, in_features: int, out_features: int) -> list[ParamLayout]:
        if in_features % self.pack or out_features % self.pack:
            raise ValueError(f"gptq {self.bits}-bit packs {self.pack} features per int32, this layer is "
                             f"[{out_features}, {in_features}]")
        qweight = ParamLayout("qweight", (in_features // self.pack, out_features), torch.int32, output_dim=1,
                              input_dim=0, input_span=self.pack)
        g_idx = ParamLayout("g_idx", (in_features,), torch.int32, input_dim=0)
        zeros_scales = int_layouts(in_features, out_features, self.group_size, not self.desc_act, self.pack)
        return [qweight, *zeros_scales, g_idx]

    def row_parallel_problem(self) -> str | None:
        if self.desc_act and self.group_size > 0:
            return "gptq desc_act (activation order) weights cannot be split over input features"
        return None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Keep ``g_idx`` for the kernel only if it is not the plain ``k // group`` (activation order). The plain
        one of a row-parallel shard counts from the shard's first group: the kernel's local ``k // group``."""
        k = layer.g_idx.shape[0]
        plain = torch.arange(k, device=layer.g_idx.device, dtype=torch.int32) // self._group(layer)
        layer.act_order = not torch.equal(layer.g_idx - layer.g_idx[0], plain)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._linear(layer, x, bias, silu_mul=False)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._linear(layer, x, bias, silu_mul=True)  # the decode GEMV's epilogue does the SwiGLU

    def _linear(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
        return int4_linear(x, layer.qweight, layer.scales, layer.qzeros, self._g_idx(layer), "gptq",
                           self._group(layer), bias, silu_mul=silu_mul)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return dequantize_gptq(layer.qweight, layer.scales, layer.qzeros, self._g_idx(layer), self._group(layer),
                               self.bits)

    def _g_idx(self, layer: nn.Module) -> torch.Tensor | None:
        if not hasattr(layer, "act_order"):
            self.process_weights_after_loading(layer)
        return layer.g_idx if layer.act_order else None

    def _group(self, layer: nn.Module) -> int:
        return self.group_size if self.group_size > 0 else layer.g_idx.shape[0]

    def describe(self) -> str:
        group = "per-channel" if self.group_size <= 0 else f"group {self.group_size}"
        order = ", activation order" if self.desc_act else ""
        return f"gptq {self.bits}-bit, {group}, {'symmetric' if self.sym else 'zero points'}{order}"
