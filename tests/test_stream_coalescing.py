"""Stream coalescing and ``stream_interval`` (issue 29): the merge of pending deltas (``outputs.merge_chunks``),
the backlog's hand-out rule (``stream_backlog.StreamBacklog``) in isolation, and ``Engine.generate_stream`` with a
slow reader and with ``stream_interval`` against the same request run to completion."""

from __future__ import annotations

import asyncio

import pytest

from xinf_sglang.runtime import InvalidRequestError, SamplingParams
from xinf_sglang.runtime.engine.outputs import StreamChunk, TokenLogprob, merge_chunks
from xinf_sglang.runtime.engine.stream_backlog import StreamBacklog

from .engine_helpers import make_engine


def _chunk(tokens: list[int], total: int, index: int = 0, finish: str | None = None, **kw) -> StreamChunk:
    text = "".join(f"<{t}>" for t in tokens)
    return StreamChunk("r", text, list(tokens), finish, prompt_tokens=3, completion_tokens=total, index=index, **kw)


def test_merge_concatenates_in_order_and_keeps_the_final_fields() -> None:
    lp = [TokenLogprob(t, -float(t)) for t in range(4)]
    prompt = [TokenLogprob(9, -1.0)]
    parts = [
        _chunk([0], 1, output_logprobs=lp[:1], prompt_logprobs=prompt),
        _chunk([1, 2], 3, output_logprobs=lp[1:3]),
        _chunk([3], 4, finish="stop", output_logprobs=lp[3:], matched_stop="x", cached_tokens=2),
    ]
    merged = merge_chunks(parts)
    assert merged.text == "<0><1><2><3>" and merged.token_ids == [0, 1, 2, 3]
    assert merged.output_logprobs == lp and merged.prompt_logprobs == prompt
    assert (merged.finish_reason, merged.completion_tokens, merged.matched_stop, merged.cached_tokens) == (
        "stop", 4, "x", 2)
    assert merge_chunks(parts[:1]) is parts[0]
    assert merge_chunks([_chunk([0], 1), _chunk([1], 2)]).output_logprobs is None


def _drain(interval: int, puts: list[list[StreamChunk]]) -> list[StreamChunk]:
    """A backlog with ``stream_interval`` ``interval``: put each group of chunks, then take every chunk it hands
    out without waiting (a reader that pulls once per group); the chunks taken, in order."""

    async def scenario() -> list[StreamChunk]:
        backlog, taken = StreamBacklog(asyncio.get_running_loop(), interval), []
        for group in puts:
            for c in group:
                backlog.put(c)
            while True:
                try:
                    taken.append(await asyncio.wait_for(backlog.get(), 0.05))
                except asyncio.TimeoutError:
                    break
        return taken

    return asyncio.run(scenario())


def test_a_lagging_reader_gets_the_backlog_as_one_chunk() -> None:
    taken = _drain(1, [[_chunk([0], 1)], [_chunk([t], t + 1) for t in range(1, 5)],
                                [_chunk([5], 6, finish="length")]])
    assert [c.token_ids for c in taken] == [[0], [1, 2, 3, 4], [5]]
    assert taken[-1].finish_reason == "length" and taken[-1].completion_tokens == 6


def test_stream_interval_first_at_once_then_every_k_and_always_the_last() -> None:
    step = [[_chunk([t], t + 1)] for t in range(9)] + [[_chunk([9], 10, finish="stop")]]
    taken = _drain(4, step)
    assert [c.token_ids for c in taken] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert "".join(c.text for c in taken) == "".join(f"<{t}>" for t in range(10))


def test_n_sequences_merge_per_index_in_order() -> None:
    puts = [[_chunk([0], 1, 0), _chunk([10], 1, 1), _chunk([1], 2, 0), _chunk([11], 2, 1, finish="stop"),
             _chunk([2], 3, 0, finish="stop")]]
    taken = _drain(1, puts)
    assert [(c.index, c.token_ids, c.finish_reason) for c in taken] == [
        (0, [0, 1, 2], "stop"), (1, [10, 11], "stop")]


def test_an_error_chunk_goes_out_at_once() -> None:
    taken = _drain(8, [[_chunk([0], 1)], [_chunk([1], 2)], [_chunk([], 2, finish="abort", error="boom")]])
    assert [(c.token_ids, c.error) for c in taken] == [([0], None), ([1], "boom")]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_a_bad_stream_interval_is_refused(bad) -> None:
    with pytest.raises(InvalidRequestError, match="stream_interval"):
        StreamBacklog(asyncio.new_event_loop(), bad)


async def _stream(engine, prompt: list[int], params: SamplingParams, delay: float = 0.0, **kw) -> list[StreamChunk]:
    chunks = []
    async for chunk in engine.generate_stream(input_ids=prompt, sampling_params=params, **kw):
        chunks.append(chunk)
        await asyncio.sleep(delay)  # a slow reader: the scheduler runs ahead meanwhile
    return chunks


def test_engine_streams_the_same_text_coalesced_or_by_interval(tiny_model) -> None:
    model_dir = tiny_model(arch="llama", seed=0)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True, logprobs=True)
    prompt = list(range(5, 25))
    with make_engine(model_dir, stream_interval=1) as engine:
        [whole] = engine.generate(input_ids=prompt, sampling_params=params)
        runs = {
            "slow reader": asyncio.run(_stream(engine, prompt, params, delay=0.05)),
            "interval 4": asyncio.run(_stream(engine, prompt, params, stream_interval=4)),
            "interval 1": asyncio.run(_stream(engine, prompt, params)),
        }
        with pytest.raises(InvalidRequestError, match="stream_interval"):
            asyncio.run(_stream(engine, prompt, params, stream_interval=0))
    for name, chunks in runs.items():
        assert "".join(c.text for c in chunks) == whole.text, name
        assert [t for c in chunks for t in c.token_ids] == whole.token_ids, name
        assert [lp.token_id for c in chunks for lp in c.output_logprobs] == whole.token_ids, name
        assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"], name
        assert chunks[-1].completion_tokens == 40, name
    assert len(runs["slow reader"]) < 40  # merged while the reader slept
    assert all(len(c.token_ids) >= 4 for c in runs["interval 4"][1:-1])
    assert len(runs["interval 4"]) <= 1 + -(-39 // 4)
