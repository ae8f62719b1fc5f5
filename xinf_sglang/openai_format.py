"""OpenAI completion payloads built from the runtime's stream: ``CompletionChunk`` dicts, usage, and a whole stream
collected into one ``Completion`` dict.

Chat payloads are built from these by Xinference's ``ChatModelMixin`` (see :mod:`xinf_sglang.chat`), as for its
other engines. Usage carries ``prompt_tokens`` and ``completion_tokens`` (which Xinference needs) and the prompt
tokens served from the prefix cache (``prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, AsyncGenerator, Dict, List, Optional

if TYPE_CHECKING:
    from .runtime import StreamChunk


def usage(chunk: "StreamChunk") -> Dict[str, Any]:
    """The ``usage`` object of a request whose final runtime chunk is ``chunk``."""
    return {
        "prompt_tokens": chunk.prompt_tokens,
        "completion_tokens": chunk.completion_tokens,
        "total_tokens": chunk.prompt_tokens + chunk.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": chunk.cached_tokens},
    }


def completion_chunk(
    request_id: str, model_uid: str, text: Optional[str], finish_reason: Optional[str], usage: Optional[Dict]
) -> Dict[str, Any]:
    """One ``CompletionChunk``; ``text=None`` gives the choice-less chunk that carries only usage."""
    choices = [] if text is None else [_choice(text, finish_reason)]
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
) -> AsyncGenerator[Dict[str, Any], None]:
    """Runtime stream chunks -> ``CompletionChunk`` dicts (usage on the final one, cached tokens too).

    ``first`` is the chunk already taken from ``rest``; ``echo`` is prepended to the first text. With
    ``include_usage`` (``stream_options``) a choice-less usage chunk follows the final one. Empty non-final texts
    are skipped. Closing this generator closes ``rest`` (the runtime stream), which aborts the request.
    """
    try:
        chunk: Optional["StreamChunk"] = first
        pending_echo = echo
        while chunk is not None:
            text = pending_echo + chunk.text
            pending_echo = ""
            if chunk.finish_reason is not None:
                final_usage = usage(chunk)
                yield completion_chunk(request_id, model_uid, text, chunk.finish_reason, final_usage)
                if include_usage:
                    yield completion_chunk(request_id, model_uid, None, None, final_usage)
                return
            if text:
                yield completion_chunk(request_id, model_uid, text, None, None)
            chunk = await rest.__anext__()
    finally:
        await rest.aclose()


async def collect_completion(
    chunks: AsyncGenerator[Dict[str, Any], None], request_id: str, model_uid: str
) -> Dict[str, Any]:
    """Drain a ``CompletionChunk`` stream into one ``Completion`` dict (texts joined, last finish reason and
    usage); the stream is closed however this ends."""
    text: List[str] = []
    finish_reason: Optional[str] = None
    final_usage: Optional[Dict[str, Any]] = None
    try:
        async for chunk in chunks:
            for choice in chunk["choices"]:
                text.append(choice.get("text") or "")
                finish_reason = choice.get("finish_reason") or finish_reason
            final_usage = chunk.get("usage") or final_usage
    finally:
        await chunks.aclose()
    completion = _completion(request_id, model_uid, [_choice("".join(text), finish_reason)])
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


def _choice(text: str, finish_reason: Optional[str]) -> Dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
