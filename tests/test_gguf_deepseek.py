"""GGUF files of DeepSeek-V2 / V3 (llama.cpp's ``deepseek2``), written by the test writer from the tiny HF
checkpoints (V2: no q LoRA, greedy softmax routing; V3: q LoRA, sigmoid ``noaux_tc`` routing over 4 groups with the
correction bias) and read by sglite's GGUF loader, in today's layout (``kv_b_proj`` split into ``attn_k_b`` /
``attn_v_b``, the latent cache as one KV head, ``key_length_mla``) and in the whole layout of the files written
before llama.cpp's MLA rewrite (``attn_kv_b``, per-head ``key_length`` / ``value_length``):

- the loader yields the checkpoint's tensors under HF names (experts stacked, ``kv_b_proj`` merged back) and a config
  that sglite reads as it reads the checkpoint's (MLA, experts and routing, YaRN scales);
- the header names V2 or V3 by ``expert_gating_func``, and the reader refuses, by name, a correction bias in a softmax
  file and one half of the split up-projection;
- sglite's greedy tokens on the GGUF equal transformers' on the checkpoint (transformers 5.17 cannot read a
  ``deepseek2`` GGUF at all: its reader refuses the architecture, so the engine's tokenizer is sglite's own);
- llama.cpp itself (xllamacpp) running the F32 files, in either layout, gives transformers' greedy tokens.

Two limits of llama.cpp shape what is compared. Its YaRN for deepseek2 never scales cos/sin (the file keeps only
``0.1 * mscale_all_dim``), which is HF's rope when ``mscale == mscale_all_dim``, as in every released DeepSeek config
but not in the tiny fixtures (V2 has no mscale keys, V3 1.0 against 0.8): the files here are of the fixtures with
their mscales equal (`REPRESENTABLE`). And llama.cpp reads a model without q LoRA only at V2-Lite's layer counts
(26, 27): it refuses the 3-layer V2 file (``key not found: deepseek2.attention.q_lora_rank``), so llama.cpp runs
V2 with a q LoRA (as the full DeepSeek-V2 has).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.model_loader.checkpoint import SafetensorsCheckpoint, open_checkpoint
from xinf_sglang.runtime.model_loader.gguf import hf_tensor_name
from xinf_sglang.runtime.model_loader.gguf_header import hf_architecture
from xinf_sglang.runtime.model_loader.gguf_names import DEEPSEEK_SHARED, gguf_tensor_name
from xinf_sglang.runtime.model_loader.model_config import ModelConfig
from xinf_sglang.runtime.testing.tiny_model import ARCHS

from .engine_helpers import engine_greedy, hf_greedy, varied_prompts
from .gguf_writer import write_gguf

pytestmark = pytest.mark.skipif("deepseek_v3" not in ARCHS, reason="make_tiny_model builds no DeepSeek yet")

DEEPSEEK_ARCHS = ("deepseek_v2", "deepseek_v3")
HF_ARCH = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
LAYOUTS = ("split", "whole")
REPRESENTABLE = {
    "deepseek_v2": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024,
                                     "mscale": 0.707, "mscale_all_dim": 0.707}},  # DeepSeek-V2-Lite's mscales
    "deepseek_v3": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
}
"""The tiny fixtures with a YaRN llama.cpp's deepseek2 computes as HF does (mscale == mscale_all_dim)."""
LLAMA_CPP_V2 = {"q_lora_rank": 24}
"""llama.cpp refuses a V2 without q LoRA below V2-Lite's 26-27 layers."""
NEW_TOKENS = 10
SIGMOID, SOFTMAX = 2, 1  # gguf.ExpertGatingFuncType
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")
_SPLIT = re.compile(r"blk\.(\d+)\.attn_[kv]_b\.weight$")


def _source(tiny_model, arch: str, **overrides) -> Path:
    return tiny_model(arch, **{**REPRESENTABLE[arch], **overrides})


@pytest.fixture(scope="module")
def deepseek_gguf(tmp_path_factory, tiny_model):
    """``build(arch, layout="split", qtype="F32", **overrides) -> Path``, each file written once per module."""
    built: dict[str, Path] = {}

    def build(arch: str, layout: str = "split", qtype: str = "F32", **overrides: Any) -> Path:
        key = json.dumps([arch, layout, qtype, overrides], sort_keys=True)
        if key not in built:
            source = _source(tiny_model, arch, **overrides)
            folder = tmp_path_factory.mktemp(f"gguf-{arch}-{layout}-{qtype}")
            split = write_gguf(source, folder / f"tiny-{arch}-{qtype}.gguf", qtype)
            built[key] = split if layout == "split" else _whole_layout(split, source, folder / "whole.gguf")
        return built[key]

    return build


def _rewrite(src: Path, dst: Path, keys: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
             tensors: dict[str, np.ndarray] | None = None) -> Path:
    """``src`` copied to ``dst`` with metadata ``keys`` set (None: removed; a new key is a uint32), the tensors named
    in ``drop`` left out and ``tensors`` (F32) added."""
    import gguf

    keys = dict(keys or {})
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = keys.pop(field.name, field.contents())
        if value is not None:
            writer.add_key_value(field.name, value, field.types[0],
                                 sub_type=field.types[-1] if len(field.types) > 1 else None)
    for name, value in keys.items():
        if value is not None:
            writer.add_uint32(name, value)
    for t in reader.tensors:
        if t.name not in drop:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    for name, value in (tensors or {}).items():
        writer.add_tensor(name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _whole_layout(split: Path, source: Path, out: Path) -> Path:
    """``split`` as llama.cpp's converter wrote DeepSeek before its MLA rewrite (spring 2025): ``attn_kv_b`` whole
    (HF's ``kv_b_proj``), per-head ``key_length`` / ``value_length``, one KV head per query head, no ``*_mla`` keys."""
    import gguf

    config = json.loads((source / "config.json").read_text())
    arch = "deepseek2"
    kv_b = {f"blk.{m[1]}.attn_kv_b.weight": t.float().numpy() for name, t in SafetensorsCheckpoint(source).tensors()
            if (m := re.match(r"model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight$", name))}
    reader = gguf.GGUFReader(str(split))
    keys = {f"{arch}.attention.key_length_mla": None, f"{arch}.attention.value_length_mla": None,
            f"{arch}.attention.key_length": config["qk_nope_head_dim"] + config["qk_rope_head_dim"],
            f"{arch}.attention.value_length": config["v_head_dim"],
            f"{arch}.attention.head_count_kv": config["num_attention_heads"]}
    drop = tuple(t.name for t in reader.tensors if _SPLIT.match(t.name))
    return _rewrite(split, out, keys, drop, kv_b)


def _expected_tensors(source: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as the loader yields them: each layer's experts stacked as ``mlp.experts.{proj}``."""
    plain: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, tensor in SafetensorsCheckpoint(source).tensors():
        match = _EXPERT.match(name)
        if match is None:
            plain[name] = tensor.float().numpy()
        else:
            stacked = f"model.layers.{match[1]}.mlp.experts.{match[3]}"
            experts.setdefault(stacked, {})[int(match[2])] = tensor.float().numpy()
    plain.update({n: np.stack([by_index[i] for i in range(len(by_index))]) for n, by_index in experts.items()})
    return plain


# ---- names ----


def test_deepseek_tensor_names_map_both_ways() -> None:
    pairs = {
        "blk.1.attn_q_a.weight": "model.layers.1.self_attn.q_a_proj.weight",
        "blk.1.attn_q_a_norm.weight": "model.layers.1.self_attn.q_a_layernorm.weight",
        "blk.1.attn_q_b.weight": "model.layers.1.self_attn.q_b_proj.weight",
        "blk.1.attn_kv_a_mqa.weight": "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
        "blk.1.attn_kv_a_norm.weight": "model.layers.1.self_attn.kv_a_layernorm.weight",
        "blk.1.attn_kv_b.weight": "model.layers.1.self_attn.kv_b_proj.weight",
        "blk.1.exp_probs_b.bias": "model.layers.1.mlp.gate.e_score_correction_bias",
    }
    for gguf, hf in pairs.items():
        assert hf_tensor_name(gguf) == hf and gguf_tensor_name(hf) == gguf
    shared = {"blk.1.ffn_up_shexp.weight": "model.layers.1.mlp.shared_experts.up_proj.weight"}
    for gguf, hf in shared.items():
        assert hf_tensor_name(gguf, shared=DEEPSEEK_SHARED) == hf and gguf_tensor_name(hf) == gguf
    assert hf_tensor_name("blk.1.attn_k_b.weight") is None  # merged with attn_v_b by GGUFWeights.items
    assert hf_tensor_name("blk.1.exp_probs_b.weight") is None


# ---- the loader ----


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", DEEPSEEK_ARCHS)
def test_loader_yields_the_checkpoint(arch: str, layout: str, deepseek_gguf, tiny_model) -> None:
    got = {name: t.numpy() for name, t in open_checkpoint(deepseek_gguf(arch, layout)).weights.items()}
    expected = _expected_tensors(_source(tiny_model, arch))
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape and np.array_equal(got[name], value), name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", DEEPSEEK_ARCHS)
def test_config_reads_as_the_checkpoints(arch: str, layout: str, deepseek_gguf, tiny_model) -> None:
    """sglite's `ModelConfig` of the GGUF equals the checkpoint's: MLA widths, experts and routing (V3's groups and
    scaling), the YaRN scales of cos/sin and of the softmax."""
    cfg = open_checkpoint(deepseek_gguf(arch, layout)).config_dict()
    assert cfg["architectures"] == [HF_ARCH[arch]]
    got = ModelConfig.from_dict(cfg)
    want = ModelConfig.from_dir(_source(tiny_model, arch))
    assert got.mla == want.mla and got.moe == want.moe
    assert (got.num_layers, got.num_heads, got.hidden_size, got.intermediate_size, got.vocab_size) == (
        want.num_layers, want.num_heads, want.hidden_size, want.intermediate_size, want.vocab_size)
    assert got.rope.rope_type == want.rope.rope_type == "yarn"
    for field in ("theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
        assert getattr(got.rope, field) == getattr(want.rope, field), field
    assert got.rope.cos_sin_scale() == pytest.approx(want.rope.cos_sin_scale(), rel=1e-6)
    assert got.attention_scale == pytest.approx(want.attention_scale, rel=1e-6)


def test_quantized_file_falls_back_to_f16_for_short_rows(deepseek_gguf, tiny_model) -> None:
    """Q8_0 blocks are 32 values; ``attn_k_b`` rows are ``qk_nope_head_dim`` (16) long, so the writer stores it as
    F16 as llama.cpp's converter does, and ``kv_b_proj`` merges an F16 half with a Q8_0 one."""
    import gguf
    from gguf import quants

    ckpt = open_checkpoint(deepseek_gguf("deepseek_v3", qtype="Q8_0"))
    counts = ckpt.weights.type_counts()
    assert counts["Q8_0"] > 0 and counts["F16"] > 0
    got = dict(ckpt.weights.items())
    source = _source(tiny_model, "deepseek_v3")
    config = json.loads((source / "config.json").read_text())
    nope, heads = config["qk_nope_head_dim"], config["num_attention_heads"]
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, value in _expected_tensors(source).items():
        if name.endswith("kv_b_proj.weight"):
            per_head = value.reshape(heads, -1, value.shape[-1])
            k = per_head[:, :nope].astype(np.float16).astype(np.float32)
            v = quants.dequantize(quants.quantize(per_head[:, nope:], q8), q8)
            assert np.array_equal(got[name].numpy(), np.concatenate([k, v], axis=1).reshape(value.shape)), name
        torch.testing.assert_close(got[name], torch.from_numpy(value), rtol=0, atol=0.05 * float(np.abs(value).max()))


def test_tokenizer_is_the_checkpoints(deepseek_gguf, tiny_model) -> None:
    """transformers cannot build a ``deepseek2`` file's tokenizer: sglite's encodes text (special tokens whole) and
    decodes ids as the checkpoint's tokenizer does."""
    from transformers import AutoTokenizer

    ours = open_checkpoint(deepseek_gguf("deepseek_v2")).load_tokenizer()
    theirs = AutoTokenizer.from_pretrained(_source(tiny_model, "deepseek_v2"))
    text = "<|im_start|>user\nThe quick brown fox jumps over the lazy dog.<|im_end|>"
    assert ours.encode(text) == theirs.encode(text)
    ids = varied_prompts(_source(tiny_model, "deepseek_v2"), 1, min_len=40, max_len=40)[0]
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.eos_token == theirs.eos_token and ours.chat_template == theirs.chat_template


# ---- which model, and refusals ----


def test_header_picks_v2_or_v3_by_gating_func(deepseek_gguf, tmp_path: Path) -> None:
    v2, v3 = deepseek_gguf("deepseek_v2"), deepseek_gguf("deepseek_v3")
    assert hf_architecture(v2) == "DeepseekV2ForCausalLM" and hf_architecture(v3) == "DeepseekV3ForCausalLM"
    gating = "deepseek2.expert_gating_func"
    old_v2 = _rewrite(v2, tmp_path / "no-gating.gguf", {gating: None})  # V2 files before the key: softmax
    assert hf_architecture(old_v2) == "DeepseekV2ForCausalLM"
    assert open_checkpoint(old_v2).config_dict()["scoring_func"] == "softmax"
    assert hf_architecture(_rewrite(v2, tmp_path / "sigmoid.gguf", {gating: SIGMOID})) == "DeepseekV3ForCausalLM"


def test_refuses_a_correction_bias_in_a_softmax_file(deepseek_gguf, tmp_path: Path) -> None:
    gating = {"deepseek2.expert_gating_func": SOFTMAX}
    softmax = _rewrite(deepseek_gguf("deepseek_v3"), tmp_path / "softmax.gguf", gating)
    with pytest.raises(ConfigError, match="exp_probs_b"):
        open_checkpoint(softmax).config_dict()


def test_refuses_attn_k_b_without_attn_v_b(deepseek_gguf, tmp_path: Path) -> None:
    half = _rewrite(deepseek_gguf("deepseek_v2"), tmp_path / "half.gguf", drop=("blk.1.attn_v_b.weight",))
    with pytest.raises(ConfigError, match="layer 1 has attn_k_b without attn_v_b"):
        dict(open_checkpoint(half).weights.items())


def test_writer_warns_where_llama_cpp_computes_another_model(tiny_model, tmp_path: Path, caplog) -> None:
    """The tiny fixtures' own YaRN (HF scales cos/sin) and a V2 without q LoRA at 3 layers (llama.cpp refuses it)."""
    with caplog.at_level(logging.WARNING):
        write_gguf(tiny_model("deepseek_v2"), tmp_path / "v2.gguf")
    assert "leaves them unscaled" in caplog.text and "no q LoRA" in caplog.text


# ---- sglite's engine and llama.cpp ----


def _engine_greedy(gguf_file: Path, prompts: list[list[int]]) -> list[list[int]]:
    return engine_greedy(gguf_file, prompts, NEW_TOKENS, max_total_tokens=1024)


@pytest.fixture(scope="module")
def hf_expected(tiny_model):
    """``expected(arch, **overrides) -> (prompts, HF greedy tokens)``, computed once per module."""
    done: dict[str, tuple[list[list[int]], list[list[int]]]] = {}

    def expected(arch: str, **overrides: Any) -> tuple[list[list[int]], list[list[int]]]:
        key = json.dumps([arch, overrides], sort_keys=True)
        if key not in done:
            source = _source(tiny_model, arch, **overrides)
            prompts = varied_prompts(source, 3, min_len=3, max_len=30)
            done[key] = prompts, [hf_greedy(source, p, NEW_TOKENS) for p in prompts]
        return done[key]

    return expected


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", DEEPSEEK_ARCHS)
def test_engine_greedy_equals_hf(arch: str, layout: str, deepseek_gguf, hf_expected) -> None:
    prompts, expected = hf_expected(arch)
    assert _engine_greedy(deepseek_gguf(arch, layout), prompts) == expected


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch,overrides", [("deepseek_v2", LLAMA_CPP_V2), ("deepseek_v3", {})])
def test_llama_cpp_runs_the_gguf_like_hf(arch: str, overrides: dict, layout: str, deepseek_gguf, hf_expected) -> None:
    """llama.cpp (xllamacpp) on the F32 file in today's layout: the MLA split, the expert keys, V3's grouped sigmoid
    routing with the correction bias and the YaRN keys the writer and reader assume are llama.cpp's. Prompts after
    which HF picks a special token are left out (llama.cpp's ``ignore_eos`` bans end-of-generation tokens)."""
    from xinf_sglang.runtime.bench.llamacpp_baseline import LlamaCppOptions, generated_ids, start_server
    from xinf_sglang.runtime.testing.tiny_model import SPECIAL_TOKENS

    prompts, expected = hf_expected(arch, **overrides)
    kept = [i for i, tokens in enumerate(expected) if not set(tokens) & set(range(len(SPECIAL_TOKENS)))]
    assert len(kept) >= 2, "too few prompts without a special token to compare"
    server = start_server(deepseek_gguf(arch, layout, **overrides), 2, 64, LlamaCppOptions(parallel=2, threads=1))
    try:
        assert [generated_ids(server, prompts[i], NEW_TOKENS) for i in kept] == [expected[i] for i in kept]
    finally:
        del server
