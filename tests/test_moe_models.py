"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE with a shared expert, Mixtral) against HF transformers.

The scheduling regimes (cached prefixes, chunked prefill, retraction, overlap) run for the three default tiny MoE
checkpoints in tests/test_parity.py; here: config variants (expert counts, top-k, ``norm_topk_prob`` both ways,
dense layers chosen by ``decoder_sparse_step`` / ``mlp_only_layers``), every checkpoint layout of the experts
(per expert as the Hub ships them, stacked 3-D as GGUF, fused as transformers 5 keeps them), what the loader
refuses, and the routing itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from xinf_sglang.runtime import SamplingParams
from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.layers.moe.experts import expert_parameter_of
from xinf_sglang.runtime.layers.moe.router import select_experts
from xinf_sglang.runtime.layers.moe.sparse_block import (
    parameter_counts,
    workspace_bytes_per_token,
)
from xinf_sglang.runtime.mem_cache.memory_plan import plan_memory
from xinf_sglang.runtime.model_loader.model_config import ModelConfig
from xinf_sglang.runtime.model_loader.moe_config import MoEConfig
from xinf_sglang.runtime.tp.distributed import TPInfo

from .engine_helpers import hf_greedy, make_engine, varied_prompts
from .test_memory_plan import gpu_inputs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)

VARIANTS = {
    "qwen3_moe-top1-unnormalised": ("qwen3_moe", {"num_experts": 5, "num_experts_per_tok": 1,
                                                   "norm_topk_prob": False, "mlp_only_layers": []}),
    "qwen3_moe-16x4-step2": ("qwen3_moe", {"num_experts": 16, "num_experts_per_tok": 4, "decoder_sparse_step": 2,
                                            "mlp_only_layers": []}),
    "qwen2_moe-normalised": ("qwen2_moe", {"norm_topk_prob": True, "num_experts": 4, "num_experts_per_tok": 2,
                                           "decoder_sparse_step": 1, "mlp_only_layers": [0]}),
    "mixtral-8x2": ("mixtral", {"num_local_experts": 8, "intermediate_size": 48}),
    "deepseek_v2-group-limited": ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 4,
                                                  "topk_group": 2, "routed_scaling_factor": 1.5}),
    "deepseek_v3-rotate-half-no-dense": ("deepseek_v3", {"rope_interleave": False, "first_k_dense_replace": 0}),
}


def _check(engine, prompts, refs) -> None:
    outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.token_ids == ref, f"prompt {i}: runtime {out.token_ids} != HF {ref}"
    assert engine.check_invariants() == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_hf(variant, tiny_model):
    arch, overrides = VARIANTS[variant]
    model_dir = tiny_model(arch, seed=3, **overrides)
    prompts = varied_prompts(model_dir, 6, min_len=3, max_len=90)
    refs = [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]
    with make_engine(model_dir, chunked_prefill_size=32) as engine:
        _check(engine, prompts, refs)


def _relayout(src, dst, arch: str, how: str) -> None:
    """Copy checkpoint ``src`` to ``dst`` with the experts stacked (GGUF's 3-D tensors) or fused (transformers 5's
    ``gate_up_proj [E, 2I, H]``) instead of one tensor per expert."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    names = {"mixtral": ("w1", "w3", "w2")}.get(arch, ("gate_proj", "up_proj", "down_proj"))
    out, stacks = {}, {}
    for name, t in tensors.items():
        prefix, sep, rest = name.partition(".experts.")
        if not sep:
            out[name] = t
            continue
        expert, proj, _ = rest.split(".")
        stacks.setdefault((prefix, names.index(proj)), {})[int(expert)] = t
    for (prefix, which), per_expert in stacks.items():
        stacked = torch.stack([per_expert[e] for e in sorted(per_expert)])
        out[f"{prefix}.experts.{('gate_proj', 'up_proj', 'down_proj')[which]}"] = stacked
    if how == "fused":
        for prefix in {p for p, _ in stacks}:
            gate, up = out.pop(f"{prefix}.experts.gate_proj"), out.pop(f"{prefix}.experts.up_proj")
            out[f"{prefix}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
    save_file({k: v.contiguous() for k, v in out.items()}, dst / "model.safetensors")


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("how", ["stacked", "fused"])
def test_expert_layouts_load_alike(arch, how, tiny_model, tmp_path):
    model_dir = tiny_model(arch)
    prompts = varied_prompts(model_dir, 3, min_len=5, max_len=40)
    refs = [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]
    _relayout(model_dir, tmp_path / how, arch, how)
    with make_engine(tmp_path / how) as engine:
        _check(engine, prompts, refs)


def test_missing_expert_is_named(tiny_model, tmp_path):
    model_dir = tiny_model("qwen3_moe")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model\.layers\.2\.mlp\.experts\.w13_weight shard up\.5"):
        make_engine(broken)


def test_config_reads_experts_and_refuses_bad_top_k(tiny_model):
    cfg = json.loads((tiny_model("qwen2_moe") / "config.json").read_text())
    moe = ModelConfig.from_dict(cfg).moe
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.shared_expert_intermediate_size) == (6, 3, 32, 96)
    assert [moe.is_sparse(i) for i in range(3)] == [False, True, False]  # decoder_sparse_step 2
    assert ModelConfig.from_dict(json.loads((tiny_model("llama") / "config.json").read_text())).moe is None
    with pytest.raises(ConfigError, match=r"num_experts_per_tok=7 must be in \[1, num_experts=6\]"):
        ModelConfig.from_dict({**cfg, "num_experts_per_tok": 7})


def test_expert_names_map_to_stacked_parameters():
    assert expert_parameter_of("model.layers.3.mlp.experts.7.up_proj.weight") == (
        "model.layers.3.mlp.experts.w13_weight", "up.7")
    assert expert_parameter_of("model.layers.0.mlp.experts.2.w2.weight") == ("model.layers.0.mlp.experts.w2_weight",
                                                                            "down.2")
    assert expert_parameter_of("model.layers.1.mlp.experts.gate_up_proj") == (
        "model.layers.1.mlp.experts.w13_weight", "gate_up")
    assert expert_parameter_of("model.layers.1.mlp.shared_expert.up_proj.weight") is None


def test_select_experts_matches_softmax_topk():
    logits = torch.randn(9, 6)
    moe = MoEConfig(num_experts=6, top_k=3, intermediate_size=8, norm_topk_prob=False)
    weights, ids = select_experts(logits, moe)
    probs = torch.softmax(logits, -1)
    assert torch.equal(ids.long(), probs.topk(3).indices)
    torch.testing.assert_close(weights, probs.gather(1, ids.long()))
    normed, _ = select_experts(logits, dataclasses.replace(moe, norm_topk_prob=True))
    torch.testing.assert_close(normed.sum(-1), torch.ones(9))
    assert ids.dtype == torch.int32


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_mla_pool_holds_the_latent_and_rope_key_per_token(arch, tiny_model):
    with make_engine(tiny_model(arch)) as engine:
        mla = engine.model_config.mla
        # (kv_lora_rank 32 + qk_rope_head_dim 8) float32 values per token and layer, shared by the 4 heads
        assert engine.memory_plan.kv_bytes_per_token == (32 + 8) * 4 * engine.model_config.num_layers
        assert (mla.kv_lora_rank, mla.qk_rope_head_dim, mla.q_lora_rank) == (32, 8, None if arch.endswith("2") else 24)


def test_grouped_routing_keeps_the_best_groups():
    """noaux_tc: groups ranked by the sum of their best two biased scores; experts outside the best groups are never
    chosen even when their own score is higher; the weights are the unbiased scores, renormalised and scaled."""
    moe = MoEConfig(num_experts=8, top_k=2, intermediate_size=8, norm_topk_prob=True, scoring="sigmoid",
                    topk_method="noaux_tc", n_group=4, topk_group=1, routed_scaling_factor=2.0)
    logits = torch.tensor([[0.0, 0.0, 3.0, -9.0, 1.0, 1.0, -9.0, -9.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0])
    weights, ids = select_experts(logits, moe, bias)
    assert sorted(ids[0].tolist()) == [4, 5]  # group 2 (experts 4, 5) wins on biased sums; expert 2 is excluded
    torch.testing.assert_close(weights, torch.full((1, 2), 1.0))  # equal sigmoid scores, renormalised, times 2


def test_startup_reports_total_and_active_parameters(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="xinf_sglang.runtime"), make_engine(tiny_model("qwen3_moe")) as engine:
        model = engine.run_on_scheduler(lambda s: s.runner.model)
        total, active = parameter_counts(model)
    line = next(r.getMessage() for r in caplog.records if "active per token" in r.getMessage())
    assert "(2 of 8 experts per sparse layer)" in line
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert total - active == round(experts * 6 / 8)  # 6 of every 8 experts idle for a token


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_memory_plan_counts_the_experts_workspace(name):
    """At real shapes the fused experts' temporaries per prefill token exceed a dense layer's gate/up output,
    and the plan reserves them (so a full prefill chunk cannot OOM a step)."""
    mc = ModelConfig.from_dict(json.loads((CONFIGS / f"{name}.json").read_text()))
    dense = 3 * mc.intermediate_size * 2
    per_token = workspace_bytes_per_token(mc.moe, mc.hidden_size, torch.bfloat16, TPInfo())
    assert per_token > dense
    inputs = gpu_inputs(ffn_bytes_per_token=per_token, hidden_size=mc.hidden_size, vocab_size=mc.vocab_size)
    smaller = gpu_inputs(ffn_bytes_per_token=dense, hidden_size=mc.hidden_size, vocab_size=mc.vocab_size)
    plan, without = plan_memory(inputs), plan_memory(smaller)
    assert plan.activation_reserve_bytes - without.activation_reserve_bytes == plan.chunked_prefill_size * (
        per_token - dense)
