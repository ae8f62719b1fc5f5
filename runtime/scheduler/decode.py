"""The running batch: one decode step for every running request, and retraction when the pool runs out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from ..model_executor.forward_batch import ForwardMode
from .output_processor import OutputProcessor
from .schedule_batch import Req, ScheduleBatch
from .kv import KVManager
from .limits import RESERVE_CLIP, SchedulerStats

logger = logging.getLogger("xinf_sglang.runtime.scheduler")

__all__ = ["DecodeManager"]

# The share of the running requests' remaining tokens that admission keeps free for them (SGLang's
# new_token_ratio): most requests stop before max_new_tokens, so reserving all of it would under-fill the batch.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001


class DecodeManager:
    """Owns ``running`` (the requests that decode, in admission order) and the new-token ratio.

    Invariant between steps: every running request holds a table row and the K/V of all its tokens but the last
    one sampled. ``requeue`` puts a retracted request back at the head of the waiting queue.
    """

    def __init__(
        self,
        kv: KVManager,
        outputs: OutputProcessor,
        stats: SchedulerStats,
        requeue: Callable[[Req], None],
        retract_first: Callable[[Req], tuple],
    ):
        self.kv = kv
        self.outputs = outputs
        self.stats = stats
        self.requeue = requeue
        self.retract_first = retract_first  # policy.retraction_key: the smallest key is retracted first
        self.running: list[Req] = []
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    def reserved(self, without: Collection[Req] = ()) -> int:
        """Tokens admission keeps free for the running requests' future output (``without`` those)."""
        running = (r for r in self.running if r not in without)
        return int(sum(min(r.remaining_new_tokens, RESERVE_CLIP) for r in running) * self.new_token_ratio)

    def schedule(self) -> ScheduleBatch | None:
        """The next decode step of every running request, retracting requests until the pool has a slot for each
        of the others; None when nothing runs (or a lone request filled the pool and was finished)."""
        if not self.running:
            return None
        while self.kv.free_tokens() < len(self.running) and len(self.running) > 1:
            self.retract(min(self.running, key=self.retract_first))
        if self.kv.free_tokens() < len(self.running):
            # A lone request has filled the whole pool: it cannot grow, and there is nobody to retract.
            req = self.running[0]
            logger.warning("request %s filled the KV pool (%d tokens); finishing it", req.rid, req.kv_len)
            self.outputs.finish(req, "length")
            self.retire_finished()
            return None
        got = self.kv.alloc_slots(len(self.running))
        assert got is not None  # guaranteed by the loop above
        reqs = list(self.running)
        return ScheduleBatch(ForwardMode.DECODE, reqs, [1] * len(reqs), got, [True] * len(reqs))

    def launched(self, batch: ScheduleBatch) -> None:
        """Count a launched decode step; without pressure the reservation for running requests shrinks."""
        self.stats.decode_steps += 1
        self.stats.latency.decode_batch_size.observe(len(batch.reqs))
        self.stats.peak_running_requests = max(self.stats.peak_running_requests, len(batch.reqs))
        self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)

    def retract(self, victim: Req, preempted: bool = False) -> None:
        """Move a running request back to the head of the queue: its KV goes to the prefix cache (evictable), its
        output and its grammar state stay, and it is re-prefilled when admitted again. ``preempted``: to make
        room for a more urgent request, not because the running batch outgrew the pool."""
        self.running.remove(victim)
        self.kv.release(victim)
        victim.retractions += 1
        self.requeue(victim)
        self.stats.retractions += 1
        if preempted:
            # A priority decision, not a sign that the reservation for running requests was too small.
            self.stats.preemptions += 1
        else:
            self.new_token_ratio = INIT_NEW_TOKEN_RATIO  # pressure: reserve more for the running requests again
        why = "for a more urgent request" if preempted else "to free KV"
        logger.info("retracted request %s (%d output tokens kept) %s", victim.rid, len(victim.output_ids), why)

    def retire_finished(self) -> None:
        """Release the KV of the running requests that finished (or were aborted) and drop them."""
        still = []
        for req in self.running:
            if req.finished:
                self.kv.release(req)
                self.stats.finished_requests += 1
                self.stats.latency.finished(req, req.finish_reason)
            else:
                still.append(req)
        self.running[:] = still
