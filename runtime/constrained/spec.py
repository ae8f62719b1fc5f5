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

Size limits (`GrammarLimits`, engine options ``grammar_max_*``) are checked here, before any compile work, so a
grammar that would take the compiler minutes (or fail at the first token) is refused at once with an error naming
the limit and the value: canonical text length, JSON-schema bytes, properties and nesting depth, number of
choices, and the largest repetition count of a regex (``a{1000}{1000}`` repeats ``a`` a million times). Every
walk over a schema is iterative: a schema nested thousands deep is an error, never a ``RecursionError``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..errors import InvalidRequestError

GrammarKind = Literal["json_schema", "regex", "ebnf", "choices"]
GRAMMAR_KINDS: tuple[str, ...] = get_args(GrammarKind)

MAX_GRAMMAR_TEXT_CHARS = 1_000_000
"""Longest canonical grammar text accepted by default; larger specs are refused before any compile work starts."""


@dataclass(frozen=True)
class GrammarLimits:
    """Per-request bounds on a constraint, checked by `GrammarSpec.from_fields` before compiling.

    Defaults sit well inside what llguidance compiles in milliseconds on one core (measured: 1,000 schema
    properties 0.04 s, 3,000 0.4 s, 10,000 6 s; llguidance's own JSON parser stops at 128 nested levels and its
    parser at 2,000 alternatives in one row).
    """

    max_grammar_chars: int = MAX_GRAMMAR_TEXT_CHARS
    """Longest canonical text of any constraint (regex, grammar, choices as Lark, schema as compact JSON)."""
    max_schema_bytes: int = 262_144
    """Largest JSON schema, in UTF-8 bytes of its compact form."""
    max_schema_properties: int = 1_000
    """Most entries of all ``properties`` objects of a JSON schema together."""
    max_schema_depth: int = 64
    """Deepest nesting of objects and arrays in a JSON schema document (``{"a": {"b": 1}}`` is 2)."""
    max_choices: int = 1_000
    """Most distinct strings in ``choices``."""
    max_regex_repetition: int = 10_000
    """Largest repetition count of any part of a regex (or of a JSON-schema ``pattern``): the product of the
    bounds of nested and stacked repeats, e.g. 10,000 for ``(a{100}){100}`` and for ``a{100}{100}``."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GrammarLimits.{name} must be an integer >= 1; got {value!r}")


DEFAULT_LIMITS = GrammarLimits()


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
        limits: GrammarLimits = DEFAULT_LIMITS,
    ) -> GrammarSpec | None:
        """The spec for the one structured-output field that is set, or None when none is.

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
        if json_schema is not None:
            spec = cls("json_schema", canonical_json_schema(json_schema, limits))
        elif regex is not None:
            spec = cls("regex", _non_empty_str("regex", regex, "a non-empty regular expression string"))
            _check_text_size("regex", spec.text, limits)
            check_regex_repetition("regex", spec.text, limits)
        elif ebnf is not None:
            spec = cls("ebnf", _non_empty_str("ebnf", ebnf, "a non-empty Lark or GBNF grammar string"))
        else:
            assert choices is not None
            spec = cls("choices", choices_to_lark(choices, limits))
        _check_text_size(spec.kind, spec.text, limits)
        return spec

    def describe(self, max_chars: int = 60) -> str:
        """A short, log- and client-safe name of this grammar: kind, size, a hash and the start of its text."""
        digest = hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        excerpt = self.text if len(self.text) <= max_chars else self.text[: max_chars - 3] + "..."
        return f"{self.kind} #{digest} ({len(self.text)} chars: {excerpt!r})"


def check_text(text: str, field: str) -> None:
    """Refuse a string that is not Unicode text: a lone surrogate (``"a\\ud800b"``, which JSON can spell) cannot
    be encoded as UTF-8, so tokenizers and the grammar engine would fail on it with unrelated errors.

    Raises:
        InvalidRequestError: naming ``field`` and the position of the first lone surrogate.
    """
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{field} is not valid Unicode text: it holds a lone surrogate {text[exc.start]!r} at character "
            f"{exc.start} (UTF-16 surrogates must come in pairs)"
        ) from None


def _check_text_size(kind: str, text: str, limits: GrammarLimits) -> None:
    check_text(text, kind)
    if len(text) > limits.max_grammar_chars:
        raise InvalidRequestError(
            f"{kind} is too large: {len(text)} characters; the limit grammar_max_chars is {limits.max_grammar_chars}"
        )


def canonical_json_schema(schema: str | Mapping[str, Any], limits: GrammarLimits = DEFAULT_LIMITS) -> str:
    """The schema as canonical JSON text: key order kept (it orders the output), compact separators, non-ASCII
    kept as is.

    Raises:
        InvalidRequestError: not valid JSON, not a JSON object, contains NaN/Infinity, uses ``x-guidance``, or
            exceeds ``limits`` (bytes, properties, nesting depth, ``pattern`` repetition).
    """
    if isinstance(schema, str):
        _check_schema_bytes(len(schema.encode("utf-8", "surrogatepass")), limits)
        try:
            value = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"json_schema is not valid JSON: {exc}") from None
        except RecursionError:  # nested far beyond max_schema_depth: Python's parser gives up first
            raise _too_deep(None, limits) from None
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
    check_schema_limits(value, limits)  # before json.dumps, which recurses
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and a bound of NaN would mean nothing.
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"json_schema is not JSON-serialisable: {exc}") from None
    _check_schema_bytes(len(text.encode("utf-8", "surrogatepass")), limits)
    return text


def check_schema_limits(schema: Any, limits: GrammarLimits = DEFAULT_LIMITS) -> None:
    """Check a parsed JSON schema against ``limits`` (nesting depth, properties, ``pattern`` repetition), without
    recursion.

    Raises:
        InvalidRequestError: naming the limit that is exceeded and the value found.
    """
    properties = 0
    for depth, key, node in _walk(schema):
        if depth > limits.max_schema_depth:
            raise _too_deep(depth, limits)
        if not isinstance(node, Mapping):
            continue
        props = node.get("properties")
        if key != "properties" and isinstance(props, Mapping):
            properties += len(props)
            if properties > limits.max_schema_properties:
                raise InvalidRequestError(
                    f"json_schema has more than {limits.max_schema_properties} properties (at least {properties}); "
                    f"the limit grammar_max_schema_properties is {limits.max_schema_properties}"
                )
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            check_regex_repetition("json_schema pattern", pattern, limits)


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


def _too_deep(depth: int | None, limits: GrammarLimits) -> InvalidRequestError:
    found = f"more than {limits.max_schema_depth}" if depth is None else f"at least {depth}"
    return InvalidRequestError(
        f"json_schema is nested {found} levels deep; the limit grammar_max_schema_depth is {limits.max_schema_depth} "
        "levels of objects and arrays"
    )


def _check_schema_bytes(size: int, limits: GrammarLimits) -> None:
    if size > limits.max_schema_bytes:
        raise InvalidRequestError(
            f"json_schema is too large: {size} bytes; the limit grammar_max_schema_bytes is {limits.max_schema_bytes}"
        )


def choices_to_lark(choices: Sequence[str], limits: GrammarLimits = DEFAULT_LIMITS) -> str:
    """A Lark grammar whose language is exactly the given strings: ``start: "a" | "b"``.

    Duplicates are dropped (first occurrence kept) so equal requests share one cache entry.

    Raises:
        InvalidRequestError: not a list of strings, empty, containing an empty string, or more distinct strings
            than ``limits.max_choices``.
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
        check_text(choice, f"choices[{i}]")
    unique = list(dict.fromkeys(choices))
    if len(unique) > limits.max_choices:
        raise InvalidRequestError(
            f"choices has {len(unique)} distinct entries; the limit grammar_max_choices is {limits.max_choices}"
        )
    # llguidance reads Lark string literals as JSON strings. ASCII-only escaping: a raw DEL (and maybe other
    # controls) is a lexer error there, while \uXXXX escapes, surrogate pairs included, always read back.
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=True) for c in unique)


_HUGE = 10**18  # repetition counts saturate here (the scan multiplies bounds)
_REPEAT = re.compile(r"\{(\d+)(,(\d*))?\}")


def check_regex_repetition(field: str, pattern: str, limits: GrammarLimits = DEFAULT_LIMITS) -> None:
    """Refuse a regex whose largest repetition count (`regex_repetition`) exceeds ``limits.max_regex_repetition``.

    Raises:
        InvalidRequestError: naming the field, the count and the limit.
    """
    count = regex_repetition(pattern, cap=_HUGE)
    if count > limits.max_regex_repetition:
        raise InvalidRequestError(
            f"{field} repeats a part {count if count <= _HUGE else 'more than 10^18'} times (the product of its "
            f"nested and stacked {{m,n}} bounds); the limit grammar_max_regex_repetition is "
            f"{limits.max_regex_repetition}"
        )


def regex_repetition(pattern: str, cap: int | None = None) -> int:
    """The largest number of copies of any part of ``pattern`` that its bounded repeats spell out.

    A cheap scan of Rust regex syntax (escapes, classes, groups, ``{m}`` / ``{m,}`` / ``{m,n}``): each repeat
    multiplies the count of what it applies to, so ``a{1000}{1000}`` and ``(a{1000}){1000}`` give 1,000,000.
    Unbounded ``*`` / ``+`` / ``?`` count 1 (they need no copies). The result saturates just above ``cap``.
    Syntax errors are left to the compiler.
    """
    limit = (cap + 1) if cap is not None else None
    groups: list[list[int]] = [[1, 0]]  # per open group: [largest count inside, count of its last item]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        top = groups[-1]
        if c == "\\":
            i = _skip_escape(pattern, i)
            top[1] = 1
        elif c == "[":
            i = _skip_class(pattern, i)
            top[1] = 1
        elif c == "(":
            groups.append([1, 0])
            i += 1
            continue
        elif c == ")" and len(groups) > 1:
            inner = groups.pop()[0]
            top = groups[-1]
            top[1] = inner  # the group is the parent's last item: a repeat after it multiplies `inner`
            i += 1
        elif c == "{" and (m := _REPEAT.match(pattern, i)) and top[1]:
            bound = int(m.group(3) or m.group(1))  # {m,n}: n; {m} and {m,}: m copies
            top[1] = _saturate(top[1] * max(bound, 1), limit)
            i = m.end()
        elif c in "|":
            top[1] = 0
            i += 1
            continue
        elif c not in "*+?":
            top[1] = 1
            i += 1
        else:
            i += 1
        top[0] = max(top[0], top[1])
    while len(groups) > 1:  # unclosed groups: the compiler reports them
        inner = groups.pop()[0]
        groups[-1][0] = max(groups[-1][0], inner)
    return groups[0][0]


def _saturate(value: int, limit: int | None) -> int:
    return value if limit is None else min(value, limit)


def _skip_escape(pattern: str, i: int) -> int:
    """Index after the escape at ``i`` (``\\x``, ``\\p{Greek}``, ``\\x{1F600}``, ``\\pL``)."""
    if i + 1 < len(pattern) and pattern[i + 1] in "pPxu" and i + 2 < len(pattern) and pattern[i + 2] == "{":
        end = pattern.find("}", i + 3)
        return len(pattern) if end < 0 else end + 1
    if i + 1 < len(pattern) and pattern[i + 1] in "pP":
        return i + 3
    return i + 2


def _skip_class(pattern: str, i: int) -> int:
    """Index after the character class opening at ``i`` (nested classes, ``[]...]``, ``[^]...]``, escapes)."""
    depth, j, n = 0, i, len(pattern)
    while j < n:
        c = pattern[j]
        if c == "\\":
            j = _skip_escape(pattern, j)
            continue
        if c == "[":
            depth += 1
            j += 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":  # a leading ] is a literal
                j += 1
            continue
        if c == "]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return n


def _non_empty_str(field: str, value: Any, allowed: str) -> str:
    if not isinstance(value, str) or not value.strip():
        shown = f"{type(value).__name__}" if not isinstance(value, str) else repr(value)
        raise InvalidRequestError(f"{field} must be {allowed}; got {shown}")
    return value


__all__ = [
    "DEFAULT_LIMITS",
    "GRAMMAR_KINDS",
    "GrammarKind",
    "GrammarLimits",
    "GrammarSpec",
    "MAX_GRAMMAR_TEXT_CHARS",
    "canonical_json_schema",
    "check_regex_repetition",
    "check_schema_limits",
    "check_text",
    "choices_to_lark",
    "regex_repetition",
]
