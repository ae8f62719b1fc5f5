"""Priority scheduling (``schedule_policy="priority"``): queue order, preemption of running requests, its
threshold, retraction order, the request checks, and that nothing leaks.

Engine tests make arrivals deterministic by holding the scheduler thread between two steps (``_Hold``, through
``Engine.run_on_scheduler``) while the later requests are submitted; with ``max_running_requests=1`` the order in
which requests finish is then the order in which they were admitted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from xinf_sglang.runtime import ConfigError, InvalidRequestError, SamplingParams
from xinf_sglang.runtime.mem_cache.allocator import ReqToTokenPool, TokenAllocator
from xinf_sglang.runtime.scheduler.output_processor import OutputProcessor
from xinf_sglang.runtime.mem_cache.radix_cache import RadixCache
from xinf_sglang.runtime.scheduler.schedule_batch import Req
from xinf_sglang.runtime.scheduler.limits import SchedulerLimits
from xinf_sglang.runtime.scheduler.scheduler import Scheduler

from .engine_helpers import make_engine, varied_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)
WAIT_S = 60  # a bound on waits, not a timing assertion


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def prompts(model_dir):
    return varied_prompts(model_dir, 5, min_len=10, max_len=30)


class _Hold:
    """Holds the scheduler thread between two steps, from the first boundary where ``ready()`` (run there) is true
    until ``release()``: requests submitted meanwhile all reach the queue before the next step."""

    def __init__(self, engine, ready) -> None:
        self.entered, self._released = threading.Event(), threading.Event()

        def hold(scheduler) -> bool:
            if not ready(scheduler):
                return False
            self.entered.set()
            self._released.wait(WAIT_S)
            return True

        def poll() -> None:
            while not engine.run_on_scheduler(hold):
                time.sleep(0.001)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    async def wait_entered(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while not self.entered.is_set():
            assert time.monotonic() < deadline, "the scheduler never reached the hold's condition"
            await asyncio.sleep(0.001)  # keeps the event loop delivering the running streams' chunks

    def release(self) -> None:
        self._released.set()
        self._thread.join(WAIT_S)


def _decoding(engine, rid: str, tokens: int):
    """True (on the scheduler thread) once request ``rid`` runs with at least ``tokens`` output tokens."""
    return lambda scheduler: any(r.rid == rid and len(r.output_ids) >= tokens for r in scheduler.running)


async def _stream(engine, finished: list[str], rid: str, prompt, params, priority: int) -> list:
    """The request's chunks; its id joins ``finished`` when its last chunk arrives (tasks wake in delivery order)."""
    stream = engine.generate_stream(input_ids=prompt, sampling_params=params, request_id=rid, priority=priority)
    chunks = [c async for c in stream]
    finished.append(rid)
    return chunks


async def _arrive_while_running(engine, first: tuple, later: list[tuple]) -> tuple[list[str], dict[str, list]]:
    """Start ``first`` = (rid, prompt, params, priority); once it decodes (4 tokens), submit ``later`` while the
    scheduler is held. Returns the order requests finished in and each request's chunks."""
    finished: list[str] = []
    tasks = {first[0]: asyncio.ensure_future(_stream(engine, finished, *first))}
    hold = _Hold(engine, _decoding(engine, first[0], 4))
    await hold.wait_entered()
    for spec in later:
        tasks[spec[0]] = asyncio.ensure_future(_stream(engine, finished, *spec))
    await asyncio.sleep(0)  # each new task runs to its submission (no grammar: nothing to await before it)
    hold.release()
    chunks = {rid: await task for rid, task in tasks.items()}
    return finished, chunks


def _tokens(chunks: list) -> list[int]:
    return sum((c.token_ids for c in chunks), [])


@pytest.mark.parametrize("low_values_first", [False, True], ids=["larger-first", "smaller-first"])
def test_waiting_requests_are_admitted_by_priority_then_arrival(model_dir, prompts, low_values_first):
    params = SamplingParams(max_new_tokens=6, **GREEDY)
    opts = dict(schedule_low_priority_values_first=True) if low_values_first else {}
    with make_engine(model_dir, schedule_policy="priority", max_running_requests=1, disable_priority_preemption=True,
                     **opts) as engine:
        # 64 tokens: the hold must see "first" between two of its steps with >= 4 tokens; on an idle machine the
        # tiny model decodes a token in about a millisecond, so a short request could end before the poll looks.
        first = ("first", prompts[0], SamplingParams(max_new_tokens=64, **GREEDY), 0)
        later = [("b0", prompts[1], params, 0), ("c5", prompts[2], params, 5), ("d5", prompts[3], params, 5),
                 ("e-1", prompts[4], params, -1)]
        finished, chunks = asyncio.run(_arrive_while_running(engine, first, later))
        expected = ["e-1", "b0", "c5", "d5"] if low_values_first else ["c5", "d5", "b0", "e-1"]
        assert finished == ["first", *expected]  # ties (c5, d5) by arrival
        assert all(c[-1].finish_reason == "length" for c in chunks.values())
        assert engine.metrics()["preemptions"] == 0
        assert engine.check_invariants() == []


@pytest.mark.parametrize(
    "threshold, high_priority, preempts",
    [(None, 20, True), (20, 20, False), (20, 21, True)],
    ids=["default-threshold-10", "difference-equals-threshold", "difference-exceeds-threshold"],
)
def test_urgent_arrival_preempts_a_running_request_when_the_batch_is_full(
    model_dir, prompts, threshold, high_priority, preempts
):
    """The batch is full (one row): an arrival more urgent by more than the threshold preempts the running request,
    which still completes with exactly its unpreempted greedy output; otherwise the arrival waits its turn."""
    low_params = SamplingParams(max_new_tokens=40, **GREEDY)
    opts = {} if threshold is None else dict(priority_scheduling_preemption_threshold=threshold)
    with make_engine(model_dir, schedule_policy="priority", max_running_requests=1, **opts) as engine:
        [alone] = engine.generate(input_ids=[prompts[0]], sampling_params=low_params)
        first = ("low", prompts[0], low_params, 0)
        later = [("high", prompts[1], SamplingParams(max_new_tokens=8, **GREEDY), high_priority)]
        finished, chunks = asyncio.run(_arrive_while_running(engine, first, later))
        assert finished == (["high", "low"] if preempts else ["low", "high"])
        assert _tokens(chunks["low"]) == alone.token_ids
        assert "".join(c.text for c in chunks["low"]) == alone.text
        assert chunks["low"][-1].completion_tokens == 40 and chunks["high"][-1].completion_tokens == 8
        m = engine.metrics()
        assert (m["preemptions"], m["retractions"]) == ((1, 1) if preempts else (0, 0))
        assert engine.check_invariants() == []


def test_priority_needs_the_priority_policy(model_dir, prompts):
    params = SamplingParams(max_new_tokens=2, **GREEDY)
    with make_engine(model_dir) as engine:  # fcfs
        with pytest.raises(InvalidRequestError, match="priority=3 needs schedule_policy='priority'"):
            engine.generate(input_ids=[prompts[0]], sampling_params=params, priority=3)
        [out] = engine.generate(input_ids=[prompts[0]], sampling_params=params, priority=0)  # the default: fine
        assert out.finish_reason == "length"
        for bad in ["high", True, 1.5, 2**63]:
            with pytest.raises(InvalidRequestError, match="priority must be an integer"):
                engine.generate(input_ids=[prompts[0]], sampling_params=params, priority=bad)
        with pytest.raises(InvalidRequestError, match="priority has 1 entries for 2 prompts"):
            engine.generate(input_ids=prompts[:2], sampling_params=params, priority=[1])
        assert engine.metrics()["finished_requests"] == 1  # nothing refused was queued
        assert engine.check_invariants() == []
    with pytest.raises(ConfigError, match="disable_priority_preemption is only used with schedule_policy='priority'"):
        make_engine(model_dir, disable_priority_preemption=True)


# ---- the scheduler's decisions, without a model ----


def _req(rid: str, n_prompt: int, priority: int, arrival: float, max_new: int = 20) -> Req:
    return Req(rid, list(range(int(100 * arrival), int(100 * arrival) + n_prompt)), SamplingParams(max_new_tokens=max_new),
               frozenset(), max_new, arrival=arrival, priority=priority)


def _scheduler(pool: int, threshold: int | None) -> Scheduler:
    allocator = TokenAllocator(pool)
    limits = SchedulerLimits(max_running_requests=4, max_prefill_tokens=512, chunked_prefill_size=512,
                             schedule_policy="priority", preemption_threshold=threshold)
    runner = SimpleNamespace(device=torch.device("cpu"))  # admission and retraction never run the model
    return Scheduler(limits, runner, allocator, ReqToTokenPool(4, 256, "cpu"), RadixCache(allocator), OutputProcessor())


def _run(sched: Scheduler, req: Req, outputs: int) -> None:
    """``req`` as a running request that has decoded ``outputs`` tokens (its KV all in the pool)."""
    req.output_ids = list(range(outputs))
    slots = sched.kv.admit(req, req.extend_len, torch.empty(0, dtype=torch.int64), sched.prefix_cache.match_prefix([])[1])
    req.kv_len = len(req.fill_ids)
    sched.req_pool.table[req.req_pool_idx, : req.kv_len] = slots.to(torch.int32)
    sched.running.append(req)


@pytest.mark.parametrize("threshold, preempts", [(4, True), (5, False)])
def test_urgent_arrival_preempts_when_the_pool_is_full(threshold, preempts):
    """100 pool tokens, 70 held by a running priority-0 request: a priority-5 arrival needing 50 does not fit. It
    preempts (the running request goes back to the queue with its output) only if 5 exceeds the threshold."""
    sched = _scheduler(100, threshold)
    low = _req("low", 60, priority=0, arrival=1.0)
    _run(sched, low, outputs=10)
    high = _req("high", 40, priority=5, arrival=2.0, max_new=10)
    sched.add(high)
    assert sched._admission_possible() == preempts
    batch = sched._schedule_prefill()
    if preempts:
        assert batch.reqs == [high] and list(sched.waiting) == [low]
        assert low.output_ids == list(range(10)) and low.req_pool_idx is None and low.retractions == 1
        assert sched.stats.preemptions == 1
    else:
        assert batch is None and sched.running == [low] and sched.stats.preemptions == 0


def test_kv_shortage_retracts_the_least_urgent_first():
    """Out of KV for the next decode step, the priority policy retracts the least urgent running request, even
    though another has decoded fewer tokens (fcfs/lpm would retract that one)."""
    sched = _scheduler(64, threshold=None)
    urgent, relaxed = _req("urgent", 30, priority=9, arrival=1.0), _req("relaxed", 28, priority=1, arrival=2.0)
    _run(sched, urgent, outputs=1)
    _run(sched, relaxed, outputs=5)
    assert sched.kv.free_tokens() == 0
    batch = sched._schedule_decode()
    assert batch.reqs == [urgent] and list(sched.waiting) == [relaxed]
    assert (sched.stats.retractions, sched.stats.preemptions) == (1, 0)
