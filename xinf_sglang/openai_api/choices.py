"""Chat replies with several choices (``n > 1``) built from single-choice conversions.

Xinference's chat conversions (``ChatModelMixin``: chat chunks, reasoning split, tool-call parsing) keep one state
per stream and number choices by their position in a chunk, so they serve one choice at a time. sglite runs them
once per choice and merges the results with each choice's ``index``:

* a ``Completion`` with n choices is split into n single-choice completions (`split_completion`), each converted,
  and the chat replies merged into one (`merge_replies`), with the completion's usage;
* a ``CompletionChunk`` stream whose chunks each carry one choice (``openai_format.completion_chunks`` with n) is
  fanned out into one sub-stream per choice (`per_choice_stream`), each converted concurrently, and the converted
  chunks fanned back in as they come. A choice-less chunk (the usage at the end) goes to the choice that ended
  last, so it follows that choice's final chunk as it does for one choice. The fan-out pulls the next completion
  chunk only once the reader has taken every converted chunk: the backlog of a slow reader then stays in the
  runtime's stream, which merges it (``runtime/engine/stream_backlog.py``), instead of queueing here chunk by chunk.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any, AsyncGenerator, Callable, Dict, List

Chunk = Dict[str, Any]
Stream = AsyncGenerator[Chunk, None]

_END = object()  # the end of a sub-stream's input


def split_completion(completion: Chunk) -> List[Chunk]:
    """One single-choice ``Completion`` per choice of ``completion`` (each choice renumbered 0), in index order."""
    choices = sorted(completion["choices"], key=lambda c: c.get("index", 0))
    return [{**completion, "choices": [{**choice, "index": 0}]} for choice in choices]


def merge_replies(replies: List[Chunk], usage: Any) -> Chunk:
    """One ``ChatCompletion`` from single-choice ones, choice ``i`` from ``replies[i]``, with ``usage``."""
    merged = copy.copy(replies[0])
    merged["choices"] = [{**reply["choices"][0], "index": i} for i, reply in enumerate(replies)]
    merged["usage"] = usage
    return merged


async def per_choice_stream(chunks: Stream, n: int, convert: Callable[[Stream], Stream]) -> Stream:
    """``convert`` run over each choice's chunks of ``chunks`` (renumbered 0 on the way in, back to the choice's
    index on the way out), merged in the order they come out. Closing this generator closes ``chunks``."""
    inputs: List[asyncio.Queue] = [asyncio.Queue() for _ in range(n)]
    outputs: asyncio.Queue = asyncio.Queue()

    async def sub_stream(i: int) -> Stream:
        while (item := await inputs[i].get()) is not _END:
            yield item
            inputs[i].task_done()  # the converter asks for the next one: it is done with this one

    async def run(i: int) -> None:
        async for out in convert(sub_stream(i)):
            for choice in out.get("choices") or []:
                choice["index"] = i
            await outputs.put(out)

    runs = [asyncio.ensure_future(run(i)) for i in range(n)]
    hungry = asyncio.Event()  # the reader waits on an empty output queue
    tasks = [asyncio.ensure_future(_dispatch(chunks, inputs, runs, outputs, hungry)), *runs]
    for task in tasks:
        task.add_done_callback(outputs.put_nowait)  # a finished task is its own end-of-output marker
    try:
        running = len(tasks)
        while running:
            if outputs.empty():
                hungry.set()
            item = await outputs.get()
            if isinstance(item, asyncio.Future):
                running -= 1
                if not item.cancelled() and item.exception() is not None:
                    raise item.exception()
                continue
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await chunks.aclose()


async def _dispatch(chunks: Stream, inputs: List[asyncio.Queue], runs: List[asyncio.Future],
                    outputs: asyncio.Queue, hungry: asyncio.Event) -> None:
    """Hand each chunk to the sub-stream of its choice, one at a time: the next is pulled once that choice's
    converter has taken it in and the reader has taken every converted chunk. Then end every sub-stream."""
    last_ended = 0
    try:
        async for chunk in chunks:
            choices = chunk.get("choices") or []
            index = last_ended
            if choices:
                index = choices[0].get("index", 0)
                if choices[0].get("finish_reason") is not None:
                    last_ended = index
                chunk = {**chunk, "choices": [{**c, "index": 0} for c in choices]}
            await inputs[index].put(chunk)
            joined = asyncio.ensure_future(inputs[index].join())
            await asyncio.wait([joined, runs[index]], return_when=asyncio.FIRST_COMPLETED)
            joined.cancel()
            hungry.clear()
            if not outputs.empty():
                await hungry.wait()
    finally:
        for q in inputs:
            q.put_nowait(_END)
