"""The runtime stream of each request: bookkeeping and abort (:class:`RequestTracker`), the start of a request
with its stream formatted as OpenAI completion payloads (:class:`CompletionRunner`), and the stream as handed to
Xinference, closed once its consumer is cancelled (:func:`closed_when_abandoned`)."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any, AsyncGenerator, Callable, Dict, List, Optional, Set, TypeVar, Union

from ...openai_api.chunks import collect_completion, completion_chunks
from ...openai_api.logprobs import LogprobFormatter
from ...openai_api.request_mapping import RequestOptions
from ...registration.engine_name import ENGINE_NAME
from ...runtime.errors import InvalidRequestError
from .errors import request_errors, stream_error

if TYPE_CHECKING:
    from ...runtime import Engine, SamplingParams, StreamChunk

logger = logging.getLogger(__name__)

Completion = Union[Dict[str, Any], AsyncGenerator[Dict[str, Any], None]]
# The error of a request once the engine failed for good (a FailureWatch's `error`), None while it serves.
FailureCheck = Callable[[], Optional[BaseException]]
T = TypeVar("T")
_closing: Set[asyncio.Future[None]] = set()  # closes in flight: the event loop keeps only weak references to tasks


class RequestTracker:
    """The requests of one model in flight: what ``abort_request`` may abort and what the metrics count.

    Created with the engine object in the worker, so it holds plain data only (it is pickled into the model
    process with it).
    """

    def __init__(self) -> None:
        self._active: Set[str] = set()
        self.client_aborts = 0  # streams closed before they finished (client disconnects, aborts)

    def __len__(self) -> int:
        return len(self._active)

    def abort(self, engine: "Engine", request_id: str) -> bool:
        """Abort ``request_id`` when it is one of these; whether it was."""
        if request_id not in self._active:
            return False
        engine.abort(request_id)
        return True

    async def stream(
        self, engine: "Engine", input_ids: List[int], params: "SamplingParams", request_id: str,
        priority: Optional[int], failure: FailureCheck, stream_interval: Optional[int] = None,
    ) -> AsyncGenerator["StreamChunk", None]:
        """The runtime's stream for one request, tracked; closing it early aborts the request and frees its KV.

        Each chunk holds what the request produced since the last pull (the runtime merges a backlog) and follows
        the request's ``stream_interval`` (the launch option's when the request sets none)."""
        # on_finish: the request leaves the bookkeeping when the runtime finishes it, even if this generator is
        # never resumed or closed (Xinference leaves a stream abandoned by a client disconnect to the garbage
        # collector, which may not run for a long time in an idle model process).
        engine_stream = engine.generate_stream(
            input_ids=input_ids, sampling_params=params, request_id=request_id, priority=priority,
            on_finish=self._active.discard, stream_interval=stream_interval,
        )
        received = finished = False
        self._active.add(request_id)
        try:
            with request_errors(InvalidRequestError):
                async for chunk in engine_stream:
                    if chunk.error:
                        raise failure() or stream_error(request_id, chunk.error)
                    received = True
                    finished = chunk.finish_reason is not None
                    yield chunk
        finally:
            self._active.discard(request_id)
            # aclose() the runtime's iterator now rather than at garbage collection: its finally aborts the
            # request in the scheduler, which frees the request's KV slots.
            await engine_stream.aclose()
            if received and not finished:
                self.client_aborts += 1
                logger.info("%s: request %s closed before it finished; aborted, KV freed", ENGINE_NAME, request_id)


class CompletionRunner:
    """Starts requests on one loaded model's runtime and turns each stream into ``CompletionChunk`` dicts (or one
    ``Completion`` dict when not streamed)."""

    def __init__(self, engine: "Engine", model_uid: str, requests: RequestTracker, failure: FailureCheck) -> None:
        self._engine = engine
        self._model_uid = model_uid
        self._requests = requests
        self._failure = failure
        self._tokenizer = engine.tokenizer
        self._token_texts: Dict[int, str] = {}  # token id -> its own decode (logprobs), filled as met

    async def run(
        self, input_ids: List[int], params: "SamplingParams", opts: RequestOptions, request_id: str, echo: str = ""
    ) -> Completion:
        """Start one request; validation errors raise here, before anything streams."""
        stream = self._requests.stream(self._engine, input_ids, params, request_id, opts.priority, self._failure,
                                       opts.stream_interval)
        # Prime the stream: the runtime validates (length vs context, stop ids, grammar) on the first step of
        # the iterator, so this turns a bad request into an exception of this call, not of the stream.
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:  # pragma: no cover - the runtime always ends with a finish chunk
            raise RuntimeError("sglite returned no output")
        chunks = completion_chunks(first, stream, request_id, self._model_uid, opts.include_usage, echo, params.n,
                                   self._logprob_formatter(params, input_ids))
        if opts.stream:
            return chunks
        return await collect_completion(chunks, request_id, self._model_uid)

    def _logprob_formatter(self, params: "SamplingParams", input_ids: List[int]) -> Optional[Callable[[], Any]]:
        """Makes each choice's OpenAI ``logprobs`` builder, when the request asked for logprobs (with the prompt's
        ids when it is echoed with them); None otherwise."""
        if not (params.wants_output_logprobs or params.wants_prompt_logprobs):
            return None
        prompt = input_ids if params.wants_prompt_logprobs else None
        return functools.partial(LogprobFormatter, self._token_text, prompt)

    def _token_text(self, token_id: int) -> str:
        """A token's own text (special tokens included), as logprobs show it."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


async def closed_when_abandoned(stream: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """``stream`` as handed to Xinference: closed at once when the task that took its last item ends cancelled.

    Xinference's abort on a client disconnect names the REST request id, which its model actor does not pass to
    sglite, so a stream whose client left ends only when it is closed. The actor pulls each item in a task of its own
    (xoscar's ``__xoscar_next__``) through ``ModelActor._to_async_gen``, which after taking the item still hops to
    worker threads (JSON, SSE bytes) and never closes what it iterates; the disconnect cancels the pull in flight. A
    cancellation that lands inside this stream reaches the runtime stream as ``CancelledError`` and aborts the
    request. One that lands in those thread hops kills ``_to_async_gen`` but leaves this stream suspended at its
    ``yield``, held by the cancelled call's traceback until Python's cyclic garbage collector frees it, while the
    engine goes on decoding. Then the task that took the item ends cancelled, and the stream is closed as the
    consumer's own ``aclose`` would close it: the request is aborted, its KV freed. A cancellation that lands once
    that task has ended, before the actor call returned its item, shows nothing here: that stream still waits for
    the collector (measured on 2 CPU cores: ~0.1 s, ~250 tokens of the tiny test model; ~1,600 once in CI).
    """
    holder: Optional[asyncio.Task[Any]] = None  # the task that took the item this generator waits at
    watched: Optional[asyncio.Task[Any]] = None  # the last task given `consumer_done`
    closing: Optional[asyncio.Future[None]] = None

    def consumer_done(task: asyncio.Task[Any]) -> None:
        nonlocal holder, closing
        if task is not holder:  # it took an earlier item and this generator was resumed since
            return
        holder = None
        if task.cancelled() and closing is None:
            closing = asyncio.ensure_future(stream.aclose())
            _closing.add(closing)
            closing.add_done_callback(_closed)

    try:
        while closing is None:
            try:
                item = await stream.__anext__()
            except StopAsyncIteration:
                return
            task = asyncio.current_task()
            if task is not None and task is not watched:
                task.add_done_callback(consumer_done)
                watched = task
            holder = task
            yield item
            holder = None
    finally:
        if closing is None:
            await stream.aclose()
        else:  # closed already, or closing: wait for it (its error is logged by `_closed`)
            await asyncio.wait([closing])


def _closed(closing: asyncio.Future[None]) -> None:
    """The end of a close started by `closed_when_abandoned`."""
    _closing.discard(closing)
    if not closing.cancelled() and closing.exception() is not None:
        logger.warning("%s: closing an abandoned stream failed: %r", ENGINE_NAME, closing.exception())
