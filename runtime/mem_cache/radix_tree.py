"""The radix tree under the prefix cache: nodes, and the structural operations on them.

Each non-root node holds a non-empty key segment (token ids) and the slots (int64 tensor, one per token) that hold
the KV of those tokens. The path from the root to a node spells a token prefix; the concatenated slots of that
path are the KV of that prefix. Children are indexed by the first token of their segment, so siblings never share
a first token and a lookup is one dict probe per node.

This module knows the shape of the tree only: splitting a node, walking it, printing it and checking its links.
Who owns the slots, locking, sizes and LRU time are the cache's (runtime/mem_cache/radix_cache.py); which nodes go first
when memory is needed is eviction's (runtime/mem_cache/radix_eviction.py). Every walk is iterative: a deep tree must not hit
the recursion limit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["Key", "TreeNode", "as_key", "check_structure", "format_tree", "iter_nodes", "shared_len", "split_node"]

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


def as_key(key: Sequence[int] | torch.Tensor) -> Key:
    """Token ids as a tuple (the tree's key type)."""
    if hasattr(key, "tolist"):  # torch / numpy: one C-level conversion instead of per-element int()
        return tuple(key.tolist())
    return tuple(key)


def shared_len(segment: Key, key: Key, start: int) -> int:
    """Length of the common prefix of ``segment`` and ``key[start:]``."""
    n = min(len(segment), len(key) - start)
    # Fast path: on a cache hit the whole segment usually matches; one C-level tuple compare.
    if segment[:n] == key[start : start + n]:
        return n
    i = 0
    while segment[i] == key[start + i]:  # terminates: some i < n differs
        i += 1
    return i


def split_node(node: TreeNode, n: int, upper_id: int) -> TreeNode:
    """Split ``node`` after its first ``n`` tokens (0 < n < len) and return the new upper node (id ``upper_id``).

    The upper part inherits ``lock_ref`` (every lock through ``node`` passes through it) and ``last_access``, so
    the cache's size counters do not change.
    """
    parent = node.parent
    assert parent is not None and 0 < n < len(node.key)
    # clone(): separate storage, so evicting one half later really releases the other's memory.
    upper = TreeNode(upper_id, node.key[:n], node.value[:n].clone(), parent, node.last_access)
    upper.lock_ref = node.lock_ref
    node.key, node.value = node.key[n:], node.value[n:].clone()
    node.parent = upper
    upper.children[node.key[0]] = node
    parent.children[upper.key[0]] = upper
    return upper


def iter_nodes(root: TreeNode) -> Iterator[TreeNode]:
    """All nodes under ``root``, root first (depth first)."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())


def format_tree(root: TreeNode, header: str, max_tokens: int = 8) -> str:
    """The tree as indented text: ``header``, then one line per node with id, lock_ref, last access and tokens."""
    lines = [header]
    stack = [(c, 1) for c in sorted(root.children.values(), key=lambda c: c.key[0], reverse=True)]
    while stack:
        node, depth = stack.pop()
        toks = ", ".join(map(str, node.key[:max_tokens])) + (", ..." if len(node.key) > max_tokens else "")
        lines.append(f"{'  ' * depth}#{node.id} lock={node.lock_ref} t={node.last_access} len={len(node.key)} [{toks}]")
        children = sorted(node.children.values(), key=lambda c: c.key[0], reverse=True)
        stack.extend((c, depth + 1) for c in children)
    return "\n".join(lines)


def check_structure(root: TreeNode) -> tuple[int, int, list[torch.Tensor]]:
    """Check the links and lock counts of the tree under ``root``; return ``(evictable, protected, values)``: the
    tokens in unlocked and in locked nodes, and every node's slots, for the cache to compare with its own counts.

    Raises ``AssertionError`` on a root that holds anything, a bad child link, a segment whose slots differ in
    length or dtype, or a node locked less often than its children together.
    """
    if root.key or root.value.numel() or root.lock_ref or root.parent is not None:
        raise AssertionError("root must hold no tokens, no lock and no parent")
    evictable = protected = 0
    values = []
    for node in iter_nodes(root):
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
    return evictable, protected, values
