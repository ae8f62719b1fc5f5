"""Fuzz and soak (issue 13).

- Soak: N mixed requests (chat and completions, prompt sizes, sampling settings, constraints, stop strings) through
  the Xinference plugin's real engine class, run in-process on a tiny model (a real ``CustomLLMFamilyV2``, no
  server), with random client behaviour: read to the end, close the stream early, abort it by id, or abandon it
  unclosed (what a client disconnect can leave behind in Xinference). Afterwards the engine is at its idle
  invariant and the plugin tracks no request. N is small in CI; ``SGLITE_SOAK_N=5000`` runs a long soak.
- Hypothesis: every generated bad value for ``SamplingParams`` / ``map_request`` / ``GrammarSpec`` is an
  ``InvalidRequestError`` / ``RequestMappingError`` (a 400), never another exception type.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xinf_sglang.openai_api.request_mapping import RequestMappingError, map_request
from xinf_sglang.runtime import InvalidRequestError, SamplingParams
from xinf_sglang.runtime.constrained import GrammarSpec

SOAK_N = int(os.environ.get("SGLITE_SOAK_N", "60"))
CONCURRENCY = 12
CONTEXT = 512

# ---------------------------------------------------------------------------------------------------- soak


@pytest.fixture(scope="module")
def plugin(tiny_model):
    pytest.importorskip("xinference")
    from xinference.model.llm.llm_family import CustomLLMFamilyV2

    from xinf_sglang.registration.custom_model import custom_llm_family
    from xinf_sglang.serving.engine import SgliteChatModel

    model_dir = tiny_model("qwen2")
    family = CustomLLMFamilyV2.parse_raw(json.dumps(custom_llm_family(model_dir, "sglite-soak")))
    model = SgliteChatModel(
        "soak", family, str(model_dir),
        {"device": "cpu", "context_length": CONTEXT, "max_running_requests": 16, "mem_fraction_static": 0.2,
         "max_total_tokens": 2048, "debug_invariants": True},  # a small pool: retractions happen too
    )
    model.load()
    yield model
    model.stop()


CONSTRAINTS: list[dict[str, Any]] = [
    {},
    {},
    {"guided_regex": "[a-z]{1,6}( [a-z]{1,6}){0,3}"},
    {"guided_choice": ["yes", "no", "maybe"]},
    {"guided_json": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
                     "required": ["n"], "additionalProperties": False}},
    {"response_format": {"type": "json_object"}},
]


def _random_config(rng: random.Random) -> dict[str, Any]:
    config: dict[str, Any] = {"max_tokens": rng.randint(1, 40), "stream": rng.random() < 0.8}
    config["temperature"] = rng.choice([0.0, 0.7, 1.0, 1.8])
    if rng.random() < 0.3:
        config.update(top_p=rng.uniform(0.1, 1.0), top_k=rng.choice([-1, 1, 5, 50]))
    if rng.random() < 0.2:
        config.update(frequency_penalty=rng.uniform(-2, 2), presence_penalty=rng.uniform(-2, 2))
    if rng.random() < 0.2:
        config["repetition_penalty"] = rng.uniform(0.5, 2.0)
    if rng.random() < 0.3:
        config["stop"] = rng.sample(["\n", "e", "the", " a", "}"], rng.randint(1, 3))
    if rng.random() < 0.5:
        config["seed"] = rng.randint(0, 2**31)
    config.update(rng.choice(CONSTRAINTS))
    return config


def _random_prompt(rng: random.Random) -> str:
    words = ["alpha", "beta", "gamma", "delta", "{", "}", "\n", "0123", "é", "日本"]
    return " ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 20, 120])))


async def _one(plugin, rng: random.Random, abandoned: list, rid: str) -> str:
    """One client: what it sends and what it does with the stream are drawn from ``rng``."""
    config = _random_config(rng)
    chat = "response_format" in config or rng.random() < 0.6  # response_format is a chat field
    prompt = _random_prompt(rng)
    if chat:
        result = await plugin.async_chat([{"role": "user", "content": prompt}], dict(config), rid)
    else:
        result = await plugin.async_generate(prompt, dict(config), rid)
    if isinstance(result, dict):
        return "done"
    behaviour = rng.choice(["finish", "finish", "close", "abort", "abandon"])
    after = rng.randint(0, 5)
    seen = 0
    async for _ in result:
        seen += 1
        if behaviour != "finish" and seen > after:
            break
    if behaviour == "abort":
        await plugin.abort_request(rid)
    if behaviour == "abandon":
        abandoned.append(result)  # never resumed, never closed: only the engine's finish can settle it
    else:
        await result.aclose()
    return behaviour


async def _soak(plugin, n: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(CONCURRENCY)
    abandoned: list = []

    async def guarded(i: int) -> str:
        async with gate:
            return await _one(plugin, random.Random(rng.random()), abandoned, f"soak-{seed}-{i}")

    outcomes = await asyncio.gather(*(guarded(i) for i in range(n)))
    engine = plugin._engine
    assert await asyncio.to_thread(engine.check_invariants, 120.0) == []
    for _ in range(200):  # on_finish callbacks run on this loop: let them
        if plugin.sglite_metrics()["plugin_active_requests"] == 0:
            break
        await asyncio.sleep(0.05)
    metrics = plugin.sglite_metrics()
    for gen in abandoned:
        await gen.aclose()
    return {"active": metrics["plugin_active_requests"], "running": metrics["running_requests"],
            "waiting": metrics["waiting_requests"], "abandoned": len(abandoned),
            **{k: outcomes.count(k) for k in set(outcomes)}}


def test_soak_mixed_requests_with_random_aborts(plugin) -> None:
    stats = asyncio.run(_soak(plugin, SOAK_N, seed=int(os.environ.get("SGLITE_SOAK_SEED", "0"))))
    print("soak:", stats)
    assert stats["active"] == stats["running"] == stats["waiting"] == 0, stats
    assert plugin._engine.check_invariants() == []
    assert plugin.sglite_metrics()["plugin_active_requests"] == 0


# ---------------------------------------------------------------------------------------------------- fuzz

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELD_VALUES = JSON_VALUES | st.sampled_from(
    ["a{1000}{1000}", "((", "\ud800", "[0-9]", "start: /x/", "root ::= \"a\"", -1, 0, 2**64, float("inf")]
)


def _grammar_spec(params: SamplingParams) -> None:
    GrammarSpec.from_fields(json_schema=params.json_schema, regex=params.regex, ebnf=params.ebnf,
                            choices=params.choices)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(list(SamplingParams.model_fields) + ["bogus"]), FIELD_VALUES, max_size=4))
def test_sampling_params_fuzz_only_raises_invalid_request(kwargs: dict[str, Any]) -> None:
    try:
        params = SamplingParams(**kwargs)
        params.verify(1000)
        _grammar_spec(params)
    except InvalidRequestError:
        pass


REQUEST_FIELDS = [
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
    "seed", "stream", "stream_options", "response_format", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "guided_json_object", "regex", "choice", "ebnf", "tools", "tool_choice",
    "parallel_tool_calls", "chat_template_kwargs", "extra_body", "logprobs", "n", "echo", "frequency_penalty",
    "presence_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens", "user", "bogus",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(REQUEST_FIELDS), FIELD_VALUES, max_size=5), st.sampled_from(["chat", "completion"]))
def test_request_mapping_fuzz_only_raises_request_errors(config: dict[str, Any], kind: str) -> None:
    try:
        sampling, _ = map_request(config, kind)  # type: ignore[arg-type]
    except RequestMappingError:
        return
    try:
        params = SamplingParams(**sampling)
        _grammar_spec(params)
    except InvalidRequestError:
        pass


def test_tools_as_an_iterator_are_accepted() -> None:
    # Xinference's REST layer passes tools as a list iterator; a non-list of objects is a mapping error.
    _, opts = map_request({"tools": iter([{"type": "function", "function": {"name": "f"}}])}, "chat")
    assert opts.tools == [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(RequestMappingError, match="tools must be a list of tool objects"):
        map_request({"tools": [1]}, "chat")
