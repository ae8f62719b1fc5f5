"""GGUF checkpoints: name mapping, the llama Q/K un-permutation, every dequantized type, tokenizer and EOS from the
metadata, clear errors; greedy tokens equal HF transformers loading the same GGUF file (tiny models of the three
architectures, and the real SmolLM2-135M-Instruct Q4_1 file)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from xinf_sglang.runtime import SamplingParams
from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.model_loader.checkpoint import GGUFCheckpoint, open_checkpoint
from xinf_sglang.runtime.model_loader.gguf import DEQUANTIZED_TYPES, hf_tensor_name, unpermute_qk
from xinf_sglang.runtime.model_loader.gguf_header import hf_architecture, read_metadata_value

from .engine_helpers import hf_greedy, make_engine, varied_prompts
from .gguf_writer import llama_cpp_permute, write_gguf

# K quants need rows of 256 values: a tiny llama wide enough for every type; Qwen3 at head_dim 128 because
# transformers' GGUF reader ignores attention.key_length for qwen3 (it assumes 128).
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
QWEN3 = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 128}
NEW_TOKENS = 12


@pytest.mark.parametrize("heads,rows_per_head,cols", [(4, 16, 8), (2, 64, 3), (1, 8, 1)])
def test_unpermute_inverts_llama_cpp_permute(heads: int, rows_per_head: int, cols: int) -> None:
    w = torch.randn(heads * rows_per_head, cols)
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), heads))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, heads), w)


def test_tensor_names_map_to_hf() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.12.attn_q.bias") == "model.layers.12.self_attn.q_proj.bias"
    assert hf_tensor_name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    assert hf_tensor_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hf_tensor_name("rope_freqs.weight") is None


def _gguf(tmp_path_factory, tiny_model, arch: str, qtype: str, **overrides) -> Path:
    folder = tmp_path_factory.mktemp(f"gguf-{arch}-{qtype}")
    return write_gguf(tiny_model(arch, **overrides), folder / f"tiny-{arch}-{qtype}.gguf", qtype)


def _assert_greedy_equals_hf(gguf_file: Path, source_dir: Path) -> None:
    prompts = varied_prompts(source_dir, 4, min_len=3, max_len=40)
    expected = [hf_greedy(gguf_file.parent, p, NEW_TOKENS, gguf_file=gguf_file.name) for p in prompts]
    engine = make_engine(gguf_file, max_total_tokens=1024)
    try:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert [o.token_ids for o in outs] == expected
        assert engine.check_invariants() == []
    finally:
        engine.shutdown()


@pytest.mark.parametrize("qtype", DEQUANTIZED_TYPES)
def test_tiny_llama_gguf_greedy_equals_hf(qtype: str, tmp_path_factory, tiny_model) -> None:
    """Every dequantized type, on the architecture whose Q/K rows llama.cpp permutes."""
    _assert_greedy_equals_hf(_gguf(tmp_path_factory, tiny_model, "llama", qtype, **WIDE), tiny_model("llama", **WIDE))


@pytest.mark.parametrize("arch,qtype,overrides", [("qwen2", "Q8_0", {}), ("qwen3", "Q4_K", QWEN3)])
def test_tiny_qwen_gguf_greedy_equals_hf(arch: str, qtype: str, overrides: dict, tmp_path_factory,
                                         tiny_model) -> None:
    """Qwen2 (q/k/v biases) and Qwen3 (q/k norms): no permutation."""
    _assert_greedy_equals_hf(_gguf(tmp_path_factory, tiny_model, arch, qtype, **overrides),
                             tiny_model(arch, **overrides))


def test_tokenizer_eos_and_template_come_from_the_metadata(tmp_path_factory, tiny_model) -> None:
    from transformers import AutoTokenizer

    source = tiny_model("qwen2")
    ckpt = open_checkpoint(_gguf(tmp_path_factory, tiny_model, "qwen2", "F16"))
    assert isinstance(ckpt, GGUFCheckpoint)
    tok, ref = ckpt.load_tokenizer(), AutoTokenizer.from_pretrained(source)
    text = "def f(x):\n\treturn x  # héllo 😀"
    assert tok(text).input_ids == ref(text).input_ids
    assert tok.eos_token_id == ref.eos_token_id and ckpt.eos_token_ids() == {ref.eos_token_id}
    assert tok.chat_template == ref.chat_template
    assert ckpt.model_config.architecture == "Qwen2ForCausalLM"
    assert ckpt.quantization == "F16"


def test_header_reader_without_the_gguf_package(tmp_path_factory, tiny_model) -> None:
    path = _gguf(tmp_path_factory, tiny_model, "llama", "Q8_0")
    assert hf_architecture(path) == "LlamaForCausalLM"
    assert read_metadata_value(path, "llama.block_count") == 2
    assert read_metadata_value(path, "no.such.key") is None
    bad = path.with_name("bad.gguf")
    bad.write_bytes(b"NOPE" + bytes(32))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_metadata_value(bad, "general.architecture")


def test_unsupported_tensor_type_is_refused_by_name(tmp_path_factory, tiny_model) -> None:
    import gguf

    path = _gguf(tmp_path_factory, tiny_model, "llama", "F32", **WIDE)
    reader = gguf.GGUFReader(str(path))
    out = path.with_name("iq4.gguf")
    writer = gguf.GGUFWriter(str(out), "llama")
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=field.types[-1]
                                 if len(field.types) > 1 else None)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name == "blk.0.ffn_up.weight":  # 18 bytes per 32 values
            rows = data.shape[0]
            writer.add_tensor(t.name, np.zeros((rows, data.shape[1] // 32 * 18), np.uint8),
                              raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"blk\.0\.ffn_up\.weight is IQ4_NL.*supported: F32"):
        make_engine(out, max_total_tokens=256)


def test_open_checkpoint_picks_and_refuses_clearly(tmp_path: Path, tmp_path_factory, tiny_model) -> None:
    one = _gguf(tmp_path_factory, tiny_model, "llama", "Q4_0")
    assert isinstance(open_checkpoint(one.parent), GGUFCheckpoint)  # a folder holding one GGUF
    shutil.copy(one, tmp_path / "a-Q4_0.gguf")
    shutil.copy(one, tmp_path / "b-Q8_0.gguf")
    with pytest.raises(ConfigError, match=r"holds 2 GGUF models \(a-Q4_0.gguf, b-Q8_0.gguf\); give the path"):
        open_checkpoint(tmp_path)
    shutil.copy(one, tmp_path / "m-00001-of-00002.gguf")
    with pytest.raises(ConfigError, match="lacks part"):
        open_checkpoint(tmp_path / "m-00001-of-00002.gguf")
    with pytest.raises(ConfigError, match="neither a config.json"):
        open_checkpoint(tmp_path_factory.mktemp("empty"))
    with pytest.raises(ConfigError, match="does not exist"):
        open_checkpoint(tmp_path / "missing")


# ---- the real model ----


def test_smollm2_gguf_greedy_equals_hf_and_reports_its_storage(smollm2, caplog) -> None:
    """SmolLM2's Q4_1 file served directly, its linears kept in their blocks: greedy tokens equal HF on the same
    weights (transformers' own GGUF conversion), EOS is <|im_end|> (id 2), and the startup log says what is kept."""
    from transformers import AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    prompts = [ref_tok(t).input_ids for t in texts]
    expected = [hf_greedy(smollm2.hf_dir, p, NEW_TOKENS) for p in prompts]
    with caplog.at_level(logging.INFO, logger="xinf_sglang.runtime"):
        engine = make_engine(smollm2.gguf, max_total_tokens=2048)
    try:
        assert engine.tokenizer.eos_token_id == 2 and engine.eos_token_ids == frozenset({2})
        assert [engine.tokenizer(t).input_ids for t in texts] == prompts
        params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert [o.token_ids for o in outs] == expected
    finally:
        engine.shutdown()
    assert "210 linears kept in their GGUF blocks (Q4_1 x210), and model.embed_tokens Q8_0" in caplog.text


def _header(*entries: bytes, kv_count: int | None = None) -> bytes:
    """A GGUF v3 header with no tensors and these raw key/value entries."""
    import struct

    count = len(entries) if kv_count is None else kv_count
    return b"GGUF" + struct.pack("<IQQ", 3, 0, count) + b"".join(entries)


def _key(name: str) -> bytes:
    import struct

    return struct.pack("<Q", len(name)) + name.encode()


def _nested_arrays(depth: int) -> bytes:
    """``depth`` arrays, each holding one array, around nothing: the recursion bomb of a hostile header."""
    import struct

    return struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 4, 0)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"GGUF" + bytes(3), "truncated"),
        (_header(kv_count=1), "truncated"),
        (_header(_key("general.architecture")[:5]), "truncated"),
        (_header(_key("general.architecture") + bytes(2)), "truncated"),
        (_header(b"\xff" * 8 + b"x"), "truncated"),  # a key of 2**64 - 1 bytes
        (_header(_key("general.architecture") + b"\x08\x00\x00\x00" + b"\xff" * 7 + b"\x3f"), "truncated"),
        (_header(_key("a") + _nested_arrays(100_000), _key("general.architecture")), "nested"),
        (_header(_key("general.architecture") + _nested_arrays(100_000)), "nested"),
        (_header(_key("a") + b"\x09\x00\x00\x00" + b"\x08\x00\x00\x00" + b"\xff" * 8), "truncated"),
        (_header(_key("a") + b"\x63\x00\x00\x00"), "unknown GGUF metadata type 99"),
    ],
    ids=["short-version", "no-entries", "short-key-length", "short-type", "huge-key", "huge-string",
         "nested-skip", "nested-read", "huge-string-array", "unknown-type"],
)
def test_malformed_header_raises_a_clear_value_error(tmp_path: Path, data: bytes, words: str) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    for read in (hf_architecture, lambda p: read_metadata_value(p, "general.architecture")):
        with pytest.raises(ValueError, match=words) as info:
            read(path)
        assert str(path) in str(info.value) and len(str(info.value)) < 400
