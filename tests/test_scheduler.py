"""Scheduler units without a model: admission decisions on a hand-built pool, radix cache and queue."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from xinf_sglang.runtime.allocator import ReqToTokenPool, TokenAllocator
from xinf_sglang.runtime.output_processor import OutputProcessor
from xinf_sglang.runtime.radix_cache import RadixCache
from xinf_sglang.runtime.request import Req
from xinf_sglang.runtime.sampling_params import SamplingParams
from xinf_sglang.runtime.scheduler import Scheduler, SchedulerLimits

CACHED = list(range(1000, 1030))  # a 30-token prefix in the radix cache


def _req(rid: str, input_ids: list[int], max_new_tokens: int, arrival: float) -> Req:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return Req(rid, input_ids, params, lambda chunk: None, frozenset(), max_new_tokens, arrival=arrival)


def _lpm_scheduler() -> Scheduler:
    """100 pool tokens: 30 cached (evictable), 20 held by one running request with 10 tokens still to come
    (0.7 * 10 = 7 reserved), so 80 are free and 73 are room for admissions."""
    allocator = TokenAllocator(100)
    req_pool = ReqToTokenPool(4, 256, "cpu")
    cache = RadixCache(allocator)
    cache.insert(CACHED, allocator.alloc(len(CACHED)))
    limits = SchedulerLimits(
        max_running_requests=4, max_prefill_tokens=512, chunked_prefill_size=512, schedule_policy="lpm",
        disable_radix_cache=False,
    )
    runner = SimpleNamespace(device=torch.device("cpu"))  # admission never runs the model
    sched = Scheduler(limits, runner, allocator, req_pool, cache, OutputProcessor())
    running = _req("running", list(range(20)), 30, arrival=0.0)
    running.output_ids = list(range(20))
    running.req_pool_idx = req_pool.alloc()
    running.kv_len = 20
    req_pool.table[running.req_pool_idx, :20] = allocator.alloc(20).to(torch.int32)
    sched.running.append(running)
    return sched


@pytest.mark.parametrize(
    "head_new_tokens, lpm_first_max_new",
    [(80, 1), (2, 100)],
    ids=["head-too-big-lpm-first-fits", "head-fits-lpm-first-too-big"],
)
def test_lpm_admission_check_matches_admission(head_new_tokens, lpm_first_max_new):
    """Under ``lpm`` the request with the longest cached prefix is admitted first, not the head of the queue: the
    "could a waiting request be admitted" check (which decides whether overlap may chain the next decode step)
    must answer for that request, i.e. agree with what the admission then does."""
    sched = _lpm_scheduler()
    sched.add(_req("head", list(range(500, 500 + head_new_tokens)), 1, arrival=1.0))
    sched.add(_req("prefixed", CACHED + [7, 8], lpm_first_max_new, arrival=2.0))
    possible = sched._admission_possible()
    batch = sched._schedule_prefill()
    assert possible == (batch is not None)
