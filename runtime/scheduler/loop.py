"""``SchedulerLoop``: drives a ``Scheduler`` from an inbox of messages and sends its outputs to an outbox.

The loop is the scheduler side's one dispatcher: a table from message type (``runtime/engine/messages.py``) to handler.
Between two steps it handles every queued message (waiting for one when there is nothing to run), then runs one
step, then sends the chunks produced as one ``Outputs``. ``inbox`` is anything with ``get(timeout=)`` and
``get_nowait()`` that raise ``queue.Empty`` (a ``queue.SimpleQueue``, a ``multiprocessing`` queue); ``outbox``
anything with ``put`` (the engine's output router on its thread, a ``multiprocessing`` queue in a process).

A step that raises fails the requests in flight and the loop goes on. Except after an unrecoverable device error
(`is_unrecoverable_device_error`: CUDA's sticky errors leave the context broken, so every later step would fail
too): then the scheduler is marked failed (``Scheduler.failure``, an `EngineFailure`), no step runs again, and
every request is refused with that error until the process ends.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import Any

from ..errors import EngineFailure, InvalidRequestError
from ..engine.messages import (
    Abort,
    AddRequests,
    CheckIdle,
    FlushCache,
    GetMetrics,
    MetricsSnapshot,
    NewRequest,
    Outputs,
    Query,
    Reply,
    Stop,
)
from ..engine.outputs import StreamChunk
from ..mem_cache.memory_plan import out_of_memory_advice
from .intake import RequestBuilder
from .scheduler import Scheduler
from ..metrics.stats_log import StatsLog

logger = logging.getLogger("xinf_sglang.runtime.scheduler")

__all__ = ["SchedulerLoop", "is_unrecoverable_device_error", "metrics_snapshot"]

IDLE_POLL_S = 0.5  # how long an idle loop waits for a message before checking again


class SchedulerLoop:
    """Runs ``scheduler`` until a ``Stop`` arrives; every request left then is aborted (and its chunk sent)."""

    def __init__(
        self,
        scheduler: Scheduler,
        builder: RequestBuilder,
        inbox: Any,
        outbox: Any,
        debug_invariants: bool = False,
        stats_interval_s: float = 0.0,
    ) -> None:
        """``stats_interval_s``: write the stats line (``stats_log.py``) every that many seconds of work; 0: never."""
        self.scheduler = scheduler
        self.builder = builder
        self.inbox = inbox
        self.outbox = outbox
        self.debug_invariants = debug_invariants
        self.stats_log = StatsLog(stats_interval_s) if stats_interval_s > 0 else None
        self._handlers: dict[type, Callable[[Any], Any]] = {
            AddRequests: self._add,
            Abort: lambda msg: self.scheduler.abort(msg.rid),
            GetMetrics: lambda msg: metrics_snapshot(self.scheduler),
            FlushCache: lambda msg: self.scheduler.prefix_cache.evict(self.scheduler.prefix_cache.evictable_size()),
            CheckIdle: lambda msg: tuple(self.scheduler.idle_invariant_violations()),
        }

    def register(self, message_type: type, handler: Callable[[Any], None]) -> None:
        """Handle ``message_type`` too. For in-process extensions only (the engine's ``run_on_scheduler`` test
        hook, whose message holds a callable): what another process sends is always a ``messages`` type."""
        self._handlers[message_type] = handler

    def run(self) -> None:
        sched = self.scheduler
        while True:
            try:
                if not self._drain_inbox(block=not sched.has_work or sched.failure is not None):
                    break
                if sched.failure is not None:
                    continue  # a failed engine only answers messages (new requests are refused in _add)
                if self.stats_log is not None and sched.has_work:
                    self.stats_log.tick(sched)  # before the step: a window's counters start before its first step
                worked = sched.step()
            except Exception as e:  # fail the requests in flight, never the loop
                worked = False
                self._step_failed(e)
            self._send_outputs()
            if not worked and self.debug_invariants and not sched.has_work:
                problems = sched.idle_invariant_violations()
                if problems:
                    logger.error("idle invariant violated: %s", "; ".join(problems))
        sched.abort_all("the engine is shutting down")
        self._send_outputs()

    def _step_failed(self, error: Exception) -> None:
        """Abort the requests in flight with ``error``; after an unrecoverable device error, fail the engine."""
        sched = self.scheduler
        if not is_unrecoverable_device_error(error):
            advice = out_of_memory_advice(error, sched.limits.memory_plan)
            logger.exception("scheduler step failed; aborting the requests in flight%s", advice)
            sched.abort_all(f"engine error: {type(error).__name__}: {error}{advice}")
            return
        sched.failure = EngineFailure(
            f"sglite engine failed: unrecoverable device error ({type(error).__name__}: {error}); the device cannot "
            "run another step, so every request is refused and the model must be relaunched"
        )
        logger.error("%s", sched.failure, exc_info=error)
        sched.abort_all(str(sched.failure))

    def _drain_inbox(self, block: bool) -> bool:
        """Handle every queued message (waiting for one if ``block``); False once asked to stop."""
        try:
            msg = self.inbox.get(timeout=IDLE_POLL_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(msg, Stop):
                return False
            self._handle(msg)
            self._send_outputs()  # an abort's last chunk goes out before the next message is handled
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _handle(self, msg: Any) -> None:
        handler = self._handlers.get(type(msg))
        if handler is None:
            logger.error("scheduler loop: no handler for %s; dropped", type(msg).__name__)
            return
        if not isinstance(msg, Query):
            handler(msg)
            return
        try:
            reply = Reply(msg.query_id, handler(msg))
        except Exception as e:  # the asker gets the error; the loop keeps serving
            reply = Reply(msg.query_id, error=f"{type(e).__name__}: {e}")
        self.outbox.put(reply)

    def _add(self, msg: AddRequests) -> None:
        for new in msg.requests:
            if self.scheduler.failure is not None:
                self.outbox.put(Outputs((_refused(new, str(self.scheduler.failure)),)))
                continue
            try:
                req = self.builder.build(new)
            except InvalidRequestError as e:
                self.outbox.put(Outputs((_refused(new, str(e)),)))
                continue
            self.scheduler.add(req)

    def _send_outputs(self) -> None:
        chunks = self.scheduler.outputs.take()
        if chunks:
            self.outbox.put(Outputs(tuple(chunks)))


def is_unrecoverable_device_error(error: BaseException) -> bool:
    """Whether ``error`` leaves the device unable to run another step: CUDA's sticky errors (an illegal memory
    access, a device-side assert, a launch failure, an ECC error), which torch raises as ``AcceleratorError``
    (older versions: a ``RuntimeError`` starting "CUDA error"). Running out of memory is not one: the next step
    may fit. Judged by name, so this module need not import torch."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if "OutOfMemoryError" in names or "out of memory" in str(error):
        return False
    return "AcceleratorError" in names or (isinstance(error, RuntimeError) and str(error).startswith("CUDA error"))


def _refused(new: NewRequest, error: str) -> StreamChunk:
    """The only chunk of a request the scheduler side did not queue (its grammar failed to compile here, or the
    engine has failed)."""
    return StreamChunk(new.rid, "", finish_reason="abort", prompt_tokens=len(new.input_ids), error=error)


def metrics_snapshot(sched: Scheduler) -> MetricsSnapshot:
    """The scheduler's counters now (call between steps)."""
    stats, kv, masks = sched.stats, sched.kv, sched.runner.sampler.masks
    return MetricsSnapshot(
        kv_total_tokens=kv.allocator.size,
        kv_free_tokens=kv.allocator.available,
        kv_evictable_tokens=kv.cache.evictable_size(),
        kv_used_tokens=kv.allocator.size - kv.allocator.available,
        running_requests=len(sched.running) + (1 if sched.chunked else 0),
        waiting_requests=len(sched.waiting),
        cache_hit_rate=stats.cache_hit_rate,
        prompt_tokens_total=stats.prompt_tokens,
        cached_prompt_tokens_total=stats.cached_prompt_tokens,
        generated_tokens_total=stats.generated_tokens,
        finished_requests=stats.finished_requests,
        aborted_requests=stats.aborted_requests,
        retractions=stats.retractions,
        preemptions=stats.preemptions,
        prefill_steps=stats.prefill_steps,
        decode_steps=stats.decode_steps,
        peak_running_requests=stats.peak_running_requests,
        peak_prefill_tokens=stats.peak_prefill_tokens,
        overlapped_steps=stats.overlapped_steps,
        prefill_tokens_total=stats.prefill_tokens,
        prefill_seconds_total=stats.prefill_seconds,
        decode_seconds_total=stats.decode_seconds,
        grammar_mask_steps=masks.steps,
        grammar_mask_ms_per_step=1e3 * masks.seconds / max(1, masks.steps),
        new_token_ratio=sched.new_token_ratio,
        latency=stats.latency.snapshot(),
    )
