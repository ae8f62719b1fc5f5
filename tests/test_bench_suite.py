"""``sglite bench offline --suite cpu``: every workload of the suite in every round, each run isolated, the rows
labelled by workload and round, and the table's min / median / ratio per workload and engine."""

from __future__ import annotations

import argparse
import json

from xinf_sglang.runtime.bench.offline import Result, Workload
from xinf_sglang.tools.bench_suite import CPU_SUITE, run_suite


def test_every_workload_runs_isolated_in_every_round(tmp_path, capsys) -> None:
    seen = []

    def run_one(args: argparse.Namespace) -> list[Result]:
        seen.append((args.num_prompts, args.input_len, args.output_len, args.shared_prefix, args.isolate))
        w = Workload([[1] * args.input_len[0]] * args.num_prompts, [args.output_len[0]] * args.num_prompts)
        seconds = len(seen)  # later runs slower: min and median differ
        return [Result("sglite", w, seconds, peak_rss_bytes=2**30, startup_s=5.0), Result("vLLM", w, 2 * seconds)]

    args = argparse.Namespace(suite="cpu", rounds=2, json_out=str(tmp_path / "rows.json"), num_prompts=7,
                              input_len=(1, 1), output_len=(1, 1), shared_prefix=0, isolate=False)
    assert run_suite(args, run_one) == 0
    expected = [(w.num_prompts, w.input_len, w.output_len, w.shared_prefix, True) for w in CPU_SUITE]
    assert seen == expected * 2
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["round"], r["engine"]) for r in rows[:2]] == [(1, "sglite"), (1, "vLLM")] and len(rows) == 12
    table = capsys.readouterr().out.splitlines()
    batch1 = [line for line in table if line.startswith("batch 1")]
    assert len(batch1) == 2 and batch1[1].split()[-3] == "2.00"  # vLLM took twice as long: sglite 2.00x
