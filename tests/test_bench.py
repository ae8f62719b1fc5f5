"""``sglite bench offline`` on the CPU: the workloads (shared prefix too), the table, the JSON, the roofline report,
the llama.cpp baseline and the F32 GGUF it runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from xinf_sglang import cli
from xinf_sglang.runtime.bench.offline import Workload, make_workload, measure_bandwidth, parse_baselines
from xinf_sglang.runtime.bench.llamacpp_baseline import LlamaCppOptions, complete, generated_ids, start_server
from xinf_sglang.runtime.model_loader.checkpoint import open_checkpoint
from xinf_sglang.runtime.testing.gguf_writer import cached_gguf

from .engine_helpers import hf_greedy, varied_prompts


def test_measure_bandwidth_reports_copy_and_read() -> None:
    bw = measure_bandwidth(torch.device("cpu"), nbytes=8 * 1024**2, repeats=2)
    assert math.isfinite(bw.copy) and bw.copy > 0
    assert math.isfinite(bw.read) and bw.read > 0


def test_bench_offline_with_roofline_and_hf_baseline(tiny_model, tmp_path, capsys) -> None:
    model = tiny_model("llama")
    out = tmp_path / "bench.json"
    argv = ["bench", "offline", "--model", str(model), "--device", "cpu", "--num-prompts", "3",
            "--input-len", "4:9", "--output-len", "5:5", "--roofline", "--json", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["engine"] for r in rows][:1] == ["sglite"] and len(rows) == 2  # sglite, then HF generate
    assert all(r["prompts"] == 3 and r["output_tokens"] == 15 for r in rows)
    assert "copy bandwidth" in printed and "read bandwidth" in printed
    assert "of the roofline" in printed and "of the read-bandwidth roofline" in printed


def test_parse_baselines_accepts_commas_repeats_and_none() -> None:
    assert parse_baselines(None) == ["hf"]
    assert parse_baselines(["hf,llamacpp"]) == ["hf", "llamacpp"]
    assert parse_baselines(["llamacpp", "hf", "llamacpp"]) == ["llamacpp", "hf"]
    assert parse_baselines(["none"]) == []
    assert parse_baselines(["vllm,llamacpp"]) == ["vllm", "llamacpp"]
    with pytest.raises(SystemExit, match="unknown tgi"):
        parse_baselines(["hf,tgi"])
    with pytest.raises(SystemExit, match="cannot be combined"):
        parse_baselines(["none", "hf"])


def test_shared_prefix_workload_shapes() -> None:
    w = make_workload(50_000, 7, (3, 5), (2, 4), seed=1, shared_prefix=10, prefix_groups=3)
    assert len(w.prompts) == len(w.output_lens) == 7
    assert all(13 <= len(p) <= 15 for p in w.prompts) and all(2 <= n <= 4 for n in w.output_lens)
    prefixes = [tuple(p[:10]) for p in w.prompts]
    assert len(set(prefixes)) == 3 and all(prefixes[i] == prefixes[i % 3] for i in range(7))
    assert all(16 <= t < 50_000 for p in w.prompts for t in p)
    assert w.max_cached_tokens == (7 - 3) * 10  # random suffixes over a big vocabulary share nothing
    assert w.head(2).max_cached_tokens == 0 and w.head(4).max_cached_tokens == 10
    warm = w.warmup_prompts()
    assert len(warm) == 2 and warm[0][0] not in {p[0] for p in w.prompts}
    plain = make_workload(50_000, 7, (3, 5), (2, 4), seed=1)
    assert plain.prefix_len == 0 and plain.max_cached_tokens == 0
    assert plain == make_workload(50_000, 7, (3, 5), (2, 4), seed=1, shared_prefix=0, prefix_groups=3)


def test_max_cached_tokens_is_the_longest_earlier_match() -> None:
    w = Workload([[1, 2, 3], [1, 2, 4, 5], [1, 2, 3], [9]], [1, 1, 1, 1])
    assert w.max_cached_tokens == 0 + 2 + 2 + 0  # a repeated prompt still computes its last token


def test_bench_offline_llamacpp_and_shared_prefix(tiny_model, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SGLITE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    out = tmp_path / "bench.json"
    argv = ["bench", "offline", "--model", str(model), "--device", "cpu", "--num-prompts", "4",
            "--input-len", "3:6", "--output-len", "4:6", "--shared-prefix", "24", "--prefix-groups", "2",
            "--baseline", "hf", "--baseline", "llamacpp", "--llamacpp-threads", "1", "--json", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["engine"] for r in rows] == ["sglite", "HF generate (batch 1)", "llama.cpp (4 slots)"]
    assert len({(r["input_tokens"], r["output_tokens"]) for r in rows}) == 1
    assert all(r["max_cache_hit_rate"] == pytest.approx(2 * 24 / rows[0]["input_tokens"]) for r in rows)
    assert all(0 <= r["cache_hit_rate"] <= r["max_cache_hit_rate"] for r in rows if r["cache_hit_rate"] is not None)
    assert "total tok/s" in printed and "theoretical maximum cached 48 of" in printed
    assert "sglite: cached" in printed and "of the maximum" in printed
    assert len(list((tmp_path / "cache" / "gguf").glob("*.f32.gguf"))) == 1


def test_f32_gguf_loads_in_sglite_and_llamacpp_with_the_hf_weights(tiny_model, tmp_path) -> None:
    model = tiny_model("llama")
    gguf_file = cached_gguf(model, cache_dir=tmp_path)
    assert cached_gguf(model, cache_dir=tmp_path) == gguf_file and len(list(tmp_path.iterdir())) == 1
    hf = dict(open_checkpoint(model).tensors())
    ours = dict(open_checkpoint(gguf_file).tensors())
    assert set(ours) == set(hf)
    assert all(torch.equal(ours[name], hf[name].float()) for name in hf)
    prompts = varied_prompts(model, 2, min_len=5, max_len=30)
    server = start_server(gguf_file, 2, 64, LlamaCppOptions(parallel=2, threads=1))
    try:
        counts = [complete(server, p, 4) for p in prompts]
        got = [generated_ids(server, p, 4) for p in prompts]
    finally:
        del server
    assert [c.prompt_tokens for c in counts] == [len(p) for p in prompts]  # ids taken as given, no BOS added
    assert [c.completion_tokens for c in counts] == [4, 4]
    assert got == [hf_greedy(model, p, 4) for p in prompts]


def test_bench_kernels_refuses_unknown_sweeps_and_quant_kinds(capsys) -> None:
    for option, value, what in (("--sweep", "linear,nope", "unknown sweep 'nope'"),
                                ("--quant-kinds", "awq_gemv,nf4", "unknown quant kind 'nf4'")):
        with pytest.raises(SystemExit):
            cli.main(["bench", "kernels", "--model-config", "configs/llama-3.1-8b.json", option, value])
        err = capsys.readouterr().err
        assert what in err and "choose from" in err
