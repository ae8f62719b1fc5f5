"""Torch references of the quantized linears: each format's dequantization, written from the format's definition,
then ``F.linear``. They are the ground truth of the Triton kernels and the CPU serving path (the weight of one
layer is dequantized on the fly for each call, so the checkpoint stays quantized in memory).

Layouts (``K`` in features, ``N`` out features, ``G`` groups along K):

- FP8 block (DeepSeek-V3 / Qwen3-FP8 / transformers ``fp8``): ``weight [N, K]`` float8_e4m3fn and
  ``weight_scale_inv [ceil(N/bn), ceil(K/bk)]`` float32; ``w[n, k] = weight[n, k] * scale_inv[n // bn, k // bk]``.
- FP8 per channel / per tensor: ``weight [N, K]`` fp8 and ``weight_scale`` ``[N]``, ``[N, 1]`` or a scalar.
- AWQ (GEMM version, 4-bit): ``qweight`` int32 ``[K, N/8]`` packed along N; nibble ``i`` (bits ``4i..4i+3``) of
  each int32 holds column ``AWQ_ORDER[i]`` of its group of 8 columns. ``qzeros`` int32 ``[G, N/8]`` in the same
  order, ``scales [G, N]``; ``w[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]``.
- GPTQ (v1 checkpoint format, 4- or 8-bit): ``qweight`` int32 ``[K/p, N]`` packed along K in natural order
  (``p = 32 / bits``; row ``k`` sits in int32 row ``k // p`` at bits ``bits * (k % p)``), ``qzeros`` int32
  ``[G, N/p]`` packed along N in natural order and storing ``zero - 1``, ``scales [G, N]``, ``g_idx [K]`` (row k
  belongs to group ``g_idx[k]``; ``k // g`` without act-order); ``w[n, k] = (q[k, n] - (zs + 1)) * s[g_idx[k], n]``
  where ``zs`` is the stored zero. As in AutoGPTQ, the ``+ 1`` is not wrapped: a stored 15 (4-bit) reads as 16.

``group_size == -1`` means one group spanning K (per-channel scales). The dequantized weights are ``[N, K]`` (the
``nn.Linear`` layout), computed in float32 and cast once to the requested dtype.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# A group of zeros still gets a positive scale, so that 0 / scale stays 0 (SGLang's and DeepSeek's epsilon).
FP8_EPS = 1e-10
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE_ORDER[j]


def resolve_group(group_size: int, k: int) -> int:
    """The number of K rows per group: ``k`` for ``-1`` (one group per column)."""
    if group_size == -1:
        return k
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return group_size


def unpack_along_cols(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 ``[R, C/p]`` packed along the last dim -> int32 ``[R, C]`` of unsigned ``bits``-bit values.
    ``order[i]`` is the column (within its pack) held at bit position ``bits * i``; None = natural order."""
    p = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    vals = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)  # [R, C/p, p] by bit position
    if order is not None:
        inverse = [order.index(j) for j in range(p)]
        vals = vals[..., inverse]  # by column
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * p)


def unpack_along_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[R/p, C]`` packed along the first dim in natural order -> int32 ``[R, C]``."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    vals = (packed.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0] * (32 // bits), packed.shape[1])


def dequantize_fp8_block(weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                         block_size: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight [N, K]`` fp8 times its ``[ceil(N/bn), ceil(K/bk)]`` block scales -> ``[N, K]`` in ``dtype``."""
    n, k = weight.shape
    bn, bk = block_size
    if tuple(weight_scale_inv.shape) != (-(-n // bn), -(-k // bk)):
        raise ValueError(f"weight_scale_inv {tuple(weight_scale_inv.shape)} does not fit weight {(n, k)} "
                         f"with blocks {block_size}")
    scale = weight_scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (weight.float() * scale).to(dtype)


def channel_scale(weight_scale: torch.Tensor, n: int) -> torch.Tensor:
    """A per-tensor (scalar / one element) or per-channel (``[N]``, ``[N, 1]``) FP8 scale as float32 ``[N]``."""
    scale = weight_scale.float().reshape(-1)
    if scale.numel() == 1:
        return scale.expand(n)
    if scale.numel() != n:
        raise ValueError(f"weight_scale of {scale.numel()} elements does not fit {n} output channels")
    return scale


def dequantize_fp8_channel(weight: torch.Tensor, weight_scale: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight [N, K]`` fp8 times its per-channel or per-tensor scale -> ``[N, K]`` in ``dtype``."""
    return (weight.float() * channel_scale(weight_scale, weight.shape[0])[:, None]).to(dtype)


def dequantize_awq(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, group_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """AWQ GEMM-version tensors (module docstring) -> the ``[N, K]`` weight in ``dtype``."""
    q = unpack_along_cols(qweight, 4, AWQ_ORDER)  # [K, N]
    z = unpack_along_cols(qzeros, 4, AWQ_ORDER)  # [G, N]
    k, n = q.shape
    g = resolve_group(group_size, k)
    if tuple(scales.shape) != (-(-k // g), n) or z.shape != scales.shape:
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not fit qweight "
                         f"{tuple(qweight.shape)} with group size {group_size}")
    rows = torch.arange(k, device=q.device) // g
    w = (q - z[rows]).float() * scales.float()[rows]
    return w.t().contiguous().to(dtype)


def gptq_bits(qweight: torch.Tensor, in_features: int) -> int:
    """The bit width of a GPTQ ``qweight [K/p, N]`` for ``K = in_features``: 4 or 8."""
    if in_features % qweight.shape[0]:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not pack {in_features} input rows")
    bits = 32 // (in_features // qweight.shape[0])
    if bits not in (4, 8):
        raise ValueError(f"GPTQ qweight {tuple(qweight.shape)} for K={in_features} is {bits}-bit; only 4 and 8")
    return bits


def dequantize_gptq(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
                    group_size: int, bits: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GPTQ v1 tensors (module docstring) -> the ``[N, K]`` weight in ``dtype``. ``g_idx`` None means
    ``k // group_size`` (no act-order)."""
    q = unpack_along_rows(qweight, bits)  # [K, N]
    z = unpack_along_cols(qzeros, bits) + 1  # [G, N]: v1 stores zero - 1
    k, n = q.shape
    g = resolve_group(group_size, k)
    rows = torch.arange(k, device=q.device) // g if g_idx is None else g_idx.to(torch.long)
    if rows.shape != (k,) or scales.shape[1] != n or z.shape != scales.shape:
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} / g_idx do not fit qweight "
                         f"{tuple(qweight.shape)} ({bits}-bit)")
    w = (q - z[rows]).float() * scales.float()[rows]
    return w.t().contiguous().to(dtype)


def fp8_quantize_per_token_group_ref(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 quantization of ``x [M, K]`` per row and group of ``group_size`` columns (the last group may be
    shorter): ``scale = max(amax, eps) / 448`` in float32, ``x_q = x / scale`` as e4m3 (round to nearest even).
    Returns ``(x_q [M, K] float8_e4m3fn, scales [M, ceil(K/group_size)] float32)``."""
    m, k = x.shape
    groups = -(-k // group_size)
    xf = F.pad(x.float(), (0, groups * group_size - k)).view(m, groups, group_size)
    scale = xf.abs().amax(dim=-1).clamp_min(FP8_EPS) / FP8_MAX
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(m, -1)[:, :k].contiguous(), scale


def fp8_block_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                         block_size: tuple[int, int] = (128, 128), bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ dequantize_fp8_block(weight)^T + bias`` in x's dtype (the activations are not quantized)."""
    return F.linear(x, dequantize_fp8_block(weight, weight_scale_inv, block_size, x.dtype), bias)


def fp8_channel_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ dequantize_fp8_channel(weight)^T + bias`` in x's dtype (the activations are not quantized)."""
    return F.linear(x, dequantize_fp8_channel(weight, weight_scale, x.dtype), bias)


def int4_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                    g_idx: torch.Tensor | None, fmt: str, group_size: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T + bias`` in x's dtype, with W dequantized from ``fmt`` "awq" or "gptq" (4- or 8-bit,
    the width read from the shapes; ``g_idx`` is ignored for AWQ)."""
    if fmt == "awq":
        w = dequantize_awq(qweight, scales, qzeros, group_size, x.dtype)
    elif fmt == "gptq":
        bits = gptq_bits(qweight, x.shape[-1])
        w = dequantize_gptq(qweight, scales, qzeros, g_idx, group_size, bits, x.dtype)
    else:
        raise ValueError(f"unknown int4 format {fmt!r}; expected 'awq' or 'gptq'")
    return F.linear(x, w, bias)
