"""``sglite bench offline``: throughput of the runtime on a random workload, next to baselines on the same
prompts in the same run: HF ``generate`` (``--baseline hf``, one prompt at a time) and llama.cpp (``--baseline
llamacpp``: xllamacpp on an F32 GGUF of the same weights, all prompts batched). What it runs and reports is
``xinf_sglang.runtime.bench.offline``; this module is the command line.

Prompts are random token ids with uniformly drawn input and output lengths; EOS is ignored so every request
produces exactly its output length. ``--shared-prefix N`` starts every prompt with the same N random tokens (one
of ``--prefix-groups G`` prefixes), then its own ``--input-len`` random tokens, and reports the prompt tokens
sglite served from its prefix cache against the most a cache could serve. ``--load-format dummy --model-config
config.json`` benchmarks real model shapes with random weights (no checkpoint or tokenizer needed).

``sglite bench serve`` (:mod:`xinf_sglang.tools.bench_serve`) measures a served model over HTTP instead. The
GPU-side modes, each in its own module: ``kernels`` (launch-shape sweeps of the Triton kernels,
:mod:`.bench_kernels`), ``decode`` (where a decode step's time goes, :mod:`.bench_decode`) and ``ab`` (``bench
offline`` interleaved between two installed copies of sglite, :mod:`.bench_ab`) and ``moe-tune`` (launch configs of
the fused-MoE kernel, :mod:`.bench_moe_tune`).
"""

from __future__ import annotations

import argparse
import importlib

from .arg_types import add_engine_arguments, length_range
from .bench_serve import options as serve_options

# mode -> (module with ``add_arguments(parser)`` and ``run(args)``, one-line help); their arguments are torch-free
MODES = {
    "kernels": ("bench_kernels", "launch-shape sweeps of the decode-time Triton kernels at a model's shapes"),
    "decode": ("bench_decode", "decode step time after prompts of given lengths, and where it goes (profiler)"),
    "ab": ("bench_ab", "bench offline interleaved between two installed copies of sglite: the new/old ratio"),
    "moe-tune": ("bench_moe_tune", "tune the fused-MoE launch configs of one layer shape on this GPU (writes JSON)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sglite bench``: ``offline`` (here) and ``serve`` (:mod:`.bench_serve.options`)."""
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("offline", help="offline throughput: all prompts submitted at once")
    add_engine_arguments(p)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=length_range, default=(32, 256), help="A:B, uniform (default 32:256)")
    p.add_argument("--output-len", type=length_range, default=(32, 128), help="A:B, uniform (default 32:128)")
    p.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                   help="every prompt starts with the same N random tokens, then its own --input-len tokens")
    p.add_argument("--prefix-groups", type=int, default=1, metavar="G",
                   help="with --shared-prefix: G different prefixes, prompt i takes prefix i %% G (default 1)")
    p.add_argument("--baseline", action="append", default=None, metavar="NAME[,NAME]",
                   help="also time these on the same prompts: hf (HF generate, batch 1), llamacpp (xllamacpp on "
                        "an F32 GGUF of the same weights, batched), vllm (vLLM in its own virtualenv, batched), "
                        "none; comma-separated or repeated (default hf)")
    p.add_argument("--baseline-num-prompts", type=int, default=None, help="HF on the first N prompts only")
    p.add_argument("--llamacpp-parallel", type=int, default=0, metavar="N",
                   help="llama.cpp server slots (default: one per prompt, all prompts batched)")
    p.add_argument("--llamacpp-threads", type=int, default=0, metavar="N",
                   help="llama.cpp CPU threads (default: torch's intra-op threads, what sglite uses)")
    p.add_argument("--vllm-python", metavar="PATH",
                   help="the python of vLLM's own virtualenv (default $SGLITE_VLLM_PYTHON)")
    p.add_argument("--vllm-kv-cache-gib", type=int, default=4, metavar="GIB",
                   help="vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE, default 4)")
    p.add_argument("--vllm-dtype", metavar="DTYPE", default="auto",
                   help="the dtype vLLM loads the weights in (default auto, what its users get: on an x86 CPU a "
                        "float32 checkpoint runs in bfloat16)")
    p.add_argument("--isolate", action="store_true",
                   help="run sglite and the llama.cpp baseline each in a fresh process and report each one's startup "
                        "(process start to ready) and peak RSS of its process tree (the HF baseline runs in this "
                        "process and reports neither)")
    p.add_argument("--json-schema", metavar="FILE",
                   help="also run the same workload constrained to this JSON schema (needs a tokenizer) and report "
                        "its throughput and the grammar-mask time per step next to the unconstrained run")
    p.add_argument("--roofline", action="store_true",
                   help="measure the device's copy and read bandwidth and print how close decode gets to the "
                        "weight-read floor")
    p.add_argument("--suite", choices=["cpu"],
                   help="instead of one workload, the suite's (cpu: batch-1 decode, 64 prompts, a 1024-token shared "
                        "prefix), each engine isolated, in --rounds interleaved rounds; min and median reported")
    p.add_argument("--rounds", type=int, default=2, help="--suite: rounds of every workload (default 2)")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON here")
    serve_options.add_arguments(sub.add_parser("serve", help=serve_options.HELP, description=serve_options.HELP))
    for name, (_, help_text) in MODES.items():
        _mode_module(name).add_arguments(sub.add_parser(name, help=help_text, description=help_text))


def _mode_module(name: str):
    return importlib.import_module(f"{__package__}.{MODES[name][0]}")


def run(args: argparse.Namespace) -> int:
    """Run the chosen mode; each imports only what it needs (``serve`` talks HTTP and never loads torch)."""
    if args.bench == "serve":
        from .bench_serve.command import run_serve

        return run_serve(args)
    if args.bench in MODES:
        return _mode_module(args.bench).run(args)
    from .bench_offline import run_offline

    return run_offline(args)
