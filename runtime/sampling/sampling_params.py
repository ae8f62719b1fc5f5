"""Per-request sampling parameters and their validation.

`SamplingParams` is what a request asks for: how many tokens, how to pick them (temperature, top-k/top-p/min-p,
penalties, seed), when to stop (stop strings, stop token ids, EOS) and, optionally, one structured-output
constraint, ``structured`` (a `GrammarSpec`: JSON schema, regex, EBNF or a list of choices; enforcing it is the
grammar backend's job). For convenience the constraint may be given as one of the keyword arguments
``json_schema=``, ``regex=``, ``ebnf=``, ``choices=``: it is turned into ``structured`` right there, once
(`GrammarSpec.from_fields`), and nothing reads those arguments afterwards. Size limits are the engine's: it checks
``structured`` against its own `GrammarLimits` when the request arrives.

Every field is validated at construction (and on assignment). A bad value raises `InvalidRequestError` whose
message names the field, the value that was sent and what is allowed, so the plugin can return it verbatim as a
400. Unknown fields are an error too: nothing a user sends is silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..constrained.spec import GrammarSpec, choices_from_lark
from ..errors import InvalidRequestError, brief

MAX_STOP_STRINGS = 16
"""Most stop strings one request may give (each is matched against every text delta)."""

MAX_STOP_CHARS = 1000
"""Longest stop string. Text that may still become one is held back and searched again with every delta on the
scheduler's thread: this bounds that work (~3 ms for a delta at the bound, 77 ms at 40,000 characters)."""

MAX_LOGIT_BIAS = 300
"""Most ``logit_bias`` entries one request may give (OpenAI's limit)."""

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are treated as greedy: dividing logits by them overflows float32 for no gain."""

SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1
"""Seed range accepted by `torch.Generator.manual_seed` (negative seeds are folded into the unsigned range)."""

MAX_N = 128
"""Most sequences one request may ask for (`n`; OpenAI's limit). The engine also bounds it by its running-request
limit, so that the n sequences decode together."""

MAX_TOP_LOGPROBS = 20
"""Most alternatives `top_logprobs` may ask for per position (OpenAI's limit)."""

STRUCTURED_FIELDS = ("json_schema", "regex", "ebnf", "choices")
"""Keyword arguments that build ``structured``; at most one may be given per request."""

# Read-only: what each field accepts, in words. One source for the messages of range checks and of type errors.
_ALLOWED = MappingProxyType(
    {
        "max_new_tokens": "an integer >= 0",
        "min_new_tokens": "an integer with 0 <= min_new_tokens <= max_new_tokens",
        "temperature": "a number >= 0 (0 means greedy)",
        "top_p": "a number in (0, 1] (1 disables it)",
        "top_k": "-1 or 0 (disabled) or an integer >= 1",
        "min_p": "a number in [0, 1] (0 disables it)",
        "frequency_penalty": "a number in [-2, 2]",
        "presence_penalty": "a number in [-2, 2]",
        "repetition_penalty": "a number > 0 (1 disables it)",
        "stop": f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
        f"{MAX_STOP_CHARS} characters each",
        "stop_token_ids": "a list of token ids >= 0 (and below the vocabulary size)",
        "ignore_eos": "true or false",
        "seed": f"an integer in [{SEED_MIN}, {SEED_MAX}]",
        "skip_special_tokens": "true or false",
        "logit_bias": f"a map of at most {MAX_LOGIT_BIAS} token ids (>= 0, below the vocabulary size) to a bias in "
        "[-100, 100]",
        "structured": "a GrammarSpec (or give one of json_schema, regex, ebnf, choices)",
        "n": f"an integer in [1, {MAX_N}] (and at most the engine's max_running_requests)",
        "logprobs": "true or false",
        "top_logprobs": f"an integer in [0, {MAX_TOP_LOGPROBS}]",
        "prompt_logprobs_start": "None or an integer >= 0 (a prompt position below the prompt's length)",
    }
)


# field -> the values it accepts (the words for each are in _ALLOWED)
_IN_RANGE: dict[str, Any] = {
    "max_new_tokens": lambda v: v >= 0,
    "min_new_tokens": lambda v: v >= 0,
    "temperature": lambda v: v >= 0,
    "top_p": lambda v: 0 < v <= 1,
    "top_k": lambda v: v >= -1,
    "min_p": lambda v: 0 <= v <= 1,
    "frequency_penalty": lambda v: -2 <= v <= 2,
    "presence_penalty": lambda v: -2 <= v <= 2,
    "repetition_penalty": lambda v: v > 0,
    "n": lambda v: 1 <= v <= MAX_N,
    "top_logprobs": lambda v: 0 <= v <= MAX_TOP_LOGPROBS,
    "prompt_logprobs_start": lambda v: v is None or v >= 0,
}


def _invalid(field: str, value: Any) -> ValueError:
    """The error for `field` = `value` being out of range; pydantic wraps it, `_format_errors` unwraps it."""
    return ValueError(f"{field} must be {_ALLOWED[field]}; got {brief(value)}")


def _bound_stop(v: Any) -> Any:
    """``v`` unchanged when its count and lengths are within bounds (other problems are pydantic's to word)."""
    stops = [v] if isinstance(v, str) else v if isinstance(v, (list, tuple)) else None
    if stops is None:
        return v  # None, or a wrong type
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"stop must be {_ALLOWED['stop']}; got {len(stops)} strings: {brief(stops)}")
    too_long = next((s for s in stops if isinstance(s, str) and len(s) > MAX_STOP_CHARS), None)
    if too_long is not None:
        raise ValueError(f"stop strings may be at most {MAX_STOP_CHARS} characters each (longer ones make matching "
                         f"the text slow); got one of {len(too_long)} characters: {brief(too_long)}")
    return v


def _bound_logit_bias(v: Any) -> Any:
    """``v`` unchanged unless it is a map of more than `MAX_LOGIT_BIAS` entries."""
    if isinstance(v, Mapping) and len(v) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries (OpenAI's limit); got {len(v)}")
    return v


# field -> its size check, run before pydantic parses the value (read-only)
_SIZE_BOUNDS = MappingProxyType({"stop": _bound_stop, "logit_bias": _bound_logit_bias})


class SamplingParams(BaseModel):
    """How one request is sampled and when it stops.

    Log probabilities (``logprobs``, ``top_logprobs``, ``prompt_logprobs_start``; returned as
    ``outputs.TokenLogprob``): an output token's logprob is taken from the distribution it was sampled from, the
    log-softmax of the logits after the grammar mask, the logit bias, the penalties and the ``min_new_tokens`` ban,
    divided by the temperature (greedy: by 1), before top-k / top-p / min-p filtering (SGLang's choice; vLLM's
    default is the raw model output). A prompt token's logprob is the log-softmax of the raw model logits at the
    position before it: nothing is sampled there, so no sampling parameter applies.

    Normalisation done at construction: `stop` is always a list of strings, `stop_token_ids` always a list of
    ints (both possibly empty), `top_k` 0 becomes -1 (both mean disabled), and a `json_schema` / `regex` /
    `ebnf` / `choices` keyword argument becomes `structured`.

    Raises:
        InvalidRequestError: a field is out of range, has the wrong type, is unknown, more than one of
            `structured`, `json_schema`, `regex`, `ebnf`, `choices` is given, or the one given is malformed.
    """

    # validate_default: the normalising validators (stop, stop_token_ids) must also run on the defaults.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False)

    max_new_tokens: int = 128
    """Most tokens to generate (the engine may lower it to fit the context length)."""
    min_new_tokens: int = 0
    """EOS and stop token ids are banned until this many tokens were generated."""
    temperature: float = 1.0
    """Softmax temperature; 0 (or below `GREEDY_TEMPERATURE`) is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability sum reaches top_p."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 (or 0) disables it."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's probability."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per occurrence in the output so far (OpenAI semantics)."""
    presence_penalty: float = 0.0
    """Subtracted from a token's logit if it occurs in the output so far (OpenAI semantics)."""
    repetition_penalty: float = 1.0
    """HF semantics over prompt + output tokens: positive logits are divided by it, others multiplied."""
    stop: list[str] | str | None = None
    """Stop strings; the output ends before the first one and never contains it. Always a list after validation."""
    stop_token_ids: list[int] | None = None
    """Token ids that end the output (like EOS, the token itself is not shown). Always a list after validation."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks); stop strings and stop_token_ids still apply."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else shares the batch."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the returned text."""
    logit_bias: dict[int, float] | None = None
    """OpenAI's logit_bias: added to the token's logit before sampling (-100 bans it, +100 all but forces it)."""
    structured: GrammarSpec | None = None
    """The structured-output constraint the output must match (built from ``json_schema=`` / ``regex=`` /
    ``ebnf=`` / ``choices=`` when one of those is given instead)."""
    n: int = 1
    """Sequences to sample from the prompt (parallel sampling, runtime/sampling/parallel_sampling.py): the prompt is computed
    once and shared through the prefix cache; with a seed each sequence has its own seed stream derived from it.
    The engine returns or streams all n, each with its ``index``."""
    logprobs: bool = False
    """Return each output token's logprob (``GenerateOutput.output_logprobs``, aligned with ``token_ids``)."""
    top_logprobs: int = 0
    """Also return the ``top_logprobs`` most likely tokens at each returned position (0..20); > 0 implies
    ``logprobs``. With ``prompt_logprobs_start`` the prompt positions get them too."""
    prompt_logprobs_start: int | None = None
    """Return the logprob of every prompt token at positions >= this one, each conditioned on the tokens before
    it (``GenerateOutput.prompt_logprobs``, starting at position ``max(start, 1)``: position 0 has no context).
    Tokens before the start may come from the prefix cache; from the start on they are recomputed. Must be below
    the prompt's length. With ``max_new_tokens=0`` the prompt is only scored (no tokens, finish_reason
    ``"length"``)."""

    def __init__(self, **data: Any) -> None:
        """Validate keyword arguments; see the class docstring for what raises."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidRequestError(_format_errors(exc)) from exc

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> SamplingParams:
        """Validate a mapping (e.g. a request body) into `SamplingParams`, raising `InvalidRequestError`."""
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise InvalidRequestError(_format_errors(exc)) from exc

    def __setattr__(self, name: str, value: Any) -> None:
        # Assignment is validated too (validate_assignment); keep the error type the same as at construction.
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise InvalidRequestError(_format_errors(exc)) from exc

    @model_validator(mode="before")
    @classmethod
    def _build_structured(cls, data: Any) -> Any:
        # The one place the loose structured-output arguments are read: they become `structured` here.
        if not isinstance(data, dict) or not any(name in data for name in STRUCTURED_FIELDS):
            return data
        data = dict(data)
        loose = {name: data.pop(name) for name in STRUCTURED_FIELDS if name in data}
        spec = GrammarSpec.from_fields(**loose, limits=None)  # the engine checks its own limits
        if spec is not None:
            if data.get("structured") is not None:
                raise ValueError(
                    f"at most one of structured, {', '.join(STRUCTURED_FIELDS)} may be set (one structured-output "
                    f"constraint per request); got structured, {', '.join(n for n, v in loose.items() if v is not None)}"
                )
            data["structured"] = spec
        return data

    @field_validator(
        "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
        "presence_penalty", "repetition_penalty", "seed", "n", "top_logprobs", "prompt_logprobs_start", mode="before",
    )
    @classmethod
    def _reject_bool(cls, v: Any, info: Any) -> Any:
        # pydantic's lax mode reads True as 1; a boolean where a number is expected is a client bug, not a value.
        if isinstance(v, bool):
            raise _invalid(info.field_name, v)
        return v

    @field_validator(*_IN_RANGE)
    @classmethod
    def _check_range(cls, v: Any, info: Any) -> Any:
        if not _IN_RANGE[info.field_name](v):
            raise _invalid(info.field_name, v)
        return -1 if info.field_name == "top_k" and v == 0 else v  # top_k 0 means disabled, like -1

    @field_validator("stop", "logit_bias", mode="before")
    @classmethod
    def _bound_size(cls, v: Any, info: Any) -> Any:
        # Before pydantic parses each entry: a million stop strings or a vocabulary of biases is refused by size.
        return _SIZE_BOUNDS[info.field_name](v)

    @field_validator("stop")
    @classmethod
    def _normalise_stop(cls, v: list[str] | str | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else list(v)
        if any(s == "" for s in stops):
            raise _invalid("stop", v)
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _normalise_stop_token_ids(cls, v: list[int] | None) -> list[int]:
        ids = [] if v is None else list(v)
        if any(i < 0 for i in ids):
            raise _invalid("stop_token_ids", v)
        return ids

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v is not None and any(t < 0 or not -100 <= b <= 100 or b != b for t, b in v.items()):
            raise _invalid("logit_bias", v)
        return v or None

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, v: int | None) -> int | None:
        if v is not None and not SEED_MIN <= v <= SEED_MAX:
            raise _invalid("seed", v)
        return v

    @model_validator(mode="after")
    def _check_cross_field(self) -> SamplingParams:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be {_ALLOWED['min_new_tokens']}; "
                f"got min_new_tokens={self.min_new_tokens}, max_new_tokens={self.max_new_tokens}"
            )
        if self.n > 1 and self.max_new_tokens == 0:
            raise ValueError(
                f"n={self.n} needs max_new_tokens >= 1 (n sequences of no tokens would all be the same); "
                "send n=1 to only score the prompt"
            )
        return self

    @property
    def is_greedy(self) -> bool:
        """Whether tokens are picked by argmax (temperature 0 or too small to divide by)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def wants_output_logprobs(self) -> bool:
        """Whether each output token's logprob is returned (``logprobs``, or ``top_logprobs`` > 0)."""
        return self.logprobs or self.top_logprobs > 0

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt tokens are scored (``prompt_logprobs_start`` is set)."""
        return self.prompt_logprobs_start is not None

    @property
    def structured_output(self) -> str | None:
        """The kind of the structured-output constraint (`json_schema`, `regex`, `ebnf`, `choices`), or None."""
        return self.structured.kind if self.structured is not None else None

    # Read-only views of `structured` in the terms of the keyword arguments (what a caller gave, read back); the
    # runtime reads `structured` itself.

    @property
    def json_schema(self) -> str | None:
        """The JSON schema of `structured`, as canonical JSON text, or None."""
        return self._structured_text("json_schema")

    @property
    def regex(self) -> str | None:
        """The regular expression of `structured`, or None."""
        return self._structured_text("regex")

    @property
    def ebnf(self) -> str | None:
        """The grammar of `structured`, or None."""
        return self._structured_text("ebnf")

    @property
    def choices(self) -> list[str] | None:
        """The distinct strings of `structured`, in order, or None."""
        text = self._structured_text("choices")
        return None if text is None else choices_from_lark(text)

    def _structured_text(self, kind: str) -> str | None:
        return self.structured.text if self.structured is not None and self.structured.kind == kind else None

    def verify(self, vocab_size: int, prompt_len: int | None = None) -> None:
        """Check the fields that depend on the model and the prompt: every stop token id and logit_bias key must
        be in [0, vocab_size), ``prompt_logprobs_start`` below ``prompt_len`` (when given).

        Raises:
            InvalidRequestError: a token id is outside the model's vocabulary, or the start is past the prompt.
        """
        start = self.prompt_logprobs_start
        if start is not None and prompt_len is not None and start >= prompt_len:
            raise InvalidRequestError(
                f"prompt_logprobs_start must be a prompt position in [0, {prompt_len - 1}] for this "
                f"{prompt_len}-token prompt; got {start}"
            )
        bad_bias = [t for t in self.logit_bias or {} if not 0 <= t < vocab_size]
        if bad_bias:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids in [0, {vocab_size}) for this model's vocabulary; got {bad_bias[0]!r}"
            )
        bad = [i for i in self.stop_token_ids or [] if not 0 <= i < vocab_size]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids must be token ids in [0, {vocab_size}) for this model's vocabulary; "
                f"got {bad[0]!r}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            )


def _format_errors(exc: ValidationError) -> str:
    """One readable line per pydantic error, each naming the field, the value and what is allowed."""
    return "; ".join(_format_error(err) for err in exc.errors())


def _format_error(err: Any) -> str:
    field = str(err["loc"][0]) if err["loc"] else ""
    if err["type"] == "extra_forbidden":
        allowed = [*SamplingParams.model_fields, *STRUCTURED_FIELDS]
        return f"unknown sampling parameter {brief(field)}; allowed: {', '.join(allowed)}"
    if err["type"] == "value_error":
        # Our own validators already wrote the full message; pydantic only prefixed "Value error, ".
        return str(err["ctx"]["error"])
    allowed = _ALLOWED.get(field)
    detail = err["msg"][0].lower() + err["msg"][1:]
    if allowed is None:
        return f"{brief(field)}: {detail}; got {brief(err.get('input'))}"
    return f"{field} must be {allowed}; got {brief(err.get('input'))} ({detail})"
