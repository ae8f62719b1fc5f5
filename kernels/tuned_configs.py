"""Tuned launch configs on disk, shared by the kernels that ship them (kernels/moe/, kernels/quant/).

A table is one JSON file per (shape, device, dtype) that maps a row count M (as a string key) to a dict of integer
launch parameters. It is looked for in a list of folders, first match wins: the folder named by an environment
variable (to try freshly tuned files before shipping them), then the package's own. For an M between the tuned ones
the nearest tuned M is used (ties go to the smaller), as SGLang and vLLM do. Each user names its files, keys and
defaults; this module only finds, reads and picks.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (strings pass through)."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def device_file_part(device_name: str) -> str:
    """A device name as it appears in file names: spaces become underscores."""
    return device_name.replace(" ", "_")


def config_dirs(env_var: str, package_dir: Path) -> list[Path]:
    """``[$env_var (if set), package_dir]``: where a user's config files are looked for, in order."""
    extra = os.environ.get(env_var)
    return ([Path(extra)] if extra else []) + [package_dir]


@functools.lru_cache(maxsize=128)
def _load(path: Path, mtime: float, keys: tuple[str, ...]) -> dict[int, dict[str, int]]:
    # mtime is part of the key so that a file rewritten by a tuner in this process is read again.
    del mtime
    raw = json.loads(path.read_text())
    return {int(m): {k: int(cfg[k]) for k in keys} for m, cfg in raw.items()}


def load_table(file_name: str, folders: list[Path], keys: tuple[str, ...]) -> dict[int, dict[str, int]] | None:
    """The table {M: config restricted to ``keys``} of the first folder that holds ``file_name``, or None."""
    for folder in folders:
        path = folder / file_name
        if path.is_file():
            return _load(path, path.stat().st_mtime, keys)
    return None


# Cards with the same die, SM count and clocks as a card that configs were tuned on: the launch shapes that suit one
# suit the other (only the memory differs: the H200 is the H100's GH100 with HBM3e). Asked for when a card has no
# file of its own; the log says so once.
STAND_INS = {"NVIDIA H200": "NVIDIA H100 80GB HBM3"}


def load_device_table(file_name: Callable[[str], str], device_name: str, folders: list[Path],
                      keys: tuple[str, ...]) -> dict[int, dict[str, int]] | None:
    """`load_table` of ``file_name(device_name)``; where there is none and the card has a stand-in
    (`STAND_INS`), the stand-in's table (logged once per file)."""
    table = load_table(file_name(device_name), folders, keys)
    stand_in = STAND_INS.get(device_name)
    if table is None and stand_in is not None:
        table = load_table(file_name(stand_in), folders, keys)
        if table is not None:
            _log_stand_in(file_name(device_name), stand_in)
    return table


@functools.cache
def _log_stand_in(file_name: str, stand_in: str) -> None:
    logger.info("tuned configs: no %s; using the %s file (same die and SM count)", file_name, stand_in)


def nearest_entry(table: dict[int, dict[str, int]], m: int) -> dict[str, int]:
    """A copy of the entry of the tuned M nearest to ``m`` (ties go to the smaller M)."""
    nearest = min(table, key=lambda tuned: (abs(tuned - m), tuned))
    return dict(table[nearest])


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
