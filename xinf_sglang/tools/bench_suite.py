"""``sglite bench offline --suite cpu``: the three CPU workloads the issues compare engines on, in one command,
every engine in its own process (``--isolate``), the rounds interleaved, min and median reported.

The workloads (issues 33 and 35): batch-1 decode (1 prompt, 128 in / 256 out), a batch (64 prompts, in 32-256 /
out 32-128, all at once) and a shared prefix (64 x (1024 shared + 32 own), 32 out). Each round runs every workload
once, each with sglite then every ``--baseline``; ``--rounds`` repeats that, so a slow spell of a shared machine
touches every engine alike. The table gives, per workload and engine, the min and median output tok/s, sglite's
median over the engine's, the median startup and the largest peak RSS of the process tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..runtime.bench.offline import Result


@dataclass(frozen=True)
class SuiteWorkload:
    """One workload of the suite, as ``bench offline`` arguments."""

    name: str
    num_prompts: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    shared_prefix: int = 0


CPU_SUITE = (SuiteWorkload("batch 1, 128 in / 256 out", 1, (128, 128), (256, 256)),
             SuiteWorkload("64 prompts, in 32-256 / out 32-128", 64, (32, 256), (32, 128)),
             SuiteWorkload("64 x (1024 shared + 32), 32 out", 64, (32, 32), (32, 32), shared_prefix=1024))
SUITES = {"cpu": CPU_SUITE}


def run_suite(args: argparse.Namespace, run_one) -> int:
    """Every workload of ``args.suite`` ``args.rounds`` times through ``run_one(args) -> list[Result]`` (sglite
    first, then the baselines); prints progress, the table, and (``--json``) every row."""
    rows: list[dict] = []
    for round_no in range(1, args.rounds + 1):
        for w in SUITES[args.suite]:
            print(f"[suite] round {round_no}/{args.rounds}: {w.name}", flush=True)
            variant = argparse.Namespace(**{**vars(args), "num_prompts": w.num_prompts, "input_len": w.input_len,
                                            "output_len": w.output_len, "shared_prefix": w.shared_prefix,
                                            "isolate": True, "json_out": None})
            rows += [_row(w.name, round_no, r) for r in run_one(variant)]
    print_suite_table(rows)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


def _row(workload: str, round_no: int, r: Result) -> dict:
    return {"workload": workload, "round": round_no, **r.as_dict()}


def print_suite_table(rows: list[dict]) -> None:
    """Per workload and engine: min / median output tok/s, sglite's median over it, startup, peak RSS."""
    print(f"\n{'workload':<36}{'engine':<22}{'min':>8}{'median':>8}{'sglite x':>9}{'startup s':>10}{'RSS MiB':>9}")
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == workload]
        medians = {e: statistics.median(r["output_tok_s"] for r in mine if r["engine"] == e)
                   for e in dict.fromkeys(r["engine"] for r in mine)}
        sglite = next(iter(medians.values()))  # sglite runs first in every round
        for engine, median in medians.items():
            runs = [r for r in mine if r["engine"] == engine]
            startup = statistics.median(r["startup_s"] or 0.0 for r in runs)
            rss = max(r["peak_rss_bytes"] or 0 for r in runs) / 2**20
            print(f"{workload:<36}{engine:<22}{min(r['output_tok_s'] for r in runs):>8.1f}{median:>8.1f}"
                  f"{sglite / median:>9.2f}{startup:>10.1f}{rss:>9.0f}")
