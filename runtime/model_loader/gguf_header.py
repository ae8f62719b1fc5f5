"""Read a GGUF file's header without numpy, torch or the ``gguf`` package at import: one metadata value
(`read_metadata_value`), or the whole metadata and tensor table (`read_gguf`), arrays left undecoded.

Xinference's supervisor asks every engine whether it can serve a model many times (start-up, catalog refresh,
the web UI's engine list); for a custom GGUF registration sglite needs the file's architecture there, and the
full reader takes seconds on a 49k-token vocabulary. The header is a sequence of typed key/value pairs
(GGUF v2/v3: little-endian; strings are a u64 length + UTF-8 bytes; arrays are an element type, a u64 count and
the elements); ``general.architecture`` normally comes first, so this reads a few hundred bytes. The file is
read through a memory map: skipping an array of strings reads only their length fields.

`read_gguf` replaces ``gguf.GGUFReader`` for loading a checkpoint. That one builds a numpy view per metadata element:
on SmolLM2's 49k-token vocabulary (tokens, scores, types, 49k merges) ~1M small arrays, ~3.5 s and ~220 MiB at
peak, paid at every launch although the vocabulary is only read when the tokenizer is converted (a cache miss,
`gguf_tokenizer_cache`). Here scalars and strings are decoded, an array is kept as its `ArrayRef` (its place in the
file) and decoded when asked (`GGUFPart.get`); a tensor's data are read from the file when asked
(`GGUFTensor.data`), shaped as ``GGUFReader`` shapes them (float types typed, block types as bytes
``[..., row bytes]``), so ``gguf.quants.dequantize`` takes them as they are. After the key/value pairs come the
tensor infos (name, dimension count, dimensions fastest first, GGML type, offset from the data start), padding to
``general.alignment`` (default 32), the tensor data. Anything out of place raises `GGUFHeaderError` naming the file:
truncation, duplicate keys or tensors, an unknown GGML type, a row that is not a whole number of blocks, a tensor
past the end of the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

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
DEFAULT_ALIGNMENT = 32  # gguf.GGUF_DEFAULT_ALIGNMENT
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
    with mapped(path) as buffer:
        reader = HeaderReader(buffer, str(path))
        _tensors, kv_count = reader.start()
        for _ in range(min(kv_count, max_keys)):
            name = reader.string()
            if stop_prefix is not None and name.startswith(stop_prefix):
                return None
            (kind,) = reader.unpack("<I")
            if name == key:
                return reader.value(kind)
            reader.skip(kind)
    return None


@contextmanager
def mapped(path: str | Path) -> Iterator[mmap.mmap]:
    """The file as a read-only memory map, closed on the way out (a header read touches only its own pages).

    Raises:
        GGUFHeaderError: the file is empty (nothing to map).
    """
    buffer = _map(path)
    try:
        yield buffer
    finally:
        buffer.close()


def _map(path: str | Path) -> mmap.mmap:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # mmap refuses an empty file
            raise GGUFHeaderError(f"{path} is not a GGUF file (it is empty)")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


MAX_ARRAY_DEPTH = 8
"""Deepest nesting of arrays read or skipped (real files nest none; a hostile one could recurse without end)."""


@dataclass(frozen=True)
class ArrayRef:
    """Where an array value lies in the file, not decoded (a 49k-entry vocabulary costs ~100 MiB as Python
    objects): `HeaderReader.array` decodes it when asked."""

    item_kind: int
    count: int
    offset: int  # of the first element


class HeaderReader:
    """Typed reads at a cursor (``pos``) over a GGUF file's bytes (a memory map) that fail with `GGUFHeaderError`
    instead of ``struct.error``, ``RecursionError`` or an allocation the size a hostile length field asks for."""

    def __init__(self, buffer: mmap.mmap | bytes, path: str, pos: int = 0) -> None:
        self.buffer = buffer
        self.path = path
        self.size = len(buffer)
        self.pos = pos

    def start(self) -> tuple[int, int]:
        """Check the magic and the version at the file's start; the ``(tensor count, key/value count)``."""
        if self.read(4) != _MAGIC:
            raise GGUFHeaderError(f"{self.path} is not a GGUF file (bad magic)")
        version, tensors, kv_count = self.unpack("<IQQ")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise GGUFHeaderError(f"{self.path}: GGUF version {version} is not supported (2 or 3){hint}")
        return tensors, kv_count

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes; a length past the end of the file is refused before anything is read."""
        self._check(n)
        data = self.buffer[self.pos:self.pos + n]
        self.pos += n
        return data

    def unpack(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        self._check(n)
        values = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += n
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        return self.read(length).decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0) -> object:
        """The value of type ``kind`` at the cursor (arrays as lists, nested ones nested)."""
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.unpack("<" + _SCALARS[kind])[0]
        return self.array(self._array(kind, depth), depth)

    def lazy_value(self, kind: int) -> object:
        """Like `value`, but an array comes as its `ArrayRef` (the cursor skips its elements)."""
        if kind != _ARRAY:
            return self.value(kind)
        ref = self._array(kind, 0)
        self._skip_items(ref, 0)
        return ref

    def array(self, ref: ArrayRef, depth: int = 0) -> list:
        """The elements of ``ref`` (the cursor moves past them)."""
        self.pos = ref.offset
        if ref.item_kind in _SCALARS:  # one unpack for the lot, its size checked before struct sees the count
            self._check(ref.count * struct.calcsize("<" + _SCALARS[ref.item_kind]))
            return list(self.unpack(f"<{ref.count}{_SCALARS[ref.item_kind]}"))
        return [self.value(ref.item_kind, depth + 1) for _ in range(ref.count)]

    def skip(self, kind: int, depth: int = 0) -> None:
        if kind == _STRING:
            (length,) = self.unpack("<Q")
            self._seek(length)
        elif kind in _SCALARS:
            self._seek(struct.calcsize("<" + _SCALARS[kind]))
        else:
            self._skip_items(self._array(kind, depth), depth)

    def _skip_items(self, ref: ArrayRef, depth: int) -> None:
        if ref.item_kind in _SCALARS:
            self._seek(ref.count * struct.calcsize("<" + _SCALARS[ref.item_kind]))
        elif ref.item_kind == _STRING:
            self._skip_strings(ref.count)
        else:
            for _ in range(ref.count):
                self.skip(ref.item_kind, depth + 1)

    def _skip_strings(self, count: int) -> None:
        """Past ``count`` strings: only their lengths are read (the vocabulary's ~100k strings in a few ms)."""
        buffer, pos, end = self.buffer, self.pos, self.size - 8
        for _ in range(count):
            if pos > end:  # this string's length field (or its bytes) runs past the end of the file
                self._seek(pos + 8 - self.pos)  # raises
            pos += 8 + struct.unpack_from("<Q", buffer, pos)[0]
        self._seek(pos - self.pos)

    def _array(self, kind: int, depth: int) -> ArrayRef:
        """The `ArrayRef` of an array value of type ``kind`` at the cursor (anything else is unknown)."""
        if kind != _ARRAY:
            raise GGUFHeaderError(f"{self.path}: unknown GGUF metadata type {kind} at offset {self.pos - 4}")
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFHeaderError(f"{self.path}: GGUF metadata arrays nested more than {MAX_ARRAY_DEPTH} deep")
        item_kind, count = self.unpack("<IQ")
        return ArrayRef(item_kind, count, self.pos)

    def _check(self, n: int) -> None:
        if n > self.size - self.pos:
            raise GGUFHeaderError(f"{self.path}: the GGUF header is truncated (a field of {n} bytes at offset "
                                  f"{self.pos} runs past the end of the {self.size}-byte file)")

    def _seek(self, n: int) -> None:
        self._check(n)
        self.pos += n


_TYPED = {"F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "I16": "int16", "I32": "int32",
          "I64": "int64"}
"""GGML types whose data come as typed numpy arrays (as ``GGUFReader`` gives them); the others as bytes."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry of the table: ``shape`` in GGUF order (fastest first); ``data_offset`` from the file's
    start. Nothing of its data is read until `data` is asked for."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int
    path: Path = field(repr=False, compare=False)

    @property
    def data(self) -> np.ndarray:
        """The tensor read from the file into a new writable array: typed for `_TYPED` types, else uint8 with the
        last (numpy) dimension in bytes; numpy dimension order (slowest first).

        Read, not memory-mapped: the loader copies every tensor into its parameter, and pages of a map touched on
        the way count in the process's RSS until the map is closed (~100 MiB more at the peak on SmolLM2's file)."""
        import numpy as np
        from gguf import GGML_QUANT_SIZES

        dims = tuple(reversed(self.shape))
        dtype = np.dtype(_TYPED.get(self.tensor_type.name, "uint8"))
        if self.tensor_type.name not in _TYPED:
            block, size = GGML_QUANT_SIZES[self.tensor_type]
            dims = (*dims[:-1], dims[-1] // block * size) if dims else (self.n_bytes,)
        out = np.empty(self.n_bytes // dtype.itemsize, dtype=dtype)
        self._read_into(memoryview(out.view(np.uint8)))
        return out.reshape(dims)

    def _read_into(self, view: memoryview) -> None:
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_offset)
            done = 0
            while done < self.n_bytes:  # one read returns at most ~2 GiB on Linux
                n = f.readinto(view[done:])
                if not n:
                    raise GGUFHeaderError(f"{self.path}: tensor {self.name!r} is cut short at byte {done} of "
                                          f"{self.n_bytes} (the file changed after it was opened?)")
                done += n


@dataclass
class GGUFPart:
    """One GGUF file: its metadata (`get`, `count`), its tensors and where their data start (``data_offset``,
    which also ends the bytes the metadata and table take)."""

    path: Path
    fields: dict[str, Any]
    tensors: list[GGUFTensor]
    data_offset: int
    buffer: mmap.mmap = field(repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` (an array as a list, decoded now), or ``default`` when absent."""
        value = self.fields.get(key, default)
        if isinstance(value, ArrayRef):
            return HeaderReader(self.buffer, str(self.path)).array(value)
        return value

    def count(self, key: str) -> int:
        """Number of items of an array field (0 when absent or not an array), without decoding them."""
        value = self.fields.get(key)
        return value.count if isinstance(value, ArrayRef) else 0


def read_gguf(path: str | Path) -> GGUFPart:
    """The metadata and tensor table of the GGUF file at ``path`` (tensor data are read when asked).

    Raises:
        GGUFHeaderError: see the module docstring; OSError: the file cannot be opened.
    """
    path = Path(path)
    buffer = _map(path)  # kept open by the part: arrays are decoded from it when asked
    reader = HeaderReader(buffer, str(path))
    tensor_count, kv_count = reader.start()
    fields = _read_fields(reader, kv_count)
    infos = [_tensor_info(reader) for _ in range(tensor_count)]
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFHeaderError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-reader.pos // alignment) * alignment
    tensors = [_tensor(reader, data_offset, *info) for info in infos]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise GGUFHeaderError(f"{path}: tensor {dup!r} appears more than once")
    return GGUFPart(path, fields, tensors, data_offset, buffer)


def _read_fields(reader: HeaderReader, count: int) -> dict[str, Any]:
    """The key/value pairs, arrays as `ArrayRef`s."""
    fields: dict[str, Any] = {}
    for _ in range(count):
        name = reader.string()
        (kind,) = reader.unpack("<I")
        if name in fields:
            raise GGUFHeaderError(f"{reader.path}: metadata key {name!r} appears more than once")
        fields[name] = reader.lazy_value(kind)
    return fields


def _tensor_info(reader: HeaderReader) -> tuple[str, tuple[int, ...], int, int]:
    """``(name, dims fastest first, GGML type id, offset from the data start)`` of the next table entry."""
    name = reader.string()
    (n_dims,) = reader.unpack("<I")
    dims = reader.unpack(f"<{n_dims}Q")  # a count past the end of the file is refused before struct reads it
    kind, offset = reader.unpack("<IQ")
    return name, dims, kind, offset


def _tensor(reader: HeaderReader, data_offset: int, name: str, dims: tuple[int, ...], kind: int,
            offset: int) -> GGUFTensor:
    """The `GGUFTensor` of a table entry, checked: a known type, whole blocks per row, data inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        ggml_type = GGMLQuantizationType(kind)
    except ValueError:
        raise GGUFHeaderError(f"{reader.path}: tensor {name!r} has an unknown GGML type {kind}") from None
    block, size = GGML_QUANT_SIZES[ggml_type]
    n_elements = math.prod(dims)
    if dims and dims[0] % block:
        raise GGUFHeaderError(f"{reader.path}: tensor {name!r} rows of {dims[0]} values are not whole "
                              f"{ggml_type.name} blocks of {block}")
    n_bytes = n_elements // block * size
    start = data_offset + offset
    if start + n_bytes > reader.size:
        raise GGUFHeaderError(f"{reader.path}: tensor {name!r} ({n_bytes} bytes at offset {start}) runs past the "
                              f"end of the {reader.size}-byte file (truncated?)")
    return GGUFTensor(name, ggml_type, dims, n_elements, n_bytes, start, Path(reader.path))
