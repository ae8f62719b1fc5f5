"""The runtime's log probabilities (``TokenLogprob``) as OpenAI's completions ``logprobs`` object.

A completions choice carries ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``: parallel lists, one
entry per token, ``top_logprobs`` a ``{token text: logprob}`` dict per token. Chat replies are built from these by
Xinference's ``ChatModelMixin`` (``_completion_logprobs_to_chat_logprobs``), which turns them into
``choices[].logprobs.content[]`` entries with ``token``, ``logprob``, ``bytes`` and ``top_logprobs``, streaming and
not, as it does for vLLM's engine.

Conventions (OpenAI's and vLLM's):

* a token's text is its own decode (special tokens included); two alternatives with the same text share one
  dict key, the more likely one's;
* ``text_offset`` is each token's character offset in the choice's text, counted from the token texts;
* with ``echo`` the prompt's tokens come first, the first one with logprob ``None`` (nothing conditions it);
  Xinference's chat conversion skips such entries;
* a logprob of ``-inf`` (a token the grammar mask or a ban excluded) is sent as -9999.0, as OpenAI does, since
  JSON has no infinity;
* a stop token, whose text is never part of the reply, gets no entry (the runtime's ``output_logprobs`` has it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:
    from ..runtime import StreamChunk

NEG_INF_LOGPROB = -9999.0
"""What a ``-inf`` logprob is sent as (OpenAI's value for tokens that cannot occur)."""

CompletionLogprobs = Dict[str, List[Any]]


class LogprobFormatter:
    """Builds one choice's ``logprobs`` objects chunk by chunk, keeping the running ``text_offset``.

    Args:
        token_text: a token id's text (its own decode).
        prompt_ids: the prompt's token ids, when the prompt is echoed with its logprobs; else None.
    """

    def __init__(self, token_text: Callable[[int], str], prompt_ids: Optional[Sequence[int]] = None) -> None:
        self.token_text = token_text
        self.prompt_ids = list(prompt_ids) if prompt_ids is not None else None
        self.offset = 0

    def chunk(self, chunk: "StreamChunk") -> Optional[CompletionLogprobs]:
        """The ``logprobs`` object of one runtime chunk (the echoed prompt's before its output tokens on the
        first), or None when the request did not ask for logprobs."""
        if chunk.output_logprobs is None and chunk.prompt_logprobs is None:
            return None
        out: CompletionLogprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if chunk.prompt_logprobs is not None and self.prompt_ids:
            first = self.prompt_ids[0]
            self._add(out, first, None, None)
            for entry in chunk.prompt_logprobs:
                self._add(out, entry.token_id, entry.logprob, entry.top)
        entries = list(chunk.output_logprobs or [])
        if entries and isinstance(chunk.matched_stop, int) and entries[-1].token_id == chunk.matched_stop:
            entries.pop()  # the stop token: its text is not in the reply
        for entry in entries:
            self._add(out, entry.token_id, entry.logprob, entry.top)
        return out

    def _add(self, out: CompletionLogprobs, token_id: int, logprob: Optional[float],
             top: Optional[Sequence[tuple[int, float]]]) -> None:
        text = self.token_text(token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if logprob is None else _finite(logprob))
        out["top_logprobs"].append(None if top is None else self._top(top))
        out["text_offset"].append(self.offset)
        self.offset += len(text)

    def _top(self, top: Sequence[tuple[int, float]]) -> Dict[str, float]:
        found: Dict[str, float] = {}
        for token_id, logprob in top:  # most likely first: a repeated text keeps the first (larger) value
            found.setdefault(self.token_text(token_id), _finite(logprob))
        return found


def merge(parts: Sequence[Optional[CompletionLogprobs]]) -> Optional[CompletionLogprobs]:
    """One choice's ``logprobs`` object from its chunks' (None when none had any)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    return {key: [v for p in present for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                    "text_offset")}


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else NEG_INF_LOGPROB

