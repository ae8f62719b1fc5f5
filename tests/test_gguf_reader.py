"""sglite's own GGUF reader (`gguf_header.read_gguf`, issue 33: startup without decoding the vocabulary) against
``gguf.GGUFReader`` on the same files: the same metadata values (every value type, arrays of each, a custom
alignment), the same tensor table (types, shapes, sizes, offsets) and the same tensor bytes; arrays left undecoded
until asked; a damaged file refused with a ConfigError that says what is wrong. Files written at run time by
``gguf.GGUFWriter`` and the runtime's tiny-model writer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.model_loader.checkpoint import open_checkpoint
from xinf_sglang.runtime.model_loader.gguf_header import ArrayRef
from xinf_sglang.runtime.model_loader.gguf_header import read_gguf

from .gguf_writer import write_gguf

V = gguf.GGUFValueType
SCALARS = [(V.UINT8, 200), (V.INT8, -7), (V.UINT16, 60000), (V.INT16, -300), (V.UINT32, 4_000_000_000),
           (V.INT32, -5), (V.FLOAT32, 0.1), (V.BOOL, True), (V.UINT64, 2**63 + 5), (V.INT64, -(2**40)),
           (V.FLOAT64, 1e-300), (V.STRING, "héllo 😀")]
ARRAYS = {V.UINT8: [1, 2, 255], V.INT32: [-1, 0, 7], V.FLOAT32: [0.5, -1.25, 3.1], V.BOOL: [True, False, True],
          V.UINT64: [2**64 - 1, 0], V.FLOAT64: [1.5, -2.5], V.STRING: ["a", "", "ŝtring", "<|im_end|>"]}


def _write(path: Path, alignment: int | None = None, tensors: dict[str, tuple[np.ndarray, str]] | None = None) -> Path:
    """A GGUF with one key of every scalar type, an array of several item types, and ``tensors`` (name ->
    (array, GGML type name): quantized by ``gguf.quants`` unless F32/F16)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for kind, value in SCALARS:
        writer.add_key_value(f"test.scalar.{kind.name.lower()}", value, kind)
    for kind, values in ARRAYS.items():
        writer.add_key_value(f"test.array.{kind.name.lower()}", values, V.ARRAY, sub_type=kind)
    for name, (value, kind) in (tensors or {}).items():
        qtype = gguf.GGMLQuantizationType[kind]
        if kind in ("F32", "F16"):
            writer.add_tensor(name, value.astype(np.float32 if kind == "F32" else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensors(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, str]]:
    w = rng.standard_normal((8, 64)).astype(np.float32)
    return {"a.weight": (w, "Q8_0"), "b.weight": (w, "Q4_1"), "c.weight": (w, "F16"),
            "d.bias": (rng.standard_normal(5).astype(np.float32), "F32"),
            "e.weight": (rng.standard_normal((2, 3, 32)).astype(np.float32), "Q4_0")}


def assert_same_as_gguf_reader(path: Path) -> None:
    """Every key, every tensor's table entry and bytes equal ``gguf.GGUFReader``'s."""
    ours, ref = read_gguf(path), gguf.GGUFReader(str(path))
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(ref_fields)
    for key, field in ref_fields.items():
        assert ours.get(key) == field.contents(), key
        if field.types[0] == V.ARRAY:
            assert ours.count(key) == len(field.data)
    assert ours.data_offset == ref.data_offset
    assert len(ours.tensors) == len(ref.tensors)
    for mine, theirs in zip(ours.tensors, ref.tensors):
        assert (mine.name, mine.tensor_type, mine.n_elements, mine.n_bytes, mine.data_offset) == (
            theirs.name, theirs.tensor_type, theirs.n_elements, theirs.n_bytes, theirs.data_offset)
        assert list(mine.shape) == theirs.shape.tolist()
        assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape, mine.name
        assert mine.data.tobytes() == np.asarray(theirs.data).tobytes(), mine.name


@pytest.mark.parametrize("alignment", [None, 64])
def test_metadata_and_tensors_equal_gguf_reader(tmp_path: Path, alignment: int | None) -> None:
    path = _write(tmp_path / "all-types.gguf", alignment, _tensors(np.random.default_rng(0)))
    assert_same_as_gguf_reader(path)
    part = read_gguf(path)
    assert part.get("test.scalar.string") == "héllo 😀" and part.get("no.such.key", 3) == 3
    assert part.count("test.array.string") == 4 and part.count("test.scalar.int32") == 0


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K", "Q6_K"])
def test_tiny_model_files_equal_gguf_reader(tmp_path: Path, tiny_model, qtype: str) -> None:
    """The runtime's writer's files (vocabulary, merges, chat template, K-quant blocks) read alike."""
    wide = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
    assert_same_as_gguf_reader(write_gguf(tiny_model("llama", **wide), tmp_path / f"tiny-{qtype}.gguf", qtype))


def test_vocabulary_is_not_decoded_until_asked(tmp_path: Path, tiny_model) -> None:
    path = write_gguf(tiny_model("qwen2"), tmp_path / "tiny.gguf", "Q8_0")
    part = read_gguf(path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert isinstance(part.fields[key], ArrayRef)
    tokens = part.get("tokenizer.ggml.tokens")
    assert len(tokens) == part.count("tokenizer.ggml.tokens") > 100 and all(isinstance(t, str) for t in tokens)


def test_smollm2_file_equals_gguf_reader(smollm2) -> None:
    """The real Q4_1 file: 49k tokens and merges, a Q8_0 embedding, 272 tensors."""
    assert_same_as_gguf_reader(smollm2.gguf)


def _cut(path: Path, size: int, name: str) -> Path:
    out = path.with_name(name)
    out.write_bytes(path.read_bytes()[:size])
    return out


def test_damaged_files_raise_a_clear_config_error(tmp_path: Path, tiny_model) -> None:
    good = write_gguf(tiny_model("llama"), tmp_path / "good.gguf", "Q8_0")
    part = read_gguf(good)
    last = part.tensors[-1]
    vocab = part.fields["tokenizer.ggml.tokens"]
    cases = {
        _cut(good, 0, "empty.gguf"): "empty",
        _cut(good, 20, "header.gguf"): "truncated",
        _cut(good, vocab.offset + 100, "vocab.gguf"): "truncated",  # inside the array of token strings
        _cut(good, part.data_offset - 10, "table.gguf"): "truncated",  # inside the tensor table
        _cut(good, last.data_offset + last.n_bytes - 1, "data.gguf"): f"{last.name}.*runs past the end",
    }
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGML" + good.read_bytes()[4:])
    cases[bad] = "bad magic"
    for path, words in cases.items():
        with pytest.raises(ConfigError, match=words) as info:
            open_checkpoint(path)
        assert str(path) in str(info.value) and "is not a readable GGUF file" in str(info.value)


def test_unknown_tensor_type_and_duplicates_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "one.gguf", tensors={"a.weight": (np.ones((2, 32), np.float32), "Q8_0")})
    data = bytearray(path.read_bytes())
    entry = data.rindex(b"a.weight") + len(b"a.weight")  # then n_dims (u32), 2 dims (u64), type (u32)
    unknown = bytearray(data)
    unknown[entry + 20:entry + 24] = (250).to_bytes(4, "little")
    (tmp_path / "unknown.gguf").write_bytes(bytes(unknown))
    with pytest.raises(ConfigError, match="unknown GGML type 250"):
        open_checkpoint(tmp_path / "unknown.gguf")
    dup = bytes(data).replace(b"test.scalar.uint8", b"test.scalar.int16")  # same length: the file stays well-formed
    (tmp_path / "dup.gguf").write_bytes(dup)
    with pytest.raises(ConfigError, match="'test.scalar.int16' appears more than once"):
        open_checkpoint(tmp_path / "dup.gguf")


def test_the_header_module_imports_neither_numpy_nor_gguf(tmp_path: Path) -> None:
    """Xinference's supervisor reads a custom GGUF's architecture through it (`read_metadata_value`)."""
    import subprocess
    import sys

    path = _write(tmp_path / "one.gguf")
    code = ("import sys\nfrom xinf_sglang.runtime.model_loader.gguf_header import read_metadata_value\n"
            f"assert read_metadata_value({str(path)!r}, 'test.scalar.int8') == -7\n"
            "print(sorted(m for m in ('numpy', 'gguf', 'torch') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
