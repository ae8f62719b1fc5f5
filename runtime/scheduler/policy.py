"""Queue order: which waiting request the admission considers first. A policy only orders; it admits nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..request import Req

__all__ = ["POLICIES", "order_waiting"]

# Beyond this many waiting requests, matching every one against the cache to sort them costs more than it saves.
LPM_MAX_WAITING = 128


def fcfs(waiting: Iterable[Req], prefix_len: Callable[[Req], int]) -> list[Req]:
    """Arrival order (the queue's order: a retracted request is put back at its head)."""
    return list(waiting)


def lpm(waiting: Iterable[Req], prefix_len: Callable[[Req], int]) -> list[Req]:
    """Longest cached prefix first, so requests sharing a cached prefix run while it is hot; ties keep queue
    order (the sort is stable). Falls back to queue order beyond ``LPM_MAX_WAITING`` requests."""
    waiting = list(waiting)
    if len(waiting) > LPM_MAX_WAITING:
        return waiting
    return sorted(waiting, key=lambda r: -prefix_len(r))


POLICIES: dict[str, Callable[[Iterable[Req], Callable[[Req], int]], list[Req]]] = {"fcfs": fcfs, "lpm": lpm}


def order_waiting(policy: str, waiting: Iterable[Req], prefix_len: Callable[[Req], int]) -> list[Req]:
    """``waiting`` in the order ``policy`` admits them; ``prefix_len(req)`` is the cached prefix length of a request."""
    return POLICIES[policy](waiting, prefix_len)
