"""Quantized linear layers: FP8 (block-scaled and per-channel), 4/8-bit integer (AWQ, GPTQ) and GGUF block weights.

reference.py holds each format's layout (read there), its dequantization and the torch references (the CPU path);
pack.py the writers (quantize and pack, for tests and checkpoint writers); fp8.py, int4.py and gguf_triton.py the
Triton kernels; config.py their launch configs; gguf_reference.py GGML's block formats and their references (their
CPU kernel is ``kernels/cpu/gguf.py``). The public functions dispatch like every op of kernels/: Triton for CUDA
tensors when triton is installed, the reference otherwise (GGUF: the C++ kernel first, for CPU float32). The weights stay in their checkpoint layouts on every device
(no repacking at load); the one thing a runtime should do once at load is ``trivial_g_idx`` on a GPTQ ``g_idx``,
passing None instead when it holds (the kernel then skips the per-row group lookup).

Decode (up to 4 rows) runs weight-streaming GEMVs on CUDA cores: int4.py's for AWQ / GPTQ, fp8.py's weight-only
FP8 one (x unquantized: it matches the reference to the summation order). Larger FP8 batches are W8A8 (x is
quantized to FP8 per token group), so they differ from the references (which multiply x as it is by the
dequantized weight) by x's FP8 rounding: ~2-4% relative error per output. GPUs without FP8 tensor cores (compute
capability below 8.9) take the reference on the GPU.
"""

from __future__ import annotations

import torch

from ..activation import silu_and_mul
from ..cpu import gguf as cpu_gguf
from .config import get_quant_config
from .fp8 import (
    fp8_block_linear_triton,
    fp8_channel_linear_triton,
    fp8_quantize_per_token_group_triton,
    triton,
)
from .gguf_reference import GGUF_BLOCKS, dequantize_gguf, gguf_linear_ref, gguf_rows_ref, random_gguf_blocks
from .gguf_triton import gguf_linear_triton, gguf_rows_triton
from .int4 import int4_linear_triton, trivial_g_idx
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


def _glu(y: torch.Tensor, silu_mul: bool) -> torch.Tensor:
    """``y``, or SiLU-and-mul of its halves (the reference paths' ``silu_mul``)."""
    return silu_and_mul(y) if silu_mul else y


def _fp8_on_gpu(x: torch.Tensor) -> bool:
    """Triton's FP8 path: CUDA tensors on a card with FP8 tensor cores (Ada, Hopper and newer)."""
    return x.is_cuda and triton is not None and torch.cuda.get_device_capability(x.device) >= (8, 9)


def fp8_quantize_per_token_group(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 quantization of ``x [M, K]`` per row and group of ``group_size`` columns -> ``(x_q [M, K]
    float8_e4m3fn, scales [M, ceil(K/group_size)] float32)`` (contract of ``fp8_quantize_per_token_group_ref``)."""
    if x.is_cuda and triton is not None:
        return fp8_quantize_per_token_group_triton(x, group_size)
    return fp8_quantize_per_token_group_ref(x, group_size)


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                     block_size: tuple[int, int] = (128, 128), bias: torch.Tensor | None = None,
                     silu_mul: bool = False) -> torch.Tensor:
    """``x [..., K]`` times a block-scaled FP8 ``weight [N, K]`` (``weight_scale_inv [ceil(N/bn), ceil(K/bk)]``
    float32, ``block_size=(bn, bk)``) plus ``bias [N]`` -> ``[..., N]`` in x's dtype (``silu_mul``: SiLU-and-mul
    of its halves, ``[..., N / 2]``: a gate/up projection). GPU: the weight-only GEMV for M <= 4 (the SiLU in its
    epilogue), else the W8A8 Triton GEMM; otherwise ``fp8_block_linear_ref``."""
    if _fp8_on_gpu(x):
        return fp8_block_linear_triton(x, weight, weight_scale_inv, tuple(block_size), bias, silu_mul=silu_mul)
    return _glu(fp8_block_linear_ref(x, weight, weight_scale_inv, tuple(block_size), bias), silu_mul)


def fp8_channel_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor:
    """``x [..., K]`` times an FP8 ``weight [N, K]`` with per-channel (``[N]`` / ``[N, 1]``) or per-tensor
    (scalar) float32 ``weight_scale`` plus ``bias`` -> ``[..., N]`` in x's dtype (``silu_mul``: as
    ``fp8_block_linear``). GPU: the weight-only GEMV for M <= 4, else W8A8 with per-token activation scales
    (``torch._scaled_mm`` on Hopper in bf16, else Triton); otherwise ``fp8_channel_linear_ref``."""
    if _fp8_on_gpu(x):
        return fp8_channel_linear_triton(x, weight, weight_scale, bias, silu_mul=silu_mul)
    return _glu(fp8_channel_linear_ref(x, weight, weight_scale, bias), silu_mul)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                g_idx: torch.Tensor | None, fmt: str, group_size: int,
                bias: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor:
    """``x [..., K]`` times an AWQ (``fmt="awq"``, 4-bit) or GPTQ v1 (``fmt="gptq"``, 4- or 8-bit, read from the
    shapes) weight in its checkpoint layout (reference.py) plus ``bias`` -> ``[..., N]`` in x's dtype;
    ``group_size`` -1 = one group. GPU: the CUDA-core GEMV for M <= 4 (not act-order), else the dequantizing
    Triton GEMM (split-K for M <= 8); otherwise
    ``int4_linear_ref``. For GPTQ pass ``g_idx=None`` unless it is act-order (``trivial_g_idx``). ``silu_mul``: as
    ``fp8_block_linear``."""
    if x.is_cuda and triton is not None:
        return int4_linear_triton(x, qweight, scales, qzeros, g_idx, fmt, group_size, bias, silu_mul=silu_mul)
    return _glu(int4_linear_ref(x, qweight, scales, qzeros, g_idx, fmt, group_size, bias), silu_mul)


def gguf_linear(x: torch.Tensor, qweight: torch.Tensor, qtype: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K]`` times a GGUF weight of block format ``qtype`` (``qweight`` uint8 ``[N, K / values, bytes]``)
    plus ``bias`` -> ``[..., N]`` in x's dtype. CPU float32: the C++ kernel (integer dot products on the blocks for
    few rows, dequantize + MKL for many); CUDA: the Triton kernel (GEMV for a few rows, dequantize + ``tl.dot`` for
    more), any float dtype; otherwise ``gguf_linear_ref``."""
    block = GGUF_BLOCKS[qtype]
    if cpu_gguf.supports(x, qweight, block, bias):
        return cpu_gguf.gguf_linear_checked(x, qweight, block, bias)
    if x.is_cuda and triton is not None:
        return gguf_linear_triton(x, qweight, qtype, bias)
    return gguf_linear_ref(x, qweight, qtype, bias)


def gguf_rows(qweight: torch.Tensor, ids: torch.Tensor, qtype: str, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` (any shape) of a GGUF weight (``qweight`` uint8 ``[N, K / values, bytes]`` of ``qtype``),
    dequantized to ``dtype`` -> ``[*ids.shape, K]``: an embedding lookup. CUDA: the Triton row decoder (one
    kernel, CUDA-graph friendly); otherwise ``gguf_rows_ref``."""
    if qweight.is_cuda and triton is not None:
        block = GGUF_BLOCKS[qtype]
        return gguf_rows_triton(qweight, ids, qtype, qweight[0].numel() // block.bytes * block.values, dtype)
    return gguf_rows_ref(qweight, ids, qtype, dtype)


__all__ = [
    "GGUF_BLOCKS",
    "act_order_g_idx",
    "dequantize_awq",
    "dequantize_fp8_block",
    "dequantize_fp8_channel",
    "dequantize_gguf",
    "dequantize_gptq",
    "fp8_block_linear",
    "fp8_block_linear_ref",
    "fp8_block_linear_triton",
    "fp8_channel_linear",
    "fp8_channel_linear_ref",
    "fp8_channel_linear_triton",
    "fp8_quantize_per_token_group",
    "fp8_quantize_per_token_group_ref",
    "fp8_quantize_per_token_group_triton",
    "get_quant_config",
    "gguf_linear",
    "gguf_linear_ref",
    "gguf_linear_triton",
    "gguf_rows",
    "gguf_rows_ref",
    "gguf_rows_triton",
    "int4_linear",
    "int4_linear_ref",
    "int4_linear_triton",
    "pack_awq",
    "pack_gptq",
    "quantize_fp8_block",
    "quantize_fp8_channel",
    "quantize_int",
    "random_gguf_blocks",
    "trivial_g_idx",
]
