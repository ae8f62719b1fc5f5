"""A stream whose consumer leaves (``aclose``, or its task cancelled, as a client disconnect does) stops
generating within one scheduler step (issue 28 point 7): the tokens generated after the close are counted by the
engine's own counter, read at the moment of the close and once the request was aborted."""

from __future__ import annotations

import asyncio
import time

import pytest

from xinf_sglang.runtime import SamplingParams

from .engine_helpers import make_engine

WAIT_S = 60  # bounds a hang; not a timing assertion
LONG = dict(max_new_tokens=1500, ignore_eos=True, temperature=1.0, seed=0)


@pytest.fixture(scope="module")
def engine(tiny_model):
    with make_engine(tiny_model("qwen2")) as eng:
        yield eng


async def _read(stream, tokens: int) -> None:
    got = 0
    async for chunk in stream:
        got += len(chunk.token_ids)
        if got >= tokens:
            return


def _generated_after(engine, close) -> int:
    """Run ``close(stats)`` (which leaves a stream mid-generation) and return the tokens generated after it."""
    stats = engine.run_on_scheduler(lambda s: s.stats)  # read without a round trip: the moment of the close counts
    aborted = engine.metrics()["aborted_requests"]
    at_close = asyncio.run(close(stats))
    deadline = time.monotonic() + WAIT_S
    while (m := engine.metrics())["aborted_requests"] == aborted:
        assert time.monotonic() < deadline, "the abandoned request was never aborted"
        time.sleep(0.01)
    assert m["running_requests"] == m["waiting_requests"] == 0
    return m["generated_tokens_total"] - at_close


@pytest.mark.parametrize("n", [1, 3])
def test_aclose_stops_generation_within_one_step(engine, n: int) -> None:
    async def close(stats) -> int:
        stream = engine.generate_stream(input_ids=[5, 6, 7], sampling_params=SamplingParams(n=n, **LONG))
        await _read(stream, 20)
        at_close = stats.generated_tokens
        await stream.aclose()
        return at_close

    assert _generated_after(engine, close) <= n  # the step in flight at the close, nothing after it


def test_a_cancelled_consumer_stops_generation_within_one_step(engine) -> None:
    async def close(stats) -> int:
        stream = engine.generate_stream(input_ids=[5, 6, 7], sampling_params=SamplingParams(**LONG))
        start = stats.generated_tokens
        consumer = asyncio.ensure_future(_read(stream, 10**9))
        while stats.generated_tokens < start + 20:
            await asyncio.sleep(0.001)
        at_close = stats.generated_tokens
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        return at_close

    assert _generated_after(engine, close) <= 1
