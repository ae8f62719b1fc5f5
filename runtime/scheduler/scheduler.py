"""``Scheduler``: one step at a time, a prefill batch if anything can be admitted, else a decode step.

The parts, one resource each: ``PrefillManager`` (the waiting queue, the chunked request, admission),
``DecodeManager`` (the running batch, retraction, the new-token ratio), ``KVManager`` (KV slots: allocator,
request->token rows, prefix cache). This class composes them and owns what spans steps: launching a step,
resolving it, and the overlap of the two. Everything here runs on the scheduler's thread (or process); the rest
of the engine talks to it only through messages (``loop.py`` dispatches them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..allocator import ReqToTokenPool, TokenAllocator
from ..forward_batch import ForwardMode
from ..model_runner import ModelRunner
from ..output_processor import OutputProcessor
from ..prefix_cache import PrefixCache
from ..request import Req
from ..schedule_batch import ScheduleBatch
from .decode import DecodeManager
from .kv import KVManager
from .limits import SchedulerLimits, SchedulerStats
from .policy import PriorityOrder, retraction_key
from .prefill import PrefillManager

__all__ = ["Launched", "Scheduler"]


@dataclass
class Launched:
    """A step whose forward and sampling were issued to the device but whose tokens were not processed yet."""

    batch: ScheduleBatch
    sampled: list[Req]  # requests that get a token from this step, in the order of ``tokens``
    tokens: torch.Tensor  # int64 on the device
    host: torch.Tensor  # the same tokens, copied (asynchronously on CUDA) to the host
    copied: torch.cuda.Event | None  # set once ``host`` holds them (None: already there)


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
        self.inflight: Launched | None = None  # overlap mode: the launched step not yet resolved
        # The batch of the step in progress: its prefilled requests are neither waiting nor running until the step
        # resolves, so an exception in between must still find them (abort_all).
        self.stepping: ScheduleBatch | None = None
        self._pinned = [_pinned_buffer(limits.max_running_requests, runner.device) for _ in range(2)]

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
        self.outputs.finish(req, "abort", error=error)

    # ---- one step ----

    def step(self) -> bool:
        """Run one step; False when there was nothing to do.

        A step is launched (forward and sampling issued, tokens left on the device) and later resolved (tokens
        appended, finishes decided, chunks sent). Without overlap a step is resolved right after its launch. With
        overlap, while the batch stays the same, decode step t+1 is launched from step t's device tokens *before*
        step t is resolved, so the CPU work of resolving overlaps the device's work. A request that step t
        finishes still gets a token from step t+1; resolving t+1 drops it.
        """
        start = time.perf_counter()
        if self.inflight is not None:
            launched, self.inflight = self.inflight, None
            if self._can_chain(launched):
                self.stepping = self._chained_decode(launched)
                self.inflight = self._launch(self.stepping)
                self.stats.overlapped_steps += 1
            self._resolve(launched)
            self.stepping = None
            self._account(launched.batch.mode, start)
            return True
        batch = self._schedule_prefill() or self._schedule_decode()
        if batch is None:
            return False
        self.stepping = batch
        launched = self._launch(batch)
        if self.limits.overlap and batch.mode is ForwardMode.DECODE:
            self.inflight = launched
        else:
            self._resolve(launched)
        self.stepping = None
        self._account(batch.mode, start)
        return True

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
        """Issue ``batch``'s forward and sampling; its KV is then the requests' (``kv_committed``)."""
        logits = self.runner.forward(batch)
        for req, n in zip(batch.reqs, batch.extend_lens):
            req.kv_len += n
        batch.kv_committed = True
        rows = [i for i, s in enumerate(batch.samples) if s]
        sampled = [batch.reqs[i] for i in rows]
        if len(rows) != len(batch.reqs):
            logits = logits[rows]
        tokens = self.runner.sample(logits, sampled) if sampled else torch.empty(0, dtype=torch.int64)
        host, copied = tokens, None
        if tokens.is_cuda:
            self._pinned.reverse()  # alternate: the other buffer may still be read by the step being resolved
            host = self._pinned[0][: len(sampled)]
            host.copy_(tokens, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        if batch.mode is ForwardMode.EXTEND:
            self.kv.prefilled(batch)  # later requests match its tokens from now on
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += batch.num_tokens
            self.stats.peak_prefill_tokens = max(self.stats.peak_prefill_tokens, batch.num_tokens)
        else:
            self.decode.launched(batch)
        return Launched(batch, sampled, tokens, host, copied)

    def _resolve(self, launched: Launched) -> None:
        if launched.copied is not None:
            launched.copied.synchronize()
        for req, tok in zip(launched.sampled, launched.host.tolist()):
            if req.finished:
                continue  # finished or aborted after this step was launched: its token is dropped
            self.outputs.append_token(req, tok)
            self.stats.generated_tokens += 1
        if launched.batch.mode is ForwardMode.EXTEND:
            # Prefilled requests join the running batch, also those that finished on their first token (retiring
            # them releases their KV); only requests aborted meanwhile, which hold nothing any more, stay out.
            self.running.extend(
                r for r in launched.sampled if r is not self.chunked and r.req_pool_idx is not None
            )
        self.decode.retire_finished()

    def _can_chain(self, launched: Launched) -> bool:
        """Whether the next decode step can be launched before ``launched`` is resolved: it decodes, every running
        request's next step does not depend on the token still in flight, no waiting request could be admitted
        instead, and the pool has a slot for every running request without retracting."""
        if launched.batch.mode is not ForwardMode.DECODE or not self.running or self.chunked is not None:
            return False
        if not all(_overlap_safe(r) for r in self.running):
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


def _overlap_safe(req: Req) -> bool:
    """Whether the next step of ``req`` can be sampled before its last token is known on the host: no grammar
    (its mask depends on that token), no penalties (they count it), no stop-token ban still pending."""
    p = req.params
    uses_penalty = p.frequency_penalty != 0 or p.presence_penalty != 0 or p.repetition_penalty != 1.0
    return req.grammar is None and not uses_penalty and len(req.output_ids) >= p.min_new_tokens


def _pinned_buffer(n: int, device: torch.device) -> torch.Tensor:
    """Host memory for sampled tokens; page-locked on CUDA so the device-to-host copy is asynchronous."""
    return torch.empty(n, dtype=torch.int64, pin_memory=device.type == "cuda")
