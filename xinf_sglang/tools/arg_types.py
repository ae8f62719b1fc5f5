"""Argument types the ``sglite bench`` modes share (kept torch-free: ``bench serve`` must start fast)."""

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
