"""``sglite bench offline``'s run: the engine and its baselines on one workload (its arguments are in
:mod:`xinf_sglang.tools.bench`). Imported only when that mode runs: it loads torch and the runtime, which
``sglite bench serve`` never needs."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from ..runtime.bench.offline import (
    Result,
    SgliteRun,
    Workload,
    bench_hf,
    bench_llamacpp,
    bench_sglite,
    make_workload,
    parse_baselines,
    print_report,
)
from ..runtime.config import EngineConfig
from ..runtime.bench.isolated import run_isolated
from ..runtime.bench.llamacpp_baseline import LlamaCppOptions
from ..runtime.bench.vllm_baseline import VllmOptions, bench_vllm, vllm_python


def run_offline(args: argparse.Namespace) -> int:
    """Time sglite, then each baseline on its workload; print the report and (``--json``) write the rows. With
    ``--suite``, the suite's workloads in interleaved rounds instead (`bench_suite`)."""
    if args.suite:
        from .bench_suite import run_suite

        return run_suite(args, _run_once)
    results = _run_once(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return 0


def _run_once(args: argparse.Namespace) -> list[Result]:
    """sglite then each baseline on the workload of ``args``; prints the report; returns the results."""
    baselines = parse_baselines(args.baseline)
    with model_folder(args) as model_dir:
        if "llamacpp" in baselines and args.load_format == "dummy":
            raise SystemExit("--baseline llamacpp needs real weights (it runs a GGUF written from --model)")
        if "vllm" in baselines:
            if args.load_format == "dummy" or model_dir.suffix == ".gguf":
                raise SystemExit("--baseline vllm needs a checkpoint folder with real weights (--model DIR)")
            vllm_python(args.vllm_python)  # before sglite's run: a missing virtualenv fails at once
        bench = bench_sglite_isolated if args.isolate else bench_sglite
        sg = bench(engine_config(args, model_dir), _workload_for(args), _json_schema(args))
        results = sg.results + [_run_baseline(name, args, model_dir, sg) for name in baselines]
        print_report(results, sg, args.roofline)
    return results


def engine_config(args: argparse.Namespace, model_dir: Path) -> EngineConfig:
    """The engine's options (``bench.add_engine_arguments``): the command's, then every ``--engine-arg``; no
    tokenizer when the folder has none (a GGUF file always holds one: its startup then counts it, as serving's)."""
    engine_kwargs = dict(_parse_engine_arg(a) for a in args.engine_arg)
    has_tokenizer = model_dir.suffix == ".gguf" or any(
        (model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return EngineConfig(
        model_path=str(model_dir), device=args.device, dtype=args.dtype, load_format=args.load_format,
        seed=args.seed, skip_tokenizer_init=not has_tokenizer, **engine_kwargs,
    )


def _workload_for(args: argparse.Namespace) -> Callable[[int], Workload]:
    """vocabulary size -> the workload of ``args`` (a partial: it pickles into an ``--isolate`` process)."""
    return partial(make_workload, num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                   seed=args.seed, shared_prefix=args.shared_prefix, prefix_groups=args.prefix_groups)


def _json_schema(args: argparse.Namespace) -> dict | None:
    return json.loads(Path(args.json_schema).read_text()) if args.json_schema else None


def _run_baseline(name: str, args: argparse.Namespace, model_dir: Path, sg: SgliteRun) -> Result:
    """Time baseline ``name`` on sglite's workload (HF: its first ``--baseline-num-prompts`` prompts)."""
    if name == "hf":
        subset = sg.workload.head(args.baseline_num_prompts or len(sg.workload.prompts))
        return bench_hf(model_dir, subset, sg.device, sg.dtype, args.load_format == "dummy", args.seed)
    if name == "vllm":
        return bench_vllm(model_dir, sg.workload, VllmOptions(args.vllm_python, _threads(args), args.vllm_kv_cache_gib,
                                                              args.vllm_dtype))
    options = LlamaCppOptions(parallel=args.llamacpp_parallel, threads=_threads(args),
                              gpu=sg.device.type == "cuda")
    return bench_llamacpp(model_dir, sg.workload, options, isolate=args.isolate)


def _threads(args: argparse.Namespace) -> int:
    """A baseline's CPU threads: ``--llamacpp-threads``, else torch's intra-op threads (what sglite uses)."""
    return args.llamacpp_threads or torch.get_num_threads()


def bench_sglite_isolated(config: EngineConfig, workload_for: Callable[[int], Workload],
                          json_schema: dict | None = None) -> SgliteRun:
    """`bench_sglite` in a fresh process: its results carry the startup and the peak RSS of that process
    tree. ``workload_for`` must pickle (a module-level function or a ``functools.partial`` of one)."""
    sg, cost = run_isolated(_sglite_child, config, workload_for, json_schema)
    results = [replace(r, startup_s=cost.startup_s, peak_rss_bytes=cost.peak_rss_bytes) for r in sg.results]
    return replace(sg, results=results)


def _sglite_child(config: EngineConfig, workload_for: Callable[[int], Workload],
                  json_schema: dict | None) -> tuple[SgliteRun, float]:
    """The isolated sglite process: the engine's startup log (memory plan, tokenizer cache) on stderr, then the run."""
    logging.basicConfig(level=logging.INFO, format="[sglite] %(message)s")
    sg = bench_sglite(config, workload_for, json_schema)
    return sg, sg.ready_age


def _parse_engine_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--engine-arg expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


@contextmanager
def model_folder(args: argparse.Namespace) -> Iterator[Path]:
    """The folder to load: --model, or a temporary folder holding only --model-config (dummy weights), removed
    on exit."""
    if not args.model_config:
        if not args.model:
            raise SystemExit("give --model DIR, or --model-config config.json with --load-format dummy")
        yield Path(args.model)
        return
    if args.load_format != "dummy":
        raise SystemExit("--model-config needs --load-format dummy (there are no weights to load)")
    tmp = Path(tempfile.mkdtemp(prefix="sglite-bench-"))
    try:
        shutil.copy(args.model_config, tmp / "config.json")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
