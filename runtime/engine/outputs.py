"""What the engine hands back: a finished result, or one streamed chunk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class TokenLogprob:
    """The log probability of one token at one position, and the most likely alternatives there.

    ``top`` holds ``SamplingParams.top_logprobs`` (token id, logprob) pairs, most likely first (empty when 0 were
    asked); it may or may not contain ``token_id``. Which distribution the values come from is stated in
    ``SamplingParams``'s docstring (output tokens: the one sampled from; prompt tokens: the raw model's). A token
    the grammar mask or a ban excluded has logprob ``-inf``.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


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
    index: int = 0  # which of the request's SamplingParams.n sequences this is (0..n-1)
    output_logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when SamplingParams asked
    # one per scored prompt position, in order from position max(prompt_logprobs_start, 1), when asked
    prompt_logprobs: list[TokenLogprob] | None = None


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
    index: int = 0  # which of the request's SamplingParams.n sequences this chunk belongs to (0..n-1)
    output_logprobs: list[TokenLogprob] | None = None  # delta, aligned with token_ids, when SamplingParams asked
    prompt_logprobs: list[TokenLogprob] | None = None  # the whole list, on the first chunk only, when asked
