"""Serving through Xinference's REST API vs the same engine in-process (issue 29): one table row per concurrency.

A tiny random-weight Llama (``tiny_model``'s default config, or ``--model-dir``) is registered in a fresh
``xinference-local`` and launched with ``--model-engine sglite``; ``sglite bench serve``'s sweep runs against it
over HTTP; then the model is deleted and the very same workloads (same seeds per level, same warm-up) run on an
``Engine`` in this process through ``bench_serve.direct.send_direct``. Run it under the shared heavy-work lock::

    flock /tmp/sglite-heavy.lock .venv/bin/python scripts/bench_rest_vs_direct.py --sweep 1,16,64 \
        --num-prompts 64 --input-len 128 --output-len 128 --out /tmp/rest-vs-direct

Prints one markdown row per level (REST / direct output tok/s, TTFT and ITL medians) and writes them to
``OUT/rows.json``. ``--launch KEY=VALUE`` sets a launch option, for the served model and the in-process Engine
alike (e.g. ``stream_interval=4``, ``device=cuda``; defaults ``mem_fraction_static=0.5``,
``max_running_requests=64``); ``--profile`` samples the model process with py-spy during the REST sweep
(``OUT/model-process.folded``, one stack per line + count). At real shapes without weights (issue 34 on a GPU)::

    python scripts/bench_rest_vs_direct.py --model-config configs/llama-3.1-8b.json --launch device=cuda \
        --launch max_running_requests=256 --sweep 1,16,64,256 --num-prompts 256 --out /tmp/rvd-8b

serves a folder holding that config and the tiny model's tokenizer, with ``load_format=dummy``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/ (the server helpers); installed package first
from tests.xinference_server import LAUNCH_TIMEOUT, http, registered_model, running_server  # noqa: E402
from xinf_sglang.runtime.testing.tiny_model import make_tiny_model  # noqa: E402

UID = "bench-tiny"


DEFAULT_LAUNCH = {"mem_fraction_static": "0.5", "max_running_requests": "64"}


def launch(endpoint: str, family: str, options: dict[str, str]) -> None:
    """The registered family launched as :data:`UID` with sglite and ``options``."""
    body = {"model_name": family, "model_engine": "sglite", "model_uid": UID, **options}
    status, reply = http("POST", endpoint + "/v1/models", body, timeout=LAUNCH_TIMEOUT)
    if status != 200:
        raise RuntimeError(f"launch failed: {reply}")


def serve_options(endpoint: str, model_dir: Path, out: Path, args: argparse.Namespace):
    """The ``sglite bench serve`` options of the sweep (the same parser as the command's)."""
    from xinf_sglang.tools.bench_serve.options import add_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--base-url", endpoint, "--model", UID, "--tokenizer", str(model_dir), "--sweep", args.sweep,
            "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len), "--output-len",
            str(args.output_len), "--output-file", str(out / "serve.jsonl")]
    return options_from_args(parser.parse_args(argv), None)


def profiled(endpoint: str, out: Path):
    """py-spy sampling the model process (its pid from sglite's metrics) until the returned process is stopped."""
    from xinf_sglang.serving.metrics import get_runtime_metrics

    pid = get_runtime_metrics(endpoint, UID, timeout=60)["pid"]
    return subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--format",
                             "raw", "--rate", "200", "--output", str(out / "model-process.folded")])


def rest_sweep(options) -> list:
    """``sglite bench serve``'s own sweep (warm-up, one workload per level) against the served model."""
    from xinf_sglang.tools.bench_serve.command import bench
    from xinf_sglang.tools.bench_serve.text import RandomText, load_tokenizer

    return asyncio.run(bench(options, RandomText(load_tokenizer(options.tokenizer))))


def direct_sweep(options, model_dir: Path, launch_options: dict[str, str]) -> list:
    """The very workloads of :func:`rest_sweep` (same seeds per level) on an Engine in this process."""
    from xinf_sglang.runtime import Engine
    from xinf_sglang.serving.launch_options import LaunchOptions, to_engine_config
    from xinf_sglang.tools.bench_serve.datasets import make_workload, warmup_workload
    from xinf_sglang.tools.bench_serve.direct import send_direct
    from xinf_sglang.tools.bench_serve.runner import RunSpec, run_workload
    from xinf_sglang.tools.bench_serve.stats import summarize
    from xinf_sglang.tools.bench_serve.text import RandomText, load_tokenizer

    text = RandomText(load_tokenizer(options.tokenizer))
    engine = Engine(to_engine_config(LaunchOptions.parse(launch_options), str(model_dir)))
    try:
        warm = warmup_workload(text, options.warmup_requests, options.seed, "completions")
        asyncio.run(run_workload(engine, warm, RunSpec("direct", 1, math.inf, 0), sender=send_direct))
        results = []
        for index, level in enumerate(options.concurrency_levels):
            workload = make_workload(options.dataset, text, options.seed + index)
            spec = RunSpec("engine-direct", level, options.request_rate, options.seed + index)
            run = asyncio.run(run_workload(engine, workload, spec, sender=send_direct))
            results.append(summarize(run, "engine-direct", "baseline", workload.dataset, options.request_rate, level))
        return results
    finally:
        engine.shutdown()


def served_folder(work: Path, args: argparse.Namespace) -> Path:
    """``--model-dir``; else the tiny random Llama; with ``--model-config`` a folder of that config and the tiny
    model's tokenizer files (no weights: served with ``load_format=dummy``)."""
    if args.model_dir:
        return args.model_dir
    tiny = make_tiny_model(work / "tiny", "llama", 0)
    if not args.model_config:
        return tiny
    folder = work / "model"
    folder.mkdir()
    for path in tiny.iterdir():
        if path.is_file() and path.name != "config.json" and path.suffix not in (".safetensors", ".bin"):
            shutil.copy(path, folder / path.name)
    shutil.copy(args.model_config, folder / "config.json")
    return folder


def launch_options(args: argparse.Namespace) -> dict[str, str]:
    """The launch options of both halves: the defaults, ``--launch`` over them, ``load_format=dummy`` with
    ``--model-config``."""
    options = {**DEFAULT_LAUNCH, **dict(item.split("=", 1) for item in args.launch)}
    if args.model_config:
        options.setdefault("load_format", "dummy")
    return options


def rows(rest: list, direct: list) -> list[dict]:
    """One row per level: output tok/s, TTFT and ITL medians of both, and the REST / direct ratios."""
    out = []
    for r, d in zip(rest, direct):
        r_tps, d_tps = r.total_output_tokens / r.duration, d.total_output_tokens / d.duration
        out.append(dict(c=r.max_concurrency, rest_tps=r_tps, direct_tps=d_tps, ratio=r_tps / d_tps,
                        rest_ttft_ms=r.ttft.median, direct_ttft_ms=d.ttft.median, rest_itl_ms=r.itl.median,
                        direct_itl_ms=d.itl.median, rest_tpot_ms=r.tpot.median, direct_tpot_ms=d.tpot.median,
                        failed=r.failed + d.failed))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/rest-vs-direct"))
    p.add_argument("--sweep", default="1,16,64")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--model-dir", type=Path, help="a checkpoint to serve instead of the tiny random Llama")
    p.add_argument("--model-config", type=Path, help="a config.json to serve with dummy weights (real shapes)")
    p.add_argument("--profile", action="store_true", help="py-spy the model process during the REST sweep")
    p.add_argument("--launch", action="append", default=[], metavar="KEY=VALUE", help="an extra launch option")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rest-vs-direct-"))
    model_dir = served_folder(work, args)
    (work / "home").mkdir()
    served = launch_options(args)
    with running_server(work / "home") as server:
        try:
            with registered_model(server, model_dir, "bench-tiny-family", chat_template=True) as family:
                launch(server.endpoint, family, served)
                options = serve_options(server.endpoint, model_dir, args.out, args)
                spy = profiled(server.endpoint, args.out) if args.profile else None
                rest = rest_sweep(options)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                    spy.wait(60)
                http("DELETE", f"{server.endpoint}/v1/models/{UID}", timeout=LAUNCH_TIMEOUT)
        finally:
            shutil.copy(server.log, args.out / "xinference.log")
    table = rows(rest, direct_sweep(options, model_dir, served))
    (args.out / "rows.json").write_text(json.dumps(table, indent=1))
    print("| streams | REST out tok/s | direct out tok/s | REST/direct | TTFT median REST / direct ms "
          "| ITL median REST / direct ms | TPOT median REST / direct ms | failed |")
    for row in table:
        print(f"| {row['c']} | {row['rest_tps']:,.0f} | {row['direct_tps']:,.0f} | {row['ratio']:.2f}x "
              f"| {row['rest_ttft_ms']:,.1f} / {row['direct_ttft_ms']:,.1f} "
              f"| {row['rest_itl_ms']:.2f} / {row['direct_itl_ms']:.2f} "
              f"| {row['rest_tpot_ms']:.2f} / {row['direct_tpot_ms']:.2f} | {row['failed']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
