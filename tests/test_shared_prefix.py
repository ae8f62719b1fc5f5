"""Concurrent requests with a shared prefix compute it once (runtime/mem_cache/prefix_sharing.py): prefill chunks enter the
radix tree while their request runs, and requests of one prefill batch reuse what an earlier one computes in the
same forward. Cached tokens come close to the maximum, and greedy tokens equal the unshared run's and HF's, under
``fcfs`` and ``lpm``, with chunked prefill smaller than the prefix and with a pool small enough to retract."""

from __future__ import annotations

import asyncio

import pytest
import torch

from xinf_sglang.runtime import SamplingParams
from xinf_sglang.runtime.layers.attention.backend import TorchAttentionBackend
from xinf_sglang.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from xinf_sglang.runtime.mem_cache.kv_pool import KVPool

from .engine_helpers import hf_greedy, make_engine, varied_prompts

NUM_REQUESTS = 16
SHARED = 200
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
REGIMES = {
    "one-batch": {},
    "chunk-16": {"chunked_prefill_size": 16},
    "chunk-32": {"chunked_prefill_size": 32},
    "retract": {"max_total_tokens": 360},
}


@pytest.fixture(scope="module", params=["llama", "deepseek_v3"])  # MHA, and MLA's latent cache
def case(request, tiny_model):
    """(model dir, prompts: one shared prefix + an own suffix of 2-9 tokens each, HF greedy outputs)."""
    model_dir = tiny_model(request.param)
    [shared] = varied_prompts(model_dir, 1, min_len=SHARED, max_len=SHARED, seed=1)
    suffixes = varied_prompts(model_dir, NUM_REQUESTS, min_len=2, max_len=9, seed=2)
    prompts = [shared + s for s in suffixes]
    refs = [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]
    return model_dir, prompts, refs


def _max_cached(prompts: list[list[int]]) -> int:
    """What a perfect cache serves: every request but the first gets the whole shared prefix."""
    return (len(prompts) - 1) * SHARED


def test_unshared_run_matches_hf(case):
    model_dir, prompts, refs = case
    with make_engine(model_dir, disable_radix_cache=True) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o.token_ids for o in outs] == refs
        assert sum(o.cached_tokens for o in outs) == 0
        assert engine.check_invariants() == []


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_concurrent_shared_prefix_is_computed_once(case, policy, regime):
    model_dir, prompts, refs = case
    with make_engine(model_dir, schedule_policy=policy, **REGIMES[regime]) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        for i, (out, ref) in enumerate(zip(outs, refs)):
            assert out.token_ids == ref, f"request {i}: {out.token_ids} != HF/unshared {ref}"
        cached = sum(o.cached_tokens for o in outs)
        m = engine.metrics()
        assert m["cached_prompt_tokens_total"] == cached
        assert cached >= 0.95 * _max_cached(prompts), f"{cached} of at most {_max_cached(prompts)} cached"
        assert (m["retractions"] > 0) == (regime == "retract")
        if regime != "retract":  # every prompt token is either cached or computed once (re-prefills add to it)
            assert m["prefill_tokens_total"] == sum(map(len, prompts)) - cached
        assert engine.check_invariants() == []


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_concurrent_streams_share_the_prefix(case, policy):
    """Streams arrive one by one: whoever comes after the first prefill matches it in the tree (still running)."""
    model_dir, prompts, refs = case

    async def one(engine, prompt):
        tokens, last = [], None
        async for chunk in engine.generate_stream(input_ids=prompt, sampling_params=GREEDY):
            tokens += chunk.token_ids
            last = chunk
        return tokens, last.cached_tokens

    async def run_all(engine):
        return await asyncio.gather(*(one(engine, p) for p in prompts))

    with make_engine(model_dir, schedule_policy=policy, chunked_prefill_size=64) as engine:
        results = asyncio.run(run_all(engine))
        assert [t for t, _ in results] == refs
        cached = sum(c for _, c in results)
        assert cached >= 0.95 * _max_cached(prompts)
        assert engine.metrics()["cached_prompt_tokens_total"] == cached
        assert engine.check_invariants() == []


def test_abort_while_peers_share_its_prefix(case):
    """Aborting the request whose prefill the others borrowed from leaves them correct and nothing leaked."""
    model_dir, prompts, refs = case

    async def first_token_then_close(engine, prompt):
        long = SamplingParams(temperature=0.0, max_new_tokens=1000, ignore_eos=True)  # still running at the abort
        stream = engine.generate_stream(input_ids=prompt, sampling_params=long)
        await stream.__anext__()  # its prefill ran, together with its peers' if they were admitted with it
        await stream.aclose()  # aborts it

    async def read_all(engine, prompt):
        return [t async for chunk in engine.generate_stream(input_ids=prompt, sampling_params=GREEDY)
                for t in chunk.token_ids]

    async def run(engine):
        first = first_token_then_close(engine, prompts[0])
        return (await asyncio.gather(first, *(read_all(engine, p) for p in prompts[1:6])))[1:]

    with make_engine(model_dir) as engine:
        assert asyncio.run(run(engine)) == refs[1:6]
        assert engine.metrics()["aborted_requests"] == 1
        assert engine.check_invariants() == []


def test_failed_prefill_forward_returns_borrowed_slots(case):
    """A prefill forward that raises: its requests are aborted with an error, their borrowed prefix slots are not
    freed twice nor cached, and the next requests still match HF."""
    model_dir, prompts, refs = case
    with make_engine(model_dir) as engine:
        runner = engine.run_on_scheduler(lambda s: s.runner)
        real_forward = runner.forward
        failed = []

        def failing_forward(batch):
            if batch.mode is ForwardMode.EXTEND and not failed and any(batch.borrowed):
                failed.append(sum(batch.borrowed))
                raise RuntimeError("injected failure")
            return real_forward(batch)

        runner.forward = failing_forward
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert failed and failed[0] > 0, "the injected failure never met a batch that borrows"
        assert all(o.finish_reason == "abort" and "injected failure" in o.error for o in outs)
        assert engine.check_invariants() == []
        assert engine.metrics()["kv_evictable_tokens"] == 0  # nothing computed, nothing cached
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o.token_ids for o in outs] == refs
        assert engine.check_invariants() == []


def test_real_model_shared_prefix(smollm2):
    """SmolLM2-135M: 8 requests x (128 shared + own tokens) submitted together compute the prefix once and match
    HF greedy."""
    model_dir = smollm2.hf_dir
    [shared] = varied_prompts(model_dir, 1, min_len=128, max_len=128, seed=3)
    prompts = [shared + s for s in varied_prompts(model_dir, 8, min_len=2, max_len=6, seed=4)]
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    refs = [hf_greedy(model_dir, p, 8) for p in prompts]
    with make_engine(model_dir) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert [o.token_ids for o in outs] == refs
        assert sum(o.cached_tokens for o in outs) >= 7 * 128
        assert engine.check_invariants() == []


# ---------------------------------------------------------------------------------------------- backend contract


def _backend(name: str, pool: KVPool, table: torch.Tensor):
    if name == "torch":
        return TorchAttentionBackend(pool, table, sm_scale=0.25)
    pytest.importorskip("triton")  # conftest set TRITON_INTERPRET=1: the Triton kernels run on CPU tensors
    from xinf_sglang.runtime.layers.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(pool, table, sm_scale=0.25)


def _extend_batch(rows, starts, lens, locs) -> ForwardBatch:
    """An extend batch: request b in table row ``rows[b]`` computes ``lens[b]`` tokens from position ``starts[b]``."""
    t = torch.tensor
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
    offsets = torch.tensor([0, *lens]).cumsum(0)[:-1]
    return ForwardBatch(
        ForwardMode.EXTEND, torch.zeros(sum(lens), dtype=torch.int64), positions, locs, t(rows), t(starts) + t(lens),
        t(lens), offsets, offsets + t(lens) - 1,
    )


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_extend_reads_prefix_slots_written_by_a_peer_in_the_same_forward(backend_name):
    """The contract in-batch sharing relies on: request 1's prefix slots are request 0's new tokens of the same
    forward; its output equals running request 0 first and request 1 after it (prefix already in the pool)."""
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, n0, p1, n1 = 4, 2, 16, 20, 12, 5
    q = torch.randn(n0 + n1, hq, d, generator=gen)
    k = torch.randn(n0 + n1, hkv, d, generator=gen)
    v = torch.randn(n0 + n1, hkv, d, generator=gen)
    cos, sin = torch.ones(n0 + n1, d), torch.zeros(n0 + n1, d)  # no rotation: K/V are the inputs as given
    outs = []
    for joint in (True, False):
        pool = KVPool(64, 1, hkv, d, torch.float32, torch.device("cpu"))
        table = torch.zeros(2, 64, dtype=torch.int32)
        locs0, locs1 = torch.arange(1, 1 + n0), torch.arange(1 + n0, 1 + n0 + n1)
        table[0, :n0] = locs0.int()
        table[1, :p1], table[1, p1 : p1 + n1] = locs0[:p1].int(), locs1.int()  # borrows request 0's first p1
        backend = _backend(backend_name, pool, table)
        if joint:
            fb = _extend_batch([0, 1], [0, p1], [n0, n1], torch.cat([locs0, locs1]))
            backend.init_forward_metadata(fb)
            outs.append(backend.forward(q, k, v, cos, sin, 0, fb))
        else:
            parts = []
            for row, start, sl in ((0, 0, slice(0, n0)), (1, p1, slice(n0, n0 + n1))):
                fb = _extend_batch([row], [start], [sl.stop - sl.start], torch.cat([locs0, locs1])[sl])
                backend.init_forward_metadata(fb)
                parts.append(backend.forward(q[sl], k[sl], v[sl], cos[sl], sin[sl], 0, fb))
            outs.append(torch.cat(parts))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
