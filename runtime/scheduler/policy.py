"""Queue order: which waiting request the admission considers first. A policy only orders; it admits nothing.

``priority`` (SGLang's ``--schedule-policy priority``): larger ``Req.priority`` first, or smaller first with
``low_values_first`` (SGLang's ``--schedule-low-priority-values-first``); ties by arrival. Whether a waiting
request may preempt running ones is ``preemption.py``'s business; how two priorities compare is ``PriorityOrder``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .schedule_batch import Req

__all__ = ["POLICIES", "PriorityOrder", "order_waiting", "retraction_key"]

# Beyond this many waiting requests, matching every one against the cache to sort them costs more than it saves.
LPM_MAX_WAITING = 128


@dataclass(frozen=True)
class PriorityOrder:
    """How request priorities compare: larger values are more urgent, or smaller ones with ``low_values_first``."""

    low_values_first: bool = False

    def rank(self, req: Req) -> int:
        """Smaller rank = more urgent."""
        return req.priority if self.low_values_first else -req.priority

    def outranks(self, req: Req, other: Req, threshold: int) -> bool:
        """Whether ``req`` is more urgent than ``other`` by more than ``threshold``."""
        return self.rank(other) - self.rank(req) > threshold


def fcfs(waiting: Iterable[Req], prefix_len: Callable[[Req], int], order: PriorityOrder) -> list[Req]:
    """Arrival order (the queue's order: a retracted request is put back at its head)."""
    return list(waiting)


def lpm(waiting: Iterable[Req], prefix_len: Callable[[Req], int], order: PriorityOrder) -> list[Req]:
    """Longest cached prefix first, so requests sharing a cached prefix run while it is hot; ties keep queue
    order (the sort is stable). Falls back to queue order beyond ``LPM_MAX_WAITING`` requests."""
    waiting = list(waiting)
    if len(waiting) > LPM_MAX_WAITING:
        return waiting
    return sorted(waiting, key=lambda r: -prefix_len(r))


def priority(waiting: Iterable[Req], prefix_len: Callable[[Req], int], order: PriorityOrder) -> list[Req]:
    """Most urgent first (``order``), ties by arrival: a preempted request keeps its place among its peers."""
    return sorted(waiting, key=lambda r: (order.rank(r), r.arrival))


Policy = Callable[[Iterable[Req], Callable[[Req], int], PriorityOrder], list[Req]]
POLICIES: dict[str, Policy] = {"fcfs": fcfs, "lpm": lpm, "priority": priority}


def order_waiting(
    policy: str, waiting: Iterable[Req], prefix_len: Callable[[Req], int], order: PriorityOrder = PriorityOrder()
) -> list[Req]:
    """``waiting`` in the order ``policy`` admits them; ``prefix_len(req)`` is the cached prefix length of a request,
    ``order`` how priorities compare (read by ``priority`` only)."""
    return POLICIES[policy](waiting, prefix_len, order)


def retraction_key(policy: str, order: PriorityOrder) -> Callable[[Req], tuple]:
    """Which running request a KV shortage retracts first (the smallest key): the fewest decoded tokens, then the
    latest arrival; under ``priority`` the least urgent before anyone else."""
    if policy == "priority":
        return lambda r: (-order.rank(r), len(r.output_ids), -r.arrival)
    return lambda r: (len(r.output_ids), -r.arrival)
