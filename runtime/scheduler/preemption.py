"""Priority preemption: running requests make room for a more urgent waiting one (``schedule_policy="priority"``).

When the most urgent waiting request cannot be admitted because the running batch is full (``max_running_requests``)
or the pool has no room for it, running requests it outranks by more than the threshold (SGLang's
``--priority-scheduling-preemption-threshold``) are retracted, the least urgent first (the latest arrival among
equals), until it fits. A preempted request is retracted like any other (``DecodeManager.retract``): its KV goes
to the prefix cache, its output and grammar state stay, and it resumes, re-prefilled, when it is the most urgent
again, so its output is the one it would have had without the preemption.

Nothing is preempted when even retracting every candidate would not make room (the estimate counts each
candidate's whole KV as freed, an upper bound: a prefix it shares with a request that keeps running stays held).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .schedule_batch import Req
from .decode import DecodeManager
from .policy import PriorityOrder

__all__ = ["Preemption"]

Fits = Callable[[Req, Sequence[Req]], bool]


class Preemption:
    """Preempts for the head of the queue. ``fits(req, without)`` answers whether ``req`` would be admitted if the
    running requests ``without`` were retracted (``PrefillManager.head_fits``)."""

    def __init__(self, order: PriorityOrder, threshold: int, decode: DecodeManager, fits: Fits) -> None:
        self.order = order
        self.threshold = threshold
        self.decode = decode
        self.fits = fits

    def candidates(self, req: Req) -> list[Req]:
        """The running requests ``req`` may preempt, in the order they would be: least urgent, latest first."""
        found = [r for r in self.decode.running if self.order.outranks(req, r, self.threshold)]
        return sorted(found, key=lambda r: (-self.order.rank(r), -r.arrival))

    def could_make_room(self, req: Req) -> bool:
        """Whether ``make_room(req)`` would preempt anyone now."""
        victims = self.candidates(req)
        return bool(victims) and not self.fits(req, ()) and self.fits(req, victims)

    def make_room(self, req: Req) -> int:
        """Preempt as few candidates as it takes for ``req`` to fit; returns how many were preempted."""
        if not self.could_make_room(req):
            return 0
        preempted = 0
        for victim in self.candidates(req):
            self.decode.retract(victim, preempted=True)
            preempted += 1
            if self.fits(req, ()):
                break
        return preempted
