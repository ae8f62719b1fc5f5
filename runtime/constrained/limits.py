"""How big a constraint an engine accepts: `GrammarLimits` (engine options ``grammar_max_*``) and its one check.

A grammar that would take the compiler minutes (or fail at the first token) is refused before any compile work,
with an error naming the limit and the value: canonical text length, JSON-schema bytes, properties and nesting
depth, number of choices, and the largest repetition count of a regex (``a{1000}{1000}`` repeats ``a`` a million
times) or of a schema's ``pattern``. What only a parse of the constraint shows (the schema's depth, properties
and patterns, the number of choices) is measured once, when the spec is built (`GrammarSize`); `GrammarLimits.check`
compares those numbers and scans the text, so the engine checks a request against its own limits without reading
the schema again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from ..errors import InvalidRequestError

__all__ = [
    "DEFAULT_LIMITS",
    "GrammarLimits",
    "GrammarSize",
    "MAX_GRAMMAR_TEXT_CHARS",
    "MeasuredGrammar",
    "REPETITION_CAP",
    "check_text",
    "regex_repetition",
]

MAX_GRAMMAR_TEXT_CHARS = 1_000_000
"""Longest canonical grammar text accepted by default; larger specs are refused before any compile work starts."""


@dataclass(frozen=True)
class GrammarSize:
    """What the limits look at that only a parse of the constraint shows, measured when its spec is built."""

    schema_depth: int | None = 0
    """Deepest nesting of objects and arrays of a JSON schema; None: deeper than Python's JSON reader and writer go
    (about a thousand levels), so it has no canonical text and every limit refuses it."""
    schema_properties: int = 0
    """Entries of all ``properties`` objects of a JSON schema together."""
    schema_repetition: int = 1
    """Largest `regex_repetition` of any ``pattern`` in a JSON schema."""
    choices: int = 0
    """Distinct strings of a ``choices`` constraint."""


class MeasuredGrammar(Protocol):
    """What `GrammarLimits.check` reads of a constraint; a `GrammarSpec` is one. Declared here, not imported:
    spec.py builds on this module (sizes, the default limits), so this module must not need spec.py back."""

    @property
    def kind(self) -> str:
        """``json_schema``, ``regex``, ``ebnf`` or ``choices``."""

    @property
    def text(self) -> str:
        """The canonical text of the constraint."""

    def measured_size(self) -> GrammarSize:
        """What only a parse of the constraint shows (`GrammarSize`)."""


@dataclass(frozen=True)
class GrammarLimits:
    """Per-request bounds on a constraint, checked by `check` before compiling.

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

    def check(self, spec: MeasuredGrammar) -> None:
        """Refuse ``spec`` if it exceeds one of these limits or its text is not Unicode text.

        Raises:
            InvalidRequestError: naming the limit (as its engine option ``grammar_max_*``) and the value found.
        """
        size = spec.measured_size()
        if spec.kind == "json_schema":
            self._check_schema(spec.text, size)
        if size.choices > self.max_choices:
            raise InvalidRequestError(
                f"choices has {size.choices} distinct entries; the limit grammar_max_choices is {self.max_choices}"
            )
        check_text(spec.text, spec.kind)
        if len(spec.text) > self.max_grammar_chars:
            raise InvalidRequestError(
                f"{spec.kind} is too large: {len(spec.text)} characters; the limit grammar_max_chars is "
                f"{self.max_grammar_chars}"
            )
        if spec.kind == "regex":  # after the length check: the scan is linear in the text
            self._check_repetition("regex", regex_repetition(spec.text, cap=REPETITION_CAP))

    def _check_schema(self, text: str, size: GrammarSize) -> None:
        depth = size.schema_depth
        if depth is None or depth > self.max_schema_depth:
            found = f"more than {self.max_schema_depth}" if depth is None else f"at least {depth}"
            raise InvalidRequestError(
                f"json_schema is nested {found} levels deep; the limit grammar_max_schema_depth is "
                f"{self.max_schema_depth} levels of objects and arrays"
            )
        if size.schema_properties > self.max_schema_properties:
            raise InvalidRequestError(
                f"json_schema has more than {self.max_schema_properties} properties (at least "
                f"{size.schema_properties}); the limit grammar_max_schema_properties is {self.max_schema_properties}"
            )
        self._check_repetition("json_schema pattern", size.schema_repetition)
        schema_bytes = len(text.encode("utf-8", "surrogatepass"))
        if schema_bytes > self.max_schema_bytes:
            raise InvalidRequestError(
                f"json_schema is too large: {schema_bytes} bytes; the limit grammar_max_schema_bytes is "
                f"{self.max_schema_bytes}"
            )

    def _check_repetition(self, field: str, count: int) -> None:
        if count > self.max_regex_repetition:
            shown = count if count <= REPETITION_CAP else "more than 10^18"
            raise InvalidRequestError(
                f"{field} repeats a part {shown} times (the product of its nested and stacked {{m,n}} bounds); "
                f"the limit grammar_max_regex_repetition is {self.max_regex_repetition}"
            )


DEFAULT_LIMITS = GrammarLimits()


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


REPETITION_CAP = 10**18
"""Where `check` lets repetition counts saturate (the scan multiplies bounds)."""
_REPEAT = re.compile(r"\{(\d+)(,(\d*))?\}")


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
