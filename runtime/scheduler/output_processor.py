"""Turns sampled tokens into request progress: finish checks, incremental text, stop strings, stream chunks.

Chunks are collected, not delivered: the scheduler loop sends what a step produced as one ``messages.Outputs``
(``take``), so nothing on the scheduler side calls into the front end.
"""

from __future__ import annotations

from ..engine.outputs import FinishReason, StreamChunk, TokenLogprob
from .schedule_batch import Req


class OutputProcessor:
    """Runs on the scheduler side right after sampling. Holds only the chunks not yet taken."""

    def __init__(self) -> None:
        self._pending: list[StreamChunk] = []

    def take(self) -> list[StreamChunk]:
        """The chunks produced since the last call, in order."""
        chunks, self._pending = self._pending, []
        return chunks

    def append_token(self, req: Req, token: int, logprob: TokenLogprob | None = None) -> None:
        """Record ``token`` for ``req``, decide whether it finished, and send the resulting chunk (with the token's
        ``logprob`` when the request asked for logprobs)."""
        req.output_ids.append(token)
        if req.grammar is not None and not req.grammar.accept_token(token):
            self.finish(req, "abort", error=f"grammar rejected token {token}: {req.grammar.error() or 'no detail'}")
            return
        logprobs = [logprob] if logprob is not None else []
        if token in req.stop_token_ids:
            # A stop token ends the output; its own text is never part of it.
            req.finish_reason, req.matched_stop = "stop", token
            text = self._drain(req)
        else:
            text, hit = req.stop_matcher.feed(req.detok.add([token]) if req.detok is not None else "")
            if hit:
                req.finish_reason, req.matched_stop = "stop", req.stop_matcher.matched
            elif req.grammar is not None and req.grammar.is_terminated():
                req.finish_reason = "stop"
                text += self._drain(req)
            elif len(req.output_ids) >= req.max_new_tokens:
                req.finish_reason = "length"
                text += self._drain(req)
        self._send(req, text, [token], logprobs)

    def finish(self, req: Req, reason: FinishReason, error: str | None = None) -> None:
        """Finish ``req`` outside the normal token path (abort, pool exhausted) and send its last chunk."""
        req.finish_reason, req.error = reason, error
        text = "" if reason == "abort" else self._drain(req)
        self._send(req, text, [], [])

    @staticmethod
    def _drain(req: Req) -> str:
        """At finish: the text held back for a possible stop string or an unfinished character."""
        text, _ = req.stop_matcher.feed(req.detok.flush() if req.detok is not None else "")
        text += req.stop_matcher.flush()
        if req.stop_matcher.stopped:
            req.finish_reason, req.matched_stop = "stop", req.stop_matcher.matched
        return text

    def _send(self, req: Req, text: str, tokens: list[int], logprobs: list[TokenLogprob]) -> None:
        prompt = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            prompt, req.prompt_logprobs_sent = list(req.prompt_logprobs), True
        self._pending.append(StreamChunk(
            request_id=req.rid,
            text=text,
            token_ids=tokens,
            finish_reason=req.finish_reason,
            prompt_tokens=len(req.input_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            matched_stop=req.matched_stop,
            error=req.error,
            output_logprobs=logprobs if req.params.wants_output_logprobs else None,
            prompt_logprobs=prompt,
        ))
