"""``Engine``: the offline and async API of the runtime.

The engine validates and tokenizes requests on the caller's thread (``request_validation.py``; bad input is
rejected before anything is queued) and compiles their grammars, then hands them to the scheduler thread through
``SchedulerClient`` (``scheduler_client.py``: typed messages in, ``StreamChunk``s out, routed to per-request sinks
by ``output_router.py``). The scheduler runs on its own thread (``scheduler/loop.py``), so that neither an asyncio
event loop nor an HTTP server ever waits on a model step, and a model step never waits on them; since it talks to
the engine only through messages, the same scheduler also runs in another process (``scheduler/process.py``).

The public surface is what a user calls: ``generate``, ``generate_stream``, ``abort``, the metrics and cache
calls, ``shutdown``, and the facts of the loaded model (``tokenizer``, ``model_config``, ``memory_plan``, ...).
Scheduler-thread state (the scheduler, its model runner) is reachable only through ``run_on_scheduler``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from .call_arguments import as_list, as_prompt_list, request_ids
from ..config import EngineConfig
from ..constrained import GrammarBackend
from ..errors import InvalidRequestError
from .messages import CheckIdle, FlushCache, GetMetrics, MetricsSnapshot, NewRequest
from ..metrics.export import collect, render
from ..metrics.server import open_metrics_endpoint
from .output_router import Collector
from ..sampling.parallel_sampling import check_n
from .outputs import GenerateOutput, StreamChunk
from .request_validation import RequestValidator
from .stream_backlog import StreamBacklog
from ..sampling.sampling_params import SamplingParams
from ..scheduler.scheduler import Scheduler
from ..scheduler.intake import RequestBuilder
from .scheduler_client import SchedulerClient
from .startup import build_runtime, make_grammar_backend


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
        self.model_config, self.device, self.dtype = rt.model_config, rt.device, rt.dtype
        self.tokenizer, self.eos_token_ids, self.memory_plan = rt.tokenizer, rt.eos_token_ids, rt.memory_plan
        self.context_length = rt.memory_plan.context_length
        self._runtime = rt  # the scheduler side: reach it through run_on_scheduler
        self.tp, self.rank_memory = rt.tp, rt.ranks  # the other tensor-parallel ranks (None at tp_size 1)
        self.requests = RequestValidator(
            self.tokenizer, self.model_config.vocab_size, self.context_length, self.memory_plan.pool_tokens,
            self.eos_token_ids, config.grammar_limits(), config.schedule_policy,
        )
        self._lock = threading.Lock()
        self._grammar: GrammarBackend | None = None
        self._closed = False
        builder = RequestBuilder(self.tokenizer, self.device, lambda: self.grammar_backend)
        self._client = SchedulerClient(rt.scheduler, builder, config.debug_invariants, config.stats_interval_s)
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
        compiling = [self._compile_grammar(req) for req in reqs]  # all compile in parallel
        reqs = [req if fut is None else fut.result() for req, fut in zip(reqs, compiling)]
        results: queue.SimpleQueue = queue.SimpleQueue()
        self._client.queue(reqs, results.put)
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
        stream_interval: int | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Stream one request's output. Closing the iterator early (``aclose``, a client disconnect) aborts the
        request and frees its KV.

        ``prompt`` is one string, ``input_ids`` one list of token ids, ``request_id`` a string, ``priority`` an
        int. Bad input raises ``InvalidRequestError`` at the first iteration, before anything is queued.
        ``on_finish(request_id)`` is called on this event loop once the engine has finished the request (done or
        aborted), whether or not anyone still reads the stream.

        With ``SamplingParams.n`` above 1 the n sequences' chunks are interleaved, each with its ``index``; every
        sequence ends with its own chunk with ``finish_reason``, and the stream ends after the last of them. A chunk
        holds all its sequence made since the last pull: >= ``stream_interval`` tokens but its first and last.
        """
        [p] = as_prompt_list(prompt, input_ids, single=True)
        [rid] = request_ids(request_id, 1)
        loop = asyncio.get_running_loop()
        req = self._make_request(p, sampling_params or SamplingParams(), rid, priority)
        chunks = StreamBacklog(loop, self.config.stream_interval if stream_interval is None else stream_interval)
        unfinished = req.params.n  # sequences whose final chunk has not come; only the routing thread counts

        def sink(chunk: StreamChunk) -> None:  # on the routing (scheduler) thread
            nonlocal unfinished
            unfinished -= chunk.finish_reason is not None
            if on_finish is not None and unfinished == 0:  # before the put: a reader may take it and end the loop
                loop.call_soon_threadsafe(on_finish, chunk.request_id)
            chunks.put(chunk)

        compiling = self._compile_grammar(req)
        if compiling is not None:  # compiled on the backend's workers; the event loop keeps serving meanwhile
            req = await asyncio.wrap_future(compiling)
        self._client.queue([req], sink)
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
        self._client.abort(request_id)

    def metrics(self) -> dict[str, float | int]:
        """A consistent snapshot of the engine's counters, taken by the scheduler between two steps."""
        return self._client.query(GetMetrics).as_dict()

    def metrics_snapshot(self, timeout: float = 60.0) -> MetricsSnapshot:
        """The scheduler's counters and latency histograms (``MetricsSnapshot``), taken between two steps."""
        return self._client.query(GetMetrics, timeout)

    def grammar_stats(self) -> dict[str, int]:
        """The grammar backend's compile-cache counters; empty until a constrained request built the backend."""
        backend = self._grammar
        return backend.cache_stats() if backend is not None else {}

    def flush_cache(self) -> int:
        """Evict every cached prefix that no request uses; returns the number of KV tokens freed."""
        return self._client.query(FlushCache)

    def check_invariants(self, timeout: float = 30.0) -> list[str]:
        """Wait until the engine is idle, then return the idle-invariant violations (empty when exact)."""
        deadline = time.monotonic() + timeout
        while True:
            problems = list(self._client.query(CheckIdle))
            if problems != ["scheduler is not idle"] or time.monotonic() > deadline:
                return problems
            time.sleep(0.01)

    def run_on_scheduler(self, fn: Callable[[Scheduler], Any], timeout: float = 60.0) -> Any:
        """Run ``fn(scheduler)`` on the scheduler thread between two steps and return its result. A test and
        debugging hook of the in-process engine, and the only way to its scheduler-thread state: ``fn`` may read
        and change the ``Scheduler`` (and its ``runner``) directly."""
        return self._client.call(fn, timeout)

    @property
    def failure(self) -> BaseException | None:
        """Why the engine stopped serving for good (a device error left the GPU unusable), or None while it serves:
        every later request is refused with that error, and the model must be relaunched."""
        return self._client.failure

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
        self._client.stop()
        self._runtime.close()
        if self._grammar is not None:
            self._grammar.close()
        self._runtime = None
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

    def _compile_grammar(self, req: NewRequest) -> Future[NewRequest] | None:
        """Start compiling ``req``'s grammar; None when unconstrained. The future gives ``req`` with the compiled
        grammar attached (the scheduler thread then only makes a matcher from it, never compiles or waits on the
        compile queue), or fails with ``InvalidRequestError`` when the grammar cannot be enforced or the compile
        queue is full."""
        spec = req.params.structured
        if spec is None:
            return None
        attached: Future[NewRequest] = Future()
        attached.set_running_or_notify_cancel()
        self.grammar_backend.compile_async(spec).add_done_callback(lambda f: _attach(req, f, attached))
        return attached


def _attach(req: NewRequest, compiled: Future, attached: Future[NewRequest]) -> None:
    """Resolve ``attached`` with ``req`` carrying ``compiled``'s grammar (or with its error)."""
    error = compiled.exception()
    if error is not None:
        attached.set_exception(error)
    else:
        attached.set_result(dataclasses.replace(req, grammar=compiled.result()))
