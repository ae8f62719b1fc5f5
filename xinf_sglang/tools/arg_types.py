"""Argument types and groups the ``sglite bench`` modes share (kept torch-free: ``bench serve`` must start fast)."""

from __future__ import annotations

import argparse


def length_range(text: str) -> tuple[int, int]:
    """``A:B`` -> ``(A, B)``, a length drawn uniformly from A..B inclusive; ``A`` alone means ``A:A``."""
    lo, _, hi = text.partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B with 1 <= A <= B, got {text!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"expected A:B with 1 <= A <= B, got {text!r}")
    return lo_i, hi_i


def int_list(text: str) -> tuple[int, ...]:
    """``A,B,...`` -> ``(A, B, ...)``, positive integers (e.g. batch sizes or prompt lengths)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine a mode benchmarks (``offline``, ``decode``): a checkpoint, or a config with random weights."""
    p.add_argument("--model", help="checkpoint folder (or use --model-config with --load-format dummy)")
    p.add_argument("--model-config", help="a config.json to benchmark with random weights (--load-format dummy)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra EngineConfig option, e.g. --engine-arg max_total_tokens=20000 (repeatable)")
