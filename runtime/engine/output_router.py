"""The engine side of the scheduler's outputs: chunks to per-request sinks, replies to the queries that wait.

``OutputRouter.put`` takes what the scheduler sends (``messages.Outputs`` / ``messages.Reply``). For the engine's
scheduler thread it is the loop's outbox itself, so chunks are routed on that thread as they are produced; for a
scheduler in another process a reader thread would call it with what arrives on the result queue.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future

from ..errors import InvalidRequestError
from .messages import Outputs, Reply, SchedulerOutput
from .outputs import GenerateOutput, StreamChunk, TokenLogprob

logger = logging.getLogger("xinf_sglang.runtime")

__all__ = ["Collector", "OutputRouter"]

Sink = Callable[[StreamChunk], None]


class OutputRouter:
    """Request id -> sink of the live requests (queued or running), query id -> the future of its reply.

    Thread-safe. A request id is live from ``register`` until its last chunk (the one with ``finish_reason``) has
    been routed; a live id cannot be registered again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sinks: dict[str, Sink] = {}
        self._replies: dict[int, Future] = {}
        self._query_ids = itertools.count()

    def register(self, rids: Iterable[str], sink: Sink) -> None:
        """Route the chunks of ``rids`` to ``sink`` (called on the routing thread; it must not block).

        Raises:
            InvalidRequestError: one of ``rids`` is live, or appears twice.
        """
        rids = list(rids)
        with self._lock:
            taken = [rid for rid in rids if rid in self._sinks]
            if taken or len(set(rids)) != len(rids):
                raise InvalidRequestError(f"request id {(taken or rids)[0]!r} is already in use by a running request")
            self._sinks.update((rid, sink) for rid in rids)

    def unregister(self, rids: Iterable[str]) -> None:
        """Forget ``rids`` (requests that were registered but never queued)."""
        with self._lock:
            for rid in rids:
                self._sinks.pop(rid, None)

    def new_query(self) -> tuple[int, Future]:
        """A fresh query id and the future its ``Reply`` resolves."""
        fut: Future = Future()
        with self._lock:
            qid = next(self._query_ids)
            self._replies[qid] = fut
        return qid, fut

    def put(self, msg: SchedulerOutput) -> None:
        """Route one message from the scheduler."""
        if isinstance(msg, Reply):
            self._reply(msg)
            return
        assert isinstance(msg, Outputs), type(msg)
        for chunk in msg.chunks:
            self._deliver(chunk)

    def _deliver(self, chunk: StreamChunk) -> None:
        with self._lock:
            if chunk.finish_reason is not None:
                sink = self._sinks.pop(chunk.request_id, None)
            else:
                sink = self._sinks.get(chunk.request_id)
        if sink is None:
            logger.warning("output for unknown request %s dropped", chunk.request_id)
            return
        try:
            sink(chunk)
        except Exception:  # a broken consumer must not take the scheduler down
            logger.exception("delivering output of request %s failed", chunk.request_id)

    def _reply(self, msg: Reply) -> None:
        with self._lock:
            fut = self._replies.pop(msg.query_id, None)
        if fut is None:
            return  # the asker gave up waiting
        if msg.error is not None:
            fut.set_exception(RuntimeError(msg.error))
        else:
            fut.set_result(msg.value)

    def forget_query(self, qid: int) -> None:
        """Drop the future of a query nobody waits for any more (its reply, if it comes, is ignored)."""
        with self._lock:
            self._replies.pop(qid, None)


class Collector:
    """Accumulates one request's chunks into its ``GenerateOutput``."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None  # set by the first chunk that carries output logprobs
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.last: StreamChunk | None = None

    def add(self, chunk: StreamChunk) -> bool:
        """Take ``chunk``; True when it was the last one."""
        self.text.append(chunk.text)
        self.tokens.extend(chunk.token_ids)
        if chunk.output_logprobs is not None:
            self.logprobs = (self.logprobs or []) + chunk.output_logprobs
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs
        self.last = chunk
        return chunk.finish_reason is not None

    def result(self) -> GenerateOutput:
        c = self.last
        return GenerateOutput(
            request_id=self.rid,
            token_ids=self.tokens,
            text="".join(self.text),
            finish_reason=c.finish_reason,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            cached_tokens=c.cached_tokens,
            matched_stop=c.matched_stop,
            error=c.error,
            output_logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )
