"""``StreamBacklog``: the chunks of one streamed request between the routing thread and the request's reader.

This is where a stream's backlog forms. The scheduler produces one chunk per sequence per step; the reader of
``Engine.generate_stream`` pulls when *its* reader pulls, and through Xinference that is one xoscar call from the
REST process per chunk (``IteratorWrapper.__anext__`` -> ``__xoscar_next__`` -> the plugin's generators ->
``generate_stream`` -> here). Whatever the scheduler produced since the last pull is therefore waiting here, and
handing it out as one chunk instead of many is what lets a slow transport keep up with the engine (vLLM's output
collector does the same).

Two rules decide what one pull gets:

* **Coalescing:** everything pending for one sequence (``StreamChunk.index``) becomes one chunk: text, token ids
  and logprobs concatenated in order (:func:`outputs.merge_chunks`); the chunk that ends a sequence carries its
  finish reason and usage. A reader that keeps up gets one chunk per step, as before.
* **stream_interval** k (SGLang's rule): a sequence's first chunk goes out at once, later ones once k tokens
  are pending, and its final chunk always. The scheduler already holds back text that may be the start of a stop
  string (the stop matcher), so no held text ever goes out early.

The routing thread calls :meth:`put` (it never blocks); the reader awaits :meth:`get` on the event loop. The loop
is woken only when a reader is waiting, so a stream whose reader lags costs the routing thread no loop callback.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from ..errors import InvalidRequestError
from .outputs import StreamChunk, merge_chunks

__all__ = ["StreamBacklog"]


class StreamBacklog:
    """The pending chunks of one request (all its ``n`` sequences) and the rule that hands them out."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream_interval: int = 1) -> None:
        if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 1:
            raise InvalidRequestError(f"stream_interval must be an integer >= 1, got {stream_interval!r}")
        self._loop = loop
        self._interval = stream_interval
        self._lock = threading.Lock()  # pending + waiter: put() runs on the routing thread
        self._pending: deque[StreamChunk] = deque()
        self._waiter: asyncio.Future | None = None
        self._sent_tokens: dict[int, int] = {}  # index -> completion_tokens of the last chunk handed out

    def put(self, chunk: StreamChunk) -> None:
        """Add one chunk from the scheduler (any thread); wakes the reader if it waits."""
        with self._lock:
            self._pending.append(chunk)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    async def get(self) -> StreamChunk:
        """The next chunk to hand out (event-loop thread): the pending deltas of the first sequence that is ready,
        merged; waits while none is."""
        while True:
            with self._lock:
                ready = self._take_ready()
                if ready is None:
                    waiter = self._waiter = self._loop.create_future()
            if ready is not None:
                self._sent_tokens[ready[-1].index] = ready[-1].completion_tokens
                return merge_chunks(ready)
            await waiter

    def _take_ready(self) -> list[StreamChunk] | None:
        """Remove and return the pending chunks of the first ready sequence (oldest first); None if none is.
        Called with the lock held."""
        pending = self._pending
        if not pending:
            return None
        first = pending[0].index
        if all(c.index == first for c in pending):  # one sequence pending (always, for n == 1): no regrouping
            if not self._ready(first, pending[-1]):
                return None
            taken = list(pending)
            pending.clear()
            return taken
        for index in dict.fromkeys(c.index for c in pending):  # sequences in the order their chunks came
            mine = [c for c in pending if c.index == index]
            if self._ready(index, mine[-1]):
                self._pending = deque(c for c in pending if c.index != index)
                return mine
        return None

    def _ready(self, index: int, last: StreamChunk) -> bool:
        """Whether sequence ``index``, whose newest pending chunk is ``last``, may go out now."""
        if last.finish_reason is not None or last.error is not None or index not in self._sent_tokens:
            return True
        return last.completion_tokens - self._sent_tokens[index] >= self._interval


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
