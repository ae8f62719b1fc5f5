"""``sglite bench offline``'s run: the engine and its baselines on one workload (its arguments are in
:mod:`xinf_sglang.tools.bench`). Imported only when that mode runs: it loads torch and the runtime, which
``sglite bench serve`` never needs."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
from ..runtime.bench.llamacpp_baseline import LlamaCppOptions


def run_offline(args: argparse.Namespace) -> int:
    """Time sglite, then each baseline on its workload; print the report and (``--json``) write the rows."""
    baselines = parse_baselines(args.baseline)
    with model_folder(args) as model_dir:
        if "llamacpp" in baselines and args.load_format == "dummy":
            raise SystemExit("--baseline llamacpp needs real weights (it runs a GGUF written from --model)")
        sg = bench_sglite(engine_config(args, model_dir), lambda vocab: _workload(args, vocab), _json_schema(args))
        results = sg.results + [_run_baseline(name, args, model_dir, sg) for name in baselines]
        print_report(results, sg, args.roofline)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps([r.as_dict() for r in results], indent=2))
    return 0


def engine_config(args: argparse.Namespace, model_dir: Path) -> EngineConfig:
    """The engine's options (``bench.add_engine_arguments``): the command's, then every ``--engine-arg``; no
    tokenizer when the folder has none."""
    engine_kwargs = dict(_parse_engine_arg(a) for a in args.engine_arg)
    has_tokenizer = any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return EngineConfig(
        model_path=str(model_dir), device=args.device, dtype=args.dtype, load_format=args.load_format,
        seed=args.seed, skip_tokenizer_init=not has_tokenizer, **engine_kwargs,
    )


def _workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    return make_workload(vocab_size, args.num_prompts, args.input_len, args.output_len, args.seed,
                         shared_prefix=args.shared_prefix, prefix_groups=args.prefix_groups)


def _json_schema(args: argparse.Namespace) -> dict | None:
    return json.loads(Path(args.json_schema).read_text()) if args.json_schema else None


def _run_baseline(name: str, args: argparse.Namespace, model_dir: Path, sg: SgliteRun) -> Result:
    """Time baseline ``name`` on sglite's workload (HF: its first ``--baseline-num-prompts`` prompts)."""
    if name == "hf":
        subset = sg.workload.head(args.baseline_num_prompts or len(sg.workload.prompts))
        return bench_hf(model_dir, subset, sg.device, sg.dtype, args.load_format == "dummy", args.seed)
    options = LlamaCppOptions(parallel=args.llamacpp_parallel, threads=args.llamacpp_threads or torch.get_num_threads(),
                              gpu=sg.device.type == "cuda")
    return bench_llamacpp(model_dir, sg.workload, options)


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
