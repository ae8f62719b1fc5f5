"""Grammars shared by the grammar-backend tests and the engine / Xinference structured-output tests."""

from __future__ import annotations

from typing import Any

# A person as a real model extracts one (SmolLM2 on the CPU and on the GPU): the name bounded, so a model that
# rambles still ends the string.
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}

POINT = {
    "type": "object",
    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
    "required": ["x", "y"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_required": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "nested_objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "address": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "string"}},
                        "required": ["city"],
                        "additionalProperties": False,
                    },
                },
                "required": ["id", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "array_bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "enum_strings": {"enum": ["red", "green", "blue"]},
    "enum_mixed": {"enum": ["a", 1, None, True, {"k": "v"}]},
    "any_of": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer", "minimum": 0}]},
    "one_of_disjoint_types": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "one_of_consts": {"oneOf": [{"const": "a"}, {"const": "b"}]},
    "ref_defs": {"$defs": {"point": POINT}, "type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 3},
    "recursive_tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["v"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "string_pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "string_lengths": {"type": "string", "minLength": 3, "maxLength": 6},
    "integer_bounds": {"type": "integer", "minimum": -5, "maximum": 17},
    "number_exclusive_bounds": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "additional_properties_false": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}},
        "additionalProperties": False,
    },
    "const_property": {
        "type": "object",
        "properties": {"kind": {"const": "point"}, "n": {"type": "integer"}},
        "required": ["kind", "n"],
        "additionalProperties": False,
    },
    "nullable": {"type": ["string", "null"]},
    "nullable_property": {
        "type": "object",
        "properties": {"nick": {"type": ["string", "null"], "maxLength": 4}},
        "required": ["nick"],
        "additionalProperties": False,
    },
    "boolean": {"type": "boolean"},
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"tag": {"enum": ["x", "y"]}, "w": {"type": "number", "minimum": 0}},
            "required": ["tag", "w"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "prefix_items": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
    "json_object": {"type": "object"},
    "nested_arrays": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        "maxItems": 3,
    },
    "optional_properties": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 2}, "c": {"type": "boolean"}},
        "additionalProperties": False,
    },
    "additional_properties_schema": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    "all_of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "string", "maxLength": 3}}, "required": ["b"]},
        ]
    },
    "integer_enum": {"type": "integer", "enum": [1, 2, 3, 5, 8]},
    "min_max_properties": {
        "type": "object",
        "additionalProperties": {"type": "integer"},
        "minProperties": 1,
        "maxProperties": 2,
    },
    "pattern_properties": {
        "type": "object",
        "patternProperties": {"^x_[a-z]+$": {"type": "integer"}},
        "additionalProperties": False,
        "maxProperties": 3,
    },
    "empty_schema": {},
    "type_list": {"type": ["integer", "string", "boolean"]},
    "multiple_of": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
    "uuid_format": {"type": "string", "format": "uuid"},
    "annotations_ignored": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "T",
        "description": "annotations do not constrain",
        "type": "object",
        "properties": {"q": {"type": "string", "description": "d", "examples": ["e"], "maxLength": 5}},
        "required": ["q"],
        "additionalProperties": False,
    },
}

REGEXES = [
    r"\d{3}-\d{4}",
    r"(cat|dog)s?",
    r"[a-z]{2,5}@[a-z]{3}\.(com|org)",
    r"-?(0|[1-9][0-9]*)(\.[0-9]+)?",
    r"[A-Z][a-z]{0,6}( [A-Z][a-z]{0,6}){0,3}",
    r"(ab|cd)*x",
    r"[0-9a-f]{8}",
    r"(true|false|null)",
    r"\{\"k\":[0-9]{1,3}\}",
    r"[^\n]{1,10}!",
    r"^[0-9]+$",
]
