"""KV ownership: who holds which pool slots, and the moves between the allocator, the prefix cache and requests.

Table of regions (see also ``Req``): at any time a KV slot is exactly one of

* free (on the allocator's free list);
* the prefix cache's: evictable while no request locks its node, protected while one does;
* a running request's own: ``req_to_token[row, prefix_len:kv_len]`` (decoded tokens, or a prefill not yet
  inserted);
* a prefill batch's ``out_cache_loc`` while its forward is in flight (``ScheduleBatch.kv_committed`` False).

``KVManager`` is the only part of the scheduler that moves slots between these regions. Prefix sharing while
requests run (inserting each prefill chunk, borrowing inside one batch) is runtime/mem_cache/prefix_sharing.py; this module
is its caller. Which prefix cache (radix, or none) is the engine's choice; nothing here asks.
"""

from __future__ import annotations

from typing import Any

import torch

from ..mem_cache.allocator import ReqToTokenPool, TokenAllocator
from ..mem_cache.prefix_cache import PrefixBatchIndex, PrefixCache
from ..mem_cache.prefix_sharing import cache_prefilled, forget_borrowed
from .schedule_batch import Req, ScheduleBatch

__all__ = ["KVManager"]


class KVManager:
    """The allocator, the request->token table and the prefix cache, seen as one resource: KV slots.

    Invariant between steps: ``allocator.available + cache evictable + cache protected + requests' own slots ==
    allocator.size``; when idle, no slot is protected or a request's (``idle_violations``).
    """

    def __init__(self, allocator: TokenAllocator, req_pool: ReqToTokenPool, cache: PrefixCache) -> None:
        self.allocator = allocator
        self.req_pool = req_pool
        self.cache = cache

    def free_tokens(self) -> int:
        """Slots an allocation can get now: free ones plus cached ones that eviction may take."""
        return self.allocator.available + self.cache.evictable_size()

    def alloc_slots(self, n: int) -> torch.Tensor | None:
        """``n`` slots, evicting unlocked cached prefixes (LRU) first if the free list is short; None if even
        that is not enough (then nothing was allocated, though the cache may have shrunk)."""
        if self.allocator.available < n:
            self.cache.evict(n - self.allocator.available)
        return self.allocator.alloc(n)

    def match(self, req: Req) -> tuple[torch.Tensor, Any]:
        """The cached prefix of ``req`` and its node, always leaving one token uncached to compute logits from
        (and, while its prompt logprobs are pending, every token from their start on: ``Req.cache_match_len``).

        The slots are only safe to use until the next eviction unless the node is locked (``admit`` locks it).
        """
        return self.cache.match_prefix(req.fill_ids[: req.cache_match_len])

    def batch_index(self) -> PrefixBatchIndex:
        """A fresh index for sharing prefixes inside one prefill batch."""
        return self.cache.batch_index()

    def admit(self, req: Req, n: int, prefix_slots: torch.Tensor, node: Any) -> torch.Tensor | None:
        """Give ``req`` a table row holding ``prefix_slots``, lock its cached prefix (``node``) and return ``n``
        new slots for it; None (and nothing changed) if there is no free row or the pool cannot provide them."""
        row = self.req_pool.alloc()
        if row is None:
            return None
        self.cache.lock(node)  # before allocating: eviction must not take the prefix we are about to use
        got = self.alloc_slots(n)
        if got is None:
            self.cache.unlock(node)
            self.req_pool.free(row)
            return None
        prefix_len = len(prefix_slots)
        self.req_pool.table[row, :prefix_len] = prefix_slots.to(self.req_pool.table.device, torch.int32)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = row, node, prefix_len, prefix_len
        return got

    def prefilled(self, batch: ScheduleBatch) -> None:
        """After a prefill forward was issued (``kv_len`` counts the new tokens): its requests' computed tokens
        enter the cache, locked by them, so later requests match them while these still run."""
        cache_prefilled(self.cache, self.req_pool, batch.reqs)

    def discard(self, batch: ScheduleBatch) -> None:
        """A batch whose forward never ran: free its new slots, and drop the borrowed prefix slots (the peers'
        new slots, just freed) from its requests' bookkeeping. No-op once the batch's KV is committed."""
        if batch.kv_committed:
            return
        self.allocator.free(batch.out_cache_loc)
        forget_borrowed(batch)

    def release(self, req: Req) -> None:
        """Return a request's KV to the prefix cache (which keeps or frees each slot) with its lock, and free its
        table row. Afterwards the request holds nothing. No-op for a request that holds nothing."""
        if req.req_pool_idx is None:
            return
        row, kv_len = req.req_pool_idx, req.kv_len
        slots = self.req_pool.table[row, :kv_len].to(torch.int64).clone()  # the row is reused once freed
        self.cache.cache_finished(req.fill_ids[:kv_len], slots, req.prefix_len, req.last_node)
        self.req_pool.free(row)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = None, None, 0, 0

    def idle_violations(self) -> list[str]:
        """Empty when the idle bookkeeping is exact: ``free + evictable == total``, nothing locked, no row held.
        Only meaningful when no request is live."""
        problems = []
        evictable = self.cache.evictable_size()
        if self.allocator.available + evictable != self.allocator.size:
            problems.append(
                f"free {self.allocator.available} + evictable {evictable} != total {self.allocator.size}"
            )
        if self.cache.protected_size() != 0:
            problems.append(f"{self.cache.protected_size()} cached tokens still locked")
        if self.req_pool.available != self.req_pool.rows:
            problems.append(f"{self.req_pool.rows - self.req_pool.available} request rows still held")
        return problems
