"""``sglite bench ab``: ``sglite bench offline`` between two installed copies of sglite on the same machine,
interleaved, and the new/old ratio of their output tokens per second.

Each copy is a folder holding an installed ``xinf_sglang`` (``pip install --no-deps --target DIR sglite.whl``;
``scripts/prepare_offline_wheels.py`` builds the wheels of two git refs). A run picks its copy through
``PYTHONPATH=DIR`` with ``python -P`` (the current folder, a checkout say, never shadows it); before timing, each
side is checked to import its own copy. Round r runs old then new when r is even, new then old when it is odd
(A B B A ...), so a drift of the machine over the rounds falls on both sides. Both sides get the same workload
(their input and output token counts are compared). Exits 1 when the ratio of the mean tok/s is under
``--min-ratio``, or the workloads differ. Everything after ``--`` is ``bench offline``'s arguments::

    sglite bench ab --old /tmp/ab/old --new /tmp/ab/new --rounds 2 -- --load-format dummy \\
        --model-config configs/llama-3.1-8b.json --num-prompts 1 --input-len 128 --output-len 256 --roofline
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SIDES = ("old", "new")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--old", required=True, metavar="DIR", help="folder of the old installed copy")
    p.add_argument("--new", required=True, metavar="DIR", help="folder of the new installed copy")
    p.add_argument("--rounds", type=int, default=1, help="runs per side; the old/new order alternates per round")
    p.add_argument("--min-ratio", type=float, default=0.97,
                   help="new/old tok/s under this fails (exit 1); default 0.97, a 3%% regression")
    p.add_argument("--run-timeout-s", type=float, default=1800.0, help="one run's limit (default 1800)")
    p.add_argument("--log", help="append every run's full output here")
    p.add_argument("offline_args", nargs=argparse.REMAINDER, metavar="-- OFFLINE_ARGS",
                   help="the workload: sglite bench offline's arguments (--baseline none and --json are added)")


@dataclass(frozen=True)
class Run:
    """One timed ``bench offline`` run of a side."""

    side: str
    tok_s: float
    seconds: float
    tokens: tuple[int, int]  # (input, output) of the workload
    wall_s: float


def run(args: argparse.Namespace) -> int:
    offline = [a for a in args.offline_args if a != "--"]
    if not offline:
        raise SystemExit("give the workload after --: sglite bench offline's arguments")
    dirs = {"old": args.old, "new": args.new}
    for side, site in dirs.items():
        check_side(side, site)
    runs: list[Run] = []
    with open(args.log or os.devnull, "a", encoding="utf-8") as log:
        for r in range(args.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                runs.append(run_once(side, dirs[side], offline, args.run_timeout_s, log))
                last = runs[-1]
                print(f"[ab] round {r + 1} {side}: {last.tok_s:.1f} out tok/s in {last.seconds:.2f} s "
                      f"(wall {last.wall_s:.0f} s)", flush=True)
    return summarize(runs, args.min_ratio)


def side_env(site: str) -> dict[str, str]:
    """This environment with ``site`` first on ``PYTHONPATH``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(site), env.get("PYTHONPATH")) if p)
    return env


def check_side(name: str, site: str) -> None:
    """The copy in ``site`` is what a run of side ``name`` imports (runtime and kernels alike)."""
    code = "import xinf_sglang.runtime as r, xinf_sglang.kernels as k; print(r.__file__); print(k.__file__)"
    done = subprocess.run([sys.executable, "-P", "-c", code], env=side_env(site), capture_output=True, text=True)
    paths = done.stdout.split()
    root = os.path.abspath(site) + os.sep
    if done.returncode or len(paths) != 2 or not all(os.path.abspath(p).startswith(root) for p in paths):
        raise SystemExit(f"side {name}: PYTHONPATH={site} imports {paths or done.stderr[-500:]}, not its own copy")


def run_once(side: str, site: str, offline: list[str], timeout_s: float, log) -> Run:
    """One ``bench offline`` run of ``side``: its sglite row of the JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "result.json"
        cmd = [sys.executable, "-P", "-m", "xinf_sglang.cli", "bench", "offline", *offline, "--baseline", "none",
               "--json", str(out_json)]
        log.write(f"\n=== {side}: PYTHONPATH={site} {' '.join(cmd)}\n")
        log.flush()
        start = time.monotonic()
        # Its own process group: a run past its limit is killed with whatever it started.
        proc = subprocess.Popen(cmd, env=side_env(site), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log.write(proc.communicate()[0])
            raise SystemExit(f"{side} timed out after {timeout_s:.0f} s") from None
        log.write(text)
        if proc.returncode != 0:
            raise SystemExit(f"{side} exited {proc.returncode}: {text.strip()[-800:]}")
        [row] = [r for r in json.loads(out_json.read_text()) if r["engine"] == "sglite"]
    return Run(side, row["output_tok_s"], row["seconds"], (row["input_tokens"], row["output_tokens"]),
               time.monotonic() - start)


def summarize(runs: list[Run], min_ratio: float) -> int:
    """Print the new/old ratio of the mean output tok/s; 1 if under ``min_ratio`` or the workloads differ."""
    tok_s = {side: [r.tok_s for r in runs if r.side == side] for side in SIDES}
    ratio = statistics.mean(tok_s["new"]) / statistics.mean(tok_s["old"])
    workloads = sorted({r.tokens for r in runs})
    print(f"[ab] new {', '.join(f'{v:.1f}' for v in tok_s['new'])} / old "
          f"{', '.join(f'{v:.1f}' for v in tok_s['old'])} out tok/s -> new/old {ratio:.3f} "
          f"(in/out tokens {workloads[0]})")
    if len(workloads) > 1:
        print(f"[ab] FAIL: the two sides ran different workloads: {workloads}")
        return 1
    if ratio < min_ratio:
        print(f"[ab] FAIL: new/old {ratio:.3f} is under --min-ratio {min_ratio}")
        return 1
    print(f"[ab] PASS: new/old {ratio:.3f} >= {min_ratio}")
    return 0
