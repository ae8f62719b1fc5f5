"""Hostile and careless requests through the engine API (issue 13): each is refused up front with an
``InvalidRequestError`` that names the field or limit, nothing is queued, and a pathological grammar never makes
another client's request fail. Every test ends with the engine back at its idle invariant (conftest)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from xinf_sglang.runtime import InvalidRequestError, SamplingParams

from .engine_helpers import make_engine
from .hostile_helpers import LONE_SURROGATE_PROMPT, REFUSED_CONSTRAINTS, wide_schema


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = make_engine(model_dir, context_length=512)
    yield eng
    eng.shutdown()


async def _first(engine, **kwargs):
    stream = engine.generate_stream(**kwargs)
    try:
        return await stream.__anext__()
    finally:
        await stream.aclose()


def _refused(engine, match: str, **kwargs) -> str:
    """Assert the stream and the offline call both refuse ``kwargs`` before queueing; return the message."""
    before = engine.metrics()
    with pytest.raises(InvalidRequestError, match=match) as err:
        asyncio.run(_first(engine, **kwargs))
    with pytest.raises(InvalidRequestError, match=match):
        engine.generate(**kwargs)
    after = engine.metrics()
    assert after["waiting_requests"] == after["running_requests"] == 0
    assert after["finished_requests"] == before["finished_requests"]
    return str(err.value)


# ---- failure 4: types ----


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=5), "prompt must be a string; got int"),
        (dict(input_ids=[[1, 2], [3, 4]]), "input_ids of a stream must be one list of token ids.*batch of 2"),
        (dict(input_ids=[True, False]), "integers, not bools.*True of type bool"),
        (dict(prompt="hi", request_id=5), "request_id must be a non-empty string; got 5"),
        (dict(prompt="hi", request_id=""), "request_id must be a non-empty string"),
        (dict(input_ids=(1, 2.5)), "2.5 of type float"),
        (dict(prompt=b"bytes"), "prompt must be a string"),
    ],
)
def test_stream_refuses_wrong_types(engine, kwargs, match) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        asyncio.run(_first(engine, **kwargs))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=[True]), "not bools"),
        (dict(input_ids=[[1], [2, False]]), "False of type bool"),
        (dict(prompt=[]), "non-empty list of strings"),
        (dict(prompt=["a", 3]), "list of strings"),
        (dict(prompt=["a", "b"], request_id="x"), "list of 2 non-empty strings"),
        (dict(prompt=["a", "b"], request_id=["x", 3]), "got 3"),
    ],
)
def test_generate_refuses_wrong_types(engine, kwargs, match) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        engine.generate(**kwargs)


def test_numpy_style_integers_are_token_ids(engine) -> None:
    import numpy as np

    [out] = engine.generate(input_ids=[list(np.array([5, 6, 7]))], sampling_params=SamplingParams(max_new_tokens=2))
    assert out.prompt_tokens == 3


# ---- failure 3: refused too late ----


@pytest.mark.parametrize("fields, match", REFUSED_CONSTRAINTS, ids=[m for _, m in REFUSED_CONSTRAINTS])
def test_pathological_constraints_are_refused_before_compiling(engine, fields, match) -> None:
    misses = engine.grammar_backend.cache_stats()["misses"]
    _refused(engine, match, prompt="hi", sampling_params=SamplingParams(max_new_tokens=4, **fields))
    assert engine.grammar_backend.cache_stats()["misses"] == misses, "a refused grammar must not be compiled"


def test_lone_surrogate_prompt_is_refused_before_tokenizing(engine) -> None:
    message = _refused(engine, "lone surrogate", prompt=LONE_SURROGATE_PROMPT)
    assert "prompt is not valid Unicode text" in message and "character 1" in message


# ---- failure 2: size checks before expensive work ----


def test_huge_prompt_is_refused_by_its_length_before_tokenizing(engine) -> None:
    message = _refused(engine, "characters", prompt="x" * 10_000_000)
    # The message counts characters: the prompt was never tokenized (a token count would name "tokens").
    assert "prompt has 10000000 characters" in message and "context_length 512" in message


def test_prompt_bound_never_refuses_what_fits(engine) -> None:
    # The bound is (context_length - 1) x the longest token: text of that many characters can fit.
    assert engine.max_prompt_chars >= engine.context_length - 1
    [out] = engine.generate(prompt="ab " * 100, sampling_params=SamplingParams(max_new_tokens=1))
    assert out.finish_reason == "length"


# ---- failure 1: a pathological compile starves nobody ----


def test_slow_grammar_is_stopped_and_others_compile(model_dir) -> None:
    """Two clients send slow schemas (they pass the raised limits, and take llguidance seconds each); another
    client's ``regex "[0-9]"`` and ``choices`` still succeed, the slow ones fail naming their grammar, and the
    compile threads are free again right after (their compiles were killed, not left running)."""
    eng = make_engine(
        model_dir, context_length=512, grammar_compile_timeout_s=1.0, grammar_max_schema_properties=100_000,
        grammar_max_schema_bytes=10_000_000,
    )
    try:
        slow = [SamplingParams(max_new_tokens=4, json_schema=wide_schema(10_000 + i)) for i in range(2)]
        quick = [SamplingParams(max_new_tokens=1, regex="[0-9]"), SamplingParams(max_new_tokens=2, choices=["x", "y"])]
        with ThreadPoolExecutor(4) as pool:
            slow_runs = [pool.submit(eng.generate, prompt="a", sampling_params=sp) for sp in slow]
            quick_runs = [pool.submit(eng.generate, prompt="b", sampling_params=sp) for sp in quick]
            digit, choice = (f.result(timeout=300)[0] for f in quick_runs)
            for f in slow_runs:
                with pytest.raises(InvalidRequestError, match=r"longer than the limit of 1 s.*stopped.*json_schema #"):
                    f.result(timeout=300)
        assert digit.text in list("0123456789") and choice.text in ("x", "y")
        # Both compile threads serve at once: the killed compiles no longer occupy them.
        [again] = eng.generate(prompt="c", sampling_params=SamplingParams(max_new_tokens=1, regex="[a-c]"))
        assert again.text in ("a", "b", "c")
        assert eng.check_invariants() == []
    finally:
        eng.shutdown()


# ---- the limits themselves (no engine) ----


@pytest.mark.parametrize(
    "pattern, count",
    [
        ("a{1000}{1000}", 1_000_000), ("(a{1000}){1000}", 1_000_000), ("(a{5000})", 5000), ("x|(a{50}){3}", 150),
        ("((a){10}b){10}", 100), ("(ab|c{9}){2}", 18), (r"(\d{1,3}\.){3}\d{1,3}", 9), ("[{]{7}", 7),
        (r"\{5}", 1), (r"\p{L}{5}", 5), ("[]]{4}", 4), ("a*b+c?", 1), ("x{2,}", 2), ("[a-z]{1,5000}", 5000),
    ],
)
def test_regex_repetition_counts_nested_and_stacked_bounds(pattern: str, count: int) -> None:
    from xinf_sglang.runtime.constrained.spec import regex_repetition

    assert regex_repetition(pattern) == count


def test_limits_are_engine_options_and_name_themselves(model_dir) -> None:
    from xinf_sglang.runtime import EngineConfig
    from xinf_sglang.runtime.constrained import GrammarSpec

    limits = EngineConfig(model_path=str(model_dir), grammar_max_choices=2, grammar_max_schema_depth=3).grammar_limits()
    GrammarSpec.from_fields(choices=["a", "b", "a"], limits=limits)  # duplicates count once
    with pytest.raises(InvalidRequestError, match="choices has 3 distinct entries; the limit grammar_max_choices is 2"):
        GrammarSpec.from_fields(choices=["a", "b", "c"], limits=limits)
    with pytest.raises(InvalidRequestError, match="at least 4 levels deep; the limit grammar_max_schema_depth is 3"):
        GrammarSpec.from_fields(json_schema={"a": {"b": {"c": {"d": 1}}}}, limits=limits)


# ---- issue 28 point 6: stop strings are bounded in length, so matching them stays cheap ----


def test_stop_strings_at_the_length_bound_keep_each_delta_cheap() -> None:
    """16 stop strings of the longest allowed length, fed text that keeps matching their common prefix and then
    breaks it: the delta that releases the held text (the worst one) still takes milliseconds, and one character
    more is refused before queueing."""
    import time

    from xinf_sglang.runtime.sampling.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS
    from xinf_sglang.runtime.scheduler.detokenizer import StopStringMatcher

    stops = ["a" * (MAX_STOP_CHARS - 1) + chr(0x41 + i) for i in range(MAX_STOP_STRINGS)]
    matcher = StopStringMatcher(SamplingParams(stop=stops).stop)
    worst = 0.0
    for delta in ["a"] * (MAX_STOP_CHARS - 2) + ["c"]:
        start = time.perf_counter()
        matcher.feed(delta)
        worst = max(worst, time.perf_counter() - start)
    assert worst < 0.05, f"one delta took {worst * 1e3:.1f} ms"
    with pytest.raises(InvalidRequestError, match=f"stop strings may be at most {MAX_STOP_CHARS} characters"):
        SamplingParams(stop=["a" * (MAX_STOP_CHARS + 1)])
