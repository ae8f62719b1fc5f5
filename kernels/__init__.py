"""Compute kernels of sglite.

Each op lives in a file of its own that holds a torch reference (``*_ref``, the CPU path and the ground truth
in tests) and, on CUDA, a Triton kernel with its launcher (``*_triton``). The public function of each file
dispatches: Triton for CUDA tensors (when triton is installed), the reference otherwise. This package knows
nothing of the runtime. On Hopper and newer GPUs the kernels of the model's forward are launched with programmatic
dependent launch (``pdl.py``): each starts while its predecessor finishes and waits before touching memory.

Triton is optional: without it (macOS, Windows) the package imports and every public function uses its reference.
To run the launchers on CPU tensors (tests), set ``TRITON_INTERPRET=1`` before triton is first imported in the
process: triton decides between compiling and interpreting when it and each kernel are defined.

With a torch built without CUDA or ROCm (a CPU-only install) and ``TRITON_INTERPRET`` unset, no Triton kernel can
ever launch, so the process treats triton as absent (`_hide_triton_without_a_gpu_backend`): ``import triton`` raises
ImportError and ``importlib.util.find_spec("triton")`` is None, for this package and everyone else in the process.
Importing triton costs ~70 MiB of RSS (its 500 MB library) and ~0.2 s, a sixth of what serving a small GGUF model
takes on the CPU. The view must be the same for the whole process: a kernels module imported later with the real
triton would look for Triton helpers that a module imported before never defined.
"""

import os as _os
import sys as _sys


def _hide_triton_without_a_gpu_backend() -> None:
    """Mark triton as not installed (``sys.modules["triton"] = None``) when this torch has no GPU backend, the
    interpreter is off and nobody imported triton yet; run once, before the kernels modules are imported."""
    import torch

    interpret = _os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
    if interpret or "triton" in _sys.modules or torch.version.cuda is not None or torch.version.hip is not None:
        return
    _sys.modules["triton"] = None


_hide_triton_without_a_gpu_backend()

from .activation import silu_and_mul, silu_and_mul_ref  # noqa: E402  (after the triton rule above)
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
