"""Quantized checkpoints served quantized (issue 32), on the CPU in float32: tiny checkpoints written in each
format's Hub layout (runtime/testing/quant_writer.py) decode greedy-identically to HF transformers running the same
weights dequantized by the references; the weights stay quantized in memory; tensor-parallel shards cut every
stored tensor where the dequantized weight is cut; unsupported schemes are refused by name before loading."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from xinf_sglang.runtime import SamplingParams
from xinf_sglang.runtime.model_loader.checkpoint import open_checkpoint
from xinf_sglang.runtime.model_loader.loader import load_model
from xinf_sglang.runtime.testing.quant_writer import QuantSpec, write_dequantized, write_quantized

from .engine_helpers import hf_greedy, make_engine, varied_prompts

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
G128 = {"hidden_size": 128, "intermediate_size": 256}  # input features a multiple of 128
HEAD128 = {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 384}

CASES = {  # id -> (arch, tiny-model overrides, what to write)
    "fp8-block128-qwen3": ("qwen3", HEAD128, QuantSpec("fp8_block", block=(128, 128))),
    "fp8-block32-llama": ("llama", {}, QuantSpec("fp8_block", block=(32, 32))),
    "fp8-channel-qwen2": ("qwen2", {}, QuantSpec("fp8_channel")),
    "fp8-tensor-llama": ("llama", {}, QuantSpec("fp8_tensor")),
    "awq-g32-llama": ("llama", {}, QuantSpec("awq", group_size=32, sym=False)),
    "awq-g128-qwen2": ("qwen2", G128, QuantSpec("awq", group_size=128)),
    "gptq-sym-g128-qwen3": ("qwen3", G128, QuantSpec("gptq", group_size=128, sym=True)),
    "gptq-asym-g32-qwen2": ("qwen2", {}, QuantSpec("gptq", group_size=32, sym=False)),
    "gptq-asym-g128-llama": ("llama", G128, QuantSpec("gptq", group_size=128, sym=False)),
    "gptq-desc-act-g32-qwen3": ("qwen3", {}, QuantSpec("gptq", group_size=32, desc_act=True)),
    "gptq-8bit-channel-llama": ("llama", {}, QuantSpec("gptq", bits=8, group_size=-1, sym=False)),
    "awq-g32-skip-down0": ("llama", {}, QuantSpec("awq", group_size=32, skip=("model.layers.0.mlp.down_proj",))),
}


@pytest.fixture(scope="module")
def written(tiny_model, tmp_path_factory):
    """Factory: case id -> (quantized folder, dequantized float folder)."""
    done = {}

    def build(case: str):
        if case not in done:
            arch, overrides, spec = CASES[case]
            quantized = write_quantized(tiny_model(arch, **overrides), tmp_path_factory.mktemp(f"q-{case}"), spec)
            done[case] = quantized, write_dequantized(quantized, tmp_path_factory.mktemp(f"dq-{case}"))
        return done[case]

    return build


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_equals_hf_on_the_dequantized_weights(case, written, caplog):
    quantized, dequantized = written(case)
    prompts = varied_prompts(dequantized, 4, min_len=3, max_len=60)
    refs = [hf_greedy(dequantized, p, NEW_TOKENS) for p in prompts]
    with caplog.at_level(logging.INFO, logger="xinf_sglang.runtime"), make_engine(quantized) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert engine.check_invariants() == []
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.token_ids == ref, f"prompt {i}: runtime {out.token_ids} != HF {ref}"
    assert "linears kept quantized as" in caplog.text


@pytest.mark.parametrize("case", ["fp8-block128-qwen3", "awq-g32-llama", "gptq-desc-act-g32-qwen3",
                                  "gptq-8bit-channel-llama"])
def test_weights_stay_quantized_at_their_checkpoint_bytes(case, written):
    """Every stored tensor is a parameter of its own dtype: memory = the checkpoint's tensor bytes (the dense
    float32 parts included; GPTQ's ``g_idx`` once per stacked layer, its projections sharing it), and no linear
    holds a dense ``weight`` unless it is FP8."""
    quantized, _ = written(case)
    model = load_model(open_checkpoint(quantized), torch.float32, torch.device("cpu"))
    with safe_open(str(quantized / "model.safetensors"), "pt") as f:
        sizes = {n: f.get_tensor(n).nbytes for n in f.keys()}
    shared = sum(b for n, b in sizes.items() if n.endswith(("k_proj.g_idx", "v_proj.g_idx", "up_proj.g_idx")))
    memory = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory == sum(sizes.values()) - shared
    layer = model.model.layers[0].self_attn.qkv_proj
    assert {p.dtype for p in layer.parameters()} <= {torch.float8_e4m3fn, torch.float32, torch.int32, torch.float16}


def test_dequantized_layer_equals_the_reference_weights(written):
    """The loaded (stacked) layer dequantizes to the HF weights, q / k / v in their rows."""
    quantized, dequantized = written("gptq-desc-act-g32-qwen3")
    model = load_model(open_checkpoint(quantized), torch.float32, torch.device("cpu"))
    layer = model.model.layers[1].self_attn.qkv_proj
    with safe_open(str(dequantized / "model.safetensors"), "pt") as f:
        ref = torch.cat([f.get_tensor(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv"])
    torch.testing.assert_close(layer.quant_method.dequantize(layer), ref, rtol=0, atol=0)


def test_dummy_weights_of_a_quantized_config(written):
    """``load_format="dummy"`` draws quantized parameters too (GPU benchmarks at real shapes): small, finite."""
    quantized, _ = written("awq-g32-llama")
    model = load_model(open_checkpoint(quantized), torch.float32, torch.device("cpu"), load_format="dummy")
    layer = model.model.layers[0].mlp.down_proj
    w = layer.quant_method.dequantize(layer)
    assert torch.isfinite(w).all() and 0 < w.abs().max() < 0.1
