"""``SchedulerClient``: the engine's side of the scheduler thread — the inbox it sends messages into, the router
its outputs come back through, and the sibling groups of ``n > 1`` requests.

The scheduler runs on its own thread (``scheduler/loop.py``) and talks to the engine only through typed messages
(``messages.py``); this class is the one place that sends them, so ``Engine`` reads as the public API alone.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ..scheduler.scheduler import Scheduler
from ..scheduler.intake import RequestBuilder
from ..scheduler.loop import SchedulerLoop
from ..sampling.parallel_sampling import SiblingGroups
from .openmp_pool import release_calling_thread_pool
from .messages import Abort, AddRequests, NewRequest, Outputs, Query, Stop
from .output_router import OutputRouter
from .outputs import StreamChunk
from .request_validation import finished_without_output

__all__ = ["SchedulerClient"]


@dataclass(frozen=True)
class _Call:
    """Run ``fn(scheduler)`` on the scheduler thread and put its result in ``future`` (``run_on_scheduler``;
    in-process only: it holds a callable, which is why it is not one of the messages)."""

    fn: Callable[[Scheduler], Any]
    scheduler: Scheduler
    future: Future

    def run(self) -> None:
        try:
            self.future.set_result(self.fn(self.scheduler))
        except Exception as e:
            self.future.set_exception(e)


class SchedulerClient:
    """Starts the scheduler thread over ``scheduler`` and carries every message between it and the engine."""

    def __init__(self, scheduler: Scheduler, builder: RequestBuilder, debug_invariants: bool,
                 stats_interval_s: float) -> None:
        self._scheduler: Scheduler | None = scheduler
        self._router = OutputRouter()
        self._siblings = SiblingGroups()  # requests with SamplingParams.n > 1
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        loop = SchedulerLoop(scheduler, builder, self._inbox, self._router, debug_invariants, stats_interval_s)
        loop.register(_Call, _Call.run)
        # The model steps on the scheduler thread from here on: the loading thread's idle OpenMP pool would make
        # every parallel region of a CPU step pay a wake-up (openmp_pool.py).
        release_calling_thread_pool()
        self._thread = threading.Thread(target=loop.run, name="sglite-scheduler", daemon=True)
        self._thread.start()

    @property
    def failure(self) -> BaseException | None:
        """The scheduler's failure for good (``Scheduler.failure``), None while it serves or once stopped. Written
        once on the scheduler thread; reading the reference from another thread needs no message."""
        scheduler = self._scheduler
        return None if scheduler is None else scheduler.failure

    def queue(self, reqs: list[NewRequest], sink: Callable[[StreamChunk], None]) -> None:
        """Submit ``reqs``, each with n > 1 as its n siblings, whose chunks ``sink`` gets relabeled with the
        request's id and their index (runtime/sampling/parallel_sampling.py)."""
        queued, sink = self._siblings.expand(reqs, sink)
        try:
            self._submit(queued, sink)
        except BaseException:
            self._siblings.discard(reqs)
            raise

    def abort(self, request_id: str) -> None:
        """Abort every sequence of ``request_id`` wherever it is; a no-op for unknown ids."""
        for rid in self._siblings.members(request_id):
            self._inbox.put(Abort(rid))

    def query(self, make: Callable[[int], Query], timeout: float = 60.0) -> Any:
        """Send the query ``make(query_id)`` and wait for its reply's value."""
        qid, fut = self._router.new_query()
        self._inbox.put(make(qid))
        try:
            return fut.result(timeout)
        finally:
            self._router.forget_query(qid)

    def call(self, fn: Callable[[Scheduler], Any], timeout: float) -> Any:
        """Run ``fn(scheduler)`` on the scheduler thread between two steps and return its result."""
        fut: Future = Future()
        self._inbox.put(_Call(fn, self._scheduler, fut))
        return fut.result(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """Abort what is left and end the scheduler thread."""
        self._inbox.put(Stop())
        self._thread.join(timeout=timeout)
        # The scheduler holds the KV pool and the model runner: a stopped engine must not keep them alive (on a GPU
        # each engine's pool takes most of the device's memory, so the next engine of the process would not fit).
        self._scheduler = None

    def _submit(self, reqs: list[NewRequest], sink: Callable[[StreamChunk], None]) -> None:
        """Route ``reqs``' chunks to ``sink`` and queue them as one message: a batch reaches the scheduler
        together, whatever the thread timing. A request with nothing to generate and no prompt to score finishes
        here."""
        self._router.register([r.rid for r in reqs], sink)
        idle = [r.max_new_tokens == 0 and not r.params.wants_prompt_logprobs for r in reqs]
        done = [finished_without_output(r) for r, nothing in zip(reqs, idle) if nothing]
        if done:
            self._router.put(Outputs(tuple(done)))
        self._inbox.put(AddRequests(tuple(r for r, nothing in zip(reqs, idle) if not nothing)))
