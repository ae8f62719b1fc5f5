"""``Scheduler``: one step at a time, a prefill batch if anything can be admitted, else a decode step.

The parts, one resource each: ``PrefillManager`` (the waiting queue, the chunked request, admission),
``DecodeManager`` (the running batch, retraction, the new-token ratio), ``KVManager`` (KV slots: allocator,
request->token rows, prefix cache). This class composes them and owns what spans steps. A step reads
schedule -> launch -> resolve: ``_schedule`` picks the batch, ``ModelRunner.launch`` issues its forward and
sampling and returns a ``Launched`` (tokens still on the device), ``_resolve`` turns those tokens into request
progress. With overlap a decode step stays launched (``inflight``) until the next step, which first launches the
following decode step from its device tokens (``_chained_decode``), then resolves it: the host's work on step t
overlaps the device's work on step t+1. Everything here runs on the scheduler's thread (or process); the rest of
the engine talks to it only through messages (``loop.py`` dispatches them).
"""

from __future__ import annotations

import time

import torch

from ..errors import EngineFailure
from ..mem_cache.allocator import ReqToTokenPool, TokenAllocator
from ..model_executor.forward_batch import ForwardMode
from ..model_executor.model_runner import Launched, ModelRunner
from .output_processor import OutputProcessor
from ..mem_cache.prefix_cache import PrefixCache
from ..sampling.sampler import can_sample_ahead
from .schedule_batch import Req, ScheduleBatch
from .decode import DecodeManager
from .kv import KVManager
from .limits import SchedulerLimits, SchedulerStats
from .policy import PriorityOrder, retraction_key
from .prefill import PrefillManager

__all__ = ["Scheduler"]


class Scheduler:
    """Continuous batching over the token pool. A live request is in exactly one of: waiting, chunked, running,
    or a step in flight (``stepping`` / ``inflight``) between its launch and its resolve."""

    def __init__(
        self,
        limits: SchedulerLimits,
        runner: ModelRunner,
        allocator: TokenAllocator,
        req_pool: ReqToTokenPool,
        prefix_cache: PrefixCache,
        outputs: OutputProcessor,
    ) -> None:
        self.limits = limits
        self.runner = runner
        self.outputs = outputs
        self.stats = SchedulerStats()
        self.kv = KVManager(allocator, req_pool, prefix_cache)
        retract_first = retraction_key(limits.schedule_policy, PriorityOrder(limits.low_priority_values_first))
        self.decode = DecodeManager(self.kv, outputs, self.stats, lambda req: self.prefill.requeue(req), retract_first)
        self.prefill = PrefillManager(limits, self.kv, self.decode, self.stats)
        self.inflight: Launched | None = None  # overlap: the decode step launched, resolved by the next step
        # The batch of the step in progress, from its scheduling to its resolve: its prefilled requests are neither
        # waiting nor running until then, so an exception in between must still find them (abort_all).
        self.stepping: ScheduleBatch | None = None
        # Set by the loop after an unrecoverable device error: no step runs again and every request is refused
        # with it. Read from any thread (one attribute): what a watcher polls to end the process (loop.py).
        self.failure: EngineFailure | None = None

    # ---- the parts' state, as the engine and tests read it ----

    @property
    def waiting(self):
        return self.prefill.waiting

    @property
    def chunked(self) -> Req | None:
        return self.prefill.chunked

    @property
    def running(self) -> list[Req]:
        return self.decode.running

    @property
    def new_token_ratio(self) -> float:
        return self.decode.new_token_ratio

    @property
    def allocator(self) -> TokenAllocator:
        return self.kv.allocator

    @property
    def req_pool(self) -> ReqToTokenPool:
        return self.kv.req_pool

    @property
    def prefix_cache(self) -> PrefixCache:
        return self.kv.cache

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.inflight)

    # ---- queue operations (called by the loop's message handlers, between steps) ----

    def add(self, req: Req) -> None:
        self.prefill.waiting.append(req)

    def abort(self, rid: str, error: str | None = None) -> bool:
        """Finish request ``rid`` wherever it is, free its KV and send its last chunk. False if unknown.

        Called between steps, when every live request is waiting, chunked or running."""
        for req in [*self.waiting, *self.running] + ([self.chunked] if self.chunked else []):
            if req.rid == rid:
                self._abort_req(req, error)
                return True
        return False

    def abort_all(self, error: str) -> None:
        """Abort every request (after a failed step, at shutdown), also those of the step that was interrupted;
        a launched step is dropped unprocessed."""
        stepped = [*(self.inflight.batch.reqs if self.inflight else []), *(self.stepping.reqs if self.stepping else [])]
        if self.stepping is not None:
            self.kv.discard(self.stepping)
        for req in [*self.waiting, *self.running, *stepped] + ([self.chunked] if self.chunked else []):
            if not req.finished:
                self._abort_req(req, error)
        self.inflight = self.stepping = None

    def retract(self, victim: Req) -> None:
        """``DecodeManager.retract``: a running request goes back to the head of the queue, its output kept."""
        self.decode.retract(victim)

    def _abort_req(self, req: Req, error: str | None) -> None:
        self.prefill.remove(req)
        if req in self.running:
            self.running.remove(req)
        self.kv.release(req)
        self.stats.aborted_requests += 1
        self.stats.latency.finished(req, "abort")
        self.outputs.finish(req, "abort", error=error)

    # ---- one step ----

    def step(self) -> bool:
        """Run one step: schedule -> launch -> resolve; False when there was nothing to do.

        Without overlap a step is resolved right after its launch. With overlap a decode step stays in flight:
        the next step launches the following decode step from its device tokens *before* resolving it (when the
        batch stays the same, ``_can_chain``), so the CPU work of resolving overlaps the device's work; if it
        cannot chain, that step only resolves. A request that step t finishes still gets a token from step t+1;
        resolving t+1 drops it.
        """
        start = time.perf_counter()
        previous = self.inflight
        batch = self._schedule(previous)
        if batch is None and previous is None:
            return False
        self.stepping = batch
        launched = self._launch(batch) if batch is not None else None
        # Overlap keeps a decode step in flight; a prefill resolves at once (its requests join the running batch).
        keep = launched is not None and self.limits.overlap and launched.batch.mode is ForwardMode.DECODE
        self.inflight = launched if keep else None
        if previous is not None:
            self._resolve(previous)
        if launched is not None and not keep:
            self._resolve(launched)
        self.stepping = None
        self._account((previous or launched).batch.mode, start)
        return True

    def _schedule(self, previous: Launched | None) -> ScheduleBatch | None:
        """The next batch: a prefill if anything can be admitted, else a decode step. With a step still in
        flight only its chained decode can be launched (or nothing, until it is resolved)."""
        if previous is None:
            return self._schedule_prefill() or self._schedule_decode()
        if not self._can_chain(previous):
            return None
        self.stats.overlapped_steps += 1
        return self._chained_decode(previous)

    def _schedule_prefill(self) -> ScheduleBatch | None:
        return self.prefill.schedule()

    def _schedule_decode(self) -> ScheduleBatch | None:
        return self.decode.schedule()

    def _admission_possible(self) -> bool:
        return self.prefill.admission_possible()

    def _account(self, mode: ForwardMode, start: float) -> None:
        elapsed = time.perf_counter() - start
        if mode is ForwardMode.EXTEND:
            self.stats.prefill_seconds += elapsed
        else:
            self.stats.decode_seconds += elapsed

    def _launch(self, batch: ScheduleBatch) -> Launched:
        """``ModelRunner.launch``; once the forward ran, its KV is the requests' (``kv_committed``)."""
        launched = self.runner.launch(batch)
        for req, n in zip(batch.reqs, batch.extend_lens):
            req.kv_len += n
        batch.kv_committed = True
        if batch.mode is ForwardMode.EXTEND:
            self.kv.prefilled(batch)  # later requests match its tokens from now on
            self.stats.prefill_steps += 1
            self.stats.latency.prefill_batch_size.observe(len(batch.reqs))
            self.stats.prefill_tokens += batch.num_tokens
            self.stats.peak_prefill_tokens = max(self.stats.peak_prefill_tokens, batch.num_tokens)
        else:
            self.decode.launched(batch)
        return launched

    def _resolve(self, launched: Launched) -> None:
        tokens = launched.host_tokens()
        for req, entries in launched.prompt_entries():  # before the tokens: the first chunk carries them
            if req.prompt_logprobs is not None:
                req.prompt_logprobs.extend(entries)
        for req, tok, logprob in zip(launched.sampled, tokens, launched.token_logprobs()):
            if req.finished:
                continue  # finished or aborted after this step was launched: its token is dropped
            self.outputs.append_token(req, tok, logprob)
            self.stats.generated_tokens += 1
        if launched.batch.mode is ForwardMode.EXTEND:
            # Prefilled requests join the running batch, also those that finished on their first token (retiring
            # them releases their KV); only requests aborted meanwhile, which hold nothing any more, stay out. A
            # prompt that was only scored (max_new_tokens=0) finishes here, unsampled.
            prefilled = [r for r in launched.batch.reqs if r is not self.chunked and r.req_pool_idx is not None]
            for req in prefilled:
                if not req.finished and req.max_new_tokens == 0:
                    self.outputs.finish(req, "length")
            self.running.extend(prefilled)
        self.stats.latency.tokens_resolved(self.running)  # TTFT / inter-token gaps of the tokens just appended
        self.decode.retire_finished()

    def _can_chain(self, launched: Launched) -> bool:
        """Whether the next decode step can be launched before ``launched`` is resolved: it decodes, every running
        request's next step does not depend on the token still in flight, no waiting request could be admitted
        instead, and the pool has a slot for every running request without retracting."""
        if launched.batch.mode is not ForwardMode.DECODE or not self.running or self.chunked is not None:
            return False
        if not all(can_sample_ahead(r) for r in self.running):
            return False
        if self.kv.free_tokens() < len(self.running):
            return False
        return not self._admission_possible()

    def _chained_decode(self, launched: Launched) -> ScheduleBatch:
        """The next decode step of the running requests, its inputs gathered from ``launched``'s device tokens."""
        reqs = list(self.running)
        position = {id(r): i for i, r in enumerate(launched.sampled)}
        rows = [position[id(r)] for r in reqs]  # every running request was in the launched decode step
        inputs = launched.tokens
        if rows != list(range(len(launched.sampled))):
            index = torch.tensor(rows, dtype=torch.int64, pin_memory=inputs.is_cuda)  # an async copy: no host wait
            inputs = inputs[index.to(inputs.device, non_blocking=True)]
        got = self.kv.alloc_slots(len(reqs))
        assert got is not None  # _can_chain checked the room
        return ScheduleBatch(ForwardMode.DECODE, reqs, [1] * len(reqs), got, [True] * len(reqs), input_ids=inputs)

    # ---- checks ----

    def idle_invariant_violations(self) -> list[str]:
        """Empty when idle bookkeeping is exact: ``free + evictable == total`` and no request holds anything."""
        if self.has_work:
            return ["scheduler is not idle"]
        return self.kv.idle_violations()
