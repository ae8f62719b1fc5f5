"""``sglite bench serve``, the whole command: checks, warm-up, the sweep (A/B per level), JSON lines, plots.

Before any load: the server must answer ``/v1/models`` and serve ``--model`` (and ``--baseline``), and each model
gets ``--warmup-requests`` short requests that are not counted (a failing one stops the command with its error).
Level ``i`` of the sweep sends the workload drawn with ``seed + i`` (and Poisson arrivals from the same seed): no
run finds an earlier run's prompts in the prefix cache, and the model and its baseline get identical requests at
the same level, one right after the other. JSON lines go to stdout (and ``--output-file``); progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys

import httpx

from .client import check_models, make_client, request_body, send
from .datasets import api_of, make_workload, warmup_workload
from .options import ServeOptions, options_from_args
from .runner import RunSpec, run_workload
from .stats import RunResult, summarize
from .text import RandomText, load_tokenizer


def run_serve(args: argparse.Namespace) -> int:
    """Run the benchmark the arguments describe; 0 once every run is reported (failed requests included)."""
    options = options_from_args(args, args.api_key or os.environ.get("OPENAI_API_KEY"))
    if options.plot_dir and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("--plot-dir needs matplotlib, which is in the [bench] extra: pip install 'xinf-sglang[bench]'")
    text = RandomText(load_tokenizer(options.tokenizer))
    results = asyncio.run(bench(options, text))
    if options.plot_dir:
        from .plots import write_plots  # matplotlib only when plotting

        for path in write_plots(results, options.plot_dir):
            _progress(f"wrote {path}")
    return 0


async def bench(options: ServeOptions, text: RandomText) -> list[RunResult]:
    """Check the server, warm each model up, then run every level for the model and then its baseline."""
    models = [(options.model, "model")] + ([(options.baseline, "baseline")] if options.baseline else [])
    results: list[RunResult] = []
    async with make_client(options.base_url, options.api_key, options.timeout_s) as client:
        await check_models(client, [uid for uid, _ in models])
        for uid, _ in models:
            await _warm_up(client, uid, text, options)
        for index, level in enumerate(options.concurrency_levels):
            workload = make_workload(options.dataset, text, options.seed + index)
            for uid, role in models:
                where = f"{uid} ({role}), max concurrency {level or 'no cap'}"
                _progress(f"{where}: {workload.num_requests} requests ...")
                spec = RunSpec(uid, level, options.request_rate, options.seed + index)
                run = await run_workload(client, workload, spec)
                result = summarize(run, uid, role, workload.dataset, options.request_rate, level)
                _progress(f"{where}: {_one_line(result)}")
                _emit(result, options.output_file)
                results.append(result)
    return results


async def _warm_up(client: httpx.AsyncClient, uid: str, text: RandomText, options: ServeOptions) -> None:
    """Short requests, one at a time, that share nothing with the measured ones; the first failure stops all."""
    workload = warmup_workload(text, options.warmup_requests, options.seed, api_of(options.dataset))
    for conversation in workload.conversations:
        turn = conversation.turns[0]
        prompt = turn.text if workload.api == "completions" else [{"role": "user", "content": turn.text}]
        outcome = await send(client, workload.api, request_body(workload.api, uid, prompt, turn.output_len))
        if not outcome.ok:
            raise SystemExit(f"warm-up request to {uid} failed: {outcome.error}")
    if workload.conversations:
        _progress(f"{uid}: {len(workload.conversations)} warm-up request(s) done")


def _one_line(r: RunResult) -> str:
    hit = "" if r.cache_hit_rate is None else f", cache hit {r.cache_hit_rate:.0%}"
    error = f" (first error: {r.first_error})" if r.failed else ""
    return (f"{r.completed} completed, {r.failed} failed in {r.duration:.1f} s; "
            f"{r.total_output_tokens / max(r.duration, 1e-9):.1f} output tok/s, p99 TTFT {r.ttft.p99:.0f} ms, "
            f"p99 ITL {r.itl.p99:.0f} ms{hit}{error}")


def _emit(result: RunResult, output_file: str | None) -> None:
    """The run's JSON line on stdout, and appended to ``output_file`` (as SGLang's ``--output-file``)."""
    line = json.dumps(result.as_json())
    print(line, flush=True)
    if output_file:
        with open(output_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _progress(message: str) -> None:
    print(f"[bench serve] {message}", file=sys.stderr, flush=True)
