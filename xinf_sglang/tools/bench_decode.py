"""``sglite bench decode``: the time of one decode step at a small batch after prompts of given lengths, from the
engine's own step accounting, and with ``--profile`` where it goes (host calls, kernels, the decode CUDA graph
alone); what it measures is :mod:`xinf_sglang.runtime.bench.decode_profile`. On a GPU, Llama-3.1-8B's shapes with
random weights::

    sglite bench decode --load-format dummy --model-config configs/llama-3.1-8b.json --prompt-len 128,6000 \\
        --engine-arg context_length=8192 --profile

``--engine-arg`` reaches every ``EngineConfig`` option (``disable_cuda_graph=true``, ``attention_backend=torch``,
...), so one run per value compares them.
"""

from __future__ import annotations

import argparse

from .arg_types import add_engine_arguments, int_list


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--prompt-len", type=int_list, default=(128,), metavar="L[,L]",
                   help="prompt lengths to decode after, one row each (default 128)")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per row (default 64)")
    p.add_argument("--batch-size", type=int, default=1, help="requests decoding together (default 1)")
    p.add_argument("--profile", action="store_true",
                   help="also profile --steps steps after the first prompt length: host calls, kernels, the graph")


def run(args: argparse.Namespace) -> int:
    from ..runtime.bench.decode_profile import decode_step_ms, print_profile, profile_decode
    from ..runtime.engine.engine import Engine
    from .bench_offline import engine_config, model_folder

    with model_folder(args) as model_dir, Engine(engine_config(args, model_dir)) as engine:
        print(f"device {engine.device}, dtype {str(engine.dtype).removeprefix('torch.')}, batch {args.batch_size}, "
              f"{args.steps} decode steps per row")
        print(f"{'prompt tokens':>14}{'ms/step':>10}{'wall ms/token':>15}")
        walls = []
        for length in args.prompt_len:
            step_ms, wall_ms = decode_step_ms(engine, length, args.steps, args.batch_size)
            walls.append(wall_ms)
            print(f"{length:>14}{step_ms:>10.3f}{wall_ms:>15.3f}", flush=True)
        if args.profile:
            print_profile(profile_decode(engine, args.prompt_len[0], args.steps, args.batch_size), walls[0])
    return 0
