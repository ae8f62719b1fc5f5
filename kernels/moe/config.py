"""Launch configs of the fused-MoE grouped GEMM: tuned JSON files per (E, N, device, dtype), else defaults.

A config file is named like SGLang's and vLLM's, ``E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json``
(N is the per-GPU intermediate size of one expert), and maps a batch size M (tokens, as a string key) to
``{"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"}``. The files ship in
``kernels/moe/configs/``; ``sglite bench moe-tune`` (``runtime/bench/moe_tune.py``) writes them on a GPU. Setting
``SGLITE_MOE_CONFIG_DIR`` puts another folder first (to try freshly tuned files before shipping them).
For an M between the tuned ones the nearest tuned M is used, as SGLang and vLLM do (the file lookup is
kernels/tuned_configs.py, shared with kernels/quant/).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import tuned_configs

# current_device_name is this module's API too (fused.py and the tuner import it from here).
from ..tuned_configs import (
    current_device_name,
    device_file_part,
    dtype_name,
    load_device_table,
    nearest_entry,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


def config_file_name(num_experts: int, intermediate: int, device_name: str, dtype: torch.dtype | str) -> str:
    """The JSON file name for one shape, device and dtype (spaces of the device name become underscores)."""
    device = device_file_part(device_name)
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
    return tuned_configs.config_dirs("SGLITE_MOE_CONFIG_DIR", CONFIG_DIR)


def load_configs(num_experts: int, intermediate: int, device_name: str,
                 dtype: torch.dtype | str) -> dict[int, dict[str, int]] | None:
    """The tuned table {M: config} of the first matching file in ``config_dirs()``, or None."""
    return load_device_table(lambda name: config_file_name(num_experts, intermediate, name, dtype), device_name,
                             config_dirs(), CONFIG_KEYS)


def get_moe_config(num_experts: int, intermediate: int, m: int, dtype: torch.dtype | str,
                   device_name: str | None = None) -> dict[str, int]:
    """The launch config for ``m`` tokens: the entry of the nearest tuned M (ties go to the smaller M) in the file
    for (``num_experts``, ``intermediate``, ``device_name``, ``dtype``), else ``default_config``. ``device_name``
    defaults to the current CUDA device's name. Returns a new dict with the keys of ``CONFIG_KEYS``."""
    table = load_configs(num_experts, intermediate, device_name or current_device_name(), dtype)
    if not table:
        return default_config(num_experts, m)
    return nearest_entry(table, m)
