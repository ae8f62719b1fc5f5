"""The runtime stream of each request: bookkeeping and abort (:class:`RequestTracker`), and the start of a request
with its stream formatted as OpenAI completion payloads (:class:`CompletionRunner`)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, AsyncGenerator, Callable, Dict, List, Optional, Set, Union

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
