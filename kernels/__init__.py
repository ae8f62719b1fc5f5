"""Compute kernels of sglite.

Each op lives in a file of its own that holds a torch reference (``*_ref``, the CPU path and the ground truth
in tests) and, on CUDA, a Triton kernel with its launcher (``*_triton``). The public function of each file
dispatches: Triton for CUDA tensors (when triton is installed), the reference otherwise. This package knows
nothing of the runtime. On Hopper and newer GPUs the kernels of the model's forward are launched with programmatic
dependent launch (``pdl.py``): each starts while its predecessor finishes and waits before touching memory.

Triton is optional: without it (macOS, Windows) the package imports and every public function uses its reference.
To run the launchers on CPU tensors (tests), set ``TRITON_INTERPRET=1`` before triton is first imported in the
process: triton decides between compiling and interpreting when it and each kernel are defined.
"""

from .activation import silu_and_mul, silu_and_mul_ref
from .argmax import argmax, argmax_ref
from .attention.decode_attention import NewToken, decode_attention, decode_attention_ref, decode_num_splits
from .attention.extend_attention import extend_attention, extend_attention_ref
from .attention.mla import mla_decode, mla_decode_ref, mla_extend, mla_extend_ref
from .linear import linear, linear_ref
from .moe import fused_experts, fused_experts_ref, get_moe_config, moe_align_block_size
from .norm import rms_norm, rms_norm_ref
from .quant import (
    fp8_block_linear,
    fp8_block_linear_ref,
    fp8_channel_linear,
    fp8_channel_linear_ref,
    fp8_quantize_per_token_group,
    int4_linear,
    int4_linear_ref,
)
from .rotary import apply_rotary, apply_rotary_ref, rotary_cos_sin
from .attention.store_kv import store_kv, store_kv_ref
from .token_bitmask import apply_token_bitmask_, apply_token_bitmask_ref

__all__ = [
    "NewToken",
    "apply_rotary",
    "apply_rotary_ref",
    "apply_token_bitmask_",
    "apply_token_bitmask_ref",
    "argmax",
    "argmax_ref",
    "decode_attention",
    "decode_attention_ref",
    "decode_num_splits",
    "extend_attention",
    "extend_attention_ref",
    "fp8_block_linear",
    "fp8_block_linear_ref",
    "fp8_channel_linear",
    "fp8_channel_linear_ref",
    "fp8_quantize_per_token_group",
    "fused_experts",
    "fused_experts_ref",
    "get_moe_config",
    "int4_linear",
    "int4_linear_ref",
    "linear",
    "linear_ref",
    "mla_decode",
    "mla_decode_ref",
    "mla_extend",
    "mla_extend_ref",
    "moe_align_block_size",
    "rms_norm",
    "rms_norm_ref",
    "rotary_cos_sin",
    "silu_and_mul",
    "silu_and_mul_ref",
    "store_kv",
    "store_kv_ref",
]
