"""``PrefixCache``: what the scheduler needs from a prefix cache, so that prefix reuse is a choice of object, not a
mode flag. ``RadixCache`` (runtime/mem_cache/radix_cache.py) implements it; ``NoPrefixCache`` is prefix reuse turned off.
The engine picks one at start (``disable_radix_cache``); nothing else asks which one it has.

Handles: ``match_prefix`` and ``cache_unfinished`` return an opaque node handle that the caller passes back to
``lock`` / ``unlock`` / ``cache_unfinished`` / ``cache_finished``; only the cache that made it understands it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .allocator import TokenAllocator

__all__ = ["NoPrefixCache", "PrefixBatchIndex", "PrefixCache"]


class PrefixBatchIndex(Protocol):
    """What the requests admitted so far into one prefill batch will have computed (runtime/mem_cache/prefix_sharing.py)."""

    def add(self, tokens: Sequence[int], slots: torch.Tensor) -> None: ...

    def extend_prefix(self, tokens: Sequence[int], prefix_slots: torch.Tensor) -> tuple[torch.Tensor, int]: ...


class PrefixCache(Protocol):
    """A cache of K/V slots keyed by token prefixes. Contracts as in ``RadixCache``; in short:

    * ``match_prefix(key) -> (slots, node)``: the cached prefix of ``key``; the slots are the cache's and stay
      valid only while ``node`` is locked.
    * ``lock(node)`` / ``unlock(node)``: nested; a locked prefix is never evicted.
    * ``cache_unfinished(key, slots, own_from, node) -> (slots, node)``: a running request's computed tokens;
      the returned slots replace the request's row, the returned node is locked instead of ``node``.
    * ``cache_finished(key, slots, own_from, node)``: the request is done with ``slots`` (``slots[:own_from]``
      came from the calls above under ``node``'s lock, the rest are its own): the cache keeps or frees every one
      and drops the lock. Afterwards the caller holds none of them.
    * ``batch_index()``: a fresh index for sharing prefixes inside one prefill batch.
    * ``evict(n) -> freed``, ``evictable_size()``, ``protected_size()``: in tokens; ``allocator.available +
      evictable_size()`` is what an allocation can get.
    """

    def match_prefix(self, key: Sequence[int]) -> tuple[torch.Tensor, Any]: ...

    def lock(self, node: Any) -> None: ...

    def unlock(self, node: Any) -> None: ...

    def cache_unfinished(
        self, key: Sequence[int], slots: torch.Tensor, own_from: int, old_node: Any
    ) -> tuple[torch.Tensor, Any]: ...

    def cache_finished(self, key: Sequence[int], slots: torch.Tensor, own_from: int, node: Any) -> None: ...

    def batch_index(self) -> PrefixBatchIndex: ...

    def evict(self, num_tokens: int) -> int: ...

    def evictable_size(self) -> int: ...

    def protected_size(self) -> int: ...


class _NoBatchIndex:
    """The batch index of ``NoPrefixCache``: requests of one batch share nothing either."""

    def add(self, tokens: Sequence[int], slots: torch.Tensor) -> None:
        pass

    def extend_prefix(self, tokens: Sequence[int], prefix_slots: torch.Tensor) -> tuple[torch.Tensor, int]:
        return prefix_slots, 0


class NoPrefixCache:
    """Prefix reuse off: nothing is matched, nothing is kept, every request computes its whole prompt.

    Holds no slot of its own, ever: ``evictable_size() == protected_size() == 0``. ``cache_unfinished`` leaves
    the request's slots where they are (nobody can match them), so ``cache_finished`` frees all of them. The
    node handle is None; locking it does nothing.
    """

    def __init__(self, allocator: TokenAllocator) -> None:
        self.allocator = allocator
        self._empty = torch.empty(0, dtype=torch.int64, device=allocator.device)

    def match_prefix(self, key: Sequence[int]) -> tuple[torch.Tensor, None]:
        return self._empty.clone(), None

    def lock(self, node: None) -> None:
        pass

    def unlock(self, node: None) -> None:
        pass

    def cache_unfinished(
        self, key: Sequence[int], slots: torch.Tensor, own_from: int, old_node: None
    ) -> tuple[torch.Tensor, None]:
        return slots, None

    def cache_finished(self, key: Sequence[int], slots: torch.Tensor, own_from: int, node: None) -> None:
        self.allocator.free(slots)  # all of them: none was ever the cache's

    def batch_index(self) -> PrefixBatchIndex:
        return _NoBatchIndex()

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def reset(self) -> None:
        pass
