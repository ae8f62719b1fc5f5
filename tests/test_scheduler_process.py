"""The scheduler behind a ``multiprocessing`` queue pair, in a spawned process, with the real model runner.

The front end is the in-thread engine's own ``RequestValidator``; the messages it makes cross the process boundary
pickled, and what comes back must equal what the in-thread engine returns for the same requests: greedy and seeded
tokens, text cut at a stop string, usage. Abort works across the boundary, and the process's scheduler is back
to its idle invariant afterwards.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue

import pytest

from xinf_sglang.runtime import EngineConfig, SamplingParams
from xinf_sglang.runtime.constrained import GrammarSpec
from xinf_sglang.runtime.engine.engine import Engine
from xinf_sglang.runtime.engine.messages import (
    Abort,
    AddRequests,
    CheckIdle,
    GetMetrics,
    MetricsSnapshot,
    NewRequest,
    Outputs,
    Reply,
    Stop,
)
from xinf_sglang.runtime.engine.outputs import StreamChunk
from xinf_sglang.runtime.scheduler.process import serve_scheduler

from .engine_helpers import varied_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)
WAIT_S = 120  # a bound on each wait, not a timing assertion: a spawned process imports torch first


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen2")


def test_messages_pickle() -> None:
    """Every message type survives a pickle round trip unchanged (what crossing a process boundary needs)."""
    params = SamplingParams(max_new_tokens=4, stop=["x"], seed=5, structured=GrammarSpec("regex", "[0-9]+"))
    new = NewRequest("a", (1, 2, 3), params, frozenset({0}), 4, priority=-3)
    snapshot = MetricsSnapshot(**{name: 1 for name in MetricsSnapshot.__dataclass_fields__})
    messages = [AddRequests((new,)), Abort("a"), Stop(), GetMetrics(1), CheckIdle(2),
                Outputs((StreamChunk("a", "hi", [5], "stop", 3, 1, 0, "x"),)), Reply(1, snapshot), Reply(2, ("x",))]
    for msg in messages:
        assert pickle.loads(pickle.dumps(msg)) == msg


def _collect(outbox, rids: set[str]) -> dict[str, list[StreamChunk]]:
    """Chunks per request until each of ``rids`` has its last one."""
    chunks: dict[str, list[StreamChunk]] = {rid: [] for rid in rids}
    open_ = set(rids)
    while open_:
        msg = outbox.get(timeout=WAIT_S)
        assert isinstance(msg, Outputs), msg
        for c in msg.chunks:
            chunks[c.request_id].append(c)
            if c.finish_reason is not None:
                open_.discard(c.request_id)
    return chunks


def _reply(outbox) -> Reply:
    msg = outbox.get(timeout=WAIT_S)
    assert isinstance(msg, Reply), msg
    return msg


def test_scheduler_in_a_spawned_process_equals_the_engine(model_dir) -> None:
    config = EngineConfig(model_path=str(model_dir), device="cpu", dtype="float32", debug_invariants=True)
    prompts = varied_prompts(model_dir, 6, min_len=8, max_len=50)
    prompts[4] = prompts[0]  # the stop-string request: its stop is cut from this prompt's greedy text
    with Engine(config) as engine:
        [probe] = engine.generate(input_ids=[prompts[0]], sampling_params=SamplingParams(max_new_tokens=16, **GREEDY))
        stop = probe.text[len(probe.text) // 2 :][:3]
        params = [SamplingParams(max_new_tokens=16, **GREEDY)] * 4 + [
            SamplingParams(max_new_tokens=16, stop=[stop], **GREEDY),
            SamplingParams(max_new_tokens=16, temperature=0.9, seed=7),
        ]
        rids = [f"r{i}" for i in range(len(prompts))]
        refs = engine.generate(input_ids=prompts, sampling_params=params, request_id=rids)
        new = [engine.requests.make(p, sp, rid) for p, sp, rid in zip(prompts, params, rids)]
        long = engine.requests.make(prompts[1], SamplingParams(max_new_tokens=1900, **GREEDY), "long")
        assert engine.check_invariants() == []
    assert refs[4].finish_reason == "stop" and refs[4].matched_stop == stop  # the stop request did stop

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=serve_scheduler, args=(config, inbox, outbox), daemon=True)
    proc.start()
    try:
        inbox.put(AddRequests(tuple(new)))
        got = _collect(outbox, set(rids))
        for ref in refs:
            chunks = got[ref.request_id]
            assert sum((c.token_ids for c in chunks), []) == ref.token_ids
            assert "".join(c.text for c in chunks) == ref.text
            last = chunks[-1]
            assert (last.finish_reason, last.matched_stop) == (ref.finish_reason, ref.matched_stop)
            assert (last.prompt_tokens, last.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)

        inbox.put(AddRequests((long,)))
        first = outbox.get(timeout=WAIT_S)
        assert isinstance(first, Outputs) and first.chunks[0].request_id == "long"
        inbox.put(Abort("long"))
        last = _collect(outbox, {"long"})["long"][-1]
        assert last.finish_reason == "abort" and last.completion_tokens < 1900

        inbox.put(CheckIdle(1))
        assert _reply(outbox) == Reply(1, ())
        inbox.put(GetMetrics(2))
        metrics = _reply(outbox).value
        assert isinstance(metrics, MetricsSnapshot)
        assert (metrics.finished_requests, metrics.aborted_requests) == (len(prompts), 1)
        assert metrics.kv_used_tokens == metrics.kv_evictable_tokens  # what is used is only the cache's
        inbox.put(Stop())
        proc.join(WAIT_S)
        assert proc.exitcode == 0
        with pytest.raises(queue.Empty):
            outbox.get(timeout=0.5)  # nothing was left to abort at the stop
    finally:
        if proc.is_alive():
            proc.kill()
