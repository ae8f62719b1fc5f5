"""RadixAttention prefix cache: a radix tree over token ids whose nodes own KV pool slots.

Each non-root node holds a non-empty key segment (token ids) and the slots (int64 tensor, one per token) that
hold the KV of those tokens. The path from the root to a node spells a token prefix; the concatenated slots of
that path are the KV of that prefix. Children are indexed by the first token of their segment, so siblings
never share a first token and a lookup is one dict probe per node.

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

import heapq
import itertools
from collections.abc import Iterator, Sequence

import torch

from .allocator import TokenAllocator

__all__ = ["BatchPrefixIndex", "RadixCache", "TreeNode"]

Key = tuple[int, ...]


class TreeNode:
    """One node of the radix tree.

    ``key`` is the node's token segment (empty only for the root), ``value`` its slots (int64, same length).
    ``lock_ref`` counts the locks whose path passes through this node; a node with ``lock_ref > 0`` is never
    evicted. ``last_access`` is a per-tree logical clock value (larger = more recently used) for LRU.
    Callers treat nodes as opaque handles for ``lock`` / ``unlock``.
    """

    __slots__ = ("id", "key", "value", "parent", "children", "lock_ref", "last_access")

    def __init__(self, node_id: int, key: Key, value: torch.Tensor, parent: TreeNode | None, last_access: int):
        self.id = node_id
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict[int, TreeNode] = {}
        self.lock_ref = 0
        self.last_access = last_access

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref}, children={len(self.children)})"


def _as_key(key: Sequence[int] | torch.Tensor) -> Key:
    if hasattr(key, "tolist"):  # torch / numpy: one C-level conversion instead of per-element int()
        return tuple(key.tolist())
    return tuple(key)


def _shared_len(segment: Key, key: Key, start: int) -> int:
    """Length of the common prefix of ``segment`` and ``key[start:]``."""
    n = min(len(segment), len(key) - start)
    # Fast path: on a cache hit the whole segment usually matches; one C-level tuple compare.
    if segment[:n] == key[start : start + n]:
        return n
    i = 0
    while segment[i] == key[start + i]:  # terminates: some i < n differs
        i += 1
    return i


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
        key = _as_key(key)
        now = next(self._clock)
        node, pos, parts = self.root, 0, []
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _shared_len(child.key, key, pos)
            if n < len(child.key):
                child = self._split(child, n)
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
        key = _as_key(key)
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
            n = _shared_len(child.key, key, pos)
            if n < len(child.key):
                # The key diverges or ends inside the segment. Split so that a new branch can hang off the
                # common part and so that only the tokens of ``key`` count as used (exact LRU).
                child = self._split(child, n)
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
        key = _as_key(key)
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
        """A fresh index for sharing prefixes inside one prefill batch (runtime/prefix_sharing.py)."""
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
        """Free slots of unlocked leaves, least recently used first, until at least ``num_tokens`` are freed.

        Whole nodes are evicted, so more than ``num_tokens`` may be freed. A parent left without children
        becomes a candidate in turn (if unlocked). Stops early when nothing evictable remains. Returns the
        number of slots given back to the allocator. O(tree size) to collect leaves, then O(k log k).
        """
        if num_tokens <= 0:
            return 0
        # Invariant: every heap entry is an unlocked leaf still in the tree (a node enters at most once:
        # either as an initial leaf or when its last child is evicted, and nothing else mutates the tree here).
        heap = [
            (n.last_access, n.id, n)
            for n in self._iter_nodes()
            if n.is_leaf and n.lock_ref == 0 and n is not self.root
        ]
        heapq.heapify(heap)
        freed, values = 0, []
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[0]]
            node.parent = None
            values.append(node.value)
            freed += len(node.key)
            if parent is not self.root and parent.is_leaf and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        if values:
            self.allocator.free(torch.cat(values))  # one free call instead of one per node
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
        values = [n.value for n in self._iter_nodes() if n is not self.root]
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
        root = self.root
        if root.key or root.value.numel() or root.lock_ref or root.parent is not None:
            raise AssertionError("root must hold no tokens, no lock and no parent")
        evictable = protected = 0
        values = []
        for node in self._iter_nodes():
            for first, child in node.children.items():
                if child.parent is not node or not child.key or child.key[0] != first:
                    raise AssertionError(f"bad child link {node!r} -> {child!r}")
            if node is root:
                continue
            if node.value.dtype != torch.int64 or node.value.numel() != len(node.key):
                shape = tuple(node.value.shape)
                raise AssertionError(f"{node!r}: {len(node.key)} tokens but value {node.value.dtype} {shape}")
            locks_below = sum(c.lock_ref for c in node.children.values())
            if node.lock_ref < locks_below or node.lock_ref < 0:
                raise AssertionError(f"{node!r}: lock_ref below its children's total {locks_below}")
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
            values.append(node.value)
        if (evictable, protected) != (self._evictable, self._protected):
            raise AssertionError(
                f"size counters (evictable={self._evictable}, protected={self._protected}) disagree with the tree "
                f"(evictable={evictable}, protected={protected})"
            )
        if not values:
            return
        slots = torch.cat(values)
        if torch.unique(slots).numel() != slots.numel():
            raise AssertionError("a slot is held by two tree positions")
        if int(slots.min()) < 1 or int(slots.max()) > self.allocator.size:
            raise AssertionError("tree holds slot 0 or a slot outside the pool")
        if check_allocator and torch.isin(slots, self.allocator.free_slots()).any():
            raise AssertionError("a slot is both in the tree and on the allocator's free list")

    def format_tree(self, max_tokens: int = 8) -> str:
        """The tree as indented text: one line per node with id, lock_ref, last access and its tokens."""
        lines = [f"root (total={self.total_size()}, evictable={self._evictable}, protected={self._protected})"]

        stack = [(c, 1) for c in sorted(self.root.children.values(), key=lambda c: c.key[0], reverse=True)]
        while stack:  # iterative: deep trees must not hit the recursion limit
            node, depth = stack.pop()
            toks = ", ".join(map(str, node.key[:max_tokens])) + (", ..." if len(node.key) > max_tokens else "")
            lines.append(
                f"{'  ' * depth}#{node.id} lock={node.lock_ref} t={node.last_access} len={len(node.key)} [{toks}]"
            )
            children = sorted(node.children.values(), key=lambda c: c.key[0], reverse=True)
            stack.extend((c, depth + 1) for c in children)
        return "\n".join(lines)

    def pretty_print(self, max_tokens: int = 8) -> None:
        """Print ``format_tree()``."""
        print(self.format_tree(max_tokens))

    def __repr__(self) -> str:
        return (
            f"RadixCache(total={self.total_size()}, evictable={self._evictable}, protected={self._protected}, "
            f"device={self.device})"
        )

    # ------------------------------------------------------------------ internals

    def _split(self, node: TreeNode, n: int) -> TreeNode:
        """Split ``node`` after its first ``n`` tokens (0 < n < len) and return the new upper node.

        The upper part inherits ``lock_ref`` (every lock through ``node`` passes through it) and
        ``last_access``, so the size counters do not change.
        """
        parent = node.parent
        assert parent is not None and 0 < n < len(node.key)
        # clone(): separate storage, so evicting one half later really releases the other's memory.
        upper = TreeNode(next(self._ids), node.key[:n], node.value[:n].clone(), parent, node.last_access)
        upper.lock_ref = node.lock_ref
        node.key, node.value = node.key[n:], node.value[n:].clone()
        node.parent = upper
        upper.children[node.key[0]] = node
        parent.children[upper.key[0]] = upper
        return upper

    def _iter_nodes(self) -> Iterator[TreeNode]:
        """All nodes, root first (iterative DFS: deep trees must not hit the recursion limit)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


class BatchPrefixIndex:
    """The tokens that the requests admitted so far into one prefill batch have K/V for once its forward ran, with
    the slot of each (the first request to reach a token position wins, as in the tree). Why borrowing them is
    correct, and who owns them meanwhile: runtime/prefix_sharing.py.

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
