"""What the engine hands back: a finished result, or one streamed chunk."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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


def merge_chunks(chunks: Sequence[StreamChunk]) -> StreamChunk:
    """One chunk that says what ``chunks`` say: consecutive deltas of one sequence, oldest first.

    Text, token ids and output logprobs are concatenated in order; the counters, finish reason and matched stop
    are the newest chunk's (they are totals, or set only on the last chunk); prompt logprobs are the first
    chunk's (only the first carries them); an error of any chunk is kept. One chunk is returned as it is.
    """
    if len(chunks) == 1:
        return chunks[0]
    logprobs = None
    if any(c.output_logprobs is not None for c in chunks):
        logprobs = [lp for c in chunks for lp in c.output_logprobs or ()]
    return dataclasses.replace(
        chunks[-1],
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        output_logprobs=logprobs,
        prompt_logprobs=next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None),
        error=next((c.error for c in chunks if c.error is not None), None),
    )
