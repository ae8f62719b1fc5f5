"""FP8 (e4m3) weights: block-scaled (DeepSeek-V3, Qwen3-FP8, transformers ``fp8`` with ``weight_block_size``,
compressed-tensors ``block``) and per-channel / per-tensor (compressed-tensors ``channel`` / ``tensor``,
``fp8`` without a block size). Activations are quantized dynamically by the GPU kernel (per token and group of
``block[1]`` columns for block weights); the torch reference (the CPU path) dequantizes the layer's weight on the fly
and multiplies in the activations' dtype, so the checkpoint stays 1 byte per weight in memory on every device.
"""

from __future__ import annotations

import torch
from torch import nn
from xinf_sglang.kernels.quant import (
    dequantize_fp8_block,
    dequantize_fp8_channel,
    fp8_block_linear,
    fp8_channel_linear,
)

from .base import LinearMethod, ParamLayout, cdiv

FP8 = torch.float8_e4m3fn


def _weight(in_features: int, out_features: int) -> ParamLayout:
    return ParamLayout("weight", (out_features, in_features), FP8, output_dim=0, input_dim=1)


class Fp8BlockLinearMethod(LinearMethod):
    """``weight [out, in]`` float8 and one float32 scale per ``block = (rows, cols)`` block of W, stored as
    ``scale_name`` (``weight_scale_inv`` in DeepSeek / transformers checkpoints, ``weight_scale`` in
    compressed-tensors ones): ``W = weight * scale[n // rows, k // cols]``."""

    name = "fp8"

    def __init__(self, block: tuple[int, int], scale_name: str = "weight_scale_inv") -> None:
        self.block = (int(block[0]), int(block[1]))
        self.scale_name = scale_name

    def layouts(self, in_features: int, out_features: int) -> list[ParamLayout]:
        bn, bk = self.block
        scale = ParamLayout(self.scale_name, (cdiv(out_features, bn), cdiv(in_features, bk)), torch.float32,
                            output_dim=0, input_dim=1, output_span=bn, input_span=bk)
        return [_weight(in_features, out_features), scale]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_block_linear(x, layer.weight, getattr(layer, self.scale_name), self.block, bias)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # the decode GEMV's epilogue does the SwiGLU
        return fp8_block_linear(x, layer.weight, getattr(layer, self.scale_name), self.block, bias, silu_mul=True)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return dequantize_fp8_block(layer.weight, getattr(layer, self.scale_name), self.block)

    def describe(self) -> str:
        return f"fp8 e4m3, {self.block[0]}x{self.block[1]} block scales, dynamic activation quantization"


class Fp8ChannelLinearMethod(LinearMethod):
    """``weight [out, in]`` float8 and ``weight_scale [out, 1]`` float32, one scale per output feature. A
    per-tensor checkpoint (one scale per projection) is read into the same layout, its scale repeated on every
    row: exact, and the q / k / v or gate / up projections stacked in one layer keep their own scales."""

    name = "fp8"

    def __init__(self, per_tensor: bool) -> None:
        self.per_tensor = per_tensor

    def layouts(self, in_features: int, out_features: int) -> list[ParamLayout]:
        scale = ParamLayout("weight_scale", (out_features, 1), torch.float32, output_dim=0, scalar=self.per_tensor)
        return [_weight(in_features, out_features), scale]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_channel_linear(x, layer.weight, layer.weight_scale, bias)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_channel_linear(x, layer.weight, layer.weight_scale, bias, silu_mul=True)  # fused at decode

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return dequantize_fp8_channel(layer.weight, layer.weight_scale)

    def describe(self) -> str:
        return f"fp8 e4m3, per-{'tensor' if self.per_tensor else 'channel'} scales, dynamic activation quantization"

    dummy_scale = 0.02 / 448
