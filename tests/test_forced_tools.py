"""Forced tool choice (xinf_sglang/openai_api/forced_tools.py): the constraint built from the tools, and clear refusals."""

from __future__ import annotations

import pytest

from xinf_sglang.openai_api.forced_tools import ToolChoiceError, is_forced, prepare

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "go"}]


def test_only_required_and_named_choices_are_forced() -> None:
    assert is_forced({"tool_choice": "required"}) and is_forced({"tool_choice": {"function": {"name": "f"}}})
    assert not is_forced({"tool_choice": "auto"}) and not is_forced({"tool_choice": "none"}) and not is_forced({})


def test_the_constraint_is_a_json_schema_of_the_allowed_calls() -> None:
    g = {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}}
    config = {"tools": iter([TOOL, g]), "tool_choice": {"type": "function", "function": {"name": "g"}},
              "parallel_tool_calls": False, "stream": True, "stream_options": {"include_usage": True}}
    messages, constrained = prepare(ASK, config)
    schema = constrained["response_format"]["json_schema"]["schema"]
    assert schema["maxItems"] == 1 and [v["properties"]["name"] for v in schema["items"]["oneOf"]] == [{"const": "g"}]
    assert constrained["stream"] is False and "tools" not in constrained and "stream_options" not in constrained
    assert messages[0]["role"] == "system" and '"g"' in messages[0]["content"] and messages[1:] == ASK


@pytest.mark.parametrize(
    "config, message",
    [
        ({"tool_choice": "required"}, "needs tools"),
        ({"tool_choice": "required", "tools": []}, "needs tools"),
        ({"tool_choice": {"function": {"name": "x"}}, "tools": [TOOL]}, "'x', which is not among the tools: ['f']"),
        ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "string"}}}]}, "cannot be forced"),
    ],
)
def test_bad_choices_are_refused(config: dict, message: str) -> None:
    with pytest.raises(ToolChoiceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prepare(ASK, config)
