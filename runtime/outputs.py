"""What the engine hands back: a finished result, or one streamed chunk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class GenerateOutput:
    """The result of one finished request (``Engine.generate``)."""

    request_id: str
    token_ids: list[int]  # generated tokens (the stop token, if any, included; stop-string text excluded from text)
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the radix cache
    matched_stop: str | int | None = None  # the stop string or stop token id that ended it, if any
    error: str | None = None  # set when the request was aborted because of an error


@dataclass
class StreamChunk:
    """One increment of a streamed request (``Engine.generate_stream``); the last one has ``finish_reason``."""

    request_id: str
    text: str  # text delta (never half a character, never part of a stop string)
    token_ids: list[int] = field(default_factory=list)  # token delta
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    cached_tokens: int = 0
    matched_stop: str | int | None = None
    error: str | None = None
