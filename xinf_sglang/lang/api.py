"""The expression builders of the language: ``gen``, ``gen_int``, ``gen_string``, ``select`` and the roles."""

from __future__ import annotations

from typing import Any

from .choices import ChoicesMethod, token_length_normalized
from .errors import LangError
from .ir import ExprList, Gen, GenParams, RoleBegin, RoleEnd, Select, as_stops, constraint_regex


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    top_logprobs_num: int | None = None,
    dtype: Any = None,
    choices: list[str] | None = None,
    choices_method: ChoicesMethod | None = None,
    regex: str | None = None,
    json_schema: str | dict | None = None,
) -> Gen | Select:
    """Generate text into variable ``name``. Unset settings take the program's (``run(...)``) defaults.

    At most one constraint: ``regex``, ``json_schema`` (a dict or its JSON text), or ``dtype`` (``int``,
    ``float``, ``bool``, ``str`` or their names, each a regex). ``choices`` makes it a ``select``.
    """
    if choices is not None:
        return select(name, choices, temperature=temperature or 0.0,
                      choices_method=choices_method or token_length_normalized)
    if choices_method is not None:
        raise LangError("choices_method needs choices")
    if name is not None and not isinstance(name, str):
        raise LangError(f"a gen's name must be a string; got {type(name).__name__}")
    regex_text, schema_text = constraint_regex(dtype, regex, json_schema)
    return Gen(name, GenParams(
        max_new_tokens=max_tokens, min_new_tokens=min_tokens, stop=as_stops(stop),
        stop_token_ids=None if stop_token_ids is None else tuple(stop_token_ids), temperature=temperature,
        top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
        top_logprobs_num=top_logprobs_num, regex=regex_text, json_schema=schema_text,
    ))


def gen_int(name: str | None = None, **kwargs: Any) -> Gen:
    """``gen(name, dtype=int, ...)``: an integer."""
    return gen(name, dtype=int, **kwargs)


def gen_string(name: str | None = None, **kwargs: Any) -> Gen:
    """``gen(name, dtype=str, ...)``: a double-quoted string."""
    return gen(name, dtype=str, **kwargs)


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesMethod = token_length_normalized,
) -> Select:
    """Append the choice the model scores best (``choices_method``) and store it as ``name``; its scores are
    in ``get_meta_info(name)``."""
    if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise LangError(f"select takes a non-empty list of non-empty strings as choices; got {choices!r}")
    if len(set(choices)) != len(choices):
        raise LangError(f"select's choices must be distinct; got {list(choices)!r}")
    if temperature:
        raise LangError(f"select scores every choice and takes the best: temperature must be 0; got {temperature!r}")
    if not isinstance(choices_method, ChoicesMethod):
        raise LangError(
            "choices_method must be sgl.token_length_normalized, sgl.greedy_token_selection or "
            f"sgl.unconditional_likelihood_normalized; got {choices_method!r}"
        )
    return Select(name, list(choices), choices_method)


def _role(role: str, expr: Any = None) -> ExprList:
    return ExprList.of(RoleBegin(role), *([] if expr is None else [expr]), RoleEnd(role))


def system(expr: Any = None) -> ExprList:
    """A system message holding ``expr``."""
    return _role("system", expr)


def user(expr: Any = None) -> ExprList:
    """A user message holding ``expr``."""
    return _role("user", expr)


def assistant(expr: Any = None) -> ExprList:
    """An assistant message holding ``expr`` (typically a ``gen``)."""
    return _role("assistant", expr)


def system_begin() -> RoleBegin:
    return RoleBegin("system")


def system_end() -> RoleEnd:
    return RoleEnd("system")


def user_begin() -> RoleBegin:
    return RoleBegin("user")


def user_end() -> RoleEnd:
    return RoleEnd("user")


def assistant_begin() -> RoleBegin:
    return RoleBegin("assistant")


def assistant_end() -> RoleEnd:
    return RoleEnd("assistant")
