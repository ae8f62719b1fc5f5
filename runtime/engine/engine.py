"""``Engine``: the offline and async API of the runtime.

The engine validates and tokenizes requests on the caller's thread (``request_validation.py``; bad input is
rejected before anything is queued) and compiles their grammars, then sends them to the scheduler as messages
(``messages.py``). The scheduler runs on its own thread (``scheduler/loop.py``), so that neither an asyncio event
loop nor an HTTP server ever waits on a model step, and a model step never waits on them; it talks to the engine
only through those messages, so the same scheduler also runs in another process (``scheduler_process.py``).
Results come back as ``StreamChunk``s keyed by request id, routed to per-request sinks (``output_router.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from .call_arguments import as_list, as_prompt_list, request_ids
from ..config import EngineConfig
from ..constrained import GrammarBackend
from ..errors import InvalidRequestError
from .messages import (
    Abort, AddRequests, CheckIdle, FlushCache, GetMetrics, MetricsSnapshot, NewRequest, Outputs, Query, Stop,
)
from ..metrics.export import collect, render
from ..metrics.server import open_metrics_endpoint
from .output_router import Collector, OutputRouter
from ..sampling.parallel_sampling import SiblingGroups, check_n
from .outputs import GenerateOutput, StreamChunk
from .request_validation import RequestValidator, finished_without_output
from ..sampling.sampling_params import SamplingParams
from ..scheduler.intake import RequestBuilder
from ..scheduler.loop import SchedulerLoop
from .startup import build_runtime, make_grammar_backend


@dataclass(frozen=True)
class _Call:
    """Run ``fn`` on the scheduler thread and put its result in ``future`` (``run_on_scheduler``; in-process only:
    it holds a callable, which is why it is not one of the messages)."""

    fn: Callable[[], Any]
    future: Future

    def run(self) -> None:
        try:
            self.future.set_result(self.fn())
        except Exception as e:
            self.future.set_exception(e)


class Engine:
    """An inference engine over one model. Thread-safe; ``generate_stream`` may be used from many asyncio tasks."""

    def __init__(self, config: EngineConfig, metric_labels: Mapping[str, str] | None = None) -> None:
        """``metric_labels``: put on every series of the Prometheus endpoint (``config.metrics_port``)."""
        self.config = config
        # Bound before the model loads: a metrics_port in use fails the start before any weight is read.
        self.metrics_endpoint = open_metrics_endpoint(config)
        try:
            rt = build_runtime(config, lambda: self.grammar_backend)
        except BaseException:
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.close()
            raise
        self.checkpoint, self.model_config, self.device, self.dtype = rt.checkpoint, rt.model_config, rt.device, rt.dtype
        self.tokenizer, self.eos_token_ids, self.memory_plan = rt.tokenizer, rt.eos_token_ids, rt.memory_plan
        self.context_length = rt.memory_plan.context_length
        self.runner, self.scheduler = rt.runner, rt.scheduler
        self._runtime = rt
        self.tp, self.rank_memory = rt.tp, rt.ranks  # the other tensor-parallel ranks (None at tp_size 1)
        self.requests = RequestValidator(
            self.tokenizer, self.model_config.vocab_size, self.context_length, self.memory_plan.pool_tokens,
            self.eos_token_ids, config.grammar_limits(), config.schedule_policy,
        )
        self._lock = threading.Lock()
        self._grammar: GrammarBackend | None = None
        self._closed = False
        self._router = OutputRouter()
        self._siblings = SiblingGroups()  # requests with SamplingParams.n > 1
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        builder = RequestBuilder(self.tokenizer, self.device, lambda: self.grammar_backend)
        loop = SchedulerLoop(self.scheduler, builder, self._inbox, self._router, config.debug_invariants,
                             config.stats_interval_s)
        loop.register(_Call, _Call.run)
        self._thread = threading.Thread(target=loop.run, name="sglite-scheduler", daemon=True)
        self._thread.start()
        if self.metrics_endpoint is not None:
            labels = dict(metric_labels or {})
            self.metrics_endpoint.serve(lambda: render(collect(self), labels))

    # ---- public API ----

    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        request_id: str | Sequence[str] | None = None,
        priority: int | Sequence[int] | None = None,
    ) -> list[GenerateOutput]:
        """Run a batch of prompts to completion; one ``GenerateOutput`` per prompt, in order (a prompt whose
        ``SamplingParams.n`` is above 1 gets n consecutive ones, ``index`` 0..n-1, all with its request id).

        ``prompt`` is a string or a list of strings; ``input_ids`` a list of token ids or a list of such lists.
        ``sampling_params`` is one ``SamplingParams`` for all, or one per prompt; ``request_id`` one string per
        prompt (a single string for a single prompt); ``priority`` one int for all or one per prompt (non-zero
        needs ``schedule_policy="priority"``). Every request is validated, and every grammar compiled, before
        any is queued; an invalid one (wrong types included) raises ``InvalidRequestError``.
        """
        prompts = as_prompt_list(prompt, input_ids)
        n = len(prompts)
        params = as_list(sampling_params or SamplingParams(), n, "sampling_params")
        rids, priorities = request_ids(request_id, n), as_list(priority, n, "priority")
        reqs = [self._make_request(*args) for args in zip(prompts, params, rids, priorities)]
        for fut in [self._compile_grammar(req) for req in reqs]:  # all compile in parallel
            if fut is not None:
                fut.result()
        results: queue.SimpleQueue = queue.SimpleQueue()
        self._queue(reqs, results.put)
        collected = {(req.rid, i): Collector(req.rid) for req in reqs for i in range(req.params.n)}
        pending = len(collected)
        while pending:
            chunk = results.get()
            if collected[chunk.request_id, chunk.index].add(chunk):
                pending -= 1
        return [dataclasses.replace(c.result(), index=i) for (_, i), c in collected.items()]

    async def generate_stream(
        self,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        on_finish: Callable[[str], None] | None = None,
        priority: int | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Stream one request's output. Closing the iterator early (``aclose``, a client disconnect) aborts the
        request and frees its KV.

        ``prompt`` is one string, ``input_ids`` one list of token ids, ``request_id`` a string, ``priority`` an
        int. Bad input raises ``InvalidRequestError`` at the first iteration, before anything is queued.
        ``on_finish(request_id)`` is called on this event loop once the engine has finished the request (done or
        aborted), whether or not anyone still reads the stream.

        With ``SamplingParams.n`` above 1 the n sequences' chunks are interleaved, each with its ``index``; every
        sequence ends with its own chunk with ``finish_reason``, and the stream ends after the last of them.
        """
        [p] = as_prompt_list(prompt, input_ids, single=True)
        [rid] = request_ids(request_id, 1)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[StreamChunk] = asyncio.Queue()
        req = self._make_request(p, sampling_params or SamplingParams(), rid, priority)
        unfinished = req.params.n  # sequences whose final chunk has not come; only the routing thread counts

        def sink(chunk: StreamChunk) -> None:  # on the routing (scheduler) thread
            nonlocal unfinished
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            unfinished -= chunk.finish_reason is not None
            if on_finish is not None and unfinished == 0:
                loop.call_soon_threadsafe(on_finish, chunk.request_id)

        compiling = self._compile_grammar(req)
        if compiling is not None:  # compiled on the backend's workers; the event loop keeps serving meanwhile
            await asyncio.wrap_future(compiling)
        self._queue([req], sink)
        finished, left = False, req.params.n
        try:
            while not finished:
                chunk = await chunks.get()
                left -= chunk.finish_reason is not None
                finished = left == 0
                yield chunk
        finally:
            if not finished:
                self.abort(req.rid)

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is (queued, prefilling, decoding), all n of its sequences; a no-op for
        unknown ids."""
        for rid in self._siblings.members(request_id):
            self._inbox.put(Abort(rid))

    def metrics(self) -> dict[str, float | int]:
        """A consistent snapshot of the engine's counters, taken by the scheduler between two steps."""
        return self._query(GetMetrics).as_dict()

    def metrics_snapshot(self, timeout: float = 60.0) -> MetricsSnapshot:
        """The scheduler's counters and latency histograms (``MetricsSnapshot``), taken between two steps."""
        return self._query(GetMetrics, timeout)

    def grammar_stats(self) -> dict[str, int]:
        """The grammar backend's compile-cache counters; empty until a constrained request built the backend."""
        backend = self._grammar
        return backend.cache_stats() if backend is not None else {}

    def flush_cache(self) -> int:
        """Evict every cached prefix that no request uses; returns the number of KV tokens freed."""
        return self._query(FlushCache)

    def check_invariants(self, timeout: float = 30.0) -> list[str]:
        """Wait until the engine is idle, then return the idle-invariant violations (empty when exact)."""
        deadline = time.monotonic() + timeout
        while True:
            problems = list(self._query(CheckIdle))
            if problems != ["scheduler is not idle"] or time.monotonic() > deadline:
                return problems
            time.sleep(0.01)

    def run_on_scheduler(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run ``fn`` on the scheduler thread between steps and return its result. A test and debugging hook of
        the in-process engine: ``fn`` may read and change scheduler state directly."""
        fut: Future = Future()
        self._inbox.put(_Call(fn, fut))
        return fut.result(timeout)

    @property
    def grammar_backend(self) -> GrammarBackend:
        """The grammar backend, built on first use (building llguidance's token table takes ~0.5 s on big vocabs)."""
        with self._lock:
            if self._grammar is None:
                self._grammar = make_grammar_backend(
                    self.config, self.tokenizer, self.model_config.vocab_size, self.eos_token_ids
                )
            return self._grammar

    @property
    def max_prompt_chars(self) -> int:
        """Most characters a text prompt can have and still fit (``RequestValidator.max_prompt_chars``)."""
        return self.requests.max_prompt_chars

    def check_prompt_text(self, text: str, field: str = "prompt") -> None:
        """Refuse text that cannot be a prompt of this engine, without tokenizing it
        (``RequestValidator.check_prompt_text``)."""
        self.requests.check_prompt_text(text, field)

    def shutdown(self) -> None:
        """Abort what is left, stop the scheduler thread and the other tensor-parallel ranks, and release the
        model's memory."""
        if self._closed:
            return
        self._closed = True
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        self._inbox.put(Stop())
        self._thread.join(timeout=60)
        self._runtime.close()
        if self._grammar is not None:
            self._grammar.close()
        self.runner = self.scheduler = self._runtime = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests ----

    def _make_request(self, prompt: str | list[int], params: Any, rid: str | None, priority: Any) -> NewRequest:
        if self._closed:
            raise InvalidRequestError("the engine is shut down")
        check_n(params, self.memory_plan.max_running_requests)
        return self.requests.make(prompt, params, rid, priority)

    def _compile_grammar(self, req: NewRequest) -> Future | None:
        """Start compiling ``req``'s grammar (cached: the scheduler side finds it there); None when unconstrained.
        The future fails with ``InvalidRequestError`` when the grammar cannot be enforced."""
        spec = req.params.structured
        return None if spec is None else self.grammar_backend.compile_async(spec)

    def _queue(self, reqs: list[NewRequest], sink: Callable[[StreamChunk], None]) -> None:
        """`_submit` ``reqs``, each with n > 1 as its n siblings, whose chunks ``sink`` gets relabeled with the
        request's id and their index (runtime/sampling/parallel_sampling.py)."""
        queued, sink = self._siblings.expand(reqs, sink)
        try:
            self._submit(queued, sink)
        except BaseException:
            self._siblings.discard(reqs)
            raise

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

    def _query(self, make: Callable[[int], Query], timeout: float = 60.0) -> Any:
        """Send the query ``make(query_id)`` and wait for its reply's value."""
        qid, fut = self._router.new_query()
        self._inbox.put(make(qid))
        try:
            return fut.result(timeout)
        finally:
            self._router.forget_query(qid)
