"""Prompt scoring under load (issue 28 point 3): ``echo`` + ``logprobs`` scores every prompt position, each a
[vocab] row of logits and of log-softmax. No step computes more than the memory plan's
``max_scored_prompt_tokens`` such rows (a long scored prompt is scored over several steps), so one client's long
scored prompt runs beside other clients' streams with nobody aborted, and the values still equal HF's."""

from __future__ import annotations

import asyncio
import math

import pytest

from xinf_sglang.runtime import SamplingParams

from .engine_helpers import make_engine, varied_prompts
from .test_logprobs import assert_prompt_logprobs, hf_logprobs


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


def _record_scored_rows(engine) -> list[int]:
    """Per forward from now on: how many logits rows beyond one per request it computed (the scored rows)."""
    runner = engine.run_on_scheduler(lambda s: s.runner)
    rows: list[int] = []

    def install(_scheduler):
        real = runner.forward

        def forward(batch):
            logits = real(batch)
            rows.append(logits.shape[0] - len(batch.reqs))
            return logits

        runner.forward = forward

    engine.run_on_scheduler(install)
    return rows


async def _stream(engine, **kwargs):
    return [chunk async for chunk in engine.generate_stream(**kwargs)]


async def _together(engine, long_prompt, others, scored: SamplingParams):
    plain = SamplingParams(temperature=0, max_new_tokens=48, ignore_eos=True)
    streams = [asyncio.ensure_future(_stream(engine, input_ids=p, sampling_params=plain)) for p in others]
    await asyncio.sleep(0.2)  # the others are decoding when the long prompt arrives
    scoring = asyncio.ensure_future(_stream(engine, input_ids=long_prompt, sampling_params=scored))
    return await scoring, await asyncio.gather(*streams)


def test_a_long_scored_prompt_beside_streams_is_scored_in_bounded_steps(model_dir) -> None:
    long_prompt = varied_prompts(model_dir, 1, min_len=700, max_len=700, seed=7)[0]
    others = varied_prompts(model_dir, 3, min_len=10, max_len=40, seed=8)
    with make_engine(model_dir) as engine:
        cap = engine.memory_plan.max_scored_prompt_tokens
        assert cap == 256 and len(long_prompt) > 2 * cap  # the CPU default; the prompt needs three steps
        rows = _record_scored_rows(engine)
        scored = SamplingParams(temperature=0, max_new_tokens=2, prompt_logprobs_start=0, top_logprobs=2)
        chunks, streams = asyncio.run(_together(engine, long_prompt, others, scored))
        metrics = engine.metrics()
        assert engine.check_invariants() == []
    assert max(rows) <= cap, f"a step scored {max(rows)} prompt positions (cap {cap})"
    assert sum(1 for r in rows if r) >= math.ceil((len(long_prompt) - 1) / cap)
    assert metrics["aborted_requests"] == 0
    for stream in streams:
        assert stream[-1].finish_reason == "length" and sum(len(c.token_ids) for c in stream) == 48
    assert chunks[-1].finish_reason == "length" and all(c.error is None for c in chunks)
    out = chunks[0]
    assert len(out.prompt_logprobs) == len(long_prompt) - 1
    assert_prompt_logprobs(out, long_prompt, 0, hf_logprobs(model_dir, long_prompt))


@pytest.mark.parametrize("start", [0, 30, 90])
def test_a_small_cap_with_chunked_prefill_still_matches_hf(model_dir, start: int) -> None:
    prompt = varied_prompts(model_dir, 1, min_len=120, max_len=120, seed=9)[0]
    params = SamplingParams(temperature=0, max_new_tokens=1, prompt_logprobs_start=start, top_logprobs=1)
    with make_engine(model_dir, max_scored_prompt_tokens=16, chunked_prefill_size=48, max_prefill_tokens=48) as eng:
        rows = _record_scored_rows(eng)
        [out] = eng.generate(input_ids=[prompt], sampling_params=params)
        assert eng.check_invariants() == []
    assert max(rows) <= 16 and sum(rows) == len(prompt) - max(start, 1)
    assert_prompt_logprobs(out, prompt, start, hf_logprobs(model_dir, prompt))
