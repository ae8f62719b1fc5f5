"""``sglite make-tiny-model OUT``: write a deterministic random-weight checkpoint (``runtime.tiny_model``)."""

from __future__ import annotations

import argparse
import pathlib

from ..runtime.testing.tiny_model import ARCHS, make_tiny_model, parameter_count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sglite make-tiny-model``."""
    parser.add_argument("out", type=pathlib.Path, help="folder to write (must be missing or empty)")
    parser.add_argument("--arch", choices=ARCHS, default="llama", help="model architecture (default: llama)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")


def run(args: argparse.Namespace) -> int:
    """Build the checkpoint and say where it went and how big it is."""
    path = make_tiny_model(args.out, args.arch, args.seed)
    print(f"wrote {args.arch} checkpoint (seed {args.seed}) to {path}: {parameter_count(path):,} parameters")
    return 0
