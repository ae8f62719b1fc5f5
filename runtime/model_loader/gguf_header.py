"""Read one metadata value from a GGUF file's header without numpy, torch or the ``gguf`` package.

Xinference's supervisor asks every engine whether it can serve a model many times (start-up, catalog refresh,
the web UI's engine list); for a custom GGUF registration sglite needs the file's architecture there, and the
full reader takes seconds on a 49k-token vocabulary. The header is a sequence of typed key/value pairs
(GGUF v2/v3: little-endian; strings are a u64 length + UTF-8 bytes; arrays are an element type, a u64 count and
the elements); ``general.architecture`` normally comes first, so this reads a few hundred bytes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
                 "deepseek2": "DeepseekV2ForCausalLM"}
"""GGUF ``general.architecture`` -> the HF architecture sglite builds (Mistral GGUFs are ``llama``; ``deepseek2`` is
also V3, see `SIGMOID_ARCHITECTURES`)."""
MOE_ARCHITECTURES = {"llama": "MixtralForCausalLM"}
"""GGUF architectures whose files with ``{arch}.expert_count`` > 0 are a mixture of experts: llama.cpp writes
Mixtral as ``llama`` with stacked experts (``ffn_*_exps``)."""
SIGMOID_ARCHITECTURES = {"deepseek2": "DeepseekV3ForCausalLM"}
"""GGUF architectures whose files with ``{arch}.expert_gating_func`` = 2 (sigmoid) are another HF architecture:
llama.cpp's ``deepseek2`` holds DeepSeek-V2 / V2-Lite / V2.5 (softmax routing, or no key: llama.cpp's default) and
DeepSeek-V3 / R1 / Moonlight (sigmoid)."""
SIGMOID_GATING = 2  # gguf.ExpertGatingFuncType.SIGMOID

_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def hf_architecture(path: str | Path) -> str | None:
    """The HF architecture name of a GGUF file (``LlamaForCausalLM``), None when sglite does not build it.

    Raises:
        GGUFHeaderError: see `read_metadata_value`.
    """
    arch = read_metadata_value(path, "general.architecture")
    if not isinstance(arch, str):
        return None
    # llama.cpp writes the hyper-parameters before the tokenizer: a dense file's search ends at its first
    # ``tokenizer.*`` key instead of skipping a vocabulary of strings one by one.
    if arch in MOE_ARCHITECTURES and read_metadata_value(path, f"{arch}.expert_count", stop_prefix="tokenizer."):
        return MOE_ARCHITECTURES[arch]
    if arch in SIGMOID_ARCHITECTURES and read_metadata_value(
            path, f"{arch}.expert_gating_func", stop_prefix="tokenizer.") == SIGMOID_GATING:
        return SIGMOID_ARCHITECTURES[arch]
    return ARCHITECTURES.get(arch)


class GGUFHeaderError(ValueError):
    """A GGUF header that cannot be read: not GGUF, an unsupported version, or malformed (truncated, nested
    too deep, an unknown value type). The message names the file and what is wrong."""


def read_metadata_value(path: str | Path, key: str, max_keys: int = 64,
                        stop_prefix: str | None = None) -> object | None:
    """The value of ``key`` among the first ``max_keys`` metadata entries of the GGUF file, or None (also when an
    entry whose name starts with ``stop_prefix`` comes first).

    Raises:
        GGUFHeaderError: the file is not GGUF v2/v3, or its header is malformed (a ``ValueError``: whoever lists
            engines treats it as "not this engine's file" instead of crashing on ``struct.error``).
    """
    with open(path, "rb") as f:
        reader = _HeaderReader(f, str(path))
        if reader.read(4) != _MAGIC:
            raise GGUFHeaderError(f"{path} is not a GGUF file (bad magic)")
        version, _tensors, kv_count = reader.unpack("<IQQ")
        if version not in (2, 3):
            raise GGUFHeaderError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        for _ in range(min(kv_count, max_keys)):
            name = reader.string()
            if stop_prefix is not None and name.startswith(stop_prefix):
                return None
            (kind,) = reader.unpack("<I")
            if name == key:
                return reader.value(kind)
            reader.skip(kind)
    return None


MAX_ARRAY_DEPTH = 8
"""Deepest nesting of arrays read or skipped (real files nest none; a hostile one could recurse without end)."""


class _HeaderReader:
    """Typed reads from a GGUF header that fail with `GGUFHeaderError` instead of ``struct.error``,
    ``RecursionError`` or an allocation the size a hostile length field asks for."""

    def __init__(self, f: BinaryIO, path: str) -> None:
        self.f = f
        self.path = path
        self.size = os.fstat(f.fileno()).st_size

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes; a length past the end of the file is refused before anything is read."""
        if n > self.size - self.f.tell():
            raise GGUFHeaderError(f"{self.path}: the GGUF header is truncated (a field of {n} bytes at offset "
                                  f"{self.f.tell()} runs past the end of the {self.size}-byte file)")
        return self.f.read(n)

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        return self.read(length).decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0) -> object:
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.unpack("<" + _SCALARS[kind])[0]
        item_kind, count = self._array(kind, depth)
        return [self.value(item_kind, depth + 1) for _ in range(count)]

    def skip(self, kind: int, depth: int = 0) -> None:
        if kind == _STRING:
            (length,) = self.unpack("<Q")
            self._seek(length)
        elif kind in _SCALARS:
            self._seek(struct.calcsize("<" + _SCALARS[kind]))
        else:
            item_kind, count = self._array(kind, depth)
            if item_kind in _SCALARS:
                self._seek(count * struct.calcsize("<" + _SCALARS[item_kind]))
            else:
                for _ in range(count):
                    self.skip(item_kind, depth + 1)

    def _array(self, kind: int, depth: int) -> tuple[int, int]:
        """The (element type, count) of an array value of type ``kind`` (anything else is unknown)."""
        if kind != _ARRAY:
            raise GGUFHeaderError(f"{self.path}: unknown GGUF metadata type {kind} at offset {self.f.tell() - 4}")
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFHeaderError(f"{self.path}: GGUF metadata arrays nested more than {MAX_ARRAY_DEPTH} deep")
        item_kind, count = self.unpack("<IQ")
        return item_kind, count

    def _seek(self, n: int) -> None:
        if n > self.size - self.f.tell():
            self.read(n)  # raises: the value runs past the end of the file
        self.f.seek(n, 1)
