"""Tests of runtime/testing/tiny_model.py: the random-weight checkpoints every other test builds on."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from xinf_sglang import cli
from xinf_sglang.runtime.testing import tiny_model as tm

ARCHS = ["llama", "qwen2", "qwen3"]
TinyModelFactory = Callable[..., Path]

# NFC-normalised text: the tokenizer normalises to NFC (as Qwen's does), so only NFC text round-trips exactly.
SAMPLES = [
    "héllo 世界 🙂",
    "def f(x):\n    return x  # café\r\n\n\tend  ",
    "It's 12,345 apples; I'LL eat 6.",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def _load_model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_folder_has_a_complete_checkpoint(tiny_model: TinyModelFactory, arch: str) -> None:
    path = tiny_model(arch)
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json"]:
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["architectures"] == [tm.ARCH_CLASSES[arch][1]]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["vocab_size"] % tm.VOCAB_MULTIPLE == 0
    assert config["vocab_size"] >= len(AutoTokenizer.from_pretrained(path))
    generation = json.loads((path / "generation_config.json").read_text())
    ids = {token: tm.SPECIAL_TOKENS.index(token) for token in tm.SPECIAL_TOKENS}
    assert generation["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_identical_files_and_another_seed_other_weights(tmp_path: Path, arch: str) -> None:
    first = tm.make_tiny_model(tmp_path / "a", arch, seed=0)
    second = tm.make_tiny_model(tmp_path / "b", arch, seed=0)
    for name in ["model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other = load_file(tm.make_tiny_model(tmp_path / "c", arch, seed=1) / "model.safetensors")
    for key, tensor in load_file(first / "model.safetensors").items():
        assert not torch.equal(tensor, other[key]), key


def test_tokenizer_training_does_not_depend_on_the_process() -> None:
    # Python's hash seed changes dict/set order between processes; the trained vocab must not follow it.
    code = (
        "import hashlib; from xinf_sglang.runtime.testing.tiny_model import _trained_tokenizer_json as t; "
        "print(hashlib.sha256(t().encode()).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout.strip()
        for seed in ["1", "2"]
    }
    assert digests == {hashlib.sha256(tm._trained_tokenizer_json().encode()).hexdigest()}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_with_auto_classes_without_missing_weights(tiny_model: TinyModelFactory, arch: str) -> None:
    path = tiny_model(arch)
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == tm.ARCH_CLASSES[arch][1]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    for key, tensor in load_file(path / "model.safetensors").items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("arch", ARCHS)
def test_no_tensor_keeps_the_default_init(tiny_model: TinyModelFactory, arch: str) -> None:
    # HF inits norms to 1 and biases to 0; a loader that skipped such a tensor would still match HF otherwise.
    tensors = load_file(tiny_model(arch) / "model.safetensors")
    norms = [k for k in tensors if k.endswith("norm.weight")]
    biases = [k for k in tensors if k.endswith(".bias")]
    assert norms
    for key in norms:
        assert not torch.allclose(tensors[key], torch.ones_like(tensors[key])), key
    for key in biases:
        assert not torch.allclose(tensors[key], torch.zeros_like(tensors[key])), key


def test_llama_is_untied_without_biases(tiny_model: TinyModelFactory) -> None:
    tensors = load_file(tiny_model("llama") / "model.safetensors")
    assert not any(k.endswith(".bias") for k in tensors)
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    model = _load_model(tiny_model("llama"))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_qwen2_has_qkv_biases_and_tied_embeddings(tiny_model: TinyModelFactory) -> None:
    path = tiny_model("qwen2")
    tensors = load_file(path / "model.safetensors")
    for layer in range(2):
        for proj in ["q_proj", "k_proj", "v_proj"]:
            assert tensors[f"model.layers.{layer}.self_attn.{proj}.bias"].abs().sum() > 0
        assert f"model.layers.{layer}.self_attn.o_proj.bias" not in tensors  # Qwen2's o_proj has no bias
    assert "lm_head.weight" not in tensors  # tied: stored once, as the embedding
    model = _load_model(path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_qwen3_has_random_qk_norms_and_no_biases(tiny_model: TinyModelFactory) -> None:
    tensors = load_file(tiny_model("qwen3") / "model.safetensors")
    for layer in range(2):
        for norm in ["q_norm", "k_norm"]:
            weight = tensors[f"model.layers.{layer}.self_attn.{norm}.weight"]
            assert weight.shape == (16,)  # per head_dim = hidden 64 / 4 heads, not Qwen3Config's default 128
            assert not torch.allclose(weight, torch.ones_like(weight))
    assert not any(k.endswith(".bias") for k in tensors)


def test_split_pattern_is_qwen2s() -> None:
    # AutoTokenizer rebuilds qwen2 folders' pre-tokenizer from this constant; ours must stay equal to it.
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert tm.QWEN2_SPLIT_PATTERN == PRETOKENIZE_REGEX


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_tokenizer_matches_the_trained_one_and_round_trips(tiny_model: TinyModelFactory, arch: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model(arch))  # Qwen2Tokenizer for qwen2, generic otherwise
    trained = tm._train_tokenizer()
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert ids == trained.encode(text).ids, text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_renders_chatml(tiny_model: TinyModelFactory, arch: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model(arch))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"
    assert rendered == expected
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without_prompt == expected.removesuffix("<|im_start|>assistant\n")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_works_and_logits_are_not_degenerate(tiny_model: TinyModelFactory, arch: str) -> None:
    path = tiny_model(arch)
    tokenizer, model = AutoTokenizer.from_pretrained(path), _load_model(path)
    input_ids = torch.tensor([tokenizer.encode("def hello(world):")])
    with torch.no_grad():
        logits = model(input_ids).logits[0]
        output = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    assert logits.std(dim=-1).min() > 0.5
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).max() > 0.05  # a clear greedy winner somewhere
    assert logits.argmax(-1).unique().numel() > 1  # positions do not all predict the same token
    new_tokens = output[0, input_ids.shape[1]:]
    assert 1 <= new_tokens.numel() <= 8
    assert isinstance(tokenizer.decode(new_tokens), str)


def test_overrides_shape_the_config(tiny_model: TinyModelFactory) -> None:
    rope = {"rope_type": "linear", "factor": 2.0}
    path = tiny_model("qwen3", vocab_size=2048, num_hidden_layers=3, hidden_size=128, intermediate_size=256,
                      tie_word_embeddings=False, rope_scaling=rope)
    config = json.loads((path / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"], config["head_dim"]) == (2048, 3, 32)
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0
    tensors = load_file(path / "model.safetensors")
    assert tensors["lm_head.weight"].shape == (2048, 128)
    model = _load_model(path)
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 2048)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "gpt2"}, "unknown arch"),
        ({"seed": -1}, "seed must be"),
        ({"hidden_sise": 32}, "unknown config override"),
        ({"dtype": "bfloat16"}, "dtype cannot be overridden"),
        ({"vocab_size": 64}, "smaller than the tokenizer"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tm.make_tiny_model(tmp_path / "out", **kwargs)


def test_non_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError):
        tm.make_tiny_model(tmp_path, "llama")


def _missing_subcommand_modules() -> list[str]:
    """cli.build_parser imports every subcommand's module, so one that is not written yet breaks them all."""
    return [module for module, _ in cli.SUBCOMMANDS.values() if importlib.util.find_spec(module) is None]


def test_cli_in_process(
    tmp_path: Path,
    tiny_model: TinyModelFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only our subcommand, through the real dispatcher, so this test does not depend on the other modules.
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"make-tiny-model": cli.SUBCOMMANDS["make-tiny-model"]})
    out = tmp_path / "cli"
    assert cli.main(["make-tiny-model", str(out), "--arch", "qwen2", "--seed", "0"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and f"{tm.parameter_count(out):,} parameters" in printed
    reference = tiny_model("qwen2", 0)
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_cli_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    if _missing_subcommand_modules():
        # cli.py cannot build its parser yet; drive the same add_arguments/run pair the way cli.main does.
        code = ("import argparse, sys; from xinf_sglang.runtime.testing import tiny_model as t; "
                "p = argparse.ArgumentParser(); t.add_arguments(p); sys.exit(t.run(p.parse_args(sys.argv[1:])))")
        command = [sys.executable, "-c", code, str(out), "--arch", "qwen3"]
    else:
        command = [sys.executable, "-m", "xinf_sglang.cli", "make-tiny-model", str(out), "--arch", "qwen3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout and "parameters" in result.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"


def test_parameter_count_of_the_default_llama(tiny_model: TinyModelFactory) -> None:
    hidden, inter, kv_dim, vocab = 64, 128, 32, 1024
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter + 2 * hidden
    assert tm.parameter_count(tiny_model("llama")) == 2 * vocab * hidden + 2 * per_layer + hidden


def test_building_leaves_the_global_torch_rng_alone(tmp_path: Path) -> None:
    # Tests that seed torch themselves must not depend on whether a tiny model was built before them.
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tm.make_tiny_model(tmp_path / "m", "llama", seed=5)
    assert torch.equal(torch.rand(4), expected)
