"""A/B of ``sglite bench offline`` between two installed copies of sglite on the same machine, interleaved.

Each copy is a folder holding an installed ``xinf_sglang`` (``pip install --no-deps --target DIR``); a run picks
its copy through ``PYTHONPATH=DIR`` (``python -P``, so the checkout's own folders never shadow it; the script
checks which copy each side imports before timing). Round r runs old then new when r is even, new then old when
it is odd (A B B A ...), so a drift of the machine over the rounds falls on both sides. Every run is the
workload's ``bench offline`` command of docs/PERFORMANCE.md with ``--baseline none``; both sides get the same
workload (the script checks that the input and output token counts agree). One row per workload: the new/old
ratio of the mean output tok/s, PASS at >= ``MIN_RATIO`` (a regression over 3% fails, as issue 20 asks).

    python scripts/gpu_ab.py --workload a --old /root/ab/old --new /root/ab/new --rounds 2
    python scripts/gpu_ab.py --workload c --num-prompts 200 ...   # fewer prompts for BOTH sides
    python scripts/gpu_ab.py --workload b --smoke-config tiny/config.json --old ... --new ...   # CPU smoke run

``--deadline`` (a Unix time) stops starting runs that would end after it (estimated from the workload's
previous run, else ``--estimate-s``); the row then says how many rounds ran.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from wave_rows import add_row

ROOT = Path(__file__).resolve().parents[1]
MIN_RATIO = 0.97
# docs/PERFORMANCE.md's commands (scripts/gpu_run.sh bench-a/b/c), without their HF baseline
WORKLOADS: dict[str, list[str]] = {
    "a": ["--model-config", "configs/llama-3.1-8b.json", "--num-prompts", "1", "--input-len", "128:128",
          "--output-len", "256:256", "--roofline", "--engine-arg", "context_length=4096"],
    "b": ["--model-config", "configs/qwen3-0.6b.json", "--num-prompts", "256", "--input-len", "100:1024",
          "--output-len", "100:1024", "--engine-arg", "context_length=4096"],
    "c": ["--model-config", "configs/llama-3.1-8b.json", "--num-prompts", "500", "--input-len", "1:4096",
          "--output-len", "1:2048", "--engine-arg", "context_length=8192"],
}
ROOFLINE = re.compile(r"= ([0-9.]+)% of the roofline")
SPLIT = re.compile(r"time split: prefill ([0-9.]+) s .*decode ([0-9.]+) s \((\d+) steps")


@dataclass
class Run:
    side: str
    tok_s: float
    seconds: float
    tokens: tuple[int, int]  # (input, output) of the workload
    roofline: float | None
    split: str
    wall_s: float


@dataclass
class Sides:
    dirs: dict[str, str]
    runs: list[Run] = field(default_factory=list)

    def tok_s(self, side: str) -> list[float]:
        return [r.tok_s for r in self.runs if r.side == side]


def bench_args(workload: str, num_prompts: int | None, smoke_config: str | None) -> list[str]:
    args = list(WORKLOADS[workload])
    if num_prompts is not None:
        args[args.index("--num-prompts") + 1] = str(num_prompts)
    if smoke_config:  # the workload's flags on a tiny config, CPU, short lengths
        args[args.index("--model-config") + 1] = smoke_config
        for flag, value in (("--input-len", "8:24"), ("--output-len", "4:12")):
            args[args.index(flag) + 1] = value
        args = [a for a in args if a != "--roofline"] + ["--device", "cpu", "--dtype", "float32"]
        args = [a for a in args if not a.startswith("context_length")]
        args.remove("--engine-arg")
    return ["bench", "offline", "--load-format", "dummy", "--baseline", "none", *args]


def side_env(site: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = site + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def check_side(name: str, site: str) -> None:
    """The copy ``site`` is what a run of side ``name`` imports (runtime and kernels alike)."""
    code = "import xinf_sglang.runtime as r, xinf_sglang.kernels as k; print(r.__file__); print(k.__file__)"
    done = subprocess.run([sys.executable, "-P", "-c", code], env=side_env(site), capture_output=True, text=True,
                          cwd=ROOT)
    paths = done.stdout.split()
    if done.returncode or len(paths) != 2 or not all(p.startswith(os.path.abspath(site)) for p in paths):
        raise SystemExit(f"side {name}: PYTHONPATH={site} imports {paths or done.stderr[-500:]}, not its own copy")


def run_once(side: str, site: str, args: list[str], timeout_s: float, log) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "result.json"
        cmd = [sys.executable, "-P", "-m", "xinf_sglang.cli", *args, "--json", str(out_json)]
        log.write(f"\n=== {side}: PYTHONPATH={site} {' '.join(cmd)}\n")
        log.flush()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=side_env(site), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            log.write(text)
            raise RuntimeError(f"{side} timed out after {timeout_s:.0f} s") from None
        log.write(text)
        if proc.returncode != 0:
            raise RuntimeError(f"{side} exited {proc.returncode}: {text.strip()[-400:]}")
        [row] = [r for r in json.loads(out_json.read_text()) if r["engine"] == "sglite"]
    roof = ROOFLINE.search(text)
    split = SPLIT.search(text)
    return Run(side, row["output_tok_s"], row["seconds"], (row["input_tokens"], row["output_tokens"]),
               float(roof.group(1)) if roof else None,
               f"prefill {split.group(1)} s, decode {split.group(2)} s / {split.group(3)} steps" if split else "",
               time.monotonic() - start)


def run_rounds(sides: Sides, args: list[str], opts: argparse.Namespace, log) -> str:
    """Run the rounds that fit before the deadline; returns why it stopped early ('' if it did not)."""
    estimate = opts.estimate_s
    for r in range(opts.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            left = opts.deadline - time.time() if opts.deadline else float("inf")
            if left < estimate * 1.2:
                return f"stopped before round {r + 1} {side}: {left:.0f} s left, a run takes ~{estimate:.0f} s"
            run = run_once(side, sides.dirs[side], args, min(opts.run_timeout_s, left), log)
            print(f"[ab] {side}: {run.tok_s:.1f} out tok/s in {run.seconds:.2f} s (wall {run.wall_s:.0f} s) "
                  f"{run.roofline or ''} {run.split}", flush=True)
            sides.runs.append(run)
            estimate = max(r.wall_s for r in sides.runs)
    return ""


def summarize(workload: str, sides: Sides, note: str, args: list[str]) -> None:
    name = f"bench-{workload} A/B"
    new, old = sides.tok_s("new"), sides.tok_s("old")
    prompts = args[args.index("--num-prompts") + 1]
    if not new or not old:
        add_row(name, "SKIP", f"no complete pair: {note}")
        return
    same_work = len({r.tokens for r in sides.runs}) == 1
    ratio = statistics.mean(new) / statistics.mean(old)
    roof = {s: [r.roofline for r in sides.runs if r.side == s and r.roofline] for s in ("new", "old")}
    detail = (f"new {', '.join(f'{v:.1f}' for v in new)} / old {', '.join(f'{v:.1f}' for v in old)} out tok/s "
              f"-> new/old {ratio:.3f} ({prompts} prompts, in/out tokens {sides.runs[0].tokens})")
    if roof["new"] and roof["old"]:
        detail += f"; roofline new {', '.join(f'{v}%' for v in roof['new'])}, old {', '.join(f'{v}%' for v in roof['old'])}"
    if not same_work:
        detail += f"; WORKLOADS DIFFER: {sorted({r.tokens for r in sides.runs})}"
    detail += f"; {note}" if note else ""
    status = "PASS" if ratio >= MIN_RATIO and same_work else "FAIL"
    add_row(name, status, detail, ratio=ratio, new=new, old=old)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    p.add_argument("--old", required=True, help="folder of the old installed copy")
    p.add_argument("--new", required=True, help="folder of the new installed copy")
    p.add_argument("--rounds", type=int, default=1, help="runs per side (old/new order alternates per round)")
    p.add_argument("--num-prompts", type=int, default=None, help="override the workload's prompt count (both sides)")
    p.add_argument("--smoke-config", help="CPU smoke run: this tiny config.json instead of the real shapes")
    p.add_argument("--deadline", type=float, default=None, help="Unix time after which no run may end")
    p.add_argument("--estimate-s", type=float, default=60.0, help="a run's wall time before one was measured")
    p.add_argument("--run-timeout-s", type=float, default=420.0)
    p.add_argument("--log", default=None, help="append every run's output here")
    opts = p.parse_args(argv)
    sides = Sides({"old": opts.old, "new": opts.new})
    for name, site in sides.dirs.items():
        check_side(name, site)
    args = bench_args(opts.workload, opts.num_prompts, opts.smoke_config)
    with open(opts.log or os.devnull, "a", encoding="utf-8") as log:
        try:
            note = run_rounds(sides, args, opts, log)
        except RuntimeError as e:
            note = f"FAILED RUN: {e}"
            add_row(f"bench-{opts.workload} A/B run", "FAIL", str(e)[:300])
    summarize(opts.workload, sides, note, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
