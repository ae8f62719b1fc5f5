"""Launch configs of the fused-MoE grouped GEMM: tuned JSON files per (E, N, device, dtype), else defaults.

A config file is named like SGLang's and vLLM's, ``E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json``
(N is the per-GPU intermediate size of one expert), and maps a batch size M (tokens, as a string key) to
``{"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"}``. The files ship in
``kernels/moe/configs/``; ``sglite bench moe-tune`` (``runtime/bench/moe_tune.py``) writes them on a GPU. Setting
``SGLITE_MOE_CONFIG_DIR`` puts another folder first (to try freshly tuned files before shipping them).
For an M between the tuned ones the nearest tuned M is used, as SGLang and vLLM do.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (strings pass through)."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def config_file_name(num_experts: int, intermediate: int, device_name: str, dtype: torch.dtype | str) -> str:
    """The JSON file name for one shape, device and dtype (spaces of the device name become underscores)."""
    device = device_name.replace(" ", "_")
    return f"E={num_experts},N={intermediate},device_name={device},dtype={dtype_name(dtype)}.json"


def make_config(block_m: int, block_n: int, block_k: int, group_m: int, num_warps: int,
                num_stages: int) -> dict[str, int]:
    """A config dict from its six values, in the order of ``CONFIG_KEYS``."""
    return dict(zip(CONFIG_KEYS, (block_m, block_n, block_k, group_m, num_warps, num_stages)))


def default_config(num_experts: int, m: int) -> dict[str, int]:
    """The untuned launch config for ``m`` tokens. Decode-sized batches (few rows per expert) take 16-row blocks,
    the smallest ``tl.dot`` tile, so an expert's one or two rows do not drag 64 rows of padding through the tensor
    cores; weight streaming is then what counts, hence wide K steps and a deep pipeline. Prefill takes 64- and
    128-row tiles, with GROUP_SIZE_M so that the programs running together share weight tiles in L2."""
    if m <= 32 or m <= num_experts:
        return make_config(16, 64, 128, 1, 4, 4)
    if m <= 512:
        return make_config(64, 64, 64, 8, 4, 3)
    return make_config(128, 128, 64, 8, 8, 3)


def config_dirs() -> list[Path]:
    """Where config files are looked for, first match wins: ``$SGLITE_MOE_CONFIG_DIR`` (if set), then the package's."""
    extra = os.environ.get("SGLITE_MOE_CONFIG_DIR")
    return ([Path(extra)] if extra else []) + [CONFIG_DIR]


@functools.lru_cache(maxsize=64)
def _load(path: Path, mtime: float) -> dict[int, dict[str, int]]:
    # mtime is part of the key so that a file rewritten by the tuner in this process is read again.
    del mtime
    raw = json.loads(path.read_text())
    return {int(m): {k: int(cfg[k]) for k in CONFIG_KEYS} for m, cfg in raw.items()}


def load_configs(num_experts: int, intermediate: int, device_name: str,
                 dtype: torch.dtype | str) -> dict[int, dict[str, int]] | None:
    """The tuned table {M: config} of the first matching file in ``config_dirs()``, or None."""
    name = config_file_name(num_experts, intermediate, device_name, dtype)
    for folder in config_dirs():
        path = folder / name
        if path.is_file():
            return _load(path, path.stat().st_mtime)
    return None


def current_device_name(device: torch.device | None = None) -> str:
    """``torch.cuda.get_device_name`` of ``device`` (the current CUDA device by default), ``"cpu"`` without CUDA."""
    if device is not None and device.type != "cuda":
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    return _cuda_name(torch.cuda.current_device() if device is None or device.index is None else device.index)


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def get_moe_config(num_experts: int, intermediate: int, m: int, dtype: torch.dtype | str,
                   device_name: str | None = None) -> dict[str, int]:
    """The launch config for ``m`` tokens: the entry of the nearest tuned M (ties go to the smaller M) in the file
    for (``num_experts``, ``intermediate``, ``device_name``, ``dtype``), else ``default_config``. ``device_name``
    defaults to the current CUDA device's name. Returns a new dict with the keys of ``CONFIG_KEYS``."""
    table = load_configs(num_experts, intermediate, device_name or current_device_name(), dtype)
    if not table:
        return default_config(num_experts, m)
    nearest = min(table, key=lambda tuned: (abs(tuned - m), tuned))
    return dict(table[nearest])
