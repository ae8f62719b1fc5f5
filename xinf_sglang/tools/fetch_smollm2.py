"""``sglite fetch-smollm2``: download SmolLM2-135M-Instruct once and print its GGUF file and float32 HF folder
(``runtime.smollm2``)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..runtime.testing.smollm2 import FetchError, default_cache_dir, fetch_smollm2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``sglite fetch-smollm2`` arguments."""
    parser.add_argument("--cache-dir", help=f"where to keep it (default {default_cache_dir()})")


def run(args: argparse.Namespace) -> int:
    """Fetch the model and print its two paths."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = fetch_smollm2(args.cache_dir)
    except FetchError as exc:
        print(f"sglite fetch-smollm2: {exc}", file=sys.stderr)
        return 1
    print(f"gguf:    {model.gguf}\nhf_dir:  {model.hf_dir}")
    return 0
