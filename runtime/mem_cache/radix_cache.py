"""RadixAttention prefix cache: a radix tree over token ids whose nodes own KV pool slots.

The tree's shape (nodes, segments, splits, walks) is runtime/mem_cache/radix_tree.py; which nodes eviction takes first is
runtime/mem_cache/radix_eviction.py. This module is the cache: slot ownership, locks, sizes and the LRU clock.

Ownership: the tree owns the slots of every node in it and gives them back to the allocator only on
``evict`` or ``reset``. Slots returned by ``match_prefix`` still belong to the tree: they are only safe to use
while the returned node is locked (``lock``), because an unlocked node may be evicted by the next ``evict``
and its slots handed to another request.

Typical use by the scheduler (the glue lives there)::

    slots, node = cache.match_prefix(prompt)      # reuse len(slots) tokens
    cache.lock(node)                              # now the prefix cannot be evicted
    ... run the request; it allocates slots for tokens len(slots).. itself ...
    slots, node = cache.cache_unfinished(computed, row_slots, len(slots), node)   # after each prefill chunk:
                                                  # others match it now; the request locks it instead
    n = cache.insert(tokens, all_slots)           # all_slots[:len(slots)] is the matched prefix
    allocator.free(all_slots[len(slots):n])       # duplicates of tokens another request cached meanwhile
    cache.unlock(node)

The cache is not thread-safe; the scheduler thread owns it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .allocator import TokenAllocator
from .radix_eviction import evict_lru
from .radix_tree import TreeNode, as_key, check_structure, format_tree, iter_nodes, shared_len, split_node

__all__ = ["BatchPrefixIndex", "RadixCache", "TreeNode"]


class RadixCache:
    """Prefix cache over token ids, holding KV slots from ``allocator``.

    Sizes are in tokens and maintained incrementally:
    ``total_size() == evictable_size() + protected_size()`` where protected tokens are those in nodes with
    ``lock_ref > 0``. The root holds no tokens, is never locked and never evicted.
    """

    def __init__(self, allocator: TokenAllocator) -> None:
        self.allocator = allocator
        self.device = allocator.device
        self._ids = itertools.count()  # node ids: unique per tree, tie-break for the eviction heap
        self._clock = itertools.count(1)  # logical LRU clock; a counter, not wall time, so order is exact
        self._empty = torch.empty(0, dtype=torch.int64, device=self.device)
        self._init_tree()

    # ------------------------------------------------------------------ lookup / insert

    def match_prefix(self, key: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, TreeNode]:
        """Find the longest cached prefix of ``key``.

        Returns ``(slots, node)``: ``slots`` is an int64 tensor (possibly empty) with the slot of each token of
        the matched prefix ``key[:len(slots)]``, and ``node`` the deepest node covering exactly that prefix (the
        root if nothing matched). When the match ends inside a node's segment, that node is split so the
        returned node ends exactly at the match; ``lock(node)`` then protects exactly the matched tokens.

        Contract: the slots belong to the tree; they are only safe to use while ``node`` is locked. Every node
        on the path counts as used now (LRU).
        """
        key = as_key(key)
        now = next(self._clock)
        node, pos, parts = self.root, 0, []
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = shared_len(child.key, key, pos)
            if n < len(child.key):
                child = split_node(child, n, next(self._ids))
            child.last_access = now
            parts.append(child.value)
            # After a split the next key token differs from the remaining child's first token (or the key
            # ended), so the loop stops at the next probe.
            node, pos = child, pos + n
        slots = torch.cat(parts) if parts else self._empty.clone()
        return slots, node

    def insert(self, key: Sequence[int] | torch.Tensor, slots: torch.Tensor) -> int:
        """Cache ``key`` whose token ``i`` has its KV in slot ``slots[i]`` (``len(slots) == len(key)``).

        Returns ``m``, the number of leading tokens of ``key`` that were already in the tree before this call.

        Ownership contract:
          * ``key[:m]``: the tree keeps its own slots and does not take ``slots[:m]``. Those stay with the
            caller. Where the caller obtained ``slots[:p]`` from ``match_prefix`` (and kept the node locked),
            they ARE the tree's slots and must not be freed; the rest, ``slots[p:m]``, are duplicates the
            caller computed itself and must free: ``allocator.free(slots[p:m])`` (empty when ``m <= p``).
            Since a locked prefix cannot be evicted, ``m >= p`` holds in that flow.
          * ``key[m:]``: the tree takes ownership of ``slots[m:]`` (copied into new nodes, so the caller may
            reuse the ``slots`` tensor, e.g. a request->token table row, afterwards). The caller must not
            free them.

        New nodes start unlocked (evictable). Every node on the path counts as used now (LRU); as in
        ``match_prefix``, a node the key ends inside is split first, so exactly the tokens of ``key`` are touched.
        """
        key = as_key(key)
        slots = slots.reshape(-1)
        if slots.numel() != len(key):
            raise ValueError(f"insert: {len(key)} tokens but {slots.numel()} slots")
        now = next(self._clock)
        node, pos = self.root, 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                # Copy: slots is often a view of a request->token row that is reused after the request ends.
                value = slots[pos:].to(device=self.device, dtype=torch.int64, copy=True)
                leaf = TreeNode(next(self._ids), key[pos:], value, node, now)
                node.children[key[pos]] = leaf
                self._evictable += len(leaf.key)
                return pos
            n = shared_len(child.key, key, pos)
            if n < len(child.key):
                # The key diverges or ends inside the segment. Split so that a new branch can hang off the
                # common part and so that only the tokens of ``key`` count as used (exact LRU).
                child = split_node(child, n, next(self._ids))
            child.last_access = now
            node, pos = child, pos + n
        return len(key)

    def cache_unfinished(
        self, key: Sequence[int] | torch.Tensor, slots: torch.Tensor, own_from: int, old_node: TreeNode
    ) -> tuple[torch.Tensor, TreeNode]:
        """Cache the computed tokens ``key`` of a request that keeps running, and move its lock onto them
        (SGLang's ``cache_unfinished_req``). Returns ``(tree_slots, node)``: the tree's slot of every token of
        ``key`` and the node that now ends exactly at ``key``, locked once for the caller.

        Contract: ``slots[i]`` holds the K/V of ``key[i]``; ``slots[:own_from]`` are not the caller's (the tree's,
        kept alive by the caller's lock on ``old_node``, or slots the tree received from an earlier insert), the
        rest are the caller's own. The caller's own slots of tokens the tree already had are duplicates and go
        back to the allocator here; the others now belong to the tree. Afterwards the caller owns none of
        ``slots``: it must read its K/V through ``tree_slots`` (the duplicates are free) and, when it finishes,
        treat all of ``key`` as its cached prefix. ``old_node`` is unlocked once (after ``node`` is locked, so a
        shared path never becomes evictable in between).
        """
        key = as_key(key)
        already = self.insert(key, slots)
        if already < own_from:  # the tree lost tokens the caller relied on: its lock or its peers were wrong
            raise AssertionError(f"cache_unfinished: the tree had {already} tokens, the caller borrowed {own_from}")
        self.allocator.free(slots.reshape(-1)[own_from:already])
        tree_slots, node = self.match_prefix(key)
        self.lock(node)
        self.unlock(old_node)
        return tree_slots, node

    def cache_finished(
        self, key: Sequence[int] | torch.Tensor, slots: torch.Tensor, own_from: int, node: TreeNode
    ) -> None:
        """A request is done with the K/V of ``key`` in ``slots`` (it finished, or is retracted): cache them and
        drop its lock on ``node`` (SGLang's ``cache_finished_req``).

        Contract: ``slots[:own_from]`` are the tree's (matched, or cached by ``cache_unfinished``, under
        ``node``'s lock); the rest are the caller's own and pass to the tree, except those of tokens another
        request cached meanwhile, which are duplicates and go back to the allocator. Afterwards the caller owns
        none of ``slots``.
        """
        already = self.insert(key, slots)
        if already > own_from:
            self.allocator.free(slots.reshape(-1)[own_from:already])
        self.unlock(node)

    def batch_index(self) -> "BatchPrefixIndex":
        """A fresh index for sharing prefixes inside one prefill batch (runtime/mem_cache/prefix_sharing.py)."""
        return BatchPrefixIndex(self.allocator)

    # ------------------------------------------------------------------ locking

    def lock(self, node: TreeNode) -> None:
        """Protect ``node`` and all its ancestors (excluding the root) from eviction. O(depth).

        Locks nest: each ``lock`` needs one matching ``unlock``. Locking the root is a no-op. ``node`` must be
        in the tree: a handle to an evicted node (or one from before ``reset``) raises ``AssertionError``.
        """
        self._check_handle(node, "lock", need_locked=False)
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one ``lock(node)``. Raises ``AssertionError`` if ``node`` is not locked. O(depth)."""
        self._check_handle(node, "unlock", need_locked=True)
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node = node.parent

    def _check_handle(self, node: TreeNode, op: str, need_locked: bool) -> None:
        """Validate before mutating, so a bad handle leaves the counters untouched."""
        top, unlocked = node, False
        while top.parent is not None:  # only the root has no parent, plus evicted nodes (detached leaves)
            unlocked = unlocked or top.lock_ref <= 0
            top = top.parent
        if top is not self.root:
            raise AssertionError(f"{op} of {node!r}, which is not in this tree (evicted, or from before reset)")
        if need_locked and unlocked:
            raise AssertionError(f"{op} of {node!r}, which is not locked")

    # ------------------------------------------------------------------ eviction

    def evict(self, num_tokens: int) -> int:
        """Free slots of unlocked leaves, least recently used first, until at least ``num_tokens`` are freed
        (``radix_eviction.evict_lru``: whole nodes, so more may be freed; early stop when nothing evictable is left).
        Returns the number of slots given back to the allocator."""
        if num_tokens <= 0:
            return 0
        evicted = evict_lru(self.root, num_tokens)
        freed = sum(len(node.key) for node in evicted)
        if evicted:
            self.allocator.free(torch.cat([node.value for node in evicted]))  # one free call, not one per node
        self._evictable -= freed
        return freed

    # ------------------------------------------------------------------ sizes / reset / debug

    def evictable_size(self) -> int:
        """Tokens in unlocked nodes (could be evicted now or after their descendants)."""
        return self._evictable

    def protected_size(self) -> int:
        """Tokens in locked nodes."""
        return self._protected

    def total_size(self) -> int:
        """Tokens (= slots) held by the tree."""
        return self._evictable + self._protected

    def reset(self) -> None:
        """Give every slot in the tree back to the allocator and start empty.

        Raises ``AssertionError`` if any node is locked (a running request still uses its prefix).
        """
        if self._protected:
            raise AssertionError(f"reset with {self._protected} tokens still locked")
        values = [n.value for n in iter_nodes(self.root) if n is not self.root]
        if values:
            self.allocator.free(torch.cat(values))
        self._init_tree()

    def _init_tree(self) -> None:
        self.root = TreeNode(next(self._ids), (), self._empty, None, 0)
        self._evictable = 0
        self._protected = 0

    def check_invariants(self, check_allocator: bool = False) -> None:
        """Walk the whole tree and raise ``AssertionError`` on any broken invariant (for tests / debug mode).

        Checks segment/slot lengths, child indexing and parent links, lock counts (a node is locked at least
        as often as all its children together), the size counters, and that no slot is in the tree twice or is
        slot 0. With ``check_allocator`` it also checks that no tree slot is on the allocator's free list.
        Syncs with the device.
        """
        evictable, protected, values = check_structure(self.root)
        if (evictable, protected) != (self._evictable, self._protected):
            raise AssertionError(
                f"size counters (evictable={self._evictable}, protected={self._protected}) disagree with the tree "
                f"(evictable={evictable}, protected={protected})"
            )
        if values:
            _check_slots(torch.cat(values), self.allocator, check_allocator)

    def format_tree(self, max_tokens: int = 8) -> str:
        """The tree as indented text: one line per node with id, lock_ref, last access and its tokens."""
        header = f"root (total={self.total_size()}, evictable={self._evictable}, protected={self._protected})"
        return format_tree(self.root, header, max_tokens)

    def pretty_print(self, max_tokens: int = 8) -> None:
        """Print ``format_tree()``."""
        print(self.format_tree(max_tokens))

    def __repr__(self) -> str:
        return (
            f"RadixCache(total={self.total_size()}, evictable={self._evictable}, protected={self._protected}, "
            f"device={self.device})"
        )


def _check_slots(slots: torch.Tensor, allocator: TokenAllocator, check_allocator: bool) -> None:
    """The tree's slots are distinct pool slots other than the dummy slot 0 (and, with ``check_allocator``, none
    of them is on the allocator's free list)."""
    if torch.unique(slots).numel() != slots.numel():
        raise AssertionError("a slot is held by two tree positions")
    if int(slots.min()) < 1 or int(slots.max()) > allocator.size:
        raise AssertionError("tree holds slot 0 or a slot outside the pool")
    if check_allocator and torch.isin(slots, allocator.free_slots()).any():
        raise AssertionError("a slot is both in the tree and on the allocator's free list")


class BatchPrefixIndex:
    """The tokens that the requests admitted so far into one prefill batch have K/V for once its forward ran, with
    the slot of each (the first request to reach a token position wins, as in the tree). Why borrowing them is
    correct, and who owns them meanwhile: runtime/mem_cache/prefix_sharing.py.

    A scratch radix tree: it only maps tokens to slots and owns nothing (it never evicts or resets, so it never
    frees a slot); drop it with the batch.
    """

    def __init__(self, allocator: TokenAllocator) -> None:
        self._tree = RadixCache(allocator)
        self._empty = True

    def add(self, tokens: Sequence[int], slots: torch.Tensor) -> None:
        """``tokens`` will have their K/V in ``slots`` once the batch's forward stored them."""
        if tokens:
            self._tree.insert(tokens, slots)
            self._empty = False

    def extend_prefix(self, tokens: Sequence[int], prefix_slots: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``prefix_slots`` (the tree's slots of a cached prefix of ``tokens``) lengthened by what the batch
        computes of ``tokens`` beyond it, and how many slots were added (0: nothing to borrow)."""
        if self._empty:
            return prefix_slots, 0
        peer = self._tree.match_prefix(tokens)[0]
        borrowed = peer.numel() - prefix_slots.numel()
        if borrowed <= 0:
            return prefix_slots, 0
        # Below len(prefix_slots) both are valid K/V of the same tokens; keep the tree's, which our lock protects.
        return torch.cat([prefix_slots, peer[prefix_slots.numel() :]]), borrowed
