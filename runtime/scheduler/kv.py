"""KV ownership: who holds which pool slots, and the moves between the allocator, the prefix cache and requests.

Table of regions (see also ``Req``): at any time a KV slot is exactly one of

* free (on the allocator's free list);
* the prefix cache's: evictable while no request locks its node, protected while one does;
* a running request's own: ``req_to_token[row, prefix_len:kv_len]`` (decoded tokens, or a prefill not yet
  inserted);
* a prefill batch's ``out_cache_loc`` while its forward is in flight (``ScheduleBatch.kv_committed`` False).

``KVManager`` is the only part of the scheduler that moves slots between these regions. Prefix sharing while
requests run (inserting each prefill chunk, borrowing inside one batch) is runtime/prefix_sharing.py; this module
is its caller.
"""

from __future__ import annotations

import torch

from ..allocator import ReqToTokenPool, TokenAllocator
from ..prefix_sharing import BatchPrefixIndex, cache_prefilled, forget_borrowed
from ..radix_cache import RadixCache, TreeNode
from ..request import Req
from ..schedule_batch import ScheduleBatch

__all__ = ["KVManager"]


class KVManager:
    """The allocator, the request->token table and the prefix cache, seen as one resource: KV slots.

    Invariant between steps: ``allocator.available + cache evictable + cache protected + requests' own slots ==
    allocator.size``; when idle, no slot is protected or a request's (``idle_violations``).
    """

    def __init__(
        self, allocator: TokenAllocator, req_pool: ReqToTokenPool, tree: RadixCache, disable_radix_cache: bool
    ) -> None:
        self.allocator = allocator
        self.req_pool = req_pool
        self.tree = tree
        self.disable_radix_cache = disable_radix_cache

    def free_tokens(self) -> int:
        """Slots an allocation can get now: free ones plus cached ones that eviction may take."""
        return self.allocator.available + (0 if self.disable_radix_cache else self.tree.evictable_size())

    def alloc_slots(self, n: int) -> torch.Tensor | None:
        """``n`` slots, evicting unlocked cached prefixes (LRU) first if the free list is short; None if even
        that is not enough (then nothing was allocated, though the cache may have shrunk)."""
        if self.allocator.available < n and not self.disable_radix_cache:
            self.tree.evict(n - self.allocator.available)
        return self.allocator.alloc(n)

    def match(self, req: Req) -> tuple[torch.Tensor, "TreeNode | None"]:
        """The cached prefix of ``req`` and its node, always leaving one token uncached to compute logits from.

        The slots are only safe to use until the next eviction unless the node is locked (``admit`` locks it).
        """
        if self.disable_radix_cache:
            return torch.empty(0, dtype=torch.int64), None
        return self.tree.match_prefix(req.fill_ids[:-1])

    def batch_index(self) -> BatchPrefixIndex | None:
        """A fresh index for sharing prefixes inside one prefill batch; None when prefix reuse is off."""
        return None if self.disable_radix_cache else BatchPrefixIndex(self.allocator)

    def admit(self, req: Req, n: int, prefix_slots: torch.Tensor, node: "TreeNode | None") -> torch.Tensor | None:
        """Give ``req`` a table row holding ``prefix_slots``, lock its cached prefix (``node``) and return ``n``
        new slots for it; None (and nothing changed) if there is no free row or the pool cannot provide them."""
        row = self.req_pool.alloc()
        if row is None:
            return None
        if node is not None:
            self.tree.lock(node)  # before allocating: eviction must not take the prefix we are about to use
        got = self.alloc_slots(n)
        if got is None:
            if node is not None:
                self.tree.unlock(node)
            self.req_pool.free(row)
            return None
        prefix_len = len(prefix_slots)
        self.req_pool.table[row, :prefix_len] = prefix_slots.to(self.req_pool.table.device, torch.int32)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = row, node, prefix_len, prefix_len
        return got

    def prefilled(self, batch: ScheduleBatch) -> None:
        """After a prefill forward was issued (``kv_len`` counts the new tokens): its requests' computed tokens
        enter the cache, locked by them, so later requests match them while these still run."""
        if not self.disable_radix_cache:
            cache_prefilled(self.tree, self.req_pool, batch.reqs)

    def discard(self, batch: ScheduleBatch) -> None:
        """A batch whose forward never ran: free its new slots, and drop the borrowed prefix slots (the peers'
        new slots, just freed) from its requests' bookkeeping. No-op once the batch's KV is committed."""
        if batch.kv_committed:
            return
        self.allocator.free(batch.out_cache_loc)
        forget_borrowed(batch)

    def release(self, req: Req) -> None:
        """Return a request's KV: its tokens go into the prefix cache (or are freed without one), its lock and its
        table row are released. Afterwards the request holds nothing. No-op for a request that holds nothing."""
        if req.req_pool_idx is None:
            return
        row, kv_len = req.req_pool_idx, req.kv_len
        slots = self.req_pool.table[row, :kv_len].to(torch.int64).clone()
        if self.disable_radix_cache:
            self.allocator.free(slots)
        else:
            tokens = req.fill_ids[:kv_len]
            already = self.tree.insert(tokens, slots)
            # The tree keeps its own slots for the part it already had; ours for that part beyond our locked
            # prefix are duplicates (another request inserted the same tokens meanwhile).
            if already > req.prefix_len:
                self.allocator.free(slots[req.prefix_len : already])
            if req.last_node is not None:
                self.tree.unlock(req.last_node)
        self.req_pool.free(row)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = None, None, 0, 0

    def idle_violations(self) -> list[str]:
        """Empty when the idle bookkeeping is exact: ``free + evictable == total``, nothing locked, no row held.
        Only meaningful when no request is live."""
        problems = []
        evictable = 0 if self.disable_radix_cache else self.tree.evictable_size()
        if self.allocator.available + evictable != self.allocator.size:
            problems.append(
                f"free {self.allocator.available} + evictable {evictable} != total {self.allocator.size}"
            )
        if not self.disable_radix_cache and self.tree.protected_size() != 0:
            problems.append(f"{self.tree.protected_size()} cached tokens still locked")
        if self.req_pool.available != self.req_pool.rows:
            problems.append(f"{self.req_pool.rows - self.req_pool.available} request rows still held")
        return problems
