"""OpenAI completion payloads built from the runtime's stream: ``CompletionChunk`` dicts, usage, and a whole stream
collected into one ``Completion`` dict.

Chat payloads are built from these by Xinference's ``ChatModelMixin`` (see :mod:`xinf_sglang.openai_api.chat`), as for its
other engines. Usage carries ``prompt_tokens`` and ``completion_tokens`` (which Xinference needs) and the prompt
tokens served from the prefix cache (``prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, AsyncGenerator, Callable, Dict, List, Optional

from .logprobs import LogprobFormatter
from .logprobs import merge as merge_logprobs

if TYPE_CHECKING:
    from ..runtime import StreamChunk


def usage(chunk: "StreamChunk") -> Dict[str, Any]:
    """The ``usage`` object of a request whose final runtime chunk is ``chunk``."""
    return UsageTally(1).add(chunk)  # type: ignore[return-value]


class UsageTally:
    """The usage of a request with ``n`` sequences, from their final runtime chunks: the prompt counted once (as
    OpenAI does for ``n``), completion tokens summed, cached tokens those the prompt had before the request (the
    least over the sequences: the first computes the prompt, the others then find it cached)."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.prompt_tokens = self.completion_tokens = 0
        self.cached_tokens: Optional[int] = None

    def add(self, final: "StreamChunk") -> Optional[Dict[str, Any]]:
        """Count one sequence's final chunk; the ``usage`` object once the last one is counted, else None."""
        self.left -= 1
        self.prompt_tokens = final.prompt_tokens
        self.completion_tokens += final.completion_tokens
        cached = final.cached_tokens
        self.cached_tokens = cached if self.cached_tokens is None else min(self.cached_tokens, cached)
        if self.left > 0:
            return None
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def completion_chunk(
    request_id: str, model_uid: str, text: Optional[str], finish_reason: Optional[str], usage: Optional[Dict],
    index: int = 0, logprobs: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """One ``CompletionChunk`` of choice ``index``; ``text=None`` gives the choice-less chunk that carries only
    usage."""
    choices = [] if text is None else [_choice(text, finish_reason, index, logprobs)]
    chunk = _completion(request_id, model_uid, choices)
    if usage is not None:
        chunk["usage"] = usage
    return chunk


async def completion_chunks(
    first: "StreamChunk",
    rest: AsyncGenerator["StreamChunk", None],
    request_id: str,
    model_uid: str,
    include_usage: bool,
    echo: str,
    n: int = 1,
    logprobs: Optional[Callable[[], LogprobFormatter]] = None,
) -> AsyncGenerator[Dict[str, Any], None]:
    """Runtime stream chunks -> ``CompletionChunk`` dicts (usage on the final one, cached tokens too).

    ``first`` is the chunk already taken from ``rest``; ``echo`` is prepended to each choice's first text. With
    ``n`` sequences (``SamplingParams.n``) each chunk is one of choice ``chunk.index``; every choice ends with its
    own ``finish_reason`` and the one that ends last carries the request's usage (`UsageTally`). With
    ``include_usage`` (``stream_options``) a choice-less usage chunk follows it. ``logprobs`` (when the request
    asked for them) makes each choice's formatter (:mod:`xinf_sglang.openai_api.logprobs`). Empty non-final texts
    without logprobs are skipped. Closing this generator closes ``rest`` (the runtime stream), which aborts the
    request.
    """
    try:
        chunk: Optional["StreamChunk"] = first
        pending_echo = dict.fromkeys(range(n), echo)
        tally = UsageTally(n)
        formatters: Dict[int, LogprobFormatter] = {}
        while chunk is not None:
            text = pending_echo.pop(chunk.index, "") + chunk.text
            lp = None
            if logprobs is not None:
                lp = formatters.setdefault(chunk.index, logprobs()).chunk(chunk)
            if chunk.finish_reason is not None:
                final_usage = tally.add(chunk)
                yield completion_chunk(request_id, model_uid, text, chunk.finish_reason, final_usage, chunk.index, lp)
                if final_usage is not None:
                    if include_usage:
                        yield completion_chunk(request_id, model_uid, None, None, final_usage)
                    return
            elif text or (lp is not None and lp["tokens"]):
                yield completion_chunk(request_id, model_uid, text, None, None, chunk.index, lp)
            chunk = await rest.__anext__()
    finally:
        await rest.aclose()


async def collect_completion(
    chunks: AsyncGenerator[Dict[str, Any], None], request_id: str, model_uid: str
) -> Dict[str, Any]:
    """Drain a ``CompletionChunk`` stream into one ``Completion`` dict (each choice's texts joined, its last finish
    reason; choices in index order; the usage); the stream is closed however this ends."""
    texts: Dict[int, List[str]] = {}
    finish_reasons: Dict[int, Optional[str]] = {}
    logprobs: Dict[int, List[Any]] = {}
    final_usage: Optional[Dict[str, Any]] = None
    try:
        async for chunk in chunks:
            for choice in chunk["choices"]:
                i = choice.get("index", 0)
                texts.setdefault(i, []).append(choice.get("text") or "")
                finish_reasons[i] = choice.get("finish_reason") or finish_reasons.get(i)
                logprobs.setdefault(i, []).append(choice.get("logprobs"))
            final_usage = chunk.get("usage") or final_usage
    finally:
        await chunks.aclose()
    choices = [_choice("".join(texts[i]), finish_reasons.get(i), i, merge_logprobs(logprobs[i])) for i in sorted(texts)]
    completion = _completion(request_id, model_uid, choices)
    completion["usage"] = final_usage
    return completion


def _completion(request_id: str, model_uid: str, choices: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The fields a ``Completion`` and a ``CompletionChunk`` share."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_uid,
        "choices": choices,
    }


def _choice(
    text: str, finish_reason: Optional[str], index: int = 0, logprobs: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}
