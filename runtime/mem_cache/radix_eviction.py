"""Which cached prefixes go first when the pool needs slots: least recently used unlocked leaves.

Only leaves are evicted (an inner node's tokens are a prefix of its children's, which need them); a parent left
without children becomes a candidate in turn. Locked nodes (a running request's prefix) never go.
"""

from __future__ import annotations

import heapq

from .radix_tree import TreeNode, iter_nodes

__all__ = ["evict_lru"]


def evict_lru(root: TreeNode, num_tokens: int) -> list[TreeNode]:
    """Detach unlocked leaves under ``root``, least recently used first, until they hold ``num_tokens`` tokens or
    nothing evictable remains; return them (their slots are the caller's to free).

    Whole nodes go, so they may hold more than ``num_tokens``. O(tree size) to collect leaves, then O(k log k).
    """
    # Invariant: every heap entry is an unlocked leaf still in the tree (a node enters at most once: either as an
    # initial leaf or when its last child is evicted, and nothing else mutates the tree here). The node id breaks
    # ties of last_access, so nodes themselves are never compared.
    heap = [(n.last_access, n.id, n) for n in iter_nodes(root) if n.is_leaf and n.lock_ref == 0 and n is not root]
    heapq.heapify(heap)
    evicted: list[TreeNode] = []
    freed = 0
    while freed < num_tokens and heap:
        _, _, node = heapq.heappop(heap)
        parent = node.parent
        assert parent is not None
        del parent.children[node.key[0]]
        node.parent = None
        evicted.append(node)
        freed += len(node.key)
        if parent is not root and parent.is_leaf and parent.lock_ref == 0:
            heapq.heappush(heap, (parent.last_access, parent.id, parent))
    return evicted
