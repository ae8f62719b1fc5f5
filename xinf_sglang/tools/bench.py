"""``sglite bench offline``: throughput of the runtime on a random workload, next to baselines on the same
prompts in the same run: HF ``generate`` (``--baseline hf``, one prompt at a time) and llama.cpp (``--baseline
llamacpp``: xllamacpp on an F32 GGUF of the same weights, all prompts batched). What it runs and reports is
``xinf_sglang.runtime.bench.offline``; this module is the command line.

Prompts are random token ids with uniformly drawn input and output lengths; EOS is ignored so every request
produces exactly its output length. ``--shared-prefix N`` starts every prompt with the same N random tokens (one
of ``--prefix-groups G`` prefixes), then its own ``--input-len`` random tokens, and reports the prompt tokens
sglite served from its prefix cache against the most a cache could serve. ``--load-format dummy --model-config
config.json`` benchmarks real model shapes with random weights (no checkpoint or tokenizer needed).

``sglite bench serve`` (:mod:`xinf_sglang.tools.bench_serve`) measures a served model over HTTP instead.
"""

from __future__ import annotations

import argparse

from .arg_types import length_range
from .bench_serve import options as serve_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sglite bench``: ``offline`` (here) and ``serve`` (:mod:`.bench_serve.options`)."""
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("offline", help="offline throughput: all prompts submitted at once")
    p.add_argument("--model", help="checkpoint folder (or use --model-config with --load-format dummy)")
    p.add_argument("--model-config", help="a config.json to benchmark with random weights (--load-format dummy)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=length_range, default=(32, 256), help="A:B, uniform (default 32:256)")
    p.add_argument("--output-len", type=length_range, default=(32, 128), help="A:B, uniform (default 32:128)")
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
    serve_options.add_arguments(sub.add_parser("serve", help=serve_options.HELP, description=serve_options.HELP))


def run(args: argparse.Namespace) -> int:
    """Run the chosen mode; each imports only what it needs (``serve`` talks HTTP and never loads torch)."""
    if args.bench == "serve":
        from .bench_serve.command import run_serve

        return run_serve(args)
    from .bench_offline import run_offline

    return run_offline(args)
