"""What the interpreter needs from a model: generate after a text, stream that, and score continuations."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..chat_template import ChatTemplate
from ..choices import TokenScore
from ..ir import GenParams


@dataclass
class GenResult:
    """One generation: its text and SGLang-style meta info (``prompt_tokens``, ``completion_tokens``,
    ``cached_tokens``, ``finish_reason`` ``{"type", "matched"}``, and ``output_token_logprobs`` when asked)."""

    text: str
    meta_info: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """A model a program runs on. Thread-safe: branches and batch programs call it from many threads."""

    chat_template: ChatTemplate

    @abstractmethod
    def generate(self, text: str, params: GenParams) -> GenResult:
        """Continue ``text`` under ``params`` (every field set: the program's defaults are merged in)."""

    @abstractmethod
    def generate_stream(self, text: str, params: GenParams) -> Iterator[GenResult]:
        """As ``generate``, as text deltas; the last one carries the meta info."""

    @abstractmethod
    def score(self, text: str, continuations: list[str]) -> list[list[TokenScore]]:
        """For each continuation, the logprob of each of its tokens after ``text`` (the tokens of
        ``text + continuation`` that the tokenization of ``text`` alone does not hold); never empty."""

    def check(self, params: GenParams) -> None:
        """Raise ``LangError`` if this backend would refuse ``params`` (the program's defaults, checked by ``run``
        before anything is sent); backends that cannot tell leave it to the server."""

    def shutdown(self) -> None:
        """Release what the backend holds (the embedded engine's model); a no-op for HTTP backends."""


def meta_info(prompt_tokens: int, completion_tokens: int, cached_tokens: int, finish: str | None,
              matched: Any, logprobs: list[TokenScore] | None) -> dict[str, Any]:
    """The meta info of one generation, in SGLang's key names."""
    info: dict[str, Any] = {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "cached_tokens": cached_tokens,
        "finish_reason": {"type": finish, "matched": matched},
    }
    if logprobs is not None:
        info["output_token_logprobs"] = logprobs
    return info
