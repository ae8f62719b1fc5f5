"""Hostile and unlucky request inputs shared by the engine-level and the Xinference-level tests (issue 13).

Each entry of `REFUSED_CONSTRAINTS` is a constraint the engine must refuse before compiling or queueing it, with
the words its error must contain (the limit or field it names).
"""

from __future__ import annotations

import json
from typing import Any


def nested_array_schema(depth: int) -> dict[str, Any]:
    """``{"type": "array", "items": ...}`` ``depth`` times around a string schema (built without recursion)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def nested_array_schema_text(depth: int) -> str:
    """The same schema as JSON text (``json.dumps`` itself recurses, so it is spelled out)."""
    return '{"type":"array","items":' * depth + '{"type":"string"}' + "}" * depth


def wide_schema(properties: int) -> dict[str, Any]:
    """An object schema with ``properties`` string properties, half of them required (llguidance's slow case)."""
    props = {f"field_{i}": {"type": "string", "maxLength": 8} for i in range(properties)}
    return {"type": "object", "properties": props, "required": list(props)[: properties // 2]}


TEN_THOUSAND_CHOICES = [f"choice-{i}" for i in range(10_000)]

# (SamplingParams fields, words the error names)
REFUSED_CONSTRAINTS: list[tuple[dict[str, Any], str]] = [
    (dict(choices=TEN_THOUSAND_CHOICES), "grammar_max_choices is 1000"),
    (dict(json_schema=nested_array_schema(200)), "grammar_max_schema_depth is 64"),
    (dict(json_schema=nested_array_schema_text(2000)), "grammar_max_schema_depth is 64"),
    (dict(regex="a{1000}{1000}"), "grammar_max_regex_repetition is 10000"),
    (dict(json_schema=wide_schema(10_000)), "grammar_max_schema"),
    (dict(regex="a\ud800b"), "lone surrogate"),
]

LONE_SURROGATE_PROMPT = "a\ud800b"


def body_json(value: Any) -> str:
    """``value`` as a JSON request body (lone surrogates are written as ``\\ud800`` escapes, as JSON allows)."""
    return json.dumps(value)
