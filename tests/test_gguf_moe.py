"""GGUF files of mixtures of experts (llama.cpp's ``qwen3moe``, ``qwen2moe`` and ``llama`` with ``ffn_*_exps``, i.e.
Mixtral), written by the test writer from tiny HF checkpoints and read by sglite's GGUF loader:

- (a) the loader yields the checkpoint's tensors under HF names, experts stacked (``[E, I, H]`` / ``[E, H, I]``),
  values equal (F32) or equal to the checkpoint rounded through the quantized type (Q8_0), and the config's expert
  keys; llama.cpp's first per-expert Mixtral layout and transformers' fused ``experts.gate_up_proj`` too;
- (b) transformers loading the GGUF gives the logits of transformers loading the (rounded) safetensors, so the writer
  is right. transformers 5.17 reads ``qwen2moe`` / ``qwen3moe`` but not their expert widths (its ``ggml.py`` maps
  only ``expert_count`` / ``expert_used_count``: they are passed to ``from_pretrained``), builds every layer sparse
  (the "all sparse" variants below), and loads a Mixtral GGUF as a dense ``LlamaForCausalLM`` whose MLPs stay random:
  Mixtral rests on (a) and on (c) against the safetensors;
- (c) sglite's greedy tokens on the GGUF equal transformers' on the same weights (the rounded safetensors; for the
  Qwen archs also transformers' own reading of the GGUF);
- llama.cpp itself (xllamacpp) running the F32 files gives transformers' greedy tokens, Mixtral included: what the
  writer and reader assume of llama.cpp's layout and routing is llama.cpp's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from xinf_sglang.runtime.model_loader.checkpoint import GGUFCheckpoint, SafetensorsCheckpoint, open_checkpoint
from xinf_sglang.runtime.model_loader.gguf import hf_tensor_name
from xinf_sglang.runtime.model_loader.gguf_header import hf_architecture
from xinf_sglang.runtime.model_loader.gguf_names import MIXTRAL_MOE_PREFIX, gguf_tensor_name
from xinf_sglang.runtime.models.registry import SUPPORTED_ARCHITECTURES
from xinf_sglang.runtime.testing.tiny_model import ARCHS

from .engine_helpers import engine_greedy, hf_greedy, varied_prompts
from .gguf_writer import write_gguf

pytestmark = pytest.mark.skipif("qwen3_moe" not in ARCHS, reason="make_tiny_model builds no mixture of experts yet")

MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral")
HF_ARCH = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
ALL_SPARSE = {"qwen3_moe": {"mlp_only_layers": []}, "qwen2_moe": {"decoder_sparse_step": 1}}
"""Overrides that make every layer sparse, as transformers' GGUF reader builds the Qwen MoE archs."""
K_QUANT_SHAPE = {"hidden_size": 256, "moe_intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1}
"""K quants need rows of 256 values (head_dim 128 = hidden / heads)."""
HF_UNREAD_KEYS = ("moe_intermediate_size", "shared_expert_intermediate_size")
NEW_TOKENS = 10
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _gguf(tmp_path_factory, tiny_model, arch: str, qtype: str, **overrides) -> Path:
    folder = tmp_path_factory.mktemp(f"gguf-{arch}-{qtype}")
    return write_gguf(tiny_model(arch, **overrides), folder / f"tiny-{arch}-{qtype}.gguf", qtype)


def _rounded(value: np.ndarray, qtype: str) -> np.ndarray:
    """``value`` through ``qtype`` and back, row by row (what a GGUF of that type holds)."""
    import gguf
    from gguf import quants

    if qtype == "F32":
        return value
    kind = gguf.GGMLQuantizationType[qtype]
    return np.asarray(quants.dequantize(quants.quantize(value, kind), kind), dtype=np.float32)


def _stays_f32(name: str, value: np.ndarray) -> bool:
    """Norms, biases, routers and Qwen2-MoE's shared-expert gate, which the writer (like llama.cpp) keeps F32."""
    return value.ndim < 2 or name.endswith((".gate.weight", ".shared_expert_gate.weight"))


def _expected_tensors(source: Path, arch: str, qtype: str) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as the loader must yield them: per-expert tensors stacked under
    ``{moe}.experts.{gate,up,down}_proj``, quantized weights rounded through ``qtype``."""
    prefix = MIXTRAL_MOE_PREFIX if arch == "mixtral" else "mlp"
    plain: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, tensor in SafetensorsCheckpoint(source).tensors():
        value = tensor.float().numpy()
        match = _EXPERT.match(name)
        if match is None:
            plain[name] = value
            continue
        layer, index, proj = match.groups()
        stacked = f"model.layers.{layer}.{prefix}.experts.{_MIXTRAL_EXPERT.get(proj, proj)}"
        experts.setdefault(stacked, {})[int(index)] = value
    plain.update({name: np.stack([by_index[i] for i in range(len(by_index))]) for name, by_index in experts.items()})
    return {name: v if _stays_f32(name, v) else _rounded(v, qtype) for name, v in plain.items()}


def _rounded_checkpoint(source: Path, qtype: str, folder: Path) -> Path:
    """A copy of ``source`` whose weights went through ``qtype`` as the GGUF writer stores them: what transformers
    runs to compute the model a quantized GGUF holds, without transformers' GGUF reader."""
    from safetensors.torch import save_file

    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    tensors = {}
    for name, tensor in SafetensorsCheckpoint(source).tensors():
        value = tensor.float().numpy()
        tensors[name] = torch.from_numpy(value if _stays_f32(name, value) else _rounded(value, qtype)).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _hf_gguf_model(gguf_file: Path, source: Path):
    """transformers' reading of the GGUF, with the expert widths its reader skips taken from the source config."""
    from transformers import AutoModelForCausalLM

    config = json.loads((source / "config.json").read_text())
    widths = {k: config[k] for k in HF_UNREAD_KEYS if k in config}
    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                **widths).eval()


# ---- names ----


def test_moe_tensor_names_map_both_ways() -> None:
    pairs = {
        "blk.2.ffn_gate_inp.weight": "model.layers.2.mlp.gate.weight",
        "blk.2.ffn_gate_exps.weight": "model.layers.2.mlp.experts.gate_proj",
        "blk.2.ffn_up_exps.weight": "model.layers.2.mlp.experts.up_proj",
        "blk.2.ffn_down_exps.weight": "model.layers.2.mlp.experts.down_proj",
        "blk.2.ffn_gate_shexp.weight": "model.layers.2.mlp.shared_expert.gate_proj.weight",
        "blk.2.ffn_down_shexp.weight": "model.layers.2.mlp.shared_expert.down_proj.weight",
        "blk.2.ffn_gate_inp_shexp.weight": "model.layers.2.mlp.shared_expert_gate.weight",
        "blk.2.ffn_gate.weight": "model.layers.2.mlp.gate_proj.weight",  # a dense layer between sparse ones
    }
    for gguf, hf in pairs.items():
        assert hf_tensor_name(gguf) == hf and gguf_tensor_name(hf) == gguf
    mixtral = {"blk.0.ffn_gate_inp.weight": "model.layers.0.block_sparse_moe.gate.weight",
               "blk.0.ffn_up_exps.weight": "model.layers.0.block_sparse_moe.experts.up_proj"}
    for gguf, hf in mixtral.items():
        assert hf_tensor_name(gguf, MIXTRAL_MOE_PREFIX) == hf and gguf_tensor_name(hf) == gguf
    assert gguf_tensor_name("model.layers.0.mlp.experts.3.gate_proj.weight") is None  # stacked by the writer first
    assert hf_tensor_name("blk.0.ffn_gate.3.weight") is None  # the old layout: stacked by GGUFWeights.items


# ---- (a) the loader ----


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_loader_yields_the_checkpoint_stacked(arch: str, qtype: str, tmp_path_factory, tiny_model) -> None:
    """Names, shapes and values of every tensor (dense layers between sparse ones included), Q/K un-permuted."""
    ckpt = open_checkpoint(_gguf(tmp_path_factory, tiny_model, arch, qtype))
    got = {name: t.numpy() for name, t in ckpt.weights.items()}
    expected = _expected_tensors(tiny_model(arch), arch, qtype)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape and np.array_equal(got[name], value), name


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_config_reads_the_expert_keys(arch: str, tmp_path_factory, tiny_model) -> None:
    source = json.loads((tiny_model(arch) / "config.json").read_text())
    if arch != "mixtral":  # the Hub's Qwen configs say num_experts; transformers 5 saves Qwen3-MoE's under Mixtral's name
        source.setdefault("num_experts", source.get("num_local_experts"))
    ckpt = open_checkpoint(_gguf(tmp_path_factory, tiny_model, arch, "F32"))
    cfg = ckpt.config_dict()
    assert cfg["architectures"] == [HF_ARCH[arch]] == source["architectures"]
    assert hf_architecture(ckpt.file.parts[0]) == HF_ARCH[arch]
    keys = ["num_experts_per_tok", "intermediate_size", "num_hidden_layers", "tie_word_embeddings"]
    keys += ["num_local_experts"] if arch == "mixtral" else ["num_experts", "moe_intermediate_size", "norm_topk_prob"]
    keys += ["shared_expert_intermediate_size", "qkv_bias"] if arch == "qwen2_moe" else []
    assert {k: cfg[k] for k in keys} == {k: source[k] for k in keys}
    if arch != "mixtral":  # HF's rule for sparse layers, decided by either key, becomes a list of dense ones
        assert cfg["decoder_sparse_step"] == 1
        assert cfg["mlp_only_layers"] == [i for i in range(source["num_hidden_layers"]) if not _hf_sparse(source, i)]
        assert cfg["mlp_only_layers"], "the tiny checkpoint should have a dense layer between sparse ones"


def _hf_sparse(config: dict, layer: int) -> bool:
    return layer not in config.get("mlp_only_layers", []) and (layer + 1) % config.get("decoder_sparse_step", 1) == 0


def test_old_per_expert_mixtral_layout_is_stacked_at_load(tmp_path_factory, tiny_model) -> None:
    """llama.cpp's Mixtral files of early 2024 (``blk.N.ffn_gate.E.weight``, still on the Hub) load as today's."""
    import gguf

    new = _gguf(tmp_path_factory, tiny_model, "mixtral", "Q8_0")
    reader = gguf.GGUFReader(str(new))
    old = new.with_name("old-layout.gguf")
    writer = gguf.GGUFWriter(str(old), "llama")
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        data = np.asarray(t.data)
        stacked = re.match(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$", t.name)
        for e in range(data.shape[0]) if stacked else ():
            writer.add_tensor(f"blk.{stacked[1]}.ffn_{stacked[2]}.{e}.weight", data[e], raw_dtype=t.tensor_type)
        if not stacked:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    want = {name: t for name, t in open_checkpoint(new).weights.items()}
    got = {name: t for name, t in open_checkpoint(old).weights.items()}
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_writer_takes_fused_experts(tmp_path: Path, tmp_path_factory, tiny_model) -> None:
    """A checkpoint with transformers 5's in-memory layout (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``
    [E, H, I]) gives the same GGUF tensors as the per-expert one ``save_pretrained`` writes."""
    from safetensors.torch import save_file

    source = tiny_model("qwen3_moe")
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, tmp_path / path.name)
    stacked = _expected_tensors(source, "qwen3_moe", "F32")
    fused = {}
    for name, value in stacked.items():
        if name.endswith(".experts.gate_proj"):
            fused[name.replace("gate_proj", "gate_up_proj")] = np.concatenate(
                [value, stacked[name.replace("gate_proj", "up_proj")]], axis=1)
        elif not name.endswith(".experts.up_proj"):
            fused[name] = value
    save_file({k: torch.from_numpy(v).contiguous() for k, v in fused.items()}, str(tmp_path / "model.safetensors"))
    got = {n: t for n, t in open_checkpoint(write_gguf(tmp_path, tmp_path / "fused.gguf")).weights.items()}
    want = {n: t for n, t in open_checkpoint(_gguf(tmp_path_factory, tiny_model, "qwen3_moe", "F32")).weights.items()}
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


# ---- (b) transformers reading the GGUF ----


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_hf_reads_the_gguf_as_the_safetensors(arch: str, qtype: str, tmp_path_factory, tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    source = tiny_model(arch, **ALL_SPARSE[arch])
    gguf_file = _gguf(tmp_path_factory, tiny_model, arch, qtype, **ALL_SPARSE[arch])
    reference = _rounded_checkpoint(source, qtype, tmp_path_factory.mktemp(f"rounded-{arch}-{qtype}"))
    ids = torch.tensor([varied_prompts(source, 1, min_len=24, max_len=24)[0]])
    with torch.no_grad():
        got = _hf_gguf_model(gguf_file, source)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_llama_cpp_runs_the_gguf_like_hf(arch: str, tmp_path_factory, tiny_model) -> None:
    """llama.cpp itself (xllamacpp, the bench's baseline) on the F32 file: the layout, the expert keys and the
    top-k renormalisation the writer and reader assume are llama.cpp's. llama.cpp's ``ignore_eos`` bans the
    end-of-generation tokens, so prompts after which HF picks a special token are left out."""
    from xinf_sglang.runtime.bench.llamacpp_baseline import LlamaCppOptions, generated_ids, start_server
    from xinf_sglang.runtime.testing.tiny_model import SPECIAL_TOKENS

    source = tiny_model(arch, **ALL_SPARSE.get(arch, {}))
    gguf_file = _gguf(tmp_path_factory, tiny_model, arch, "F32", **ALL_SPARSE.get(arch, {}))
    prompts = varied_prompts(source, 4, min_len=5, max_len=30)
    expected = {i: hf_greedy(source, p, NEW_TOKENS) for i, p in enumerate(prompts)}
    kept = [i for i, tokens in expected.items() if not set(tokens) & set(range(len(SPECIAL_TOKENS)))]
    assert len(kept) >= 2, "too few prompts without a special token to compare"
    server = start_server(gguf_file, 2, 64, LlamaCppOptions(parallel=2, threads=1))
    try:
        assert {i: generated_ids(server, prompts[i], NEW_TOKENS) for i in kept} == {i: expected[i] for i in kept}
    finally:
        del server


# ---- (c) sglite's engine ----


def _engine_greedy(gguf_file: Path, prompts: list[list[int]]) -> list[list[int]]:
    return engine_greedy(gguf_file, prompts, NEW_TOKENS, max_total_tokens=1024)


def _needs_model(arch: str) -> None:
    if HF_ARCH[arch] not in SUPPORTED_ARCHITECTURES:
        pytest.skip(f"sglite does not build {HF_ARCH[arch]} yet")


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_engine_greedy_equals_hf_on_the_same_weights(arch: str, qtype: str, tmp_path_factory, tiny_model) -> None:
    """The tiny checkpoints as they are (dense layers between sparse ones, norm_topk_prob as llama.cpp has it)."""
    _needs_model(arch)
    source = tiny_model(arch)
    reference = _rounded_checkpoint(source, qtype, tmp_path_factory.mktemp(f"rounded-{arch}-{qtype}"))
    prompts = varied_prompts(source, 4, min_len=3, max_len=40)
    expected = [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    assert _engine_greedy(_gguf(tmp_path_factory, tiny_model, arch, qtype), prompts) == expected


@pytest.mark.parametrize("arch,qtype,overrides", [("qwen3_moe", "Q8_0", {}), ("qwen2_moe", "Q8_0", {}),
                                                  ("qwen3_moe", "Q4_K", K_QUANT_SHAPE)])
def test_engine_greedy_equals_hf_reading_the_gguf(arch: str, qtype: str, overrides: dict, tmp_path_factory,
                                                  tiny_model) -> None:
    """The acceptance's check: sglite and transformers both reading one GGUF file (Q4_K: random blocks, stacked
    experts included)."""
    _needs_model(arch)
    overrides = {**ALL_SPARSE[arch], **overrides}
    source = tiny_model(arch, **overrides)
    gguf_file = _gguf(tmp_path_factory, tiny_model, arch, qtype, **overrides)
    prompts = varied_prompts(source, 3, min_len=3, max_len=30)
    model = _hf_gguf_model(gguf_file, source)
    model.generation_config.eos_token_id = None
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    assert _engine_greedy(gguf_file, prompts) == expected


def test_gguf_checkpoint_reports_the_moe_file(tmp_path_factory, tiny_model) -> None:
    ckpt = open_checkpoint(_gguf(tmp_path_factory, tiny_model, "qwen2_moe", "Q8_0"))
    assert isinstance(ckpt, GGUFCheckpoint) and ckpt.quantization == "Q8_0"
    assert ckpt.weights.type_counts()["Q8_0"] > 0
