"""``sglite bench moe-tune`` on the CPU: its help, its refusal without a GPU, the grid it searches, and one tuning
pass of runtime/bench/moe_tune.py on a tiny shape with the GPU timer replaced (the kernels run under the Triton
interpreter, which tests/conftest.py turns on): the fastest config that matches the reference is the one written."""

from __future__ import annotations

import json

import pytest
import torch
from xinf_sglang.kernels.moe.config import CONFIG_KEYS, config_file_name, get_moe_config
from xinf_sglang.runtime.bench import moe_tune

from xinf_sglang import cli

QWEN3_30B = moe_tune.MoeShape(128, 768, 2048, 8, torch.bfloat16)
MIXTRAL_8X7B = moe_tune.MoeShape(8, 14336, 4096, 2, torch.bfloat16)
TUNE_ARGS = ["bench", "moe-tune", "--experts", "8", "--intermediate", "64", "--hidden", "32", "--topk", "2"]


def test_help_lists_the_shape_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "moe-tune", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(opt in text for opt in ("--experts", "--intermediate", "--hidden", "--topk", "--batch-sizes", "--out"))


def test_refuses_without_a_gpu(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs an NVIDIA GPU"):
        cli.main([*TUNE_ARGS, "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_grid_fits_shared_memory_and_follows_the_batch() -> None:
    decode = moe_tune.candidate_configs(QWEN3_30B, 1)
    prefill = moe_tune.candidate_configs(QWEN3_30B, 4096)  # 256 rows per expert
    assert {c["BLOCK_SIZE_M"] for c in decode} == {16} and {c["GROUP_SIZE_M"] for c in decode} == {1}
    assert {c["BLOCK_SIZE_M"] for c in prefill} == {32, 64, 128}
    assert {c["BLOCK_SIZE_M"] for c in moe_tune.candidate_configs(MIXTRAL_8X7B, 4096)} == {64, 128}
    for c in decode + prefill:
        assert set(c) == set(CONFIG_KEYS)
        assert (c["BLOCK_SIZE_M"] + c["BLOCK_SIZE_N"]) * c["BLOCK_SIZE_K"] * 2 * c["num_stages"] <= moe_tune.SMEM_BYTES
    assert len(moe_tune.candidate_configs(QWEN3_30B, 1, quick=True)) < len(decode)


def test_tune_keeps_the_fastest_matching_config(monkeypatch, tmp_path) -> None:
    """A tiny shape with a fake timer that makes the 128-column configs fastest, while those configs' outputs are
    corrupted: the tuner must pass over them. A second run with more batch sizes keeps the first entries."""
    monkeypatch.setattr(moe_tune, "require_cuda", lambda: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    real, last = moe_tune.fused_experts_triton, {}

    def triton_path(x, w13, w2, weights, ids, config):
        last.update(config)  # what the fake timer below is timing
        out = real(x, w13, w2, weights, ids, config=config)
        return out + 1.0 if config["BLOCK_SIZE_N"] == 128 else out

    def fake_ms(fn, device, reps, inner) -> float:
        return 1e-3 if last["BLOCK_SIZE_N"] == 128 else 1.0 / last["BLOCK_SIZE_K"]

    monkeypatch.setattr(moe_tune, "fused_experts_triton", triton_path)
    monkeypatch.setattr(moe_tune, "time_ms", fake_ms)
    shape = moe_tune.MoeShape(4, 16, 32, 2, torch.float32)
    path = moe_tune.tune(shape, [1], tmp_path, quick=True, reps=1, workers=1)
    assert path.name == config_file_name(4, 16, "Fake GPU", torch.float32)
    table = json.loads(path.read_text())
    assert list(table) == ["1"] and table["1"]["BLOCK_SIZE_N"] == 64 and table["1"]["BLOCK_SIZE_K"] == 128
    table["1"]["num_warps"] = 8  # a marker: the rerun must not retune M=1
    path.write_text(json.dumps(table))
    moe_tune.tune(shape, [1, 3], tmp_path, quick=True, reps=1, workers=1)
    table = json.loads(path.read_text())
    assert list(table) == ["1", "3"] and table["1"]["num_warps"] == 8
    monkeypatch.setenv("SGLITE_MOE_CONFIG_DIR", str(tmp_path))
    assert get_moe_config(4, 16, 2, torch.float32, "Fake GPU") == table["1"]
