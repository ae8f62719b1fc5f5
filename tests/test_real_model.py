"""The real SmolLM2-135M-Instruct (float32, CPU) through the runtime: greedy tokens identical to HF ``generate``
for prompts of different lengths, plain and chat-templated, submitted together; again from the radix cache, with
prefill chunks smaller than the prompts, and in a pool small enough to force retraction."""

from __future__ import annotations

import pytest

from xinf_sglang.runtime import SamplingParams

from .engine_helpers import CORPUS, hf_greedy, make_engine

pytestmark = pytest.mark.slow  # ~30 s on the 2-core machine: SmolLM2 in the runtime and in HF, 10 prompts

NEW_TOKENS = 16
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a prime number is.",
    "List three colours.",
    "Translate 'good morning' into Spanish.",
]


@pytest.fixture(scope="module")
def case(smollm2):
    """(model dir, ten prompts of 6-~300 tokens: five plain, five chat-templated, HF greedy references)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    plain = [tok(CORPUS[start : start + chars]).input_ids for start, chars in
             ((0, 30), (500, 120), (1500, 300), (4000, 700), (9000, 1100))]
    chats = [
        list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"])
        for q in QUESTIONS
    ]
    prompts = plain + chats
    assert len({len(p) for p in prompts}) == len(prompts) and max(len(p) for p in prompts) > 200
    refs = [hf_greedy(smollm2.hf_dir, p, NEW_TOKENS) for p in prompts]
    return smollm2.hf_dir, prompts, refs


def _tokens(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def test_greedy_equals_hf_together_then_from_the_cache(case) -> None:
    model_dir, prompts, refs = case
    with make_engine(model_dir, max_total_tokens=8192) as engine:
        assert _tokens(engine.generate(input_ids=prompts, sampling_params=GREEDY)) == refs
        again = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert _tokens(again) == refs
        # every prompt but its last token comes from the radix cache the second time
        assert [o.cached_tokens for o in again] == [len(p) - 1 for p in prompts]
        assert engine.check_invariants() == []


def test_greedy_equals_hf_with_small_prefill_chunks(case) -> None:
    model_dir, prompts, refs = case
    with make_engine(model_dir, max_total_tokens=8192, chunked_prefill_size=32, max_prefill_tokens=64) as engine:
        assert _tokens(engine.generate(input_ids=prompts, sampling_params=GREEDY)) == refs
        assert engine.metrics()["prefill_steps"] > len(prompts)  # the long prompts went in several chunks
        assert engine.check_invariants() == []


def test_greedy_equals_hf_under_retraction(case) -> None:
    """Longer outputs of the short prompts in a pool of 2.5 requests: admission's decaying reserve lets more in
    than the pool holds, decode retracts and re-prefills them later."""
    model_dir, prompts, _ = case
    short = [p for p in prompts if len(p) < 50]  # two plain, five chat prompts
    new_tokens = 32
    refs = [hf_greedy(model_dir, p, new_tokens) for p in short]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    pool = int(2.5 * (max(len(p) for p in short) + new_tokens))
    with make_engine(model_dir, max_total_tokens=pool) as engine:
        assert _tokens(engine.generate(input_ids=short, sampling_params=params)) == refs
        assert engine.metrics()["retractions"] > 0
        assert engine.check_invariants() == []
