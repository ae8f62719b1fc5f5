"""`BatchMask`: one step's grammar masking of a batch's logits, with the time it takes (a metric).

Each step with a constrained row: the rows of constrained requests are filled in one call of the grammar
backend's batched fill (`GrammarBackend.fill_bitmasks`; llguidance computes them in parallel), every other row is
reset to allow-all (a row left over from a finished constrained request would otherwise silently constrain its
successor), and the mask is applied to the logits. The CPU bitmask is kept between steps and grown on demand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .backend import GrammarBackend
from .bitmask import allocate_bitmask, apply_bitmask_
from .matcher import GrammarMatcher

__all__ = ["BatchMask"]


class BatchMask:
    """Masks a batch's logits to what each row's grammar allows next.

    Args:
        vocab_size: the logits' width.
        grammar_backend: the backend that made the matchers (called at the first constrained step: the engine
            builds it when the first constrained request arrives).
    """

    def __init__(self, vocab_size: int, grammar_backend: Callable[[], GrammarBackend]) -> None:
        self.vocab_size = vocab_size
        self.grammar_backend = grammar_backend
        self._bitmask = allocate_bitmask(0, vocab_size)
        self.steps = 0
        """Steps that masked logits."""
        self.seconds = 0.0
        """Host time those steps spent filling and applying masks."""

    def apply(self, logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> None:
        """Mask ``logits[i]`` ([B, V]) to what ``matchers[i]`` allows next; rows whose matcher is None allow all."""
        start = time.perf_counter()
        bitmask = self.fill(matchers)
        apply_bitmask_(logits, bitmask)
        self.seconds += time.perf_counter() - start
        self.steps += 1

    def fill(self, matchers: Sequence[GrammarMatcher | None]) -> torch.Tensor:
        """The bitmask of one step (``[len(matchers), words]`` int32 on the CPU, valid until the next call):
        constrained rows filled by the backend's batched fill, the others allow-all."""
        n = len(matchers)
        if self._bitmask.shape[0] < n:
            self._bitmask = allocate_bitmask(max(n, 2 * self._bitmask.shape[0]), self.vocab_size)
        bitmask = self._bitmask[:n]
        bitmask.fill_(-1)
        rows = [(m, row) for row, m in enumerate(matchers) if m is not None]
        if rows:
            self.grammar_backend().fill_bitmasks(rows, bitmask)
        return bitmask
