"""Streaming text out of token ids: the incremental detokenizer and the stop-string matcher.

Per request, each step's new token ids go through `IncrementalDetokenizer.add` (text delta, never half a
character) and then `StopStringMatcher.feed` (text safe to show, and whether a stop string ended the output).
On a finish without a stop string (EOS, length, abort), drain both in that order:
`shown, stopped = matcher.feed(detok.flush())`, then, if not stopped, `shown += matcher.flush()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
"""What a decoder yields for bytes that are not (yet) a complete UTF-8 character."""


class TokenDecoder(Protocol):
    """The part of a HF tokenizer the detokenizer uses."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str:
        """Text of `token_ids`."""
        ...


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas, token by token, at O(window) cost per call.

    Technique (prefix offset / read offset): the text of `ids[prefix_offset:read_offset]` was already emitted;
    each call decodes only `ids[prefix_offset:]` and emits what it adds. Decoding with a little already-emitted
    context on the left keeps tokenizers whose decode depends on the neighbour (e.g. SentencePiece dropping the
    leading space of the first token) right, without re-decoding the whole output.

    UTF-8 safety: a byte-level token can end inside a multi-byte character, which decodes to U+FFFD. Trailing
    U+FFFD are held back until a later token completes the character; the text before them is emitted at once.
    Concatenating every delta plus `flush()` gives `tokenizer.decode(all_ids)` for byte-level BPE tokenizers
    (and any tokenizer whose decode of a token window ends the same way as the decode of the whole output).

    Limitation: while every new token leaves the text ending in U+FFFD (invalid bytes, or tokens that each
    straddle two characters) the window grows; after `MAX_PENDING_TOKENS` such tokens the held text is emitted
    as is, which bounds the cost but may show U+FFFD where a later token would have completed a character.
    """

    MAX_PENDING_TOKENS = 64
    """Most tokens decoded past `read_offset` before held text is emitted anyway (cost bound, see above)."""

    CONTEXT_TOKENS = 5
    """Prompt tokens decoded as left context of the first output tokens (as SGLang's and vLLM's detokenizers do)."""

    def __init__(
        self, tokenizer: TokenDecoder, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()
    ) -> None:
        """`tokenizer` is the model's HF tokenizer; `skip_special_tokens` is passed to its `decode`.

        The last `CONTEXT_TOKENS` of `prompt_ids` are decoded as left context and never emitted: the first output
        token then reads as it does inside the sequence, not as the start of a text. SentencePiece decoders strip
        the space of a text's first "▁piece": without context an output the grammar made " 1" would read "1".
        """
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = self._stable_context(list(prompt_ids[-self.CONTEXT_TOKENS :]))
        self._context_len = len(context)
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)  # decode(ids[prefix_offset:read_offset]); all of it was emitted
        self._pending_emitted = 0  # characters past prefix_text already emitted from tokens after read_offset
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    @property
    def token_ids(self) -> list[int]:
        """All token ids added so far (a copy; the prompt context excluded)."""
        return self._ids[self._context_len :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""

    def _stable_context(self, context: list[int]) -> list[int]:
        """``context``, or none when its text ends inside a character: the first output token would complete
        that character and rewrite the text the offsets are measured on."""
        return [] if self._decode(context).endswith(REPLACEMENT_CHAR) else context

    def add(self, token_ids: list[int]) -> str:
        """Append `token_ids` and return the new text they complete (possibly empty)."""
        self._ids.extend(token_ids)
        tail = self._decode_tail()
        if tail.endswith(REPLACEMENT_CHAR) and len(self._ids) - self._read_offset <= self.MAX_PENDING_TOKENS:
            stable = tail.rstrip(REPLACEMENT_CHAR)
            return self._emit(tail, len(stable))
        return self._advance(tail)

    def flush(self) -> str:
        """At finish: return whatever is held back (it may end in U+FFFD if the output stopped mid-character)."""
        if self._read_offset == len(self._ids):
            return ""
        return self._advance(self._decode_tail())

    def _decode_tail(self) -> str:
        """Text the tokens after `read_offset` add to the window's already-emitted text."""
        return self._decode(self._ids[self._prefix_offset :])[len(self._prefix_text) :]

    def _emit(self, tail: str, upto: int) -> str:
        """Emit `tail[pending_emitted:upto]` without moving the offsets."""
        delta = tail[self._pending_emitted : upto]
        if delta:
            self._pending_emitted = upto
            self._chunks.append(delta)
        return delta

    def _advance(self, tail: str) -> str:
        """Emit the rest of `tail` and mark every token as read."""
        delta = self._emit(tail, len(tail))
        if tail:
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        else:
            # Tokens with no text (skipped special tokens): keep the left context, which they do not provide.
            self._read_offset = len(self._ids)
        self._pending_emitted = 0
        return delta


class StopStringMatcher:
    """Cuts a text stream before the first stop string, however the stream is split into deltas.

    Text that could still be the start of a stop string is held back until it is disambiguated, so neither the
    stop string nor any part of it is ever emitted. The output is exactly the whole text up to the earliest
    occurrence (smallest start index) of any stop string, as if the text had been searched in one piece: a stop
    string that completes while an earlier-starting one might still complete waits for the earlier one.
    """

    def __init__(self, stop: list[str]) -> None:
        """`stop`: the stop strings (non-empty; an empty list passes everything through)."""
        if any(s == "" for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = list(stop)
        self._held = ""
        self._stopped = False
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        """Whether a stop string was hit (every later `feed` returns nothing)."""
        return self._stopped

    @property
    def matched(self) -> str | None:
        """The stop string that ended the output (the shortest one if several start at the same place)."""
        return self._matched

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add `delta`; return (text safe to emit now, whether a stop string was hit)."""
        if self._stopped:
            return "", True
        if not self._stop:
            return delta, False
        text = self._held + delta
        match = self._earliest_match(text)
        end = match[0] if match else len(text)
        hold_from = self._partial_start(text, end)
        if hold_from < end:
            # Something before the match (or at the end) may still become a stop string: wait.
            self._held = text[hold_from:]
            return text[:hold_from], False
        self._held = ""
        if match is None:
            return text, False
        self._stopped, self._matched = True, match[1]
        return text[: match[0]], True

    def flush(self) -> str:
        """At finish: the held-back text up to the first complete stop string in it, if any (then `stopped` is
        set: a later stop string completed while an earlier-starting one was still possible, and the output ended
        before the earlier one could complete), else all of it. Empty after a stop."""
        held, self._held = self._held, ""
        if self._stopped:
            return ""
        match = self._earliest_match(held)
        if match is None:
            return held
        self._stopped, self._matched = True, match[1]
        return held[: match[0]]

    def _earliest_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the earliest complete occurrence in `text`; ties go to the shortest string."""
        found = [(text.find(s), len(s), s) for s in self._stop]
        hits = [(start, length, s) for start, length, s in found if start >= 0]
        if not hits:
            return None
        start, _, stop = min(hits)
        return start, stop

    def _partial_start(self, text: str, end: int) -> int:
        """First index before `end` where the rest of `text` is a proper prefix of a stop string (else `end`)."""
        longest = max(len(s) for s in self._stop)
        for i in range(max(0, len(text) - longest + 1), end):
            rest = text[i:]
            if any(len(s) > len(rest) and s.startswith(rest) for s in self._stop):
                return i
        return end
