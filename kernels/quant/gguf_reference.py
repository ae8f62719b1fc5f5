"""GGML's block formats (the GGUF tensor types sglite keeps quantized) and their torch references.

A weight ``W [N, K]`` is stored row by row, each row ``K / values`` blocks of ``bytes`` bytes
(``qweight`` uint8 ``[N, K / values, bytes]``). Layouts (``ggml-common.h``; ``d``, ``m``, ``dmin`` float16):

- Q8_0 (32 values, 34 bytes): ``d, qs[32]`` int8; ``w = d * q``.
- Q4_0 (32, 18): ``d, qs[16]``; value ``j`` is the low nibble of ``qs[j]``, value ``j + 16`` the high one;
  ``w = d * (q - 8)``. Q4_1 (32, 20): ``d, m, qs[16]``; ``w = d * q + m``.
- Q5_0 (32, 22): ``d, qh[4], qs[16]``; bit ``j`` of the little-endian ``qh`` is bit 4 of value ``j``;
  ``w = d * (q - 16)``. Q5_1 (32, 24): ``d, m, qh[4], qs[16]``; ``w = d * q + m``.
- Q4_K (256, 144): ``d, dmin, scales[12], qs[128]``; eight sub-blocks of 32 with 6-bit scales ``sc`` and mins
  ``mn`` packed in ``scales`` (ggml's ``get_scale_min_k4``); sub-block ``k`` is the low (``k`` even) or high
  nibbles of ``qs[32 (k // 2):][:32]``; ``w = d * sc[k] * q - dmin * mn[k]``.
- Q5_K (256, 176): ``d, dmin, scales[12], qh[32], qs[128]``; as Q4_K, plus bit ``k`` of ``qh[l]`` as bit 4 of
  value ``l`` of sub-block ``k``.
- Q6_K (256, 210): ``ql[128], qh[64], scales[16]`` int8, ``d``; value ``128 n + 32 c + l`` (``n`` < 2, ``c`` < 4)
  is the low (``c`` < 2) or high nibble of ``ql[64 n + 32 (c % 2) + l]`` with bits ``2c, 2c + 1`` of
  ``qh[32 n + l]`` above it; ``w = d * scales[8 n + 2 c + l // 16] * (q - 32)``.

``dequantize_gguf`` is the ground truth of the CPU kernels (``kernels/cpu/gguf.py``) and of the Triton ones
(``gguf_triton.py``, ``gguf_rows_ref`` for the embedding lookup); tests check it against
``gguf.quants.dequantize`` (llama.cpp's own Python reading). ``random_gguf_blocks`` draws valid blocks with small
scales for tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class GGUFBlock:
    """One block format: values and bytes per block, its ``ggml_type`` id, the byte offsets of its float16 scale
    fields (``d`` / ``m`` / ``dmin``: what `random_gguf_blocks` keeps small)."""

    name: str
    values: int
    bytes: int
    ggml_type: int
    f16_offsets: tuple[int, ...]


GGUF_BLOCKS = {b.name: b for b in (
    GGUFBlock("Q4_0", 32, 18, 2, (0,)),
    GGUFBlock("Q4_1", 32, 20, 3, (0, 2)),
    GGUFBlock("Q5_0", 32, 22, 6, (0,)),
    GGUFBlock("Q5_1", 32, 24, 7, (0, 2)),
    GGUFBlock("Q8_0", 32, 34, 8, (0,)),
    GGUFBlock("Q4_K", 256, 144, 12, (0, 2)),
    GGUFBlock("Q5_K", 256, 176, 13, (0, 2)),
    GGUFBlock("Q6_K", 256, 210, 14, (208,)),
)}
"""The types sglite keeps quantized (``Q2_K``, ``Q3_K`` and the ``IQ*`` types are dequantized at load)."""


def _f16(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 at byte ``offset`` of every block ``[..., bytes]`` -> float32 ``[..., 1]``."""
    return b[..., offset:offset + 2].contiguous().view(torch.float16).float()


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """``[..., 16]`` bytes -> ``[..., 32]`` codes: the low nibbles, then the high ones."""
    return torch.cat([q & 15, q >> 4], dim=-1).float()


def _bits(q: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` bytes -> ``[..., 8 n]`` bits, little-endian (bit ``j`` of byte ``i`` at ``8 i + j``)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device)
    return ((q[..., None] >> shifts) & 1).flatten(-2).float()


def _legacy(b: torch.Tensor, name: str) -> torch.Tensor:
    d = _f16(b, 0)
    if name == "Q8_0":
        return d * b[..., 2:34].contiguous().view(torch.int8).float()
    has_min = name in ("Q4_1", "Q5_1")
    qs = 4 if has_min else 2
    if name.startswith("Q5"):
        codes = _nibbles(b[..., qs + 4:qs + 20]) + 16 * _bits(b[..., qs:qs + 4])
        return d * codes + (_f16(b, 2) if has_min else -16 * d)
    codes = _nibbles(b[..., qs:qs + 16])
    return d * codes + (_f16(b, 2) if has_min else -8 * d)


def k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins packed in 12 bytes ``[..., 12]`` (ggml's ``get_scale_min_k4``) -> two
    float ``[..., 8]``."""
    s = scales.long()
    low_sc, low_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    high_sc = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    high_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([low_sc, high_sc], -1).float(), torch.cat([low_m, high_m], -1).float()


def _q45_k(b: torch.Tensor, fifth: bool) -> torch.Tensor:
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = k_scales_mins(b[..., 4:16])
    qs = b[..., 48:176] if fifth else b[..., 16:144]
    pairs = qs.reshape(*qs.shape[:-1], 4, 32)
    codes = torch.stack([pairs & 15, pairs >> 4], dim=-2).reshape(*qs.shape[:-1], 8, 32).float()
    if fifth:
        codes = codes + 16 * _bits(b[..., 16:48]).reshape(*qs.shape[:-1], 32, 8).transpose(-1, -2)
    return (d[..., None] * sc[..., None] * codes - dmin[..., None] * mn[..., None]).flatten(-2)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    lead = b.shape[:-1]
    ql = b[..., 0:128].reshape(*lead, 2, 2, 32)  # [n, c % 2, l]
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)  # [n, -, l]
    low = torch.cat([ql & 15, ql >> 4], dim=-2)  # [n, c, l] with c = 2 * (nibble) + c % 2
    shifts = (2 * torch.arange(4, dtype=torch.uint8, device=b.device)).reshape(4, 1)
    high = (qh >> shifts) & 3  # [n, c, l]
    codes = (low | (high << 4)).float() - 32
    scales = b[..., 192:208].contiguous().view(torch.int8).float().reshape(*lead, 2, 4, 2, 1)
    values = codes.reshape(*lead, 2, 4, 2, 16) * scales
    return _f16(b, 208) * values.reshape(*lead, 256)


def dequantize_gguf(qweight: torch.Tensor, qtype: str, in_features: int | None = None) -> torch.Tensor:
    """``W [N, K]`` float32 from ``qweight`` uint8 ``[N, K / values, bytes]`` (or ``[N, row bytes]``, with
    ``in_features`` K) of the block format ``qtype``."""
    block = GGUF_BLOCKS[qtype]
    rows = qweight.shape[0]
    b = qweight.reshape(rows, -1, block.bytes)
    if block.values == 32:
        w = _legacy(b, qtype)
    elif qtype == "Q6_K":
        w = _q6_k(b)
    else:
        w = _q45_k(b, fifth=qtype == "Q5_K")
    w = w.reshape(rows, -1)
    if in_features is not None and w.shape[1] != in_features:
        raise ValueError(f"{qtype} weight of {w.shape[1]} values per row, expected {in_features}")
    return w


def gguf_linear_ref(x: torch.Tensor, qweight: torch.Tensor, qtype: str,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W.T (+ bias)`` with ``W`` dequantized from its blocks, in ``x``'s dtype."""
    w = dequantize_gguf(qweight, qtype, x.shape[-1])
    return F.linear(x, w.to(x.dtype), bias)


def gguf_rows_ref(qweight: torch.Tensor, ids: torch.Tensor, qtype: str, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` (any shape) of the weight in ``qweight``'s blocks, dequantized and cast to ``dtype``:
    ``[*ids.shape, K]`` (an embedding lookup)."""
    rows = dequantize_gguf(qweight[ids.reshape(-1)], qtype)
    return rows.to(dtype).reshape(*ids.shape, rows.shape[-1])


def random_gguf_blocks(rows: int, cols: int, qtype: str, gen: torch.Generator | None = None,
                       scale: float = 0.01) -> torch.Tensor:
    """``[rows, cols / values, bytes]`` uint8 blocks of random codes with their float16 scale fields drawn
    uniform in ``[scale / 2, scale]`` (mins of Q4_1 / Q5_1 negative, so values centre near zero), on the device of
    ``gen`` (the CPU without one)."""
    block = GGUF_BLOCKS[qtype]
    if cols % block.values:
        raise ValueError(f"{qtype} rows hold multiples of {block.values} values, got {cols}")
    device = gen.device if gen is not None else None
    shape = (rows, cols // block.values)
    blocks = torch.randint(0, 256, (*shape, block.bytes), dtype=torch.uint8, generator=gen, device=device)
    for i, offset in enumerate(block.f16_offsets):
        value = torch.rand(*shape, 1, generator=gen, device=device) * scale / 2 + scale / 2
        if i == 1 and block.values == 32:  # Q4_1 / Q5_1's m: the minimum, about -d * 8 (or -d * 16)
            value = -value * (8 if qtype == "Q4_1" else 16)
        blocks[..., offset:offset + 2] = value.half().view(torch.uint8)
    return blocks
