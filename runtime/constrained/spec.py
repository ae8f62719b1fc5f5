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

Built once, where the fields come in (`SamplingParams` converts its loose keyword arguments with it): the field is
checked for type and shape, parsed once into canonical text and measured (`GrammarSize`). Size limits are the
engine's (`GrammarLimits`, runtime/constrained/limits.py): ``from_fields`` applies the default ones unless told
``limits=None``, and the engine checks every request against its own before compiling. Every walk over a schema
is iterative: a schema nested thousands deep is refused, never a ``RecursionError``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ..errors import InvalidRequestError
from .limits import (
    DEFAULT_LIMITS,
    MAX_GRAMMAR_TEXT_CHARS,
    REPETITION_CAP,
    GrammarLimits,
    GrammarSize,
    check_text,
    regex_repetition,
)

GrammarKind = Literal["json_schema", "regex", "ebnf", "choices"]
GRAMMAR_KINDS: tuple[str, ...] = get_args(GrammarKind)


@dataclass(frozen=True)
class GrammarSpec:
    """One structured-output constraint: ``kind`` and its canonical ``text`` (see the module docstring), and its
    ``size`` as measured when it was built (not part of equality: the text determines it).

    Build it with `from_fields` (request input, validated) or directly when ``text`` is already canonical
    (tests, internal callers); the constructor only checks that ``kind`` is known and ``text`` is a string.
    """

    kind: GrammarKind
    text: str
    size: GrammarSize | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(GRAMMAR_KINDS)}")
        if not isinstance(self.text, str):
            raise TypeError(f"GrammarSpec.text must be a str, got {type(self.text).__name__}")

    @property
    def cache_key(self) -> tuple[str, str]:
        """The compile-cache key: ``(kind, text)``."""
        return (self.kind, self.text)

    def measured_size(self) -> GrammarSize:
        """``size``, or for a spec built directly from its text, the size measured from that text now.

        Raises:
            InvalidRequestError: a ``json_schema`` text that is not JSON, or a ``choices`` text that is not what
                `choices_to_lark` writes.
        """
        if self.size is not None:
            return self.size
        if self.kind == "json_schema":
            return _json_schema_spec(self.text).measured_size()
        if self.kind == "choices":
            return GrammarSize(choices=len(choices_from_lark(self.text)))
        return GrammarSize()

    @classmethod
    def from_fields(
        cls,
        *,
        json_schema: str | Mapping[str, Any] | None = None,
        regex: str | None = None,
        ebnf: str | None = None,
        choices: Sequence[str] | None = None,
        limits: GrammarLimits | None = DEFAULT_LIMITS,
    ) -> GrammarSpec | None:
        """The spec for the one structured-output field that is set, or None when none is.

        ``limits``: checked at once (`GrammarLimits.check`); None leaves them to the caller (the engine checks
        its own limits when the request arrives).

        Raises:
            InvalidRequestError: more than one field is set, the set field has the wrong type or shape (not
                JSON, not an object, empty, non-string choices, ...), or it exceeds one of ``limits`` (the
                message names the limit and the value). Whether a grammar *compiles* is checked later by the
                backend.
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
        [(kind, value)] = given.items()
        spec = _BUILDERS[kind](value)
        if limits is not None:
            limits.check(spec)
        return spec

    def describe(self, max_chars: int = 60) -> str:
        """A short, log- and client-safe name of this grammar: kind, size, a hash and the start of its text."""
        digest = hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        excerpt = self.text if len(self.text) <= max_chars else self.text[: max_chars - 3] + "..."
        return f"{self.kind} #{digest} ({len(self.text)} chars: {excerpt!r})"


def _json_schema_spec(schema: Any) -> GrammarSpec:
    """The schema as canonical JSON text (key order kept: it orders the output; compact separators; non-ASCII
    kept as is), measured. A schema too deep for Python's JSON reader or writer gets no text and an unknown depth,
    which every limit refuses.

    Raises:
        InvalidRequestError: not valid JSON, not a JSON object, contains NaN/Infinity or uses ``x-guidance``.
    """
    too_deep = GrammarSpec("json_schema", "", GrammarSize(schema_depth=None))
    if isinstance(schema, str):
        try:
            value = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"json_schema is not valid JSON: {exc}") from None
        except RecursionError:
            return too_deep
    elif isinstance(schema, Mapping):
        value = schema
    else:
        raise InvalidRequestError(
            f"json_schema must be a JSON schema object, given as a JSON string or a dict; got {type(schema).__name__}"
        )
    if not isinstance(value, Mapping):
        raise InvalidRequestError(
            f"json_schema must be a JSON object (e.g. {{\"type\": \"object\"}}); "
            f"got {type(value).__name__} {value!r:.80}"
        )
    if "x-guidance" in value:
        raise InvalidRequestError(
            "json_schema must not contain 'x-guidance': the JSON output format (compact, strictly enforced) "
            "is fixed by the server"
        )
    size = measure_schema(value)
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and a bound of NaN would mean nothing.
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        return too_deep
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"json_schema is not JSON-serialisable: {exc}") from None
    return GrammarSpec("json_schema", text, size)


def measure_schema(schema: Any) -> GrammarSize:
    """Depth, properties and the largest ``pattern`` repetition of a parsed JSON schema, in one iterative walk."""
    depth = properties = 0
    repetition = 1
    for level, key, node in _walk(schema):
        depth = max(depth, level)
        if not isinstance(node, Mapping):
            continue
        props = node.get("properties")
        if key != "properties" and isinstance(props, Mapping):
            properties += len(props)
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            repetition = max(repetition, regex_repetition(pattern, cap=REPETITION_CAP))
    return GrammarSize(schema_depth=depth, schema_properties=properties, schema_repetition=repetition)


def _walk(value: Any) -> Iterator[tuple[int, str | None, Any]]:
    """``(depth, key it sits under, node)`` for every object and array in ``value``, depth first, iteratively."""
    stack: list[tuple[int, str | None, Any]] = [(1, None, value)]
    while stack:
        depth, key, node = stack.pop()
        yield depth, key, node
        if isinstance(node, Mapping):
            children: Any = ((k, v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            children = ((None, v) for v in node)
        else:
            continue
        stack.extend((depth + 1, k, v) for k, v in children if isinstance(v, (Mapping, list, tuple)))


def _choices_spec(choices: Any) -> GrammarSpec:
    """The ``choices`` spec: its Lark grammar, measured by its number of distinct strings.

    Raises:
        InvalidRequestError: not a list of strings, empty, containing an empty string or a lone surrogate.
    """
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise InvalidRequestError(f"choices must be a non-empty list of strings; got {type(choices).__name__}")
    if not choices:
        raise InvalidRequestError("choices must be a non-empty list of strings; got []")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise InvalidRequestError(f"choices must be a list of strings; choices[{i}] is {type(choice).__name__}")
        if not choice:
            raise InvalidRequestError(f"choices must be non-empty strings; choices[{i}] is empty")
        check_text(choice, f"choices[{i}]")
    unique = list(dict.fromkeys(choices))  # duplicates dropped, so equal requests share one cache entry
    return GrammarSpec("choices", choices_to_lark(unique), GrammarSize(choices=len(unique)))


def choices_to_lark(choices: Sequence[str]) -> str:
    """A Lark grammar whose language is exactly the given (distinct, non-empty) strings: ``start: "a" | "b"``."""
    # llguidance reads Lark string literals as JSON strings. ASCII-only escaping: a raw DEL (and maybe other
    # controls) is a lexer error there, while \uXXXX escapes, surrogate pairs included, always read back.
    return _CHOICES_START + _CHOICES_SEPARATOR.join(json.dumps(c, ensure_ascii=True) for c in choices)


def choices_from_lark(text: str) -> list[str]:
    """The strings of a `choices_to_lark` grammar, in order (its inverse).

    Raises:
        InvalidRequestError: ``text`` is not what `choices_to_lark` writes.
    """
    decoder, strings, i = json.JSONDecoder(), [], len(_CHOICES_START)
    try:
        if not text.startswith(_CHOICES_START):
            raise ValueError(f"it does not start with {_CHOICES_START!r}")
        while True:
            value, i = decoder.raw_decode(text, i)
            strings.append(value)
            if i == len(text):
                return strings
            if not text.startswith(_CHOICES_SEPARATOR, i):
                raise ValueError(f"expected {_CHOICES_SEPARATOR!r} at {i}")
            i += len(_CHOICES_SEPARATOR)
    except ValueError as exc:
        raise InvalidRequestError(f"a choices spec must hold the grammar choices_to_lark writes: {exc}") from None


_CHOICES_START, _CHOICES_SEPARATOR = "start: ", " | "


def _non_empty_str(field: str, value: Any, allowed: str) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = f"{type(value).__name__}" if not isinstance(value, str) else repr(value)
        raise InvalidRequestError(f"{field} must be {allowed}; got {shown}")
    return value


_BUILDERS = {
    "json_schema": _json_schema_spec,
    "regex": lambda v: GrammarSpec("regex", _non_empty_str("regex", v, "a non-empty regular expression string")),
    "ebnf": lambda v: GrammarSpec("ebnf", _non_empty_str("ebnf", v, "a non-empty Lark or GBNF grammar string")),
    "choices": _choices_spec,
}

__all__ = [
    "DEFAULT_LIMITS",
    "GRAMMAR_KINDS",
    "GrammarKind",
    "GrammarLimits",
    "GrammarSize",
    "GrammarSpec",
    "MAX_GRAMMAR_TEXT_CHARS",
    "check_text",
    "choices_from_lark",
    "choices_to_lark",
    "measure_schema",
    "regex_repetition",
]
