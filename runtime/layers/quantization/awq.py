"""AWQ (GEMM version, 4-bit, zero points): ``qweight`` int32 ``[in, out/8]`` (8 output features per int32 in
AWQ's interleaved order), ``qzeros`` int32 ``[in/group, out/8]`` packed the same way, ``scales`` float16
``[in/group, out]``; ``W[:, k] = (q - z) * s`` over the group of input feature ``k``. The layout and its
dequantization are defined in ``kernels/quant/reference.py``; the GPU runs the int4 dequant-GEMM / GEMV kernels on
the packed tensors, the CPU the reference (the layer's weight dequantized on the fly for each call: 4 bits per weight
stay in memory, and CPU serving is for development and tests, where a dequantization per step is affordable).
"""

from __future__ import annotations

import torch
from torch import nn
from xinf_sglang.kernels.quant import dequantize_awq, int4_linear

from .base import LinearMethod, ParamLayout, cdiv

PACK = 8  # 4-bit values per int32


def int_layouts(in_features: int, out_features: int, group_size: int, grouped_input: bool,
                pack: int = PACK) -> list[ParamLayout]:
    """The zeros and scales of a grouped integer format: ``[groups, out/pack]`` int32 and ``[groups, out]``
    float16, one row per ``group_size`` input features (one row for ``-1``, which the input split does not cut;
    ``grouped_input`` False: not cut either, the groups being named by a ``g_idx``)."""
    group = group_size if group_size > 0 else in_features
    groups = cdiv(in_features, group)
    input_dim = 0 if grouped_input and group_size > 0 else None
    return [
        ParamLayout("qzeros", (groups, out_features // pack), torch.int32, output_dim=1, input_dim=input_dim,
                    output_span=pack, input_span=group),
        ParamLayout("scales", (groups, out_features), torch.float16, output_dim=1, input_dim=input_dim,
                    input_span=group),
    ]


class AWQLinearMethod(LinearMethod):
    """4-bit AWQ GEMM weights with zero points, ``group_size`` input features per scale (-1: one group)."""

    name = "awq"

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def layouts(self, in_features: int, out_features: int) -> list[ParamLayout]:
        if out_features % PACK:
            raise ValueError(f"awq packs {PACK} output features per int32, this layer has {out_features}")
        qweight = ParamLayout("qweight", (in_features, out_features // PACK), torch.int32, output_dim=1,
                              input_dim=0, output_span=PACK)
        return [qweight, *int_layouts(in_features, out_features, self.group_size, grouped_input=True)]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._linear(layer, x, bias, silu_mul=False)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._linear(layer, x, bias, silu_mul=True)  # the decode GEMV's epilogue does the SwiGLU

    def _linear(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool) -> torch.Tensor:
        return int4_linear(x, layer.qweight, layer.scales, layer.qzeros, None, "awq", self._group(layer), bias,
                           silu_mul=silu_mul)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return dequantize_awq(layer.qweight, layer.scales, layer.qzeros, self._group(layer))

    def _group(self, layer: nn.Module) -> int:
        return self.group_size if self.group_size > 0 else layer.qweight.shape[0]

    def describe(self) -> str:
        group = "per-channel" if self.group_size <= 0 else f"group {self.group_size}"
        return f"awq 4-bit, {group}, zero points"
