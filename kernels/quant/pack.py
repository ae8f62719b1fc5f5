"""Writers of the quantized formats (the inverses of reference.py's dequantizers): round-to-nearest quantization of
a float weight and the packing of its integers in AWQ's and GPTQ's layouts, and FP8 block / per-channel
quantization. For tests and for writing tiny checkpoints; not on the serving path. reference.py's docstring
describes each layout.

The integer convention throughout: ``q [K, N]`` (in features x out features, the checkpoints' orientation) of
unsigned ``bits``-bit values, ``zeros [G, N]`` the value subtracted before scaling (``w = (q - z) * s``),
``scales [G, N]``.
"""

from __future__ import annotations

import torch

from .reference import AWQ_ORDER, FP8_DTYPE, FP8_EPS, FP8_MAX, resolve_group


def _to_int32(packed: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits (two's complement)."""
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def pack_along_cols(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """``[R, C]`` unsigned ``bits``-bit integers -> int32 ``[R, C/p]``: bit position ``bits * i`` of each int32 holds
    column ``order[i]`` of its pack of ``p = 32 / bits`` (natural order when None)."""
    p = 32 // bits
    r, c = values.shape
    if c % p:
        raise ValueError(f"{c} columns do not pack by {p}")
    if int(values.min()) < 0 or int(values.max()) >= 1 << bits:
        raise ValueError(f"values outside [0, {(1 << bits) - 1}] do not fit {bits} bits")
    v = values.to(torch.int64).view(r, c // p, p)
    if order is not None:
        v = v[..., list(order)]  # by bit position
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    return _to_int32((v << shifts).sum(-1))


def pack_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[R, C]`` unsigned ``bits``-bit integers -> int32 ``[R/p, C]`` packed along R in natural order."""
    return pack_along_cols(values.t(), bits).t().contiguous()


def pack_awq(q: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit ``q [K, N]`` and ``zeros [G, N]`` -> AWQ's ``(qweight [K, N/8], qzeros [G, N/8])`` (interleaved order)."""
    return pack_along_cols(q, 4, AWQ_ORDER), pack_along_cols(zeros, 4, AWQ_ORDER)


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [K, N]`` and ``zeros [G, N]`` -> GPTQ v1's ``(qweight [K/p, N], qzeros [G, N/p])``, the zeros stored
    as ``zero - 1``. A zero of 0 has no v1 encoding (it would read back as ``2**bits``): ValueError."""
    if int(zeros.min()) < 1:
        raise ValueError("GPTQ v1 stores zero - 1: a zero point of 0 cannot be written (use zeros >= 1)")
    return pack_along_rows(q, bits), pack_along_cols(zeros - 1, bits)


def act_order_g_idx(k: int, group_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A GPTQ act-order ``g_idx [K]`` int32: rows visited in a random order, each run of ``group_size`` visited rows
    forming a group (what ``desc_act=True`` writes). Non-monotonic, every group of full size but the last."""
    g = resolve_group(group_size, k)
    perm = torch.randperm(k, generator=generator)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // g).to(torch.int32)
    return g_idx


def quantize_int(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                 g_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of ``weight [N, K]`` per group of K rows (``g_idx[k]`` names the group of row
    k; ``k // group_size`` when None). Returns int32 ``q [K, N]``, int32 ``zeros [G, N]``, float32
    ``scales [G, N]``. ``sym``: zero ``2**(bits-1)`` and ``scale = amax / (2**(bits-1) - 1)`` (GPTQ's sym, which
    AWQ-style checkpoints also accept); else asymmetric over ``[min(w, 0), max(w, 0)]`` with the zero clamped to
    ``[1, 2**bits - 1]`` so that GPTQ v1 can store it."""
    n, k = weight.shape
    g = resolve_group(group_size, k)
    dev = weight.device
    rows = torch.arange(k, device=dev) // g if g_idx is None else g_idx.to(dev, torch.long)
    groups = int(rows.max()) + 1
    w = weight.float().t()  # [K, N]
    maxq = (1 << bits) - 1
    scales = torch.empty(groups, n, device=dev)
    zeros = torch.empty(groups, n, dtype=torch.int32, device=dev)
    for grp in range(groups):
        block = w[rows == grp]
        lo, hi = block.min(0).values.clamp(max=0), block.max(0).values.clamp(min=0)
        if sym:
            scales[grp] = (torch.maximum(-lo, hi) / (maxq // 2)).clamp_min(1e-8)
            zeros[grp] = (maxq + 1) // 2
        else:
            scales[grp] = ((hi - lo) / maxq).clamp_min(1e-8)
            zeros[grp] = torch.round(-lo / scales[grp]).clamp(1, maxq).to(torch.int32)
    q = torch.round(w / scales[rows]) + zeros[rows]
    return q.clamp(0, maxq).to(torch.int32), zeros, scales


def quantize_fp8_block(weight: torch.Tensor,
                       block_size: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> ``(float8_e4m3fn [N, K], weight_scale_inv [ceil(N/bn), ceil(K/bk)] float32)``, one
    scale per block: ``scale = amax / 448`` (the DeepSeek-V3 checkpoints' convention)."""
    n, k = weight.shape
    bn, bk = block_size
    nb, kb = -(-n // bn), -(-k // bk)
    w = torch.nn.functional.pad(weight.float(), (0, kb * bk - k, 0, nb * bn - n)).view(nb, bn, kb, bk)
    scale = w.abs().amax(dim=(1, 3)).clamp_min(FP8_EPS) / FP8_MAX
    q = (w / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb * bn, kb * bk)[:n, :k].contiguous(), scale


def quantize_fp8_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> ``(float8_e4m3fn [N, K], weight_scale [N] float32)``, one scale per output channel."""
    scale = weight.float().abs().amax(dim=1).clamp_min(FP8_EPS) / FP8_MAX
    q = (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale
