"""``sglite bench moe-tune``: tune the fused-MoE launch configs for one layer shape on this GPU and write the JSON
file that ``kernels.moe.get_moe_config`` reads. What it times and how is :mod:`xinf_sglang.runtime.bench.moe_tune`;
this module is the command line. On a GPU, Qwen3-30B-A3B and Mixtral-8x7B at tp 1::

    sglite bench moe-tune --experts 128 --intermediate 768 --hidden 2048 --topk 8 --out kernels/moe/configs
    sglite bench moe-tune --experts 8 --intermediate 14336 --hidden 4096 --topk 2 --out kernels/moe/configs

Under tensor parallelism pass the per-rank intermediate size (N / tp). A rerun tunes only the batch sizes missing
from the file (``--overwrite`` redoes them). The CPU has nothing to tune: the command refuses there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .arg_types import int_list

DEFAULT_BATCH_SIZES = "1,2,4,8,16,24,32,48,64,96,128,256,512,1024,1536,2048,3072,4096"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, required=True, metavar="E", help="number of experts")
    p.add_argument("--intermediate", type=int, required=True, metavar="N",
                   help="intermediate size of one expert on one GPU (moe_intermediate_size / tp)")
    p.add_argument("--hidden", type=int, required=True, metavar="H", help="hidden size of the model")
    p.add_argument("--topk", type=int, required=True, metavar="K", help="experts per token")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--batch-sizes", type=int_list, default=int_list(DEFAULT_BATCH_SIZES), metavar="M[,M]",
                   help=f"token counts to tune (default {DEFAULT_BATCH_SIZES})")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="folder of the JSON file (default: the installed package's kernels/moe/configs)")
    p.add_argument("--quick", action="store_true",
                   help="a small grid of launch configs: a shorter run that may miss the best config")
    p.add_argument("--reps", type=int, default=5, help="timed CUDA-graph replays per config; the minimum counts")
    p.add_argument("--compile-workers", type=int, default=None, metavar="N",
                   help="processes that compile the grid first (default: min(16, CPU cores); 1 = compile inline)")
    p.add_argument("--overwrite", action="store_true", help="retune the batch sizes already in the file")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..runtime.bench.moe_tune import MoeShape, require_cuda, tune

    require_cuda()  # before anything else: the clear refusal on a machine without a GPU
    shape = MoeShape(args.experts, args.intermediate, args.hidden, args.topk, getattr(torch, args.dtype))
    path = tune(shape, args.batch_sizes, args.out, quick=args.quick, reps=args.reps, workers=args.compile_workers,
                overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0
