"""Quantized linear layers: FP8 (block-scaled and per-channel) and 4/8-bit integer (AWQ, GPTQ) weights.

reference.py holds each format's layout, its dequantization and the torch references (the CPU path); pack.py the
writers (quantize and pack, for tests and checkpoint writers). The public functions dispatch like every op of
kernels/: Triton for CUDA tensors when triton is installed, the reference otherwise.
"""

from __future__ import annotations

from .pack import (
    act_order_g_idx,
    pack_awq,
    pack_gptq,
    quantize_fp8_block,
    quantize_fp8_channel,
    quantize_int,
)
from .reference import (
    dequantize_awq,
    dequantize_fp8_block,
    dequantize_fp8_channel,
    dequantize_gptq,
    fp8_block_linear_ref,
    fp8_channel_linear_ref,
    fp8_quantize_per_token_group_ref,
    int4_linear_ref,
)

fp8_block_linear = fp8_block_linear_ref  # the Triton paths are being written: until then every device dequantizes
fp8_channel_linear = fp8_channel_linear_ref
fp8_quantize_per_token_group = fp8_quantize_per_token_group_ref
int4_linear = int4_linear_ref

__all__ = [
    "act_order_g_idx",
    "dequantize_awq",
    "dequantize_fp8_block",
    "dequantize_fp8_channel",
    "dequantize_gptq",
    "fp8_block_linear",
    "fp8_block_linear_ref",
    "fp8_channel_linear",
    "fp8_channel_linear_ref",
    "fp8_quantize_per_token_group",
    "fp8_quantize_per_token_group_ref",
    "int4_linear",
    "int4_linear_ref",
    "pack_awq",
    "pack_gptq",
    "quantize_fp8_block",
    "quantize_fp8_channel",
    "quantize_int",
]
