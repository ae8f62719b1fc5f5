"""KV pool slot allocator and the request->token table.

The KV pool is token-granular: every cached token owns one slot (a row index into the per-layer K/V buffers).
Slot 0 is reserved as the dummy slot that padded CUDA-graph rows write to, so the pool buffers have
``size + 1`` rows and the allocator hands out slots ``1..size`` only.

Ownership, which the scheduler and the radix cache rely on: a slot is at any time exactly one of
free (in the allocator), held by a running request (slots it allocated itself), or held by the radix cache.
Whoever holds a slot frees it exactly once.
"""

from __future__ import annotations

import operator

import torch

__all__ = ["TokenAllocator", "ReqToTokenPool"]


class TokenAllocator:
    """Free list over KV pool slots ``1..size``.

    The free list is a fixed-size int64 stack on ``device`` plus a Python-side top counter, so ``alloc`` and
    ``free`` are a slice copy each: O(n) tensor work, no per-slot Python loop and, on GPU, no device sync
    (the counter is known on the host; only ``debug`` checks read tensor values back).

    Freed slots are reused first (LIFO), which keeps recently touched pool rows warm.

    Args:
        size: number of usable slots (KV pool tokens), at least 1. Slot 0 is not counted.
        device: where the free list and the returned slot tensors live (the KV pool's device).
        debug: check every ``free`` for slot 0, out-of-range slots, duplicates and double frees, raising
            ``AssertionError``. These checks sync with the device; leave it off on the hot path.
    """

    def __init__(self, size: int, device: str | torch.device = "cpu", debug: bool = False) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"TokenAllocator size must be a positive int, got {size!r}")
        self.size: int = size
        self.device = torch.device(device)
        self.debug = debug
        # Invariant: self._stack[:self._top] are exactly the free slots, each once; entries at and above
        # _top are stale and never read. Stored descending so the first alloc(n) returns 1..n.
        self._stack = torch.arange(size, 0, -1, dtype=torch.int64, device=self.device)
        self._top: int = size
        # debug only: _is_free[s] is True iff slot s is on the free stack (index 0 is always False).
        self._is_free: torch.Tensor | None = None
        if debug:
            self._is_free = torch.ones(size + 1, dtype=torch.bool, device=self.device)
            self._is_free[0] = False

    @property
    def available(self) -> int:
        """Number of free slots (host-side counter; never syncs)."""
        return self._top

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take ``n`` distinct free slots.

        Returns an int64 tensor of shape ``[n]`` on ``device`` that the caller now owns, or ``None`` if fewer
        than ``n`` slots are free (nothing is taken then: never a partial allocation). ``alloc(0)`` returns an
        empty tensor. The result is a fresh tensor, not a view of the free list.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"alloc needs a non-negative int, got {n!r}")
        if n > self._top:
            return None
        # flip() copies, so later frees that overwrite this stack region cannot change the result.
        out = self._stack[self._top - n : self._top].flip(0)
        self._top -= n
        if self._is_free is not None:
            self._is_free[out] = False
        return out

    def free(self, slots: torch.Tensor) -> None:
        """Return ``slots`` (any integer dtype, any shape; flattened) to the free list.

        Contract: the caller owns every slot in ``slots`` and gives up ownership; each slot is freed once.
        Freeing more slots than are allocated always raises ``AssertionError`` (a cheap host-side check);
        with ``debug=True`` slot 0, out-of-range slots, duplicates and double frees raise too, and nothing is
        freed when a check fails.
        """
        slots = slots.reshape(-1)
        k = slots.numel()
        if k == 0:
            return
        if self._top + k > self.size:
            raise AssertionError(
                f"freeing {k} slots with {self._top} of {self.size} already free: some slot is freed twice"
            )
        slots = slots.to(device=self.device, dtype=torch.int64)
        if self._is_free is not None:
            self._debug_check_free(slots)
            self._is_free[slots] = True
        self._stack[self._top : self._top + k] = slots
        self._top += k

    def free_slots(self) -> torch.Tensor:
        """A copy of the current free list (for tests and debugging; order is unspecified)."""
        return self._stack[: self._top].clone()

    def check_no_double_free(self) -> None:
        """Check the whole free list: every entry in ``1..size`` and no slot listed twice.

        Works with or without ``debug`` (it catches a double free after the fact, as a duplicate entry).
        Raises ``AssertionError`` naming the offending slots. Syncs with the device.
        """
        free = self._stack[: self._top]
        if free.numel() == 0:
            return
        lo, hi = int(free.min()), int(free.max())
        if lo < 1 or hi > self.size:
            raise AssertionError(f"free list holds slots outside 1..{self.size} (min {lo}, max {hi})")
        uniq, counts = torch.unique(free, return_counts=True)
        if uniq.numel() != free.numel():
            dup = uniq[counts > 1][:8].tolist()
            raise AssertionError(f"double free: slots {dup} are on the free list more than once")
        if self._is_free is not None and int(self._is_free.sum()) != self._top:
            raise AssertionError("debug free mask disagrees with the free list")

    def _debug_check_free(self, slots: torch.Tensor) -> None:
        assert self._is_free is not None
        lo, hi = int(slots.min()), int(slots.max())
        if lo == 0:
            raise AssertionError("freeing slot 0, the reserved dummy slot that is never allocated")
        if lo < 0 or hi > self.size:
            raise AssertionError(f"freeing slots outside 1..{self.size} (min {lo}, max {hi})")
        uniq, counts = torch.unique(slots, return_counts=True)
        if uniq.numel() != slots.numel():
            raise AssertionError(f"slots {uniq[counts > 1][:8].tolist()} appear twice in one free() call")
        already = slots[self._is_free[slots]]
        if already.numel():
            raise AssertionError(f"double free: slots {already[:8].tolist()} are already free")

    def __repr__(self) -> str:
        return f"TokenAllocator(size={self.size}, available={self.available}, device={self.device})"


class ReqToTokenPool:
    """The request->token table: row ``r`` maps token position ``i`` of the request in row ``r`` to its slot.

    ``table`` is an int32 tensor ``[rows, context_len]`` on ``device``, zeros initially; it takes
    ``rows * context_len * 4`` bytes (``nbytes``), which the memory planner must account for. Attention
    kernels read a request's KV through ``table[row, :seq_len]``.

    Rows are handed out whole; their contents are not cleared on ``alloc`` or ``free`` (the owner writes
    positions ``0..seq_len-1`` before any kernel reads them, so stale entries past ``seq_len`` are harmless).
    Row allocation is host-side bookkeeping only.
    """

    def __init__(self, rows: int, context_len: int, device: str | torch.device = "cpu") -> None:
        for name, v in (("rows", rows), ("context_len", context_len)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ReqToTokenPool {name} must be a positive int, got {v!r}")
        self.rows: int = rows
        self.context_len: int = context_len
        self.device = torch.device(device)
        self.table = torch.zeros((rows, context_len), dtype=torch.int32, device=self.device)
        # Invariant: _free_rows holds each free row once and _is_free[r] is True iff r is in it.
        # Stored reversed so pop() hands out row 0 first.
        self._free_rows: list[int] = list(range(rows - 1, -1, -1))
        self._is_free: list[bool] = [True] * rows

    @property
    def available(self) -> int:
        """Number of free rows."""
        return len(self._free_rows)

    @property
    def nbytes(self) -> int:
        """Bytes taken by ``table``: ``rows * context_len * 4``."""
        return self.rows * self.context_len * 4

    def alloc(self) -> int | None:
        """Take a free row index (the caller owns it until ``free``), or ``None`` if all rows are in use."""
        if not self._free_rows:
            return None
        row = self._free_rows.pop()
        self._is_free[row] = False
        return row

    def free(self, row: int) -> None:
        """Give back a row taken with ``alloc``. Out-of-range rows and double frees raise ``AssertionError``."""
        row = operator.index(row)  # accepts numpy / 0-d tensor ints, rejects floats
        if not 0 <= row < self.rows:
            raise AssertionError(f"freeing row {row} outside 0..{self.rows - 1}")
        if self._is_free[row]:
            raise AssertionError(f"double free of request row {row}")
        self._is_free[row] = True
        self._free_rows.append(row)

    def __repr__(self) -> str:
        return (
            f"ReqToTokenPool(rows={self.rows}, context_len={self.context_len}, available={self.available}, "
            f"device={self.device})"
        )
