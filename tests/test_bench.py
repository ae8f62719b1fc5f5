"""``sglite bench offline`` on the CPU: the workload, the table, the JSON and the roofline report."""

from __future__ import annotations

import json
import math

import torch

from xinf_sglang import cli
from xinf_sglang.runtime.bench import measure_bandwidth


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
