"""Greedy tokens of the runtime equal HF transformers' on the same checkpoint (dense and mixture-of-experts
architectures), in every scheduling regime:
a mixed batch, cached prefixes, chunked prefill and a pool small enough to force retraction."""

from __future__ import annotations

import pytest

from xinf_sglang.runtime import SamplingParams

from .engine_helpers import hf_greedy, make_engine, varied_prompts

ARCHS = ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"]
NUM_PROMPTS = 12
NEW_TOKENS = 48
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tiny_model):
    """(model dir, prompts, HF reference outputs) for one architecture."""
    model_dir = tiny_model(request.param)
    prompts = varied_prompts(model_dir, NUM_PROMPTS, min_len=3, max_len=150)
    refs = [hf_greedy(model_dir, p, NEW_TOKENS) for p in prompts]
    return model_dir, prompts, refs


def _assert_parity(outs, refs):
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.token_ids == ref, f"prompt {i}: runtime {out.token_ids} != HF {ref}"
        assert out.finish_reason == "length"


def test_batch_matches_hf(case):
    model_dir, prompts, refs = case
    with make_engine(model_dir) as engine:
        _assert_parity(engine.generate(input_ids=prompts, sampling_params=GREEDY), refs)
        assert engine.check_invariants() == []


def test_cached_prefixes_match_hf(case):
    model_dir, prompts, refs = case
    with make_engine(model_dir) as engine:
        first = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        second = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        _assert_parity(first, refs)
        _assert_parity(second, refs)
        assert all(o.cached_tokens == 0 for o in first)
        # Every prompt is fully cached the second time except the one token left to compute logits from.
        assert [o.cached_tokens for o in second] == [len(p) - 1 for p in prompts]
        assert engine.metrics()["cache_hit_rate"] > 0.45
        assert engine.check_invariants() == []


def test_chunked_prefill_matches_hf(case):
    model_dir, prompts, refs = case
    with make_engine(model_dir, chunked_prefill_size=16, max_prefill_tokens=32) as engine:
        assert max(len(p) for p in prompts) > 16
        _assert_parity(engine.generate(input_ids=prompts, sampling_params=GREEDY), refs)
        assert engine.metrics()["prefill_steps"] > NUM_PROMPTS  # long prompts really went in several chunks
        assert engine.check_invariants() == []


@pytest.mark.parametrize("disable_radix_cache", [False, True])
def test_retraction_matches_hf(case, disable_radix_cache):
    model_dir, prompts, refs = case
    # Big enough for the longest request alone (150 + 48), far too small for all twelve at once.
    with make_engine(model_dir, max_total_tokens=260, disable_radix_cache=disable_radix_cache) as engine:
        _assert_parity(engine.generate(input_ids=prompts, sampling_params=GREEDY), refs)
        assert engine.metrics()["retractions"] > 0
        assert engine.check_invariants() == []


@pytest.mark.parametrize("pool", [None, 260])
def test_overlap_schedule_matches_hf(case, pool):
    """Launching step t+1 before processing step t changes nothing in the tokens, with and without retraction."""
    model_dir, prompts, refs = case
    with make_engine(model_dir, overlap_schedule="on", max_total_tokens=pool) as engine:
        _assert_parity(engine.generate(input_ids=prompts, sampling_params=GREEDY), refs)
        m = engine.metrics()
        assert m["overlapped_steps"] > NEW_TOKENS // 2
        assert (m["retractions"] > 0) == (pool is not None)
        assert engine.check_invariants() == []
