"""Launch configs of the quantized-linear kernels: tuned JSON files per (kernel, N, K, device, dtype), else defaults.

A file is named ``kind=int4,N=4096,K=4096,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json`` (``kind`` one of
``KINDS``) and maps a row count M (as a string key) to ``{"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K",
"GROUP_SIZE_M", "SPLIT_K", "num_warps", "num_stages"}``; the nearest tuned M is used. The files ship in
``kernels/quant/configs/``; ``SGLITE_QUANT_CONFIG_DIR`` puts another folder first. The lookup itself is
kernels/tuned_configs.py, shared with the MoE configs. ``SPLIT_K`` only means something to the int4, GEMV and GGUF
kernels (the FP8 GEMM keeps it at 1). The decode GEMVs on CUDA cores (``GEMV_KINDS``: ``awq_gemv``, ``gptq_gemv``,
``fp8_block_gemv``, ``fp8_channel_gemv``, up to ``INT_GEMV_MAX_M`` / ``FP8_GEMV_MAX_M`` rows) have kinds of their
own: their tiles mean other things than the ``tl.dot`` kernels' (AWQ and GPTQ pack along different dims). The GGUF kernel has one kind per block format (``gguf_q4_k``...): decoding a
Q6_K block costs other instructions than a Q8_0 one, so each tunes apart; its ``BLOCK_SIZE_M`` below 16 selects
the GEMV (no ``tl.dot``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from .. import tuned_configs
from ..tuned_configs import (
    current_device_name,
    device_file_part,
    dtype_name,
    load_device_table,
    nearest_entry,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "SPLIT_K", "num_warps", "num_stages")
GGUF_KINDS = tuple(f"gguf_{t}" for t in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"))
GEMV_KINDS = ("awq_gemv", "gptq_gemv", "fp8_block_gemv", "fp8_channel_gemv")
KINDS = ("fp8_block", "fp8_channel", "int4") + GEMV_KINDS + GGUF_KINDS
# Up to this many rows the int4 tl.dot kernel runs as a split-K GEMV (one 16-row tile, the smallest tl.dot takes).
GEMV_MAX_M = 8
# Up to this many rows the weight-streaming GEMVs on CUDA cores run instead (kernels/quant/int4.py and fp8.py say
# why 4): int4 from AWQ / GPTQ words, FP8 weight-only (no activation quantization).
INT_GEMV_MAX_M = 4
FP8_GEMV_MAX_M = 4
# Programs a GEMV launch aims for: two per SM of an H100 / H200 (132 SMs), so every SM streams weights.
GEMV_TARGET_PROGRAMS = 264


def make_config(block_m: int, block_n: int, block_k: int, group_m: int, split_k: int, num_warps: int,
                num_stages: int) -> dict[str, int]:
    """A config dict from its seven values, in the order of ``CONFIG_KEYS``."""
    return dict(zip(CONFIG_KEYS, (block_m, block_n, block_k, group_m, split_k, num_warps, num_stages)))


def config_file_name(kind: str, n: int, k: int, device_name: str, dtype: torch.dtype | str) -> str:
    """The JSON file name for one kernel, weight shape, device and activation dtype."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantized kernel {kind!r}; expected one of {KINDS}")
    return f"kind={kind},N={n},K={k},device_name={device_file_part(device_name)},dtype={dtype_name(dtype)}.json"


def default_split_k(n: int, k: int, block_n: int, block_k: int) -> int:
    """Split K until the launch has about ``GEMV_TARGET_PROGRAMS`` programs (a power of two, each split keeping at
    least two K steps): at decode a 4096-wide output in 64-column strips is only 64 programs, half the SMs idle."""
    tiles = -(-n // block_n)
    split = 1
    while tiles * split * 2 <= GEMV_TARGET_PROGRAMS and k // (split * 2) >= 2 * block_k:
        split *= 2
    return split


def default_config(kind: str, n: int, k: int, m: int) -> dict[str, int]:
    """The untuned launch config for ``m`` rows. Decode-sized calls take 16-row tiles (the smallest ``tl.dot``
    tile) and narrow column strips, so that even N = 4096 spreads over the SMs and the weights stream with a deep
    pipeline (the skinny bf16 linear's shapes, kernels/linear.py); the int4 one also splits K. Prefill takes 64-
    and 128-row tiles with GROUP_SIZE_M, so that programs running together share weight tiles in L2."""
    if kind in GGUF_KINDS:
        return _gguf_default(n, k, m)
    if kind in GEMV_KINDS:
        return _gemv_default(kind, n, k)
    if kind == "int4":
        if m <= GEMV_MAX_M:
            bn, bk = 64, 128
            return make_config(16, bn, bk, 1, default_split_k(n, k, bn, bk), 4, 4)
        if m <= 32:
            return make_config(16, 128, 64, 1, 1, 4, 3)
        if m <= 128:
            return make_config(64, 64, 64, 8, 1, 4, 3)
        return make_config(128, 128, 64, 8, 1, 8, 3)
    if m <= 16:
        return make_config(16, 32 if n <= 8192 else 64, 128, 1, 1, 4, 6)
    if m <= 128:
        return make_config(64, 64, 128, 8, 1, 4, 4)
    return make_config(128, 128, 128, 8, 1, 8, 3)


# The decode GEMVs' untuned launch per kind: (BLOCK_SIZE_N, BLOCK_SIZE_K, SPLIT_K, num_warps), the consensus of the
# H100 sweep at Llama-3.1-8B's four shapes (2026-12-07): many small programs (2-16 K steps each, 1-2 warps) keep
# more loads in flight per SM than a few large ones; the defaults these replaced ran 1.2-2.3x slower at M = 1.
GEMV_DEFAULTS = {"awq_gemv": (128, 128, 16, 2), "gptq_gemv": (64, 128, 16, 1), "fp8_block_gemv": (16, 128, 8, 2),
                 "fp8_channel_gemv": (16, 512, 2, 4)}


def _gemv_default(kind: str, n: int, k: int) -> dict[str, int]:
    """The CUDA-core GEMVs (``BLOCK_SIZE_M`` unused: the launcher takes the rows rounded up to a power of two):
    ``GEMV_DEFAULTS``, the split halved until each split keeps two K steps. Tuned files replace these per shape."""
    bn, bk, split, warps = GEMV_DEFAULTS[kind]
    while split > 1 and k // split < 2 * bk:
        split //= 2
    return make_config(1, bn, bk, 1, split, warps, 3)


def _gguf_default(n: int, k: int, m: int) -> dict[str, int]:
    """GGUF: up to 4 rows a GEMV on CUDA cores (``BLOCK_SIZE_M`` = rows rounded up to a power of two; the tile
    product ``M x N x K`` kept at 4-8k floats of registers), 5-8 rows the 16-row ``tl.dot`` tile; both split K.
    Larger batches take the int4 kernel's GEMM tiles (the dequantization in the K loop is alike)."""
    if m <= 4:
        bm = 1 if m == 1 else 2 if m == 2 else 4
        bn, bk = 32, 128 if m == 1 else 64
        return make_config(bm, bn, bk, 1, default_split_k(n, k, bn, bk), 4, 3)
    if m <= GEMV_MAX_M:
        return make_config(16, 64, 128, 1, default_split_k(n, k, 64, 128), 4, 3)
    return default_config("int4", n, k, m)


def config_dirs() -> list[Path]:
    """Where config files are looked for, first match wins: ``$SGLITE_QUANT_CONFIG_DIR`` (if set), the package's."""
    return tuned_configs.config_dirs("SGLITE_QUANT_CONFIG_DIR", CONFIG_DIR)


def get_quant_config(kind: str, n: int, k: int, m: int, dtype: torch.dtype | str,
                     device: torch.device | str | None = None) -> dict[str, int]:
    """The launch config of kernel ``kind`` for an ``N x K`` weight and ``m`` rows: the nearest tuned M's entry in
    the file for (kind, N, K, device, dtype), else ``default_config``. ``device`` is a torch device (its name is
    looked up) or a device name; the current CUDA device by default. Returns a new dict with ``CONFIG_KEYS``."""
    name = device if isinstance(device, str) else current_device_name(device)
    return dict(_lookup(kind, n, k, m, dtype_name(dtype), name, os.environ.get("SGLITE_QUANT_CONFIG_DIR")))


@functools.lru_cache(maxsize=4096)
def _lookup(kind: str, n: int, k: int, m: int, dtype: str, device_name: str, extra_dir: str | None) -> dict[str, int]:
    # Cached: every quantized linear of every eager forward asks, and a file lookup is two stat calls. A tuner
    # passes its candidates explicitly; the environment folder is part of the key.
    del extra_dir
    table = load_device_table(lambda name: config_file_name(kind, n, k, name, dtype), device_name, config_dirs(),
                              CONFIG_KEYS)
    if not table:
        return default_config(kind, n, k, m)
    return nearest_entry(table, m)
