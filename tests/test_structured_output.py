"""Structured output through the engine on a random-weight tiny model (unconstrained, it writes garbage): every
JSON output parses and validates, every regex output full-matches, choices are members, EBNF output parses, and
constrained requests leave their unconstrained neighbours untouched.

A random model has no reason ever to close a string, a number or an array, so left alone it fills
``max_new_tokens`` with a valid but unfinished prefix. The JSON tests therefore give the tokens made only of
closing characters (and EOS) a positive logit bias and digit tokens a negative one (numbers end), as a trained
model's preferences would: the bias changes which allowed token is likely, never what is allowed, so validity
still rests on the grammar alone."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from xinf_sglang.runtime import InvalidRequestError, SamplingParams

from .engine_helpers import make_engine, varied_prompts
from .grammar_cases import REGEXES, SCHEMAS

MAX_NEW = 600


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


@pytest.fixture(scope="module")
def closing_bias(engine) -> dict[int, float]:
    """+6 for tokens made only of closing characters (not commas alone: those are legal inside strings) and EOS,
    -10 for digit tokens (a random model repeats a digit forever)."""
    tok = engine.tokenizer
    texts = {i: tok.decode([i]).strip() for i in range(len(tok))}
    bias = {i: 6.0 for i, t in texts.items() if t and set(t) <= set('"}],') and set(t) != {","}}
    bias.update({i: 6.0 for i in engine.eos_token_ids})
    bias.update({i: -10.0 for i, t in texts.items() if t.isdigit()})
    return bias


def _validate(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, cls=jsonschema.Draft202012Validator,
                        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("temperature, seeds", [(0.7, [1, 2, 3]), (1.0, [4, 5, 6]), (1.3, [7, 8, 9])])
def test_every_schema_gives_valid_json(engine, prompt, closing_bias, temperature, seeds):
    names = sorted(SCHEMAS)
    params = [SamplingParams(json_schema=SCHEMAS[n], temperature=temperature, seed=s, max_new_tokens=MAX_NEW,
                             logit_bias=closing_bias) for n in names for s in seeds]
    outs = engine.generate(input_ids=[prompt] * len(params), sampling_params=params)
    for (name, _), out in zip([(n, s) for n in names for s in seeds], outs):
        assert out.finish_reason == "stop", f"{name}: {out.finish_reason} after {len(out.token_ids)} tokens: {out.text!r}"
        _validate(out.text, SCHEMAS[name])
    assert engine.check_invariants() == []


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_output_fullmatches(engine, prompt, closing_bias, pattern):
    params = [SamplingParams(regex=pattern, temperature=t, seed=i, max_new_tokens=MAX_NEW, logit_bias=closing_bias)
              for i, t in enumerate([0.0, 0.7, 1.0])]
    for out in engine.generate(input_ids=[prompt] * 3, sampling_params=params):
        assert out.finish_reason == "stop"
        assert re.fullmatch(pattern, out.text), (pattern, out.text)


def test_choices_are_members(engine, prompt):
    choices = ["positive", "negative", "neutral", "I don't know"]
    params = [SamplingParams(choices=choices, temperature=1.0, seed=i, max_new_tokens=50) for i in range(8)]
    for out in engine.generate(input_ids=[prompt] * 8, sampling_params=params):
        assert out.text in choices and out.finish_reason == "stop"


def test_ebnf_output_parses(engine, prompt, closing_bias):
    grammar = 'root ::= "[" item ("," item)* "]"\nitem ::= [1-9] [0-9]* | "\\"" [a-z]+ "\\""'
    params = [SamplingParams(ebnf=grammar, temperature=1.0, seed=i, max_new_tokens=MAX_NEW, logit_bias=closing_bias)
              for i in range(6)]
    for out in engine.generate(input_ids=[prompt] * 6, sampling_params=params):
        assert out.finish_reason == "stop"
        value = json.loads(out.text)
        assert isinstance(value, list) and all(isinstance(v, (int, str)) for v in value)


def test_mixed_batch_leaves_unconstrained_rows_untouched(engine, model_dir, closing_bias):
    prompts = varied_prompts(model_dir, 6, min_len=8, max_len=40)
    free = SamplingParams(temperature=0.0, max_new_tokens=32, ignore_eos=True)
    alone = engine.generate(input_ids=prompts, sampling_params=free)
    constrained = SamplingParams(json_schema=SCHEMAS["flat_required"], max_new_tokens=MAX_NEW, temperature=0.8,
                                 seed=0, logit_bias=closing_bias)
    mixed_params = [free if i % 2 == 0 else constrained for i in range(6)]
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


def test_retracted_constrained_request_resumes_exactly(engine, prompt, closing_bias):
    """Retracted mid-output and re-prefilled, a seeded constrained request ends exactly as an undisturbed run: the
    matcher state and the output survive the retraction."""
    params = SamplingParams(json_schema=SCHEMAS["nested_objects"], temperature=0.9, seed=11, max_new_tokens=MAX_NEW,
                            logit_bias=closing_bias)
    [ref] = engine.generate(input_ids=[prompt], sampling_params=params)
    _validate(ref.text, SCHEMAS["nested_objects"])
    assert len(ref.token_ids) > 8

    def retract_after_four_tokens(sched) -> bool:
        req = next((r for r in sched.running if r.rid == "victim"), None)
        if req is None or len(req.output_ids) < 4:
            return False
        sched.retract(req)
        return True

    async def main():
        task = asyncio.ensure_future(_drain(engine.generate_stream(input_ids=prompt, sampling_params=params,
                                                                   request_id="victim")))
        while not engine.run_on_scheduler(retract_after_four_tokens):
            await asyncio.sleep(0)
        return await task

    before = engine.metrics()["retractions"]
    chunks = asyncio.run(main())
    assert engine.metrics()["retractions"] == before + 1
    assert sum((c.token_ids for c in chunks), []) == ref.token_ids
    assert "".join(c.text for c in chunks) == ref.text


async def _drain(stream):
    return [c async for c in stream]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(json_schema={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (dict(json_schema="{not json"), "JSON"),
        (dict(regex="(unclosed"), "regex"),
        (dict(ebnf='root ::= ( "a" '), "ebnf grammar .* is malformed"),
        (dict(ebnf="root ::= undefined_rule"), "undefined_rule"),
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
