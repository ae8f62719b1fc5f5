"""What a request asks its output to match: `GrammarSpec`, built from the four structured-output fields.

A `GrammarSpec` is the backend-independent, hashable description of one constraint. Its ``(kind, text)`` pair is
the compile-cache key, so ``text`` is canonical: a JSON schema is re-serialised with compact separators, so its
spacing and whether it came as text or as a dict do not matter. Key order is kept on purpose: the output lists
an object's properties in the order of the schema's ``properties`` (models are often asked for a "reasoning"
field before an "answer" one), so two schemas that differ only in key order are different constraints.

Accepted inputs (`GrammarSpec.from_fields`, at most one of them):

- ``json_schema``: a JSON schema as a JSON string or a dict; ``{"type": "object"}`` is OpenAI's ``json_object``.
  The schema's top level must be a JSON object. ``x-guidance`` (llguidance's per-schema options) is rejected:
  the output format (compact JSON, strict enforcement) is fixed by the runtime, not by the request.
- ``regex``: a regular expression in the Rust ``regex`` crate syntax (as in llguidance): Perl-style classes,
  ``\\p{...}`` Unicode classes, bounded repeats; no look-around and no back-references. ``\\d`` means ASCII
  ``[0-9]`` (as in JSON Schema); ``\\w`` and ``\\s`` are Unicode-aware. The whole output must match (the pattern
  is anchored at both ends; ``^``/``$`` are allowed but redundant).
- ``ebnf``: a context-free grammar, in one of two dialects told apart by the rule separator:

  * Lark, llguidance's dialect (``start: item+`` / ``ITEM: /[a-z]+/``; the start rule is ``start``; string
    literals ``"..."``, regex terminals ``/.../``, ``| ? * + {m,n}``, ``%ignore``, ``%import common.X``,
    inline ``%json {...}`` schemas). See llguidance's docs/syntax.md.
  * GBNF as used by llama.cpp and SGLang's xgrammar (``root ::= "[" item ("," item)* "]"``, the start rule is
    ``root``, character classes ``[a-z]``, ``# comments``). Translated to Lark by the backend.

- ``choices``: a non-empty list of non-empty strings; the output is exactly one of them. Turned here into a Lark
  grammar ``start: "a" | "b"`` (kind ``choices``, compiled like an ``ebnf`` spec).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..errors import InvalidRequestError

GrammarKind = Literal["json_schema", "regex", "ebnf", "choices"]
GRAMMAR_KINDS: tuple[str, ...] = get_args(GrammarKind)

MAX_GRAMMAR_TEXT_CHARS = 1_000_000
"""Longest canonical grammar text accepted; larger specs are refused before any compile work starts."""


@dataclass(frozen=True)
class GrammarSpec:
    """One structured-output constraint: ``kind`` and its canonical ``text`` (see the module docstring).

    Build it with `from_fields` (request input, validated) or directly when ``text`` is already canonical
    (tests, internal callers); the constructor only checks that ``kind`` is known and ``text`` is a string.
    """

    kind: GrammarKind
    text: str

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(GRAMMAR_KINDS)}")
        if not isinstance(self.text, str):
            raise TypeError(f"GrammarSpec.text must be a str, got {type(self.text).__name__}")

    @property
    def cache_key(self) -> tuple[str, str]:
        """The compile-cache key: ``(kind, text)``."""
        return (self.kind, self.text)

    @classmethod
    def from_fields(
        cls,
        *,
        json_schema: str | Mapping[str, Any] | None = None,
        regex: str | None = None,
        ebnf: str | None = None,
        choices: Sequence[str] | None = None,
    ) -> GrammarSpec | None:
        """The spec for the one structured-output field that is set, or None when none is.

        Raises:
            InvalidRequestError: more than one field is set, or the set field has the wrong type or shape
                (not JSON, not an object, empty, non-string choices, ...). Whether a grammar *compiles* is
                checked later by the backend.
        """
        given = {
            name: value
            for name, value in (("json_schema", json_schema), ("regex", regex), ("ebnf", ebnf), ("choices", choices))
            if value is not None
        }
        if len(given) > 1:
            raise InvalidRequestError(
                f"at most one of json_schema, regex, ebnf, choices may be set (one structured-output constraint "
                f"per request); got {', '.join(given)}"
            )
        if not given:
            return None
        if json_schema is not None:
            spec = cls("json_schema", canonical_json_schema(json_schema))
        elif regex is not None:
            spec = cls("regex", _non_empty_str("regex", regex, "a non-empty regular expression string"))
        elif ebnf is not None:
            spec = cls("ebnf", _non_empty_str("ebnf", ebnf, "a non-empty Lark or GBNF grammar string"))
        else:
            assert choices is not None
            spec = cls("choices", choices_to_lark(choices))
        if len(spec.text) > MAX_GRAMMAR_TEXT_CHARS:
            raise InvalidRequestError(
                f"{spec.kind} is too large: {len(spec.text)} characters, at most {MAX_GRAMMAR_TEXT_CHARS} allowed"
            )
        return spec


def canonical_json_schema(schema: str | Mapping[str, Any]) -> str:
    """The schema as canonical JSON text: key order kept (it orders the output), compact separators, non-ASCII
    kept as is.

    Raises:
        InvalidRequestError: not valid JSON, not a JSON object, contains NaN/Infinity, or uses ``x-guidance``.
    """
    if isinstance(schema, str):
        try:
            value = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"json_schema is not valid JSON: {exc}") from None
    elif isinstance(schema, Mapping):
        value = schema
    else:
        raise InvalidRequestError(
            f"json_schema must be a JSON schema object, given as a JSON string or a dict; got {type(schema).__name__}"
        )
    if not isinstance(value, Mapping):
        raise InvalidRequestError(
            f"json_schema must be a JSON object (e.g. {{\"type\": \"object\"}}); got {type(value).__name__} {value!r:.80}"
        )
    if "x-guidance" in value:
        raise InvalidRequestError(
            "json_schema must not contain 'x-guidance': the JSON output format (compact, strictly enforced) "
            "is fixed by the server"
        )
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and a bound of NaN would mean nothing.
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"json_schema is not JSON-serialisable: {exc}") from None


def choices_to_lark(choices: Sequence[str]) -> str:
    """A Lark grammar whose language is exactly the given strings: ``start: "a" | "b"``.

    Duplicates are dropped (first occurrence kept) so equal requests share one cache entry.

    Raises:
        InvalidRequestError: not a list of strings, empty, or containing an empty string.
    """
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise InvalidRequestError(f"choices must be a non-empty list of strings; got {type(choices).__name__}")
    if not choices:
        raise InvalidRequestError("choices must be a non-empty list of strings; got an empty list")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise InvalidRequestError(f"choices must be a list of strings; choices[{i}] is {type(choice).__name__}")
        if not choice:
            raise InvalidRequestError(f"choices must be non-empty strings; choices[{i}] is empty")
    unique = list(dict.fromkeys(choices))
    # llguidance reads Lark string literals as JSON strings. ASCII-only escaping: a raw DEL (and maybe other
    # controls) is a lexer error there, while \uXXXX escapes, surrogate pairs included, always read back.
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=True) for c in unique)


def _non_empty_str(field: str, value: Any, allowed: str) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = f"{type(value).__name__}" if not isinstance(value, str) else repr(value)
        raise InvalidRequestError(f"{field} must be {allowed}; got {shown}")
    return value


__all__ = [
    "GRAMMAR_KINDS",
    "GrammarKind",
    "GrammarSpec",
    "MAX_GRAMMAR_TEXT_CHARS",
    "canonical_json_schema",
    "choices_to_lark",
]
