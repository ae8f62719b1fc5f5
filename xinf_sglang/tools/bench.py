"""``sglite bench offline``: throughput of the runtime on a random workload, next to baselines on the same
prompts in the same run: HF ``generate`` (``--baseline hf``, one prompt at a time) and llama.cpp (``--baseline
llamacpp``: xllamacpp on an F32 GGUF of the same weights, all prompts batched). What it runs and reports is
``xinf_sglang.runtime.bench``; this module is the command line.

Prompts are random token ids with uniformly drawn input and output lengths; EOS is ignored so every request
produces exactly its output length. ``--shared-prefix N`` starts every prompt with the same N random tokens (one
of ``--prefix-groups G`` prefixes), then its own ``--input-len`` random tokens, and reports the prompt tokens
sglite served from its prefix cache against the most a cache could serve. ``--load-format dummy --model-config
config.json`` benchmarks real model shapes with random weights (no checkpoint or tokenizer needed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..runtime.bench import (
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
from ..runtime.llamacpp_baseline import LlamaCppOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sglite bench`` (one mode so far: ``offline``)."""
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("offline", help="offline throughput: all prompts submitted at once")
    p.add_argument("--model", help="checkpoint folder (or use --model-config with --load-format dummy)")
    p.add_argument("--model-config", help="a config.json to benchmark with random weights (--load-format dummy)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=_range, default=(32, 256), help="A:B, uniform (default 32:256)")
    p.add_argument("--output-len", type=_range, default=(32, 128), help="A:B, uniform (default 32:128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                   help="every prompt starts with the same N random tokens, then its own --input-len tokens")
    p.add_argument("--prefix-groups", type=int, default=1, metavar="G",
                   help="with --shared-prefix: G different prefixes, prompt i takes prefix i %% G (default 1)")
    p.add_argument("--baseline", action="append", default=None, metavar="NAME[,NAME]",
                   help="also time these on the same prompts: hf (HF generate, batch 1), llamacpp (xllamacpp on "
                        "an F32 GGUF of the same weights, batched), none; comma-separated or repeated (default hf)")
    p.add_argument("--baseline-num-prompts", type=int, default=None, help="HF on the first N prompts only")
    p.add_argument("--llamacpp-parallel", type=int, default=0, metavar="N",
                   help="llama.cpp server slots (default: one per prompt, all prompts batched)")
    p.add_argument("--llamacpp-threads", type=int, default=0, metavar="N",
                   help="llama.cpp CPU threads (default: torch's intra-op threads, what sglite uses)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra EngineConfig option, e.g. --engine-arg max_total_tokens=20000 (repeatable)")
    p.add_argument("--json-schema", metavar="FILE",
                   help="also run the same workload constrained to this JSON schema (needs a tokenizer) and report "
                        "its throughput and the grammar-mask time per step next to the unconstrained run")
    p.add_argument("--roofline", action="store_true",
                   help="measure the device's copy and read bandwidth and print how close decode gets to the "
                        "weight-read floor")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    """Time sglite, then each baseline on its workload; print the report and (``--json``) write the rows."""
    baselines = parse_baselines(args.baseline)
    model_dir, cleanup = _model_dir(args)
    try:
        if "llamacpp" in baselines and args.load_format == "dummy":
            raise SystemExit("--baseline llamacpp needs real weights (it runs a GGUF written from --model)")
        sg = bench_sglite(_engine_config(args, model_dir), lambda vocab: _workload(args, vocab), _json_schema(args))
        results = sg.results + [_run_baseline(name, args, model_dir, sg) for name in baselines]
        print_report(results, sg, args.roofline)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps([r.as_dict() for r in results], indent=2))
    finally:
        if cleanup:
            shutil.rmtree(model_dir, ignore_errors=True)
    return 0


def _engine_config(args: argparse.Namespace, model_dir: Path) -> EngineConfig:
    """The engine's options: the command's, then every ``--engine-arg``; no tokenizer when the folder has none."""
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


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"expected A:B with 1 <= A <= B, got {text!r}")
    return lo_i, hi_i


def _parse_engine_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--engine-arg expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _model_dir(args: argparse.Namespace) -> tuple[Path, bool]:
    """The folder to load: --model, or a temporary folder holding only --model-config (dummy weights)."""
    if args.model_config:
        if args.load_format != "dummy":
            raise SystemExit("--model-config needs --load-format dummy (there are no weights to load)")
        tmp = Path(tempfile.mkdtemp(prefix="sglite-bench-"))
        shutil.copy(args.model_config, tmp / "config.json")
        return tmp, True
    if not args.model:
        raise SystemExit("give --model DIR, or --model-config config.json with --load-format dummy")
    return Path(args.model), False
