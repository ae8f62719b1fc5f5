"""Model loading: every supported architecture and rope variant, both rope config spellings, sharded
checkpoints and half precision, each checked against HF transformers on the same folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from xinf_sglang.runtime import SamplingParams
from xinf_sglang.runtime.model_loader.model_config import ModelConfig

from .engine_helpers import hf_greedy, make_engine, varied_prompts

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _assert_matches_hf(folder: Path, **engine_kw) -> None:
    prompts = varied_prompts(folder, 4, min_len=5, max_len=60)
    refs = [hf_greedy(folder, p, 24) for p in prompts]
    with make_engine(folder, **engine_kw) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert [o.token_ids for o in outs] == refs


def test_mistral_architecture_matches_hf(tiny_model, tmp_path):
    folder = _copy(tiny_model("llama", seed=3), tmp_path / "mistral")
    _edit_config(folder, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    assert ModelConfig.from_dir(folder).architecture == "MistralForCausalLM"
    assert type(AutoModelForCausalLM.from_pretrained(folder)).__name__ == "MistralForCausalLM"
    _assert_matches_hf(folder)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "linear", "factor": 4.0},
    ],
    ids=["llama3", "linear"],
)
def test_rope_scaling_variants_match_hf(tiny_model, rope):
    folder = tiny_model("llama", seed=4, rope_scaling=rope)
    assert ModelConfig.from_dir(folder).rope.rope_type == rope["rope_type"]
    _assert_matches_hf(folder)


def test_old_style_rope_theta_config_is_read(tiny_model, tmp_path):
    """transformers 4.x configs: ``rope_theta`` / ``rope_scaling`` at top level, no ``rope_parameters``."""
    folder = _copy(tiny_model("llama", seed=5), tmp_path / "old")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 50000.0
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 128}
    (folder / "config.json").write_text(json.dumps(cfg))
    rope = ModelConfig.from_dir(folder).rope
    assert rope.theta == 50000.0 and rope.rope_type == "llama3" and rope.factor == 2.0
    _assert_matches_hf(folder)  # HF reads the same old-style keys


def test_sharded_checkpoint_with_index(tiny_model, tmp_path):
    src = tiny_model("qwen3", seed=6)
    folder = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(folder, max_shard_size="100KB")
    for f in src.iterdir():
        if not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, folder / f.name)
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 1
    _assert_matches_hf(folder)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_generates(tiny_model, dtype):
    folder = tiny_model("qwen2")
    with make_engine(folder, dtype=dtype) as engine:
        assert engine.run_on_scheduler(lambda s: s.runner.model.model.embed_tokens.weight.dtype) == getattr(torch, dtype)
        [out] = engine.generate(input_ids=varied_prompts(folder, 1, min_len=10, max_len=10), sampling_params=GREEDY)
        assert len(out.token_ids) == 24 and out.finish_reason == "length"


def test_dummy_weights_from_config_alone(tiny_model, tmp_path):
    folder = tmp_path / "cfg-only"
    folder.mkdir()
    shutil.copy(tiny_model("llama") / "config.json", folder / "config.json")
    with make_engine(folder, load_format="dummy", skip_tokenizer_init=True) as engine:
        [out] = engine.generate(input_ids=[[5, 6, 7]], sampling_params=GREEDY)
        assert len(out.token_ids) == 24 and out.text == ""
        params = engine.run_on_scheduler(lambda s: dict(s.runner.model.named_parameters()))
        assert all(torch.isfinite(p).all() for p in params.values())
