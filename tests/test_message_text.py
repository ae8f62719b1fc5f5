"""The chat check's walk of message strings (issue 28 point 1): bounded memory whatever the body's shape, count
and characters budgets, and an error path built only for the value it names.

``RequestInput`` runs here over a stand-in for the runtime engine that has only what the check reads (its limits);
the same check through a real Xinference is tests/test_xinference_hostile.py's big-body test.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

pytest.importorskip("xinference")

from xinf_sglang.runtime.engine.request_validation import RequestValidator  # noqa: E402
from xinf_sglang.serving.engine.errors import SgliteRequestError  # noqa: E402
from xinf_sglang.serving.engine.message_text import MAX_MESSAGE_VALUES, TextBudget, walk_strings  # noqa: E402
from xinf_sglang.serving.engine.request_input import RequestInput  # noqa: E402


class _Limits:
    """The engine facts ``RequestInput.check_messages`` reads: context length and the prompt-text bound."""

    tokenizer = None

    def __init__(self, context_length: int, max_prompt_chars: int) -> None:
        self.context_length = context_length
        self.max_prompt_chars = max_prompt_chars

    def check_prompt_text(self, text: str, field: str) -> None:
        RequestValidator.check_prompt_text(self, text, field)  # type: ignore[arg-type]


def _input(max_prompt_chars: int = 10**7, context_length: int = 32768) -> RequestInput:
    return RequestInput(_Limits(context_length, max_prompt_chars))  # type: ignore[arg-type]


def _wide_under_long_key(key_chars: int = 300_000, children: int = 3_000) -> list[dict[str, Any]]:
    """Issue 28's body: one message nesting ``children`` strings under a ``key_chars``-character key."""
    return [{"role": "user", "content": "hi", "x": {"k" * key_chars: [f"s{i}" for i in range(children)]}}]


def test_strings_under_a_long_key_cost_no_memory_per_child() -> None:
    messages = _wide_under_long_key()
    tracemalloc.start()
    try:
        _input().check_messages(messages, None)  # within both budgets: accepted
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"the walk took {peak / 1e6:.0f} MB (building every path costs ~900 MB)"


def test_characters_budget_counts_keys_and_stops_at_the_breaking_string() -> None:
    with pytest.raises(SgliteRequestError) as err:
        _input(max_prompt_chars=100_000).check_messages(_wide_under_long_key(), None)
    message = str(err.value)
    assert "has 300000 characters" in message and "at most 100000" in message, message
    assert len(message) < 400, message  # the key is shown by its start and length, not in full


def test_total_characters_over_the_budget_names_where_the_walk_stopped() -> None:
    messages = [{"role": "user", "content": "x" * 60}, {"role": "user", "content": "y" * 60}]
    with pytest.raises(SgliteRequestError, match=r"more than 100 characters of text .*messages\[\d\]\.content"):
        _input(max_prompt_chars=100).check_messages(messages, None)


def test_values_budget_is_checked_before_a_container_is_walked() -> None:
    messages = [{"role": "user", "content": [None] * (MAX_MESSAGE_VALUES + 1)}]
    with pytest.raises(SgliteRequestError, match=rf"more than {MAX_MESSAGE_VALUES} values .*messages\[0\]\.content"):
        _input().check_messages(messages, None)


def test_lone_surrogate_is_named_by_its_path() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a\ud800b"}]}]
    with pytest.raises(SgliteRequestError, match=r"messages\[0\]\.content\[0\]\.text is not valid Unicode"):
        _input().check_messages(messages, None)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"\udfff": {}}}}]
    with pytest.raises(SgliteRequestError, match=r"tools\[0\]\.function\.parameters\..* is not valid Unicode"):
        _input().check_messages([{"role": "user", "content": "hi"}], tools)


def test_walk_yields_every_string_and_key_once() -> None:
    budget = TextBudget(100, 1000, "test")
    found = sorted(text for text, _ in walk_strings([("messages", [{"a": ["b", 1, {"c": "d"}]}])], budget))
    assert found == ["a", "b", "c", "d"]
