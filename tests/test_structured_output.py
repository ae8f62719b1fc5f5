"""Structured output through the engine on a random-weight tiny model (unconstrained, it writes garbage): every
JSON output parses and validates, every regex output full-matches, choices are members, EBNF output parses, and
constrained requests leave their unconstrained neighbours untouched."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from xinf_sglang.runtime import InvalidRequestError, SamplingParams

from .engine_helpers import make_engine, varied_prompts
from .grammar_cases import REGEXES, SCHEMAS

MAX_NEW = 400


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = make_engine(model_dir)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompt(model_dir):
    return varied_prompts(model_dir, 1, min_len=12, max_len=12)[0]


def _validate(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, cls=jsonschema.Draft202012Validator,
                        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("temperature, seeds", [(0.0, [None]), (0.8, [1, 2]), (1.2, [3])])
def test_every_schema_gives_valid_json(engine, prompt, temperature, seeds):
    names = sorted(SCHEMAS)
    params = [SamplingParams(json_schema=SCHEMAS[n], temperature=temperature, seed=s, max_new_tokens=MAX_NEW)
              for n in names for s in seeds]
    outs = engine.generate(input_ids=[prompt] * len(params), sampling_params=params)
    for (name, _), out in zip([(n, s) for n in names for s in seeds], outs):
        assert out.finish_reason == "stop", f"{name}: {out.finish_reason} after {len(out.token_ids)} tokens: {out.text!r}"
        _validate(out.text, SCHEMAS[name])
    assert engine.check_invariants() == []


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_output_fullmatches(engine, prompt, pattern):
    params = [SamplingParams(regex=pattern, temperature=t, seed=i, max_new_tokens=MAX_NEW)
              for i, t in enumerate([0.0, 0.7, 1.0])]
    for out in engine.generate(input_ids=[prompt] * 3, sampling_params=params):
        assert out.finish_reason == "stop"
        assert re.fullmatch(pattern, out.text), (pattern, out.text)


def test_choices_are_members(engine, prompt):
    choices = ["positive", "negative", "neutral", "I don't know"]
    params = [SamplingParams(choices=choices, temperature=1.0, seed=i, max_new_tokens=50) for i in range(8)]
    for out in engine.generate(input_ids=[prompt] * 8, sampling_params=params):
        assert out.text in choices and out.finish_reason == "stop"


def test_ebnf_output_parses(engine, prompt):
    grammar = 'root ::= "[" item ("," item)* "]"\nitem ::= [0-9]+ | "\\"" [a-z]+ "\\""'
    params = [SamplingParams(ebnf=grammar, temperature=1.0, seed=i, max_new_tokens=MAX_NEW) for i in range(6)]
    for out in engine.generate(input_ids=[prompt] * 6, sampling_params=params):
        assert out.finish_reason == "stop"
        value = json.loads(out.text)
        assert isinstance(value, list) and all(isinstance(v, (int, str)) for v in value)


def test_mixed_batch_leaves_unconstrained_rows_untouched(engine, model_dir):
    prompts = varied_prompts(model_dir, 6, min_len=8, max_len=40)
    free = SamplingParams(temperature=0.0, max_new_tokens=32, ignore_eos=True)
    alone = engine.generate(input_ids=prompts, sampling_params=free)
    mixed_params = [free if i % 2 == 0 else SamplingParams(json_schema=SCHEMAS["flat_required"], max_new_tokens=MAX_NEW,
                                                           temperature=0.0) for i in range(6)]
    mixed = engine.generate(input_ids=prompts, sampling_params=mixed_params)
    for i in range(0, 6, 2):
        assert mixed[i].token_ids == alone[i].token_ids
    for i in range(1, 6, 2):
        _validate(mixed[i].text, SCHEMAS["flat_required"])


def test_special_tokens_never_appear_in_constrained_output(engine, prompt):
    specials = set(engine.tokenizer.all_special_ids)
    outs = engine.generate(input_ids=[prompt] * 4, sampling_params=[
        SamplingParams(regex=r"[^\n]{1,40}", temperature=1.5, seed=i, max_new_tokens=MAX_NEW) for i in range(4)])
    for out in outs:
        body = out.token_ids[:-1] if out.matched_stop is not None else out.token_ids
        assert not specials & set(body)


def test_max_new_tokens_cut_reports_length(engine, prompt):
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 300}}, "required": ["s"]}
    [out] = engine.generate(input_ids=[prompt], sampling_params=SamplingParams(json_schema=schema, max_new_tokens=10))
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_constrained_requests_survive_retraction(model_dir, prompt):
    with make_engine(model_dir, max_total_tokens=300) as engine:
        params = [SamplingParams(json_schema=SCHEMAS["nested_objects"], temperature=0.9, seed=i, max_new_tokens=MAX_NEW)
                  for i in range(10)]
        outs = engine.generate(input_ids=[prompt] * 10, sampling_params=params)
        assert engine.metrics()["retractions"] > 0
        for out in outs:
            _validate(out.text, SCHEMAS["nested_objects"])
        assert engine.check_invariants() == []


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(json_schema={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (dict(json_schema="{not json"), "JSON"),
        (dict(regex="(unclosed"), "regex"),
        (dict(ebnf="root ::= "), "ebnf|grammar"),
    ],
)
def test_bad_grammar_is_an_error_and_nothing_is_queued(engine, prompt, fields, message):
    before = engine.metrics()
    with pytest.raises(InvalidRequestError, match=re.compile(message, re.I)):
        engine.generate(input_ids=[prompt], sampling_params=SamplingParams(**fields))
    assert engine.metrics()["finished_requests"] == before["finished_requests"]


def test_two_grammars_at_once_is_an_error():
    with pytest.raises(InvalidRequestError, match="json_schema.*regex|regex.*json_schema"):
        SamplingParams(json_schema={"type": "object"}, regex="a+")
