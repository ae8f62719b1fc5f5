"""Request -> runtime: an OpenAI request's fields as runtime ``SamplingParams``, its text checked before any work,
and its prompt as token ids. Every refusal here is the client's error, a :class:`SgliteRequestError` (a 400)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ...openai_api.request_mapping import RequestKind, RequestMappingError, RequestOptions, map_request
from ...runtime.errors import InvalidRequestError
from .errors import SgliteRequestError, request_errors
from .message_text import MAX_MESSAGE_VALUES, TextBudget, walk_strings

if TYPE_CHECKING:
    from ...runtime import Engine, SamplingParams

Tools = Optional[List[Dict[str, Any]]]


def map_config(config: Optional[Dict[str, Any]], kind: RequestKind) -> Tuple[Dict[str, Any], RequestOptions]:
    """The request's ``SamplingParams`` kwargs and the options the plugin acts on itself."""
    with request_errors(RequestMappingError):
        return map_request(config, kind)


class RequestInput:
    """Checks and converts one loaded model's requests for its runtime ``engine`` (limits read off the engine)."""

    def __init__(self, engine: "Engine") -> None:
        self._engine = engine
        self._tokenizer = engine.tokenizer
        self.context_length = int(engine.context_length)

    def check_text(self, text: str, field: str) -> None:
        """Refuse text no prompt can hold (lone surrogate, longer than any prompt that fits) before any work."""
        with request_errors(InvalidRequestError):
            self._engine.check_prompt_text(text, field)

    def encode(self, text: str, add_special_tokens: bool) -> List[int]:
        """``text``'s token ids (``add_special_tokens``: the tokenizer's own BOS handling)."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def check_messages(self, messages: Any, tools: Tools) -> None:
        """Cheap bounds before templating: no more messages than context tokens, every string valid Unicode,
        and all their text together (dict keys included) no longer than any prompt that fits (templates add text,
        never remove it); walked under a budget (`message_text.walk_strings`), so the check's own cost is bounded."""
        if not isinstance(messages, list):
            raise SgliteRequestError(f"messages must be a list; got {type(messages).__name__}")
        if len(messages) > self.context_length:
            raise SgliteRequestError(
                f"messages has {len(messages)} entries; context_length is {self.context_length} tokens, "
                "and every message takes at least one"
            )
        limit = self._engine.max_prompt_chars
        budget = TextBudget(MAX_MESSAGE_VALUES, limit,
                            f"with context_length {self.context_length} a prompt can have at most {limit}")
        for text, place in walk_strings([("messages", messages), ("tools", tools or [])], budget):
            if not _is_text(text):
                self.check_text(text, place.path())  # raises, naming the lone surrogate and where it is

    def sampling_params(self, sampling: Dict[str, Any], opts: RequestOptions, prompt_tokens: int) -> "SamplingParams":
        """The runtime's ``SamplingParams`` (validated there); no ``max_tokens`` fills the context."""
        from ...runtime import SamplingParams

        sampling = dict(sampling)
        if not opts.max_tokens_given:
            # OpenAI semantics: no max_tokens means "up to the context length" (Xinference's
            # XINFERENCE_MAX_TOKENS caps it when set, as it does for the other engines).
            sampling["max_new_tokens"] = _default_max_tokens(self.context_length, prompt_tokens)
        with request_errors(InvalidRequestError):
            return SamplingParams(**sampling)


def _is_text(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate), without building an error path."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _default_max_tokens(context_length: int, prompt_tokens: int) -> int:
    from xinference.constants import XINFERENCE_MAX_TOKENS

    room = max(context_length - prompt_tokens, 0)
    return min(room, XINFERENCE_MAX_TOKENS) if XINFERENCE_MAX_TOKENS else room
