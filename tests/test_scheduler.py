"""Scheduler units without a model: admission decisions on a hand-built pool, radix cache and queue."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from xinf_sglang.runtime.mem_cache.allocator import ReqToTokenPool, TokenAllocator
from xinf_sglang.runtime.scheduler.output_processor import OutputProcessor
from xinf_sglang.runtime.mem_cache.prefix_cache import NoPrefixCache
from xinf_sglang.runtime.mem_cache.radix_cache import RadixCache
from xinf_sglang.runtime.scheduler.schedule_batch import Req
from xinf_sglang.runtime.sampling.sampling_params import SamplingParams
from xinf_sglang.runtime.scheduler.limits import SchedulerLimits
from xinf_sglang.runtime.scheduler.scheduler import Scheduler
from xinf_sglang.runtime.scheduler.policy import order_waiting

CACHED = list(range(1000, 1030))  # a 30-token prefix in the radix cache


def _req(rid: str, input_ids: list[int], max_new_tokens: int, arrival: float) -> Req:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return Req(rid, input_ids, params, frozenset(), max_new_tokens, arrival=arrival)


def _lpm_scheduler() -> Scheduler:
    """100 pool tokens: 30 cached (evictable), 20 held by one running request with 10 tokens still to come
    (0.7 * 10 = 7 reserved), so 80 are free and 73 are room for admissions."""
    allocator = TokenAllocator(100)
    req_pool = ReqToTokenPool(4, 256, "cpu")
    cache = RadixCache(allocator)
    cache.insert(CACHED, allocator.alloc(len(CACHED)))
    limits = SchedulerLimits(
        max_running_requests=4, max_prefill_tokens=512, chunked_prefill_size=512, schedule_policy="lpm"
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


def test_no_prefix_cache_matches_nothing_and_keeps_nothing():
    """Prefix reuse off: a NoPrefixCache never matches, holds no slot, shares nothing inside a batch, and a finished
    request's slots (also those it handed to ``cache_unfinished``) all go back to the allocator."""
    allocator = TokenAllocator(16)
    cache = NoPrefixCache(allocator)
    slots = allocator.alloc(6)
    held, node = cache.cache_unfinished([1, 2, 3, 4], slots[:4], 0, None)
    assert torch.equal(held, slots[:4]) and node is None
    assert cache.match_prefix([1, 2, 3, 4, 5])[0].numel() == 0
    index = cache.batch_index()
    index.add([1, 2, 3, 4], slots[:4])
    assert index.extend_prefix([1, 2, 3, 4, 5], torch.empty(0, dtype=torch.int64))[1] == 0
    cache.cache_finished([1, 2, 3, 4, 5, 6], slots, 4, node)
    assert allocator.available == allocator.size
    assert (cache.evict(8), cache.evictable_size(), cache.protected_size()) == (0, 0, 0)


def test_lpm_without_prefix_cache_is_arrival_order():
    """With nothing cached every prefix is empty, and ``lpm``'s stable sort keeps the queue order (fcfs)."""
    cache = NoPrefixCache(TokenAllocator(8))
    waiting = [_req(str(i), [i, i + 1, i + 2], 1, arrival=float(i)) for i in range(5)]
    prefix_len = lambda r: len(cache.match_prefix(r.fill_ids[:-1])[0])  # noqa: E731
    assert order_waiting("lpm", waiting, prefix_len) == order_waiting("fcfs", waiting, prefix_len) == waiting
