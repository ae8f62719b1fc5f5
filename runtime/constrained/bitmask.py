"""The per-step token bitmask of a decode batch: allocation, allow-all reset, and applying it to logits.

Layout (the one llguidance fills and ``kernels.token_bitmask`` reads): ``bitmask [B, ceil(V / 32)]`` int32,
bit ``j`` (bit 0 = least significant) of word ``w`` of row ``b`` allows token ``32 * w + j`` for request ``b``.
A row of all ones (every word -1) allows every token.

How the scheduler uses it each decode step: keep one CPU bitmask for the batch (`allocate_bitmask`, reused while
the batch size fits), fill the rows of constrained requests (`GrammarMatcher.fill_bitmask` or the backend's
batched fill), reset every other row to allow-all (`reset_rows_allow_all`; a row left over from a finished
constrained request would otherwise silently constrain its successor), then `apply_bitmask_` to the logits
before sampling. Rows are filled on the CPU (the grammar engine writes through a pointer); `apply_bitmask_`
copies the mask to the logits' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xinf_sglang.kernels import apply_token_bitmask_

BITS_PER_WORD = 32


def bitmask_width(vocab_size: int) -> int:
    """Number of int32 words per row for a vocabulary of ``vocab_size`` tokens: ``ceil(vocab_size / 32)``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    return (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD


def allocate_bitmask(batch: int, vocab_size: int, *, pin_memory: bool | None = None) -> torch.Tensor:
    """A CPU bitmask ``[batch, ceil(vocab_size / 32)]`` int32 with every token allowed.

    ``pin_memory`` None pins when CUDA is available (the per-step host-to-device copy can then be asynchronous).
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    shape = (batch, bitmask_width(vocab_size))
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)


def reset_rows_allow_all(bitmask: torch.Tensor, rows: Sequence[int] | torch.Tensor | slice) -> None:
    """Set ``rows`` of ``bitmask`` to allow every token (all bits 1), in place."""
    if isinstance(rows, slice):
        bitmask[rows] = -1
        return
    index = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(list(rows), dtype=torch.long)
    if index.numel():
        bitmask.index_fill_(0, index.to(device=bitmask.device, dtype=torch.long), -1)


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """In place: ``logits[b, t] = -inf`` wherever token ``t`` is not allowed by row ``b``; returns ``logits``.

    ``logits [B, V]`` float on any device; ``bitmask [B, >= ceil(V / 32)]`` int32 (usually on the CPU: it is
    moved to the logits' device here). Tokens ``>= V`` covered by the last word are ignored. Dispatches to the
    Triton kernel for CUDA logits and to the torch reference otherwise (``kernels.apply_token_bitmask_``).
    """
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=bitmask.is_pinned())
    return apply_token_bitmask_(logits, bitmask)


__all__ = ["BITS_PER_WORD", "allocate_bitmask", "apply_bitmask_", "bitmask_width", "reset_rows_allow_all"]
