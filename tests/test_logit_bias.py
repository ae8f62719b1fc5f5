"""``logit_bias`` under hostile sizes (issue 28 point 2): at most 300 entries (OpenAI's limit), refused before
anything is queued with a message naming the field and the cap; the n siblings of a request share its bias instead
of copying it; the bias tensors of a request are built once, not from its Python dict at every step."""

from __future__ import annotations

import time

import pytest
import torch

from xinf_sglang.runtime import InvalidRequestError, SamplingParams
from xinf_sglang.runtime.engine.messages import NewRequest
from xinf_sglang.runtime.sampling.parallel_sampling import expand
from xinf_sglang.runtime.sampling.sampling_params import MAX_LOGIT_BIAS

from .engine_helpers import make_engine


@pytest.fixture(scope="module")
def engine(tiny_model):
    with make_engine(tiny_model("qwen2")) as eng:
        yield eng


def test_more_than_300_entries_are_refused_before_queueing(engine) -> None:
    before = engine.metrics()
    with pytest.raises(InvalidRequestError, match="logit_bias may hold at most 300 entries .*got 301"):
        engine.generate(input_ids=[[1, 2, 3]], sampling_params=SamplingParams.model_validate(
            {"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}))
    after = engine.metrics()
    assert after["finished_requests"] == before["finished_requests"] and after["waiting_requests"] == 0


def test_300_entries_work_for_n_siblings(engine) -> None:
    bias = {i: -100.0 for i in range(MAX_LOGIT_BIAS)}  # bans ids 0..299: none may be sampled
    params = SamplingParams(n=8, max_new_tokens=4, ignore_eos=True, seed=1, logit_bias=bias)
    outs = engine.generate(input_ids=[[400, 401, 402]], sampling_params=params)
    assert len(outs) == 8 and all(len(o.token_ids) == 4 and min(o.token_ids) >= MAX_LOGIT_BIAS for o in outs)


def test_siblings_share_the_bias_instead_of_copying_it() -> None:
    params = SamplingParams(n=128, stop=["x"], logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS)})
    new = NewRequest("r", (1, 2, 3), params, frozenset(), 16)
    start = time.perf_counter()
    siblings = expand(new)
    elapsed = time.perf_counter() - start
    assert len(siblings) == 128 and [s.params.n for s in siblings] == [1] * 128
    assert all(s.params.logit_bias is params.logit_bias and s.params.stop is params.stop for s in siblings)
    assert elapsed < 0.5, f"expanding n=128 took {elapsed:.3f} s"


def test_the_bias_tensors_are_built_once_per_request_not_per_step(engine, monkeypatch) -> None:
    from xinf_sglang.runtime.sampling import sampling_batch

    built = []
    real = sampling_batch.RequestBias.of.__func__

    def counting(cls, logit_bias, device):
        built.append(len(logit_bias or {}))
        return real(cls, logit_bias, device)

    monkeypatch.setattr(sampling_batch.RequestBias, "of", classmethod(counting))
    before = engine.metrics()["decode_steps"]
    bias = {i: 1.0 for i in range(MAX_LOGIT_BIAS)}
    params = SamplingParams(n=4, max_new_tokens=24, ignore_eos=True, seed=3, logit_bias=bias)
    outs = engine.generate(input_ids=[[400, 401, 402]], sampling_params=params)
    assert all(len(o.token_ids) == 24 for o in outs)
    assert engine.metrics()["decode_steps"] - before >= 23
    assert built == [MAX_LOGIT_BIAS] * 4  # one per sequence, none per step


def test_cached_bias_tensors_sample_like_a_batch_built_from_the_dicts() -> None:
    from xinf_sglang.runtime.sampling.sampler import sample
    from xinf_sglang.runtime.sampling.sampling_batch import RequestBias, SamplingBatch

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0, logit_bias={int(logits[0].argmax()): -100.0, 3: 2.0}),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logit_bias={7: 100.0})]
    lists = [[[]] * 3, [[]] * 3, [None] * 3, [[]] * 3]
    fresh = SamplingBatch.build(params, *lists, 50, "cpu")
    cached = SamplingBatch.build(params, *lists, 50, "cpu", biases=[RequestBias.of(p.logit_bias, "cpu") for p in params])
    assert sample(logits.clone(), fresh).tolist() == sample(logits.clone(), cached).tolist()
    assert sample(logits.clone(), cached).tolist()[2] == 7
