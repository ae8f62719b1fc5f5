"""Tests for SamplingParams: defaults, normalisation, and a clear InvalidRequestError for every bad value."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xinf_sglang.runtime.constrained import GrammarLimits, GrammarSize, GrammarSpec
from xinf_sglang.runtime.constrained.spec import DEFAULT_LIMITS
from xinf_sglang.runtime.errors import InvalidRequestError, brief
from xinf_sglang.runtime.sampling.sampling_params import (
    MAX_LOGIT_BIAS, MAX_STOP_CHARS, MAX_STOP_STRINGS, STRUCTURED_FIELDS, SamplingParams,
)


def test_defaults() -> None:
    p = SamplingParams()
    assert p.max_new_tokens == 128
    assert p.min_new_tokens == 0
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == -1
    assert p.min_p == 0.0
    assert p.frequency_penalty == 0.0
    assert p.presence_penalty == 0.0
    assert p.repetition_penalty == 1.0
    assert p.stop == []
    assert p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.seed is None
    assert p.skip_special_tokens is True
    assert p.structured_output is None
    assert not p.is_greedy


# (kwargs, field named in the message, words of the allowed range that must appear, the value shown)
BAD_VALUES = (
    ({"max_new_tokens": -1}, "max_new_tokens", ">= 0", "-1"),
    ({"min_new_tokens": -1}, "min_new_tokens", "0 <= min_new_tokens <= max_new_tokens", "-1"),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, "min_new_tokens", "<= max_new_tokens", "max_new_tokens=4"),
    ({"temperature": -0.1}, "temperature", ">= 0", "-0.1"),
    ({"temperature": float("nan")}, "temperature", ">= 0", "nan"),
    ({"temperature": float("inf")}, "temperature", ">= 0", "inf"),
    ({"top_p": 0.0}, "top_p", "(0, 1]", "0.0"),
    ({"top_p": 1.5}, "top_p", "(0, 1]", "1.5"),
    ({"top_p": -0.2}, "top_p", "(0, 1]", "-0.2"),
    ({"top_k": -2}, "top_k", "-1 or 0", "-2"),
    ({"min_p": -0.01}, "min_p", "[0, 1]", "-0.01"),
    ({"min_p": 1.01}, "min_p", "[0, 1]", "1.01"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "[-2, 2]", "2.5"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]", "-2.5"),
    ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]", "3"),
    ({"presence_penalty": -3}, "presence_penalty", "[-2, 2]", "-3"),
    ({"repetition_penalty": 0}, "repetition_penalty", "> 0", "0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "> 0", "-1.0"),
    ({"stop": ""}, "stop", "non-empty", "''"),
    ({"stop": ["ok", ""]}, "stop", "non-empty", "''"),
    ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop", f"at most {MAX_STOP_STRINGS}", "'s'"),
    ({"stop_token_ids": [3, -1]}, "stop_token_ids", ">= 0", "-1"),
    ({"seed": 2**64}, "seed", "an integer in", str(2**64)),
    ({"seed": -(2**63) - 1}, "seed", "an integer in", str(-(2**63) - 1)),
    ({"choices": []}, "choices", "non-empty list", "[]"),
    # Wrong types get the same shape of message: field, what is allowed, what was sent.
    ({"temperature": "hot"}, "temperature", ">= 0", "'hot'"),
    ({"max_new_tokens": 1.5}, "max_new_tokens", ">= 0", "1.5"),
    ({"top_k": True}, "top_k", "-1 or 0", "True"),
    ({"stop": 5}, "stop", "non-empty string", "5"),
    ({"ignore_eos": "maybe"}, "ignore_eos", "true or false", "'maybe'"),
)


@pytest.mark.parametrize(("kwargs", "field", "allowed", "shown"), BAD_VALUES)
def test_bad_value_names_field_range_and_value(kwargs: dict, field: str, allowed: str, shown: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert field in message
    assert allowed in message
    assert shown in message


def test_invalid_request_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0},
        {"temperature": 100.0},
        {"top_p": 1e-9},
        {"top_p": 1},
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 1},
        {"top_k": 10**6},
        {"min_p": 0},
        {"min_p": 1},
        {"frequency_penalty": -2, "presence_penalty": 2},
        {"frequency_penalty": 2, "presence_penalty": -2},
        {"repetition_penalty": 1e-6},
        {"repetition_penalty": 10},
        {"max_new_tokens": 0},
        {"min_new_tokens": 7, "max_new_tokens": 7},
        {"stop": ["s"] * MAX_STOP_STRINGS},
        {"seed": 0},
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
        {"json_schema": {"type": "object"}},
        {"json_schema": '{"type": "object"}'},
        {"regex": "[a-z]+"},
        {"ebnf": 'root ::= "yes" | "no"'},
        {"choices": ["yes", "no"]},
    ],
)
def test_boundary_values_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_normalisation() -> None:
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(temperature=0).is_greedy


def test_unknown_field_rejected_with_allowed_list() -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(temprature=0.5)
    message = str(info.value)
    assert "temprature" in message
    assert "temperature" in message.split("allowed:")[1]


def test_several_errors_reported_together() -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(temperature=-1, top_p=2)
    assert "temperature" in str(info.value) and "top_p" in str(info.value)


@pytest.mark.parametrize("first", STRUCTURED_FIELDS)
@pytest.mark.parametrize("second", STRUCTURED_FIELDS)
def test_at_most_one_structured_output(first: str, second: str) -> None:
    values = {"json_schema": {"type": "object"}, "regex": "a+", "ebnf": 'root ::= "a"', "choices": ["a"]}
    if first == second:
        assert SamplingParams(**{first: values[first]}).structured_output == first
        return
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{first: values[first], second: values[second]})
    message = str(info.value)
    assert "at most one of" in message
    assert first in message and second in message


def test_verify_stop_token_ids_against_vocab() -> None:
    SamplingParams(stop_token_ids=[0, 99]).verify(100)
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop_token_ids=[5, 100]).verify(100)
    message = str(info.value)
    assert "stop_token_ids" in message and "[0, 100)" in message and "100" in message


def test_assignment_is_validated() -> None:
    p = SamplingParams()
    p.max_new_tokens = 5
    assert p.max_new_tokens == 5
    with pytest.raises(InvalidRequestError, match="temperature"):
        p.temperature = -1.0


def test_model_validate_raises_invalid_request() -> None:
    assert SamplingParams.model_validate({"top_k": 5}).top_k == 5
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams.model_validate({"top_p": 0})


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_any_non_negative_temperature_accepted(t: float) -> None:
    assert SamplingParams(temperature=t).temperature == t


@given(st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False))
def test_any_negative_temperature_rejected(t: float) -> None:
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=t)


def test_pickle_and_dump_round_trip() -> None:
    # The scheduler may run in its own process: parameters cross it by pickle.
    p = SamplingParams(stop="x", seed=3, choices=["a", "b"], top_k=0)
    assert pickle.loads(pickle.dumps(p)) == p
    assert SamplingParams(**p.model_dump()) == p


def test_logit_bias_range_and_vocab_checks() -> None:
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0})
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})
    with pytest.raises(InvalidRequestError, match=r"logit_bias keys must be token ids in \[0, 10\)"):
        SamplingParams(logit_bias={10: 1.0}).verify(10)
    assert SamplingParams(logit_bias={}).logit_bias is None


# ---- the structured-output constraint: one GrammarSpec, built once ----


def test_a_loose_field_becomes_structured_once() -> None:
    p = SamplingParams(json_schema='{"type": "object",  "properties": {"a": {"type": "string"}}}', seed=1)
    # Canonical text, measured when built: the engine checks its limits on these numbers, not on a new parse.
    assert p.structured == GrammarSpec("json_schema", '{"type":"object","properties":{"a":{"type":"string"}}}')
    assert p.structured.size == GrammarSize(schema_depth=3, schema_properties=1)
    dumped = p.model_dump()
    assert dumped["structured"]["kind"] == "json_schema" and not set(STRUCTURED_FIELDS) & set(dumped)
    # Read back in the terms they were given in.
    assert (p.json_schema, p.regex, p.ebnf, p.choices) == (p.structured.text, None, None, None)
    assert SamplingParams(choices=["b", "a", "b"]).choices == ["b", "a"]
    assert SamplingParams(ebnf='start: "x"').ebnf == 'start: "x"'
    # Nothing rebuilds it: not an assignment, not a given spec.
    spec = p.structured
    p.max_new_tokens = 3
    assert p.structured is spec
    assert SamplingParams(structured=spec).structured is spec


def test_structured_and_a_loose_field_together_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match=r"at most one of structured, json_schema, regex, ebnf, choices may "
                       r"be set \(one structured-output constraint per request\); got structured, choices"):
        SamplingParams(structured=GrammarSpec("regex", "a+"), choices=["a"])


def test_a_malformed_constraint_is_refused_at_construction() -> None:
    with pytest.raises(InvalidRequestError, match="json_schema is not valid JSON"):
        SamplingParams(json_schema='{"type":')
    with pytest.raises(InvalidRequestError, match=r"choices must be non-empty strings; choices\[1\] is empty"):
        SamplingParams(choices=["a", ""])


def test_size_limits_are_the_engines() -> None:
    """Over the default limits is still a valid SamplingParams (an engine may be launched with higher ones)."""
    p = SamplingParams(regex="a{1000}{1000}")
    with pytest.raises(InvalidRequestError, match="grammar_max_regex_repetition is 10000"):
        DEFAULT_LIMITS.check(p.structured)
    GrammarLimits(max_regex_repetition=10**6).check(p.structured)
    deep = SamplingParams(json_schema='{"items":' * 3000 + "{}" + "}" * 3000)  # beyond Python's JSON reader
    with pytest.raises(InvalidRequestError, match="nested more than 120 levels deep"):
        GrammarLimits(max_schema_depth=120).check(deep.structured)


LOOSE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
) | st.sampled_from(["a{1000}{1000}", "((", "\ud800", '{"type": "object"}', "start: /x/", 'root ::= "a"'])


@given(st.sampled_from(STRUCTURED_FIELDS), LOOSE_VALUES)
def test_loose_fields_only_raise_invalid_request(field: str, value) -> None:
    try:
        p = SamplingParams(**{field: value})
    except InvalidRequestError:
        return
    assert p.structured_output == (None if value is None else field)
    if p.structured is not None:
        try:
            DEFAULT_LIMITS.check(p.structured)
        except InvalidRequestError:
            pass



# ---- issue 28: sizes a client controls are bounded, and errors do not echo them at full length ----


def test_logit_bias_is_capped_at_openais_300_entries() -> None:
    assert len(SamplingParams(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS)}).logit_bias) == 300
    for make in (lambda b: SamplingParams(logit_bias=b), lambda b: SamplingParams.model_validate({"logit_bias": b})):
        with pytest.raises(InvalidRequestError) as info:
            make({str(i): 1.0 for i in range(150_000)})  # a whole vocabulary, as JSON keys
        message = str(info.value)
        assert "logit_bias may hold at most 300 entries" in message and "got 150000" in message
        assert len(message) < 300


def test_stop_strings_are_capped_in_length() -> None:
    assert SamplingParams(stop=["x" * MAX_STOP_CHARS]).stop == ["x" * MAX_STOP_CHARS]
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(stop=["ok", "x" * 200_000])
    message = str(info.value)
    assert f"at most {MAX_STOP_CHARS} characters" in message and "200000 characters" in message
    assert len(message) < 400


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": "h" * 100_000},
        {"stop": 10**5000 // 7},
        {"stop": ["s"] * 100_000},
        {"logit_bias": {1: "x" * 100_000}},
        {"k" * 100_000: 1},
        {"max_new_tokens": list(range(100_000))},
    ],
    ids=["long-string", "huge-int", "many-stops", "long-bias-value", "long-unknown-key", "long-list"],
)
def test_errors_do_not_echo_client_values_at_full_length(kwargs: dict) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert len(message) < 1500, message[:200]
    assert next(iter(kwargs))[:5] in message  # still names the field


def test_brief_keeps_short_values_and_cuts_long_ones() -> None:
    assert brief("abc") == "'abc'"
    cut = brief("a" * 1000)
    assert cut.startswith("'aaaa") and cut.endswith("… (1002 characters)") and len(cut) < 120
