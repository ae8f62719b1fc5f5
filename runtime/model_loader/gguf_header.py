"""Read one metadata value from a GGUF file's header without numpy, torch or the ``gguf`` package.

Xinference's supervisor asks every engine whether it can serve a model many times (start-up, catalog refresh,
the web UI's engine list); for a custom GGUF registration sglite needs the file's architecture there, and the
full reader takes seconds on a 49k-token vocabulary. The header is a sequence of typed key/value pairs
(GGUF v2/v3: little-endian; strings are a u64 length + UTF-8 bytes; arrays are an element type, a u64 count and
the elements); ``general.architecture`` normally comes first, so this reads a few hundred bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
"""GGUF ``general.architecture`` -> the HF architecture sglite builds (Mistral GGUFs are ``llama``)."""

_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def hf_architecture(path: str | Path) -> str | None:
    """The HF architecture name of a GGUF file (``LlamaForCausalLM``), None when sglite does not build it."""
    arch = read_metadata_value(path, "general.architecture")
    return ARCHITECTURES.get(arch) if isinstance(arch, str) else None


def read_metadata_value(path: str | Path, key: str, max_keys: int = 64) -> object | None:
    """The value of ``key`` among the first ``max_keys`` metadata entries of the GGUF file, or None.

    Raises:
        ValueError: the file is not GGUF v2/v3.
    """
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        version, _tensors, kv_count = struct.unpack("<IQQ", f.read(20))
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        for _ in range(min(kv_count, max_keys)):
            name = _read_string(f)
            kind = struct.unpack("<I", f.read(4))[0]
            if name == key:
                return _read_value(f, kind)
            _skip_value(f, kind)
    return None


def _read_string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, kind: int) -> object:
    if kind == _STRING:
        return _read_string(f)
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if kind == _ARRAY:
        item_kind, count = struct.unpack("<IQ", f.read(12))
        return [_read_value(f, item_kind) for _ in range(count)]
    raise ValueError(f"unknown GGUF metadata type {kind}")


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind == _STRING:
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(length, 1)
    elif kind in _SCALARS:
        f.seek(struct.calcsize("<" + _SCALARS[kind]), 1)
    elif kind == _ARRAY:
        item_kind, count = struct.unpack("<IQ", f.read(12))
        if item_kind in _SCALARS:
            f.seek(count * struct.calcsize("<" + _SCALARS[item_kind]), 1)
        else:
            for _ in range(count):
                _skip_value(f, item_kind)
    else:
        raise ValueError(f"unknown GGUF metadata type {kind}")
