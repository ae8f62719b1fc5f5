"""The expressions a program appends to its state (``s += ...``): text, generations, selections, role markers.

Expressions are plain values; the executor (``executor.py``) interprets them in order. ``a + b`` of two
expressions (or an expression and a string) is an ``ExprList``, so ``s += "Q: " + gen("a")`` works as in SGLang.
Arguments are checked when an expression is built, so a bad ``gen`` fails at the line that wrote it, before any
model work.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Union

from .choices import ChoicesMethod
from .errors import LangError

# dtype -> the regex its value must match: SGLang's own (sglang/lang/ir.py REGEX_INT, REGEX_FLOAT, REGEX_BOOL,
# REGEX_STR), so a program ported from SGLang is constrained to the same text. That includes their quirks: numbers
# may end in spaces and newlines (`[ \n]*`), and a string holds only word characters and whitespace.
DTYPE_REGEX = {
    "int": r"[-+]?[0-9]+[ \n]*",
    "float": r"[-+]?[0-9]*\.?[0-9]+[ \n]*",
    "bool": r"(True|False)",
    "str": r"\"[\w\d\s]*\"",
}


@dataclass(frozen=True)
class GenParams:
    """Sampling settings of one generation; ``None`` means "take the program's default" (``run(...)``)."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool | None = None
    return_logprob: bool | None = None
    top_logprobs_num: int | None = None
    regex: str | None = None
    json_schema: str | None = None

    def over(self, defaults: GenParams) -> GenParams:
        """These settings, with the unset ones taken from ``defaults``."""
        return replace(defaults, **{f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None})

    def with_stops(self, extra: tuple[str, ...]) -> GenParams:
        """These settings with ``extra`` stop strings added (the chat template's end-of-turn markers)."""
        stops = tuple(self.stop or ())
        return replace(self, stop=stops + tuple(s for s in extra if s not in stops))


def as_stops(stop: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """``stop`` as a tuple of strings (None stays None); a non-string entry is an error."""
    if stop is None:
        return None
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise LangError(f"stop must be a non-empty string or a list of non-empty strings; got {stop!r}")
    return stops


def constraint_regex(dtype: Any, regex: str | None, json_schema: Any) -> tuple[str | None, str | None]:
    """(regex, json_schema text) of a gen's constraint; at most one of dtype, regex, json_schema may be given."""
    given = [name for name, v in (("dtype", dtype), ("regex", regex), ("json_schema", json_schema)) if v is not None]
    if len(given) > 1:
        raise LangError(f"gen takes at most one of dtype, regex, json_schema; got {', '.join(given)}")
    if dtype is not None:
        key = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", None)
        if key not in DTYPE_REGEX:
            raise LangError(f"dtype must be one of int, float, bool, str (or their names); got {dtype!r}")
        return DTYPE_REGEX[key], None
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as e:
            raise LangError(f"regex {regex!r} does not compile: {e}") from None
        return regex, None
    if json_schema is not None:
        if isinstance(json_schema, str):
            try:
                json.loads(json_schema)
            except ValueError as e:
                raise LangError(f"json_schema must be a JSON schema (a dict or its JSON text): {e}") from None
            return None, json_schema
        if isinstance(json_schema, dict):
            return None, json.dumps(json_schema)
        raise LangError(f"json_schema must be a dict or a JSON string; got {type(json_schema).__name__}")
    return None, None


class Expr:
    """Base of every expression; ``+`` concatenates into an ``ExprList``."""

    def __add__(self, other: Any) -> ExprList:
        return ExprList.of(self, other)

    def __radd__(self, other: Any) -> ExprList:
        return ExprList.of(other, self)


def as_expr(value: Any) -> Expr:
    """``value`` as an expression: strings become ``Text``; anything else that is not an ``Expr`` is an error."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise LangError(f"a program state takes strings and sgl expressions (gen, select, ...); got {type(value).__name__}")


@dataclass(eq=False)
class ExprList(Expr):
    items: list[Expr] = field(default_factory=list)

    @classmethod
    def of(cls, *parts: Any) -> ExprList:
        items: list[Expr] = []
        for part in parts:
            expr = as_expr(part)
            items.extend(expr.items if isinstance(expr, ExprList) else [expr])
        return cls(items)


@dataclass(eq=False)
class Text(Expr):
    value: str


@dataclass(eq=False)
class Gen(Expr):
    name: str | None
    params: GenParams


@dataclass(eq=False)
class Select(Expr):
    name: str | None
    choices: list[str]
    method: ChoicesMethod


@dataclass(eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(eq=False)
class RoleEnd(Expr):
    role: str


@dataclass(eq=False)
class VarScopeBegin(Expr):
    name: str


@dataclass(eq=False)
class VarScopeEnd(Expr):
    name: str


@dataclass(eq=False)
class ConcatAndAppend(Expr):
    """Join of forked branches: append each branch's text since the fork, in branch order."""

    states: list[Any]


NamedExpr = Union[Gen, Select, VarScopeBegin]
