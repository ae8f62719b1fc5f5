"""``SamplingParams(n=...)``: n sequences from one prompt (runtime/sampling/parallel_sampling.py), on a tiny model.

Seeds reproduce and differ per sequence, greedy sequences are identical, the prompt is computed once (the other
sequences share its K/V), aborting the request aborts every sequence, streaming gives what ``generate`` gives.
"""

from __future__ import annotations

import asyncio

import pytest

from xinf_sglang.runtime import InvalidRequestError, SamplingParams
from xinf_sglang.runtime.sampling.parallel_sampling import sibling_id, sibling_seed

from .engine_helpers import hf_greedy, make_engine, varied_prompts

SAMPLED = dict(temperature=1.0, ignore_eos=True, max_new_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = make_engine(model_dir, max_running_requests=8)
    yield eng
    eng.shutdown()


def _prompt(model_dir, seed: int, length: int = 40) -> list[int]:
    return varied_prompts(model_dir, 1, min_len=length, max_len=length, seed=seed)[0]


def test_seeded_samples_differ_per_sequence_and_reproduce(engine, model_dir):
    prompt = _prompt(model_dir, 1)
    params = SamplingParams(n=3, seed=7, **SAMPLED)
    first = engine.generate(input_ids=prompt, sampling_params=params, request_id="r")
    again = engine.generate(input_ids=prompt, sampling_params=params, request_id="r")
    assert [(o.request_id, o.index) for o in first] == [("r", 0), ("r", 1), ("r", 2)]
    tokens = [o.token_ids for o in first]
    assert len({tuple(t) for t in tokens}) == 3  # three different samples at temperature 1
    assert [o.token_ids for o in again] == tokens  # the same seed reproduces all three
    [alone] = engine.generate(input_ids=prompt, sampling_params=SamplingParams(seed=7, **SAMPLED))
    assert alone.token_ids == tokens[0]  # sequence 0 keeps the request's own seed
    for i in (1, 2):  # sequence i samples like a single request with the derived seed
        [single] = engine.generate(input_ids=prompt, sampling_params=SamplingParams(seed=sibling_seed(7, i), **SAMPLED))
        assert single.token_ids == tokens[i]


def test_unseeded_samples_are_independent(engine, model_dir):
    outs = engine.generate(input_ids=_prompt(model_dir, 2), sampling_params=SamplingParams(n=4, **SAMPLED))
    assert len({tuple(o.token_ids) for o in outs}) == 4


def test_greedy_sequences_are_identical_and_equal_hf(engine, model_dir):
    prompt = _prompt(model_dir, 3)
    outs = engine.generate(input_ids=prompt, sampling_params=SamplingParams(n=3, temperature=0, ignore_eos=True,
                                                                               max_new_tokens=10))
    assert [o.token_ids for o in outs] == [hf_greedy(model_dir, prompt, 10)] * 3


def test_the_prompt_is_computed_once(engine, model_dir):
    prompt = _prompt(model_dir, 4, length=60)  # not cached yet
    before = engine.metrics()
    outs = engine.generate(input_ids=prompt, sampling_params=SamplingParams(n=4, seed=1, **SAMPLED))
    after = engine.metrics()
    # The first sequence computes the prompt; the others share it and compute only its last token (which the
    # cache always leaves uncached, for the logits).
    assert [o.cached_tokens for o in outs] == [0, 59, 59, 59]
    assert [o.prompt_tokens for o in outs] == [60] * 4
    assert after["prefill_tokens_total"] - before["prefill_tokens_total"] == 60 + 3
    assert after["cached_prompt_tokens_total"] - before["cached_prompt_tokens_total"] == 3 * 59
    assert [o.completion_tokens for o in outs] == [12] * 4


def test_streaming_equals_generate(engine, model_dir):
    prompt = _prompt(model_dir, 5)
    params = SamplingParams(n=3, seed=11, **SAMPLED)
    offline = engine.generate(input_ids=prompt, sampling_params=params)

    async def main():
        return [c async for c in engine.generate_stream(input_ids=prompt, sampling_params=params, request_id="s")]

    chunks = asyncio.run(main())
    assert {c.request_id for c in chunks} == {"s"}
    for out in offline:
        mine = [c for c in chunks if c.index == out.index]
        assert sum((c.token_ids for c in mine), []) == out.token_ids
        assert "".join(c.text for c in mine) == out.text
        assert [c.finish_reason for c in mine][-1] == "length" and all(c.finish_reason is None for c in mine[:-1])
    assert chunks[-1].finish_reason is not None  # the stream ends with the last sequence's final chunk


def test_abort_of_the_request_aborts_every_sequence(engine, model_dir):
    long = SamplingParams(n=3, seed=2, temperature=1.0, ignore_eos=True, max_new_tokens=400)
    finished: list[str] = []

    async def main():
        stream = engine.generate_stream(input_ids=_prompt(model_dir, 6), sampling_params=long, request_id="a",
                                        on_finish=finished.append)
        chunks = [await stream.__anext__()]
        engine.abort("a")
        chunks += [c async for c in stream]
        return chunks

    chunks = asyncio.run(main())
    finals = {c.index: c.finish_reason for c in chunks if c.finish_reason is not None}
    assert finals == {0: "abort", 1: "abort", 2: "abort"}
    assert finished == ["a"]  # on_finish once, for the request


def test_closing_the_stream_aborts_every_sequence(engine, model_dir):
    long = SamplingParams(n=3, seed=2, temperature=1.0, ignore_eos=True, max_new_tokens=400)

    async def main():
        stream = engine.generate_stream(input_ids=_prompt(model_dir, 7), sampling_params=long, request_id="c")
        await stream.__anext__()
        await stream.aclose()

    asyncio.run(main())
    assert engine.check_invariants() == []  # every sequence freed its KV
    engine.abort("c")  # the group is gone: a no-op
    [again] = engine.generate(input_ids=[1, 2, 3], sampling_params=SamplingParams(max_new_tokens=2), request_id="c")
    assert again.finish_reason == "length"  # the id is free again


def test_each_sequence_reports_its_own_end(engine, model_dir):
    """One sequence aborted on its own (by its scheduler-side id) ends alone, with its index; the others finish."""
    params = SamplingParams(n=3, seed=3, temperature=1.0, ignore_eos=True, max_new_tokens=200)

    async def main():
        stream = engine.generate_stream(input_ids=_prompt(model_dir, 8), sampling_params=params, request_id="e")
        chunks = [await stream.__anext__()]
        engine.abort(sibling_id("e", 1))
        chunks += [c async for c in stream]
        return chunks

    finals = {c.index: c.finish_reason for c in asyncio.run(main()) if c.finish_reason is not None}
    assert finals == {0: "length", 1: "abort", 2: "length"}


def test_a_failed_step_reports_the_error_on_every_sequence(model_dir):
    with make_engine(model_dir) as engine:
        runner = engine.run_on_scheduler(lambda s: s.runner)
        real_forward = runner.forward

        def broken_forward(batch):
            runner.forward = real_forward  # fail exactly once
            raise RuntimeError("simulated device failure")

        runner.forward = broken_forward
        outs = engine.generate(input_ids=[5, 6, 7, 8], sampling_params=SamplingParams(n=2, max_new_tokens=4))
        assert [(o.index, o.finish_reason) for o in outs] == [(0, "abort"), (1, "abort")]
        assert all("simulated device failure" in o.error for o in outs)
        assert engine.check_invariants() == []


def test_batches_mix_n_and_single_requests(engine, model_dir):
    prompts = [_prompt(model_dir, 9, 20), _prompt(model_dir, 10, 30)]
    params = [SamplingParams(n=2, seed=4, **SAMPLED), SamplingParams(seed=5, **SAMPLED)]
    outs = engine.generate(input_ids=prompts, sampling_params=params, request_id=["x", "y"])
    assert [(o.request_id, o.index, o.prompt_tokens) for o in outs] == [("x", 0, 20), ("x", 1, 20), ("y", 0, 30)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=9), "n=9 is more than this engine's max_running_requests=8"),
        (dict(n=0), "n must be an integer in [1, 128]"),
        (dict(n=129), "n must be an integer in [1, 128]"),
        (dict(n=True), "n must be an integer in [1, 128]"),
        (dict(n=2, max_new_tokens=0), "n=2 needs max_new_tokens >= 1"),
    ],
)
def test_bad_n_is_refused_before_anything_is_queued(engine, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        engine.generate(input_ids=[1, 2, 3], sampling_params=SamplingParams(**kwargs))
    assert engine.metrics()["waiting_requests"] == 0


def test_a_live_request_id_cannot_start_another_group(engine, model_dir):
    long = SamplingParams(n=2, temperature=1.0, ignore_eos=True, max_new_tokens=300)

    async def main():
        stream = engine.generate_stream(input_ids=_prompt(model_dir, 11), sampling_params=long, request_id="dup")
        await stream.__anext__()
        with pytest.raises(InvalidRequestError, match="'dup' is already in use"):
            engine.generate(input_ids=[1, 2], sampling_params=SamplingParams(n=2, max_new_tokens=2), request_id="dup")
        await stream.aclose()

    asyncio.run(main())
