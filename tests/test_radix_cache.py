"""Tests for the RadixAttention prefix cache (runtime/mem_cache/radix_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xinf_sglang.runtime.mem_cache.allocator import TokenAllocator
from xinf_sglang.runtime.mem_cache.prefix_sharing import BatchPrefixIndex
from xinf_sglang.runtime.mem_cache.radix_cache import RadixCache, TreeNode


def make(size: int = 64) -> tuple[TokenAllocator, RadixCache]:
    alloc = TokenAllocator(size, debug=True)
    return alloc, RadixCache(alloc)


def put(alloc: TokenAllocator, tree: RadixCache, key: list[int]) -> tuple[torch.Tensor, int]:
    """Insert ``key`` with freshly allocated slots, freeing the duplicates as the contract says."""
    slots = alloc.alloc(len(key))
    assert slots is not None
    m = tree.insert(key, slots)
    alloc.free(slots[:m])
    return slots, m


def content(tree: RadixCache) -> dict[tuple[int, ...], int]:
    """The tree as {token prefix: slot of its last token}."""
    out: dict[tuple[int, ...], int] = {}
    stack: list[tuple[TreeNode, tuple[int, ...]]] = [(tree.root, ())]
    while stack:
        node, prefix = stack.pop()
        for i, slot in enumerate(node.value.tolist()):
            out[prefix + node.key[: i + 1]] = slot
        stack.extend((c, prefix + node.key) for c in node.children.values())
    return out


def nodes(tree: RadixCache) -> list[tuple[tuple[int, ...], TreeNode]]:
    """Every non-root node with the full token prefix that ends at its last token."""
    out = []
    stack = [(c, c.key) for c in tree.root.children.values()]
    while stack:
        node, prefix = stack.pop()
        out.append((prefix, node))
        stack.extend((c, prefix + c.key) for c in node.children.values())
    return out


def path_len(node: TreeNode) -> int:
    n = 0
    while node.parent is not None:
        n += len(node.key)
        node = node.parent
    return n


# ---------------------------------------------------------------------------------------------- match / insert


def test_match_on_empty_tree():
    _, tree = make()
    slots, node = tree.match_prefix([1, 2, 3])
    assert slots.numel() == 0 and slots.dtype == torch.int64
    assert node is tree.root
    slots, node = tree.match_prefix([])
    assert slots.numel() == 0 and node is tree.root
    assert tree.total_size() == 0 and tree.evictable_size() == 0 and tree.protected_size() == 0


def test_insert_into_empty_tree_returns_zero_and_exact_match_returns_slots():
    alloc, tree = make()
    slots = alloc.alloc(4)
    assert tree.insert([1, 2, 3, 4], slots) == 0
    assert tree.total_size() == 4 == tree.evictable_size()
    got, node = tree.match_prefix([1, 2, 3, 4])
    assert got.tolist() == slots.tolist()
    assert node.is_leaf and path_len(node) == 4
    # a longer query matches the cached part only
    got, node2 = tree.match_prefix([1, 2, 3, 4, 5, 6])
    assert got.tolist() == slots.tolist() and node2 is node


def test_partial_match_splits_node_at_match_end():
    alloc, tree = make()
    slots = alloc.alloc(4)
    tree.insert([1, 2, 3, 4], slots)
    got, node = tree.match_prefix([1, 2, 9])
    assert got.tolist() == slots[:2].tolist()
    assert node.key == (1, 2) and path_len(node) == 2
    assert list(node.children.values())[0].key == (3, 4)
    assert tree.total_size() == 4
    # the whole key is still there, now spread over two nodes
    got, leaf = tree.match_prefix([1, 2, 3, 4])
    assert got.tolist() == slots.tolist() and leaf.parent is node
    tree.check_invariants(check_allocator=True)


def test_match_of_a_proper_prefix_of_a_segment_splits():
    alloc, tree = make()
    slots = alloc.alloc(5)
    tree.insert([7, 8, 9, 10, 11], slots)
    got, node = tree.match_prefix([7, 8])
    assert got.tolist() == slots[:2].tolist() and node.key == (7, 8)
    tree.check_invariants()


def test_match_first_token_mismatch_returns_root():
    alloc, tree = make()
    put(alloc, tree, [1, 2, 3])
    got, node = tree.match_prefix([2, 1])
    assert got.numel() == 0 and node is tree.root


def test_insert_returns_already_cached_length_and_tree_keeps_its_slots():
    alloc, tree = make()
    first = alloc.alloc(3)
    assert tree.insert([1, 2, 3], first) == 0
    second = alloc.alloc(5)
    assert tree.insert([1, 2, 3, 4, 5], second) == 3
    alloc.free(second[:3])  # caller matched nothing itself (own prefix 0): all 3 duplicates are its own
    got, _ = tree.match_prefix([1, 2, 3, 4, 5])
    assert got.tolist() == first.tolist() + second[3:].tolist()
    dup = alloc.alloc(2)
    assert tree.insert([1, 2], dup) == 2  # fully cached key (ends inside a segment)
    alloc.free(dup)
    assert tree.total_size() == 5
    tree.check_invariants(check_allocator=True)


def test_insert_diverging_inside_a_segment_splits():
    alloc, tree = make()
    a, _ = put(alloc, tree, [1, 2, 3, 4])
    b = alloc.alloc(3)
    assert tree.insert([1, 2, 7], b) == 2
    alloc.free(b[:2])
    assert content(tree) == {
        (1,): a[0].item(), (1, 2): a[1].item(), (1, 2, 3): a[2].item(), (1, 2, 3, 4): a[3].item(),
        (1, 2, 7): b[2].item(),
    }
    tree.check_invariants(check_allocator=True)


def test_insert_flow_with_matched_prefix_frees_only_own_duplicates():
    """The scheduler flow: match + lock, compute the rest, insert, free slots[own_prefix_len:returned]."""
    alloc, tree = make(32)
    put(alloc, tree, [1, 2])
    prefix, node = tree.match_prefix([1, 2, 3, 4, 5])
    tree.lock(node)
    own = alloc.alloc(3)
    slots = torch.cat([prefix, own])
    put(alloc, tree, [1, 2, 3, 4])  # another request caches 3, 4 meanwhile
    m = tree.insert([1, 2, 3, 4, 5], slots)
    assert m == 4
    alloc.free(slots[len(prefix) : m])
    tree.unlock(node)
    assert alloc.available + tree.total_size() == alloc.size
    tree.check_invariants(check_allocator=True)


def test_insert_empty_key_and_length_mismatch():
    alloc, tree = make()
    assert tree.insert([], torch.empty(0, dtype=torch.int64)) == 0
    with pytest.raises(ValueError, match="3 tokens but 2 slots"):
        tree.insert([1, 2, 3], alloc.alloc(2))
    assert tree.total_size() == 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_insert_copies_slots_and_accepts_tensor_keys(dtype):
    alloc, tree = make()
    row = torch.zeros(8, dtype=dtype)  # like a request->token table row (int32 there)
    row[:3] = alloc.alloc(3).to(dtype)
    expected = row[:3].tolist()
    assert tree.insert(torch.tensor([4, 5, 6]), row[:3]) == 0
    row.zero_()  # the row is reused by another request
    got, _ = tree.match_prefix(torch.tensor([4, 5, 6]))
    assert got.tolist() == expected and got.dtype == torch.int64


# ---------------------------------------------------------------------------------------------- lock / sizes


def test_lock_unlock_sizes_are_incremental_and_nest():
    alloc, tree = make()
    put(alloc, tree, [1, 2, 3, 4])
    put(alloc, tree, [1, 2, 5])
    _, n12 = tree.match_prefix([1, 2])
    _, leaf = tree.match_prefix([1, 2, 3, 4])
    assert (tree.evictable_size(), tree.protected_size()) == (5, 0)
    tree.lock(leaf)
    assert (tree.evictable_size(), tree.protected_size()) == (1, 4)
    tree.lock(n12)
    assert (tree.evictable_size(), tree.protected_size()) == (1, 4)
    tree.unlock(leaf)
    assert (tree.evictable_size(), tree.protected_size()) == (3, 2)
    tree.unlock(n12)
    assert (tree.evictable_size(), tree.protected_size()) == (5, 0)
    with pytest.raises(AssertionError, match="not locked"):
        tree.unlock(n12)
    tree.check_invariants()


def test_lock_root_is_noop():
    alloc, tree = make()
    put(alloc, tree, [1])
    _, root = tree.match_prefix([9])
    tree.lock(root)
    tree.unlock(root)
    assert tree.protected_size() == 0 and tree.root.lock_ref == 0


def test_split_of_locked_node_keeps_lock_on_both_parts():
    alloc, tree = make()
    put(alloc, tree, [1, 2, 3, 4])
    _, leaf = tree.match_prefix([1, 2, 3, 4])
    tree.lock(leaf)
    _, upper = tree.match_prefix([1, 2])  # splits the locked node
    assert upper.lock_ref == 1 and leaf.lock_ref == 1 and leaf.parent is upper
    assert tree.protected_size() == 4
    assert tree.evict(100) == 0
    tree.unlock(leaf)  # walks through the new upper node too
    assert tree.protected_size() == 0 and upper.lock_ref == 0
    tree.check_invariants()


# ---------------------------------------------------------------------------------------------- evict


def test_lock_prevents_eviction():
    alloc, tree = make(16)
    a, _ = put(alloc, tree, [1, 2, 3])
    put(alloc, tree, [4, 5])
    _, node = tree.match_prefix([1, 2, 3])
    tree.lock(node)
    assert tree.evict(100) == 2
    got, _ = tree.match_prefix([1, 2, 3])
    assert got.tolist() == a.tolist()
    assert tree.total_size() == 3 == tree.protected_size() and tree.evictable_size() == 0
    tree.unlock(node)
    assert tree.evict(100) == 3
    assert alloc.available == 16


def test_lock_of_partial_prefix_protects_only_the_prefix():
    alloc, tree = make(16)
    put(alloc, tree, [1, 2, 3, 4])
    _, node = tree.match_prefix([1, 2, 9])
    tree.lock(node)
    assert tree.evict(100) == 2
    assert content(tree).keys() == {(1,), (1, 2)}
    tree.unlock(node)


def test_evict_lru_order_older_leaves_first():
    alloc, tree = make(16)
    a, _ = put(alloc, tree, [1, 1])
    b, _ = put(alloc, tree, [2, 2])
    c, _ = put(alloc, tree, [3, 3])
    tree.match_prefix([1, 1])  # a is now the most recently used; b is the oldest
    free_before = alloc.available
    assert tree.evict(1) == 2  # whole node, so "at least" 1
    assert alloc.available == free_before + 2
    assert set(alloc.free_slots().tolist()) >= set(b.tolist())
    assert content(tree).keys() == {(1,), (1, 1), (3,), (3, 3)}
    assert tree.evict(1) == 2  # then c
    assert content(tree).keys() == {(1,), (1, 1)}


def test_match_refreshes_the_whole_path():
    alloc, tree = make(16)
    put(alloc, tree, [1, 2, 3])
    put(alloc, tree, [1, 2, 4])
    put(alloc, tree, [5])
    tree.match_prefix([1, 2, 3])  # refreshes (1, 2) and (3,), not (4,)
    assert tree.evict(1) == 1 and (1, 2, 4) not in content(tree)
    assert tree.evict(1) == 1 and (5,) not in content(tree)  # older than the refreshed parent
    assert content(tree).keys() == {(1,), (1, 2), (1, 2, 3)}


def test_insert_of_a_proper_prefix_touches_only_that_prefix():
    alloc, tree = make(16)
    put(alloc, tree, [1, 2, 3, 4])
    put(alloc, tree, [9])
    put(alloc, tree, [1, 2])  # ends inside (1, 2, 3, 4): split, only (1, 2) becomes recent
    assert tree.evict(1) == 2  # (3, 4) is the oldest leaf now
    assert content(tree).keys() == {(1,), (1, 2), (9,)}


def test_lock_of_evicted_or_stale_node_raises():
    alloc, tree = make(16)
    put(alloc, tree, [1, 2])
    _, node = tree.match_prefix([1, 2])
    tree.evict(2)
    with pytest.raises(AssertionError, match="not in this tree"):
        tree.lock(node)
    put(alloc, tree, [3, 4, 5])
    _, stale = tree.match_prefix([3, 4])
    old_root = tree.root
    tree.reset()
    put(alloc, tree, [6])
    for op in (tree.lock, tree.unlock):
        for handle in (stale, old_root):
            with pytest.raises(AssertionError, match="not in this tree"):
                op(handle)
    # a rejected handle leaves the new tree's counters untouched
    assert tree.protected_size() == 0 and tree.evictable_size() == 1
    tree.check_invariants(check_allocator=True)


def test_evict_stops_once_enough_is_freed():
    alloc, tree = make(16)
    for k in ([1], [2], [3], [4]):
        put(alloc, tree, k)
    assert tree.evict(3) == 3
    assert content(tree).keys() == {(4,)}


def test_parent_becomes_evictable_after_its_children():
    alloc, tree = make(16)
    put(alloc, tree, [1, 2, 3])
    put(alloc, tree, [1, 2, 4])  # tree: (1,2) -> {(3,), (4,)}
    assert tree.evict(1) == 1
    assert tree.evict(1) == 1
    assert content(tree).keys() == {(1,), (1, 2)}
    assert tree.evict(1) == 2  # the former parent, now a leaf
    assert tree.total_size() == 0 and alloc.available == 16


def test_parent_evicted_in_same_call_before_newer_leaf():
    alloc, tree = make(16)
    put(alloc, tree, [1, 2, 3])
    put(alloc, tree, [1, 2, 4])
    put(alloc, tree, [9, 9, 9])  # newest
    # children of (1, 2) go first, then (1, 2) itself (older than [9, 9, 9]), which reaches the target
    assert tree.evict(4) == 4
    assert content(tree).keys() == {(9,), (9, 9), (9, 9, 9)}


def test_evict_edge_cases():
    alloc, tree = make(8)
    assert tree.evict(5) == 0  # empty tree
    put(alloc, tree, [1, 2])
    assert tree.evict(0) == 0 and tree.evict(-3) == 0
    _, node = tree.match_prefix([1, 2])
    tree.lock(node)
    assert tree.evict(5) == 0  # everything locked
    tree.unlock(node)
    assert tree.evict(5) == 2  # less than asked: nothing evictable remains
    assert tree.evictable_size() == 0


# ---------------------------------------------------------------------------------------------- reset / debug


def test_reset_frees_everything_and_refuses_while_locked():
    alloc, tree = make(16)
    put(alloc, tree, [1, 2, 3])
    put(alloc, tree, [1, 4])
    _, node = tree.match_prefix([1, 4])
    tree.lock(node)
    with pytest.raises(AssertionError, match="locked"):
        tree.reset()
    tree.unlock(node)
    tree.reset()
    assert alloc.available == 16 and tree.total_size() == 0
    assert tree.match_prefix([1, 2, 3])[0].numel() == 0
    alloc.check_no_double_free()


def test_check_invariants_catches_corruption():
    alloc, tree = make(16)
    put(alloc, tree, [1, 2, 3])
    tree.check_invariants(check_allocator=True)
    tree._evictable += 1
    with pytest.raises(AssertionError, match="size counters"):
        tree.check_invariants()
    tree._evictable -= 1
    _, node = tree.match_prefix([1, 2, 3])
    alloc.free(node.value[:1])  # slot now both free and in the tree
    with pytest.raises(AssertionError, match="free list"):
        tree.check_invariants(check_allocator=True)


def test_format_tree_and_repr():
    alloc, tree = make(64)
    put(alloc, tree, list(range(20)))
    put(alloc, tree, [0, 1, 99])
    text = tree.format_tree(max_tokens=4)
    assert text.splitlines()[0].startswith("root (total=21")
    assert "[0, 1]" in text and "[2, 3, 4, 5, ...]" in text and "[99]" in text
    assert "RadixCache(total=21" in repr(tree)
    tree.pretty_print()


def test_idle_invariant_after_request_flows():
    """DESIGN.md idle invariant: free_slots + evictable_cached == total_slots once no request runs."""
    alloc, tree = make(64)
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2], [7, 8, 9]]
    for p in prompts:
        prefix, node = tree.match_prefix(p)
        tree.lock(node)
        slots = torch.cat([prefix, alloc.alloc(len(p) - len(prefix))])
        m = tree.insert(p, slots)
        alloc.free(slots[len(prefix) : m])
        tree.unlock(node)
    assert alloc.available + tree.evictable_size() == alloc.size
    assert tree.protected_size() == 0


def test_deep_tree_no_recursion_limit():
    alloc, tree = make(4000)
    key: list[int] = []
    for i in range(1500):  # 1500 single-token nodes in a chain, each inserted as its own split
        key.append(i % 7)
        put(alloc, tree, key)
    tree.check_invariants()
    tree.format_tree()
    assert tree.evict(10**6) == 1500


# ---------------------------------------------------------------------------------------------- stateful model test


@dataclass
class Req:
    """A running request in the model: it locked ``node`` (its cached prefix) and owns ``slots[cached:]``."""

    key: tuple[int, ...]
    cached: int
    node: TreeNode
    slots: torch.Tensor


keys = st.lists(st.integers(0, 2), min_size=1, max_size=8).map(tuple)


class RadixMachine(RuleBasedStateMachine):
    """Scheduler-like use of the cache against a naive model.

    The model is ``{token prefix: slot}`` for every cached prefix (prefix-closed), i.e. the slot the first
    inserter of that token had. Slots are either free, in the tree, or owned by a running request.
    """

    SIZE = 40

    def __init__(self) -> None:
        super().__init__()
        self.alloc = TokenAllocator(self.SIZE, debug=True)
        self.tree = RadixCache(self.alloc)
        self.model: dict[tuple[int, ...], int] = {}
        self.reqs: list[Req] = []
        self.locks: list[tuple[tuple[int, ...], TreeNode]] = []  # (locked prefix, node) outside requests
        # LRU model: the operation count at which each cached prefix was last matched or inserted
        self.touch: dict[tuple[int, ...], int] = {}
        self.clock = 0

    # -- model helpers

    def model_match(self, key: tuple[int, ...]) -> list[int]:
        out = []
        while len(out) < len(key) and key[: len(out) + 1] in self.model:
            out.append(self.model[key[: len(out) + 1]])
        return out

    def locked_prefixes(self) -> set[tuple[int, ...]]:
        points = [r.key[: r.cached] for r in self.reqs] + [p for p, _ in self.locks]
        return {p[:i] for p in points for i in range(1, len(p) + 1)}

    def touch_prefixes(self, key: tuple[int, ...], n: int) -> None:
        self.clock += 1
        for j in range(1, n + 1):
            self.touch[key[:j]] = self.clock

    def check_match(self, key: tuple[int, ...]) -> tuple[torch.Tensor, TreeNode]:
        slots, node = self.tree.match_prefix(key)
        assert slots.tolist() == self.model_match(key)
        self.touch_prefixes(key, slots.numel())
        assert path_len(node) == slots.numel()
        assert (node is self.tree.root) == (slots.numel() == 0)
        return slots, node

    def evict(self, n: int) -> int:
        locked = self.locked_prefixes()
        ev_before = self.tree.evictable_size()
        freed = self.tree.evict(n)
        assert freed == ev_before - self.tree.evictable_size()
        if freed < n:
            assert self.tree.evictable_size() == 0, "stopped early with evictable tokens left"
        free_now = set(self.alloc.free_slots().tolist())
        gone = {p for p, s in self.model.items() if s in free_now}
        assert len(gone) == freed
        assert not gone & locked, "a locked prefix was evicted"
        for p in self.model:
            if p not in gone:  # leaves first: a surviving prefix never lost one of its own prefixes
                assert not any(p[:i] in gone for i in range(1, len(p)))
        if gone:  # LRU: nothing evicted was used more recently than any unlocked leaf that survived
            newest_gone = max(self.touch[p] for p in gone)
            for prefix, node in nodes(self.tree):
                if node.is_leaf and node.lock_ref == 0:
                    assert self.touch[prefix] >= newest_gone, "evicted a more recently used leaf"
        for p in gone:
            del self.model[p]
            del self.touch[p]
        return freed

    def alloc_with_evict(self, n: int) -> torch.Tensor | None:
        if self.alloc.available < n:
            self.evict(n - self.alloc.available)
        return self.alloc.alloc(n)

    def cache(self, key: tuple[int, ...], slots: torch.Tensor, own_prefix: int) -> int:
        expected = len(self.model_match(key))
        m = self.tree.insert(key, slots)
        assert m == expected and m >= own_prefix
        self.alloc.free(slots[own_prefix:m])
        for j in range(m, len(key)):
            self.model[key[: j + 1]] = int(slots[j])
        self.touch_prefixes(key, len(key))
        return m

    # -- rules

    @rule(key=keys)
    def start_request(self, key):
        prefix, node = self.check_match(key)
        self.tree.lock(node)
        own = self.alloc_with_evict(len(key) - prefix.numel())
        if own is None:
            self.tree.unlock(node)
            return
        self.reqs.append(Req(key, prefix.numel(), node, torch.cat([prefix, own])))

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 50), toks=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def decode(self, i, toks):
        r = self.reqs[i % len(self.reqs)]
        own = self.alloc_with_evict(len(toks))
        if own is not None:
            r.key += tuple(toks)
            r.slots = torch.cat([r.slots, own])

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 50))
    def finish_request(self, i):
        r = self.reqs.pop(i % len(self.reqs))
        assert r.slots[: r.cached].tolist() == self.model_match(r.key)[: r.cached]  # locked prefix intact
        self.cache(r.key, r.slots, r.cached)
        self.tree.unlock(r.node)

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 50))
    def abort_request(self, i):
        r = self.reqs.pop(i % len(self.reqs))
        self.alloc.free(r.slots[r.cached :])
        self.tree.unlock(r.node)

    def cache_unfinished(self, r: Req) -> None:
        """The scheduler's insert after a prefill (chunk): ``r``'s tokens enter the tree, locked by ``r``."""
        expected = len(self.model_match(r.key))
        tree_slots, node = self.tree.cache_unfinished(r.key, r.slots, r.cached, r.node)
        for j in range(expected, len(r.key)):
            self.model[r.key[: j + 1]] = int(r.slots[j])
        self.touch_prefixes(r.key, len(r.key))
        assert tree_slots.tolist() == self.model_match(r.key)  # the request now reads the tree's slots
        assert path_len(node) == len(r.key)
        r.cached, r.node, r.slots = len(r.key), node, tree_slots

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 50))
    def insert_unfinished(self, i):
        """A running request caches what it computed so far (prompt, or prompt + output when re-prefilled)."""
        self.cache_unfinished(self.reqs[i % len(self.reqs)])

    @rule(batch=st.lists(keys, min_size=1, max_size=4), forward_fails=st.booleans())
    def prefill_batch(self, batch, forward_fails):
        """One prefill step as the scheduler runs it: each request matches the tree, then borrows what earlier
        requests of the batch compute (in-batch sharing), allocates the rest; after the forward every request is
        cached unfinished in batch order. A failed forward frees the batch's own slots and aborts its requests."""
        peers = BatchPrefixIndex(self.alloc)
        admitted: list[Req] = []
        for key in batch:
            prefix, node = self.check_match(key[:-1])  # one token always left to compute
            self.tree.lock(node)
            full, borrowed = peers.extend_prefix(key[:-1], prefix)
            assert full.numel() == prefix.numel() + borrowed
            own = self.alloc_with_evict(len(key) - full.numel())
            if own is None:
                self.tree.unlock(node)
                break
            slots = torch.cat([full, own])
            peers.add(key, slots)
            admitted.append(Req(key, full.numel(), node, slots))
        if forward_fails:
            own_parts = [r.slots[r.cached :] for r in admitted]
            if own_parts:
                self.alloc.free(torch.cat(own_parts))  # abort_all frees out_cache_loc; borrowed ones are in it
            for r in admitted:
                self.tree.unlock(r.node)
            return
        for r in admitted:
            self.cache_unfinished(r)
            self.reqs.append(r)

    @rule(key=keys)
    def insert_fresh(self, key):
        slots = self.alloc_with_evict(len(key))
        if slots is not None:
            self.cache(key, slots, 0)

    @rule(key=st.lists(st.integers(0, 2), max_size=9).map(tuple))
    def match(self, key):
        self.check_match(key)

    @rule(key=keys)
    def lock(self, key):
        prefix, node = self.check_match(key)
        self.tree.lock(node)
        self.locks.append((key[: prefix.numel()], node))

    @precondition(lambda self: self.locks)
    @rule(i=st.integers(0, 50))
    def unlock(self, i):
        _, node = self.locks.pop(i % len(self.locks))
        self.tree.unlock(node)

    @rule(n=st.integers(0, SIZE + 5))
    def evict_rule(self, n):
        self.evict(n)

    @rule()
    def reset(self):
        if self.tree.protected_size():
            with pytest.raises(AssertionError):
                self.tree.reset()
        else:
            self.tree.reset()
            self.model.clear()
            self.touch.clear()
            # with nothing protected, every lock is on the (old) root: move those handles to the new root
            assert all(not p for p, _ in self.locks)
            self.locks = [(p, self.tree.root) for p, _ in self.locks]
            for r in self.reqs:
                assert r.cached == 0
                r.node = self.tree.root

    # -- invariants, checked after every step

    @invariant()
    def no_leak_and_partition(self):
        held = [x for r in self.reqs for x in r.slots[r.cached :].tolist()]
        free = self.alloc.free_slots().tolist()
        tree_slots = list(content(self.tree).values())
        assert self.alloc.available + self.tree.total_size() + len(held) == self.alloc.size
        # every slot is exactly one of free / in the tree / held by a request
        assert sorted(free + tree_slots + held) == list(range(1, self.SIZE + 1))
        self.alloc.check_no_double_free()

    @invariant()
    def tree_matches_model(self):
        assert content(self.tree) == self.model
        assert self.tree.evictable_size() + self.tree.protected_size() == self.tree.total_size()
        assert self.tree.total_size() == len(self.model)
        assert self.tree.protected_size() == len(self.locked_prefixes())
        self.tree.check_invariants(check_allocator=True)

    @invariant()
    def lru_clock_matches_model(self):
        """Tokens of one node were last used together, and node clocks order like the model's touch times."""
        pairs = set()
        for prefix, node in nodes(self.tree):
            times = {self.touch[prefix[: len(prefix) - i]] for i in range(len(node.key))}
            assert len(times) == 1, f"node {node!r} mixes tokens used at different times {times}"
            pairs.add((node.last_access, times.pop()))
        by_clock = sorted(pairs)
        assert [t for _, t in by_clock] == sorted(t for _, t in by_clock)  # same order
        assert len({c for c, _ in pairs}) == len({t for _, t in pairs}) == len(pairs)  # one-to-one

    def teardown(self):
        for r in self.reqs:
            self.alloc.free(r.slots[r.cached :])
            self.tree.unlock(r.node)
        for _, node in self.locks:
            self.tree.unlock(node)
        self.tree.reset()
        assert self.alloc.available == self.SIZE


TestRadixMachine = RadixMachine.TestCase
TestRadixMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
