"""Log probabilities (``SamplingParams.logprobs`` / ``top_logprobs`` / ``prompt_logprobs_start``) against HF
transformers' log-softmax on the same checkpoint.

Tolerance: 1e-4 absolute in float32 on CPU, for the tiny random models and for SmolLM2-135M-Instruct alike (the
runtime's kernels and HF's differ in summation order only). Output logprobs come from the sampled distribution
(after bias / penalties / grammar mask, divided by the temperature); prompt logprobs from the raw logits.
"""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch

from xinf_sglang.runtime import SamplingParams
from xinf_sglang.runtime.errors import InvalidRequestError

from .engine_helpers import _hf_model, make_engine, varied_prompts

TOL = 1e-4  # absolute, float32


@functools.lru_cache(maxsize=64)
def _hf_logprobs(model_dir: str, tokens: tuple[int, ...], gguf_file: str | None = None) -> torch.Tensor:
    """[len(tokens), V] log-softmax of HF's raw logits over ``tokens``: row ``q`` scores token ``q + 1``."""
    model = _hf_model(model_dir, gguf_file)
    with torch.no_grad():
        logits = model(torch.tensor([list(tokens)])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def hf_logprobs(model_dir, tokens) -> torch.Tensor:
    return _hf_logprobs(str(model_dir), tuple(tokens))


def assert_prompt_logprobs(out, prompt, start, ref) -> None:
    """``out.prompt_logprobs`` score ``prompt[max(start, 1):]`` as ``ref`` does, top-k included."""
    first = max(start, 1)
    assert [e.token_id for e in out.prompt_logprobs] == prompt[first:]
    for p, entry in zip(range(first, len(prompt)), out.prompt_logprobs):
        assert abs(entry.logprob - ref[p - 1, prompt[p]].item()) < TOL, f"position {p}"
        assert_top(entry, ref[p - 1])


def assert_top(entry, row: torch.Tensor) -> None:
    """The entry's alternatives are HF's top-k of ``row``, sorted, within tolerance."""
    if not entry.top:
        return
    want = row.topk(len(entry.top))
    assert [t for t, _ in entry.top] == want.indices.tolist()
    values = [v for _, v in entry.top]
    assert values == sorted(values, reverse=True)
    assert max(abs(a - b) for a, b in zip(values, want.values.tolist())) < TOL


def assert_output_logprobs(out, prompt, ref, temperature: float = 1.0) -> None:
    """``out.output_logprobs`` are the log-softmax of HF's logits / temperature at each output position."""
    assert len(out.output_logprobs) == len(out.token_ids)
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.output_logprobs)):
        # ref is log_softmax(raw); log_softmax(raw / T) == log_softmax(ref / T), a per-row shift changes nothing
        row = torch.log_softmax(ref[len(prompt) - 1 + i] / temperature, dim=-1)
        assert entry.token_id == tok
        assert abs(entry.logprob - row[tok].item()) < TOL, f"output token {i}"
        assert_top(entry, row)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def prompts(model_dir):
    return varied_prompts(model_dir, 4, min_len=8, max_len=60)


@pytest.fixture(scope="module")
def engine(model_dir):
    with make_engine(model_dir) as eng:
        yield eng


# ---- output tokens ---------------------------------------------------------------------------------------------


def test_greedy_output_logprobs_match_hf_and_top1_is_the_token(engine, model_dir, prompts):
    asks = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True, top_logprobs=5)
    plain = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    # A mixed batch: rows that ask and rows that do not, so the gather of the asking rows is exercised.
    outs = engine.generate(input_ids=prompts, sampling_params=[asks, plain, asks, plain])
    for i in (0, 2):
        out = outs[i]
        ref = hf_logprobs(model_dir, prompts[i] + out.token_ids)
        assert_output_logprobs(out, prompts[i], ref)
        assert all(e.top[0][0] == e.token_id and len(e.top) == 5 for e in out.output_logprobs)
        assert out.prompt_logprobs is None
    assert outs[1].output_logprobs is None and outs[3].output_logprobs is None


def test_logprobs_without_top_have_no_alternatives(engine, model_dir, prompts):
    [out] = engine.generate(input_ids=[prompts[1]],
                            sampling_params=SamplingParams(temperature=0, max_new_tokens=4, logprobs=True))
    assert out.output_logprobs and all(e.top == [] for e in out.output_logprobs)
    assert_output_logprobs(out, prompts[1], hf_logprobs(model_dir, prompts[1] + out.token_ids))


def test_sampled_logprobs_are_after_temperature_and_before_top_k(engine, model_dir, prompts):
    params = SamplingParams(temperature=0.7, top_k=3, seed=7, max_new_tokens=8, ignore_eos=True, top_logprobs=4)
    [out] = engine.generate(input_ids=[prompts[2]], sampling_params=params)
    ref = hf_logprobs(model_dir, prompts[2] + out.token_ids)
    assert_output_logprobs(out, prompts[2], ref, temperature=0.7)
    # top_k=3 filtered what could be drawn, not the returned distribution: the 4th alternative is finite.
    assert all(len(e.top) == 4 and e.top[3][1] > float("-inf") for e in out.output_logprobs)


def test_logit_bias_and_penalty_are_in_the_distribution(engine, model_dir, prompts):
    prompt = prompts[0]
    [plain] = engine.generate(input_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_new_tokens=1))
    boosted = plain.token_ids[0] + 1
    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True, logprobs=True,
                            logit_bias={boosted: 3.0}, presence_penalty=1.5)
    [out] = engine.generate(input_ids=[prompt], sampling_params=params)
    ref = hf_logprobs(model_dir, prompt + out.token_ids)
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.output_logprobs)):
        logits = ref[len(prompt) - 1 + i].clone()
        logits[boosted] += 3.0
        logits[list(set(out.token_ids[:i]))] -= 1.5
        assert abs(entry.logprob - torch.log_softmax(logits, -1)[tok].item()) < TOL


def test_grammar_mask_is_in_the_distribution(engine):
    params = SamplingParams(temperature=0, max_new_tokens=8, top_logprobs=20, choices=["yes", "no"])
    [out] = engine.generate(prompt="Answer: ", sampling_params=params)
    assert out.text in ("yes", "no")
    first = out.output_logprobs[0]
    allowed = [v for _, v in first.top if v > float("-inf")]
    assert 1 <= len(allowed) < 20  # only the tokens starting "yes" / "no" may be drawn: the rest are -inf
    assert abs(sum(torch.tensor(allowed).exp().tolist()) - 1.0) < 1e-4


def test_a_stop_token_gets_its_logprob_too(engine, model_dir, prompts):
    greedy = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    [free] = engine.generate(input_ids=[prompts[3]], sampling_params=greedy)
    stop = free.token_ids[2]
    params = greedy.model_copy(update={"stop_token_ids": [stop], "logprobs": True})
    [out] = engine.generate(input_ids=[prompts[3]], sampling_params=params)
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop
    assert [e.token_id for e in out.output_logprobs] == out.token_ids
    assert_output_logprobs(out, prompts[3], hf_logprobs(model_dir, prompts[3] + out.token_ids))


# ---- prompt tokens ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 1, 5])
def test_prompt_logprobs_match_hf(engine, model_dir, prompts, start):
    prompt = prompts[3]
    params = SamplingParams(temperature=0, max_new_tokens=2, prompt_logprobs_start=start, top_logprobs=3)
    [out] = engine.generate(input_ids=[prompt], sampling_params=params)
    ref = hf_logprobs(model_dir, prompt + out.token_ids)
    assert len(out.prompt_logprobs) == len(prompt) - max(start, 1)
    assert_prompt_logprobs(out, prompt, start, ref)
    assert_output_logprobs(out, prompt, ref)


def test_scoring_only_with_max_new_tokens_zero(engine, model_dir, prompts):
    prompt = prompts[2]
    [out] = engine.generate(input_ids=[prompt], sampling_params=SamplingParams(
        max_new_tokens=0, prompt_logprobs_start=0))
    assert (out.token_ids, out.text, out.finish_reason, out.completion_tokens) == ([], "", "length", 0)
    assert out.output_logprobs is None
    assert_prompt_logprobs(out, prompt, 0, hf_logprobs(model_dir, prompt))


def test_a_cached_prefix_stops_at_the_start_and_gives_the_same_values(engine, model_dir, prompts):
    prompt = prompts[3]
    engine.flush_cache()
    params = SamplingParams(max_new_tokens=0, prompt_logprobs_start=20, top_logprobs=2)
    [cold] = engine.generate(input_ids=[prompt], sampling_params=params)
    engine.generate(input_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=1))  # all cached now
    [warm] = engine.generate(input_ids=[prompt], sampling_params=params)
    assert cold.cached_tokens == 0 and warm.cached_tokens == 19  # up to the position before the start
    assert len(warm.prompt_logprobs) == len(cold.prompt_logprobs) == len(prompt) - 20
    assert all(a.token_id == b.token_id and abs(a.logprob - b.logprob) < TOL and a.top[0][0] == b.top[0][0]
               for a, b in zip(warm.prompt_logprobs, cold.prompt_logprobs))
    assert_prompt_logprobs(warm, prompt, 20, hf_logprobs(model_dir, prompt))
    # A request that does not score its prompt still uses the whole cached prefix.
    [plain] = engine.generate(input_ids=[prompt], sampling_params=SamplingParams(max_new_tokens=1))
    assert plain.cached_tokens == len(prompt) - 1


def test_requests_of_one_batch_sharing_a_prefix(engine, model_dir, prompts):
    """In-batch prefix sharing stops at the start position too."""
    engine.flush_cache()
    prompt = prompts[3]
    params = [SamplingParams(max_new_tokens=1), SamplingParams(max_new_tokens=0, prompt_logprobs_start=3)]
    plain, scored = engine.generate(input_ids=[prompt, prompt], sampling_params=params)
    assert_prompt_logprobs(scored, prompt, 3, hf_logprobs(model_dir, prompt))


def test_streaming_equals_non_streaming(engine, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, top_logprobs=2, prompt_logprobs_start=2)
    [whole] = engine.generate(input_ids=[prompts[1]], sampling_params=params)

    async def collect():
        return [c async for c in engine.generate_stream(input_ids=prompts[1], sampling_params=params)]

    chunks = asyncio.run(collect())
    assert chunks[0].prompt_logprobs == whole.prompt_logprobs
    assert all(c.prompt_logprobs is None for c in chunks[1:])
    assert all(len(c.output_logprobs) == len(c.token_ids) for c in chunks)
    assert [e for c in chunks for e in c.output_logprobs] == whole.output_logprobs


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(top_logprobs=21), "top_logprobs must be an integer in [0, 20]; got 21"),
        (dict(top_logprobs=-1), "top_logprobs must be an integer in [0, 20]; got -1"),
        (dict(prompt_logprobs_start=-1), "prompt_logprobs_start must be None or an integer >= 0"),
        (dict(prompt_logprobs_start=8), "prompt_logprobs_start must be a prompt position in [0, 7] for this 8-token"),
        (dict(logprobs="maybe"), "logprobs must be true or false"),
    ],
)
def test_bad_values_are_refused_clearly(engine, params, message):
    with pytest.raises(InvalidRequestError) as exc:
        engine.generate(input_ids=[list(range(10, 18))], sampling_params=SamplingParams(**params))
    assert message in str(exc.value)


def test_requests_that_do_not_ask_compute_no_extra_logits(engine, prompts):
    """No request asks: every forward returns one logits row per request (no prompt rows)."""
    runner = engine.run_on_scheduler(lambda s: s.runner)
    shapes = []

    def install(_scheduler):
        real = runner.forward

        def forward(batch):
            logits = real(batch)
            shapes.append((logits.shape[0], len(batch.reqs), batch.prompt_spans))
            return logits

        runner.forward = forward
        return real

    real = engine.run_on_scheduler(install)
    try:
        engine.generate(input_ids=prompts, sampling_params=SamplingParams(max_new_tokens=3))
    finally:
        engine.run_on_scheduler(lambda _: setattr(runner, "forward", real))
    assert shapes and all(rows == reqs and spans is None for rows, reqs, spans in shapes)


# ---- scheduling regimes ----------------------------------------------------------------------------------------


def test_chunked_prefill(model_dir):
    prompt = varied_prompts(model_dir, 1, min_len=70, max_len=70, seed=3)[0]
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True, prompt_logprobs_start=10,
                            top_logprobs=2)
    with make_engine(model_dir, chunked_prefill_size=16, max_prefill_tokens=16) as eng:
        [out] = eng.generate(input_ids=[prompt], sampling_params=params)
        assert eng.metrics()["prefill_steps"] >= 5  # 70 tokens in chunks of 16
        assert eng.check_invariants() == []
    ref = hf_logprobs(model_dir, prompt + out.token_ids)
    assert_prompt_logprobs(out, prompt, 10, ref)
    assert_output_logprobs(out, prompt, ref)


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_retraction_and_overlap(model_dir, overlap):
    prompts = varied_prompts(model_dir, 8, min_len=20, max_len=120, seed=5)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, top_logprobs=2, prompt_logprobs_start=4)
    with make_engine(model_dir, max_total_tokens=200, overlap_schedule=overlap) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        assert eng.metrics()["retractions"] > 0
        assert eng.check_invariants() == []
    for prompt, out in zip(prompts, outs):
        ref = hf_logprobs(model_dir, prompt + out.token_ids)
        assert_prompt_logprobs(out, prompt, 4, ref)
        assert_output_logprobs(out, prompt, ref)


def test_tensor_parallel_equals_one_rank(model_dir, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True, top_logprobs=3, prompt_logprobs_start=2)
    with make_engine(model_dir) as one:
        want = one.generate(input_ids=prompts[:2], sampling_params=params)
    with make_engine(model_dir, tp_size=2) as two:
        got = two.generate(input_ids=prompts[:2], sampling_params=params)
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.prompt_logprobs + a.output_logprobs, b.prompt_logprobs + b.output_logprobs):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < TOL
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_smollm2_matches_hf(smollm2):
    prompt_text = "The capital of France is Paris. The capital of Italy is"
    with make_engine(smollm2.hf_dir) as eng:
        prompt = eng.tokenizer.encode(prompt_text, add_special_tokens=False)
        params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, top_logprobs=5,
                                prompt_logprobs_start=0)
        [out] = eng.generate(input_ids=[prompt], sampling_params=params)
    ref = hf_logprobs(smollm2.hf_dir, prompt + out.token_ids)
    assert_prompt_logprobs(out, prompt, 0, ref)
    assert_output_logprobs(out, prompt, ref)
