"""``RequestValidator``: turns one prompt + ``SamplingParams`` into a ``messages.NewRequest``, or refuses it.

Runs on the caller's thread, before anything is queued: text bounds (cheap, before tokenizing), tokenization,
prompt length against the context and the KV pool, token id ranges, sampling parameters against the vocabulary,
what needs a tokenizer, the priority against the schedule policy, and the structured-output constraint against the
engine's grammar limits (``SamplingParams.structured``, built and measured once with the parameters; whether it
*compiles* is the engine's next step, also before queueing).
"""

from __future__ import annotations

import functools
import uuid
from typing import Any

from .call_arguments import is_integer
from ..constrained import GrammarLimits
from ..constrained.spec import check_text
from ..errors import InvalidRequestError
from .messages import NewRequest
from .outputs import StreamChunk
from ..sampling.sampling_params import SamplingParams

__all__ = ["PRIORITY_MAX", "PRIORITY_MIN", "RequestValidator", "finished_without_output"]

PRIORITY_MIN, PRIORITY_MAX = -(2**63), 2**63 - 1  # int64: what every client library and JSON parser round-trips


class RequestValidator:
    """The engine's request checks, with the model facts they need.

    Args:
        tokenizer: the HF tokenizer, or None (``skip_tokenizer_init``: token ids only).
        vocab_size: the model's vocabulary (logits width).
        context_length: most prompt + output tokens per request.
        pool_tokens: the KV pool's size (a prompt must fit it).
        eos_token_ids: stop tokens unless ``ignore_eos``.
        grammar_limits: the per-request structured-output limits.
        schedule_policy: the engine's policy; a non-zero priority needs ``"priority"``.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        context_length: int,
        pool_tokens: int,
        eos_token_ids: frozenset[int],
        grammar_limits: GrammarLimits,
        schedule_policy: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.pool_tokens = pool_tokens
        self.eos_token_ids = eos_token_ids
        self.grammar_limits = grammar_limits
        self.schedule_policy = schedule_policy

    def make(self, prompt: str | list[int], params: Any, rid: str | None, priority: Any = None) -> NewRequest:
        """The queueable request for ``prompt`` (text or token ids).

        Raises:
            InvalidRequestError: anything above is wrong; the message names the field and what is allowed.
        """
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        self._check_needs_tokenizer(prompt, params)
        if isinstance(prompt, str):
            self.check_prompt_text(prompt)  # cheap bounds first: tokenizing 10 MB takes a minute
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = prompt
        self._check_prompt(ids)
        params.verify(self.vocab_size, len(ids))
        self._check_structured(params)
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        return NewRequest(
            rid=rid or uuid.uuid4().hex,
            input_ids=tuple(ids),
            params=params.model_copy(deep=True),  # the scheduler's own: the caller may reuse or change its copy
            stop_token_ids=frozenset(stop_ids),
            max_new_tokens=min(params.max_new_tokens, self.context_length - len(ids)),
            priority=self.check_priority(priority),
        )

    def check_priority(self, priority: Any) -> int:
        """``priority`` as an int (None means 0). A non-zero priority needs ``schedule_policy="priority"``: under
        another policy it would be ignored, so it is refused instead (vLLM refuses it the same way)."""
        if priority is None:
            return 0
        if not is_integer(priority) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise InvalidRequestError(
                f"priority must be an integer in [{PRIORITY_MIN}, {PRIORITY_MAX}] (larger runs first unless the "
                f"engine sets schedule_low_priority_values_first); got {priority!r:.40} ({type(priority).__name__})"
            )
        if priority != 0 and self.schedule_policy != "priority":
            raise InvalidRequestError(
                f"priority={priority} needs schedule_policy='priority'; this engine runs "
                f"schedule_policy={self.schedule_policy!r} (send priority 0 or none, or relaunch with "
                "schedule_policy='priority')"
            )
        return int(priority)

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """Most characters a text prompt can have and still fit: ``(context_length - 1)`` times the longest
        token of the vocabulary (in characters; byte-level tokens count bytes, so the bound holds for any text).

        A longer text is refused before it is tokenized (`check_prompt_text`).
        """
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1) if self.tokenizer is not None else 1
        return (self.context_length - 1) * max(longest, 1)

    def check_prompt_text(self, text: str, field: str = "prompt") -> None:
        """Refuse text that cannot be a prompt of this engine, without tokenizing it.

        Raises:
            InvalidRequestError: ``text`` (named ``field`` in the message) holds a lone surrogate (not Unicode
                text: tokenizers cannot encode it), or is longer than `max_prompt_chars`.
        """
        check_text(text, field)
        if len(text) > self.max_prompt_chars:
            raise InvalidRequestError(
                f"{field} has {len(text)} characters; with context_length {self.context_length} at most "
                f"{self.max_prompt_chars} can fit (context_length - 1 tokens of at most "
                f"{self.max_prompt_chars // max(self.context_length - 1, 1)} characters each)"
            )

    def _check_needs_tokenizer(self, prompt: str | list[int], params: SamplingParams) -> None:
        if self.tokenizer is not None:
            return
        if isinstance(prompt, str):
            raise InvalidRequestError("this engine runs with skip_tokenizer_init: send input_ids, not text")
        if params.stop:
            raise InvalidRequestError("stop strings need a tokenizer; this engine runs with skip_tokenizer_init")

    def _check_prompt(self, ids: list[int]) -> None:
        ctx = self.context_length
        if not ids:
            raise InvalidRequestError("the prompt is empty: at least one token is needed")
        if len(ids) >= ctx:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; context_length is {ctx}, so at most {ctx - 1} prompt tokens fit "
                f"(with room for one new token)"
            )
        if len(ids) >= self.pool_tokens:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the KV pool holds {self.pool_tokens}; "
                f"raise max_total_tokens / mem_fraction_static"
            )
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of range: the vocabulary has ids 0..{self.vocab_size - 1}")

    def _check_structured(self, params: SamplingParams) -> None:
        if params.structured is None:
            return
        if self.tokenizer is None:
            raise InvalidRequestError("structured output needs a tokenizer; this engine runs with skip_tokenizer_init")
        self.grammar_limits.check(params.structured)


def finished_without_output(new: NewRequest) -> StreamChunk:
    """The one chunk of a request with nothing to generate (``max_new_tokens=0``) and no prompt to score: it is
    never queued."""
    return StreamChunk(new.rid, "", finish_reason="length", prompt_tokens=len(new.input_ids),
                       output_logprobs=[] if new.params.wants_output_logprobs else None)
