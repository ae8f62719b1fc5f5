"""Sampling outputs on the GPU (CUDA graphs + overlap, float32), tiny llama / qwen2 / qwen3 models:

- log probabilities: greedy decode with ``top_logprobs=5`` and ``prompt_logprobs_start=0`` on every other prompt
  of the batch (the others ask for nothing, so the gather of the asking rows runs): output and prompt logprobs and
  the top-5 values against ``log_softmax`` of HF's logits on the same GPU over prompt + output, within 1e-4 (the
  two sides differ in summation order only). Alternatives are compared by value (HF's k largest) and each id by
  its own HF value, so exact ties may come in either order;
- ``n=3``: greedy, each sequence identical to HF's greedy tokens; seeded (temperature 0.8), the same batch twice
  gives the same 3 sequences, and siblings differ.

The CPU tier: tests/test_logprobs.py, tests/test_parallel_sampling.py."""

from __future__ import annotations

import pytest
import torch

from . import require_gpus

require_gpus()
pytestmark = pytest.mark.cuda

from xinf_sglang.runtime import SamplingParams  # noqa: E402

from ..engine_helpers import _hf_model, hf_greedy, make_engine, varied_prompts  # noqa: E402

NEW_TOKENS, TOP, TOL, N = 32, 5, 1e-4, 3
DEVICE = "cuda"


def greedy(**extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True, **extra)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def case(request, tiny_model):
    """(model dir, eight prompts of 3-150 tokens, HF float32 greedy references on the GPU), an engine on the GPU."""
    model_dir = tiny_model(request.param)
    prompts = varied_prompts(model_dir, 8, min_len=3, max_len=150)
    refs = [hf_greedy(model_dir, p, NEW_TOKENS, device=DEVICE) for p in prompts]
    with make_engine(model_dir, device=DEVICE) as engine:
        yield model_dir, prompts, refs, engine
        assert engine.check_invariants() == []


def hf_logprobs(model_dir, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] float32 log_softmax of HF's logits on the GPU: row q scores token q + 1."""
    with torch.no_grad():
        logits = _hf_model(str(model_dir), None, DEVICE)(torch.tensor([tokens], device=DEVICE)).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def logprob_errors(entries, rows: torch.Tensor, tokens: list[int]) -> tuple[float, int]:
    """(max |runtime - HF| over the entries' logprobs and top values, entries whose token or top-k count is
    wrong), entry j against ``rows[j]`` scoring ``tokens[j]``."""
    worst, bad = 0.0, 0
    for entry, row, tok in zip(entries, rows, tokens):
        want_top = row.topk(len(entry.top)).values.tolist() if entry.top else []
        errs = [abs(entry.logprob - row[tok].item())]
        errs += [abs(v - w) for (_, v), w in zip(entry.top, want_top)]  # the k largest values, in order
        errs += [abs(v - row[t].item()) for t, v in entry.top]  # each alternative's own value
        bad += entry.token_id != tok or len(entry.top) != len(want_top)
        worst = max(worst, *errs)
    return worst, bad


def test_logprobs_match_hf_log_softmax(case) -> None:
    model_dir, prompts, refs, engine = case
    asks = greedy(top_logprobs=TOP, prompt_logprobs_start=0)
    outs = engine.generate(input_ids=prompts, sampling_params=[asks if i % 2 == 0 else greedy()
                                                               for i in range(len(prompts))])
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        if i % 2:
            assert out.output_logprobs is None and out.prompt_logprobs is None
            continue
        assert out.token_ids == refs[i] and len(out.output_logprobs) == len(out.token_ids)
        ref = hf_logprobs(model_dir, prompt + out.token_ids)
        for entries, rows, tokens in ((out.output_logprobs, ref[len(prompt) - 1 :], out.token_ids),
                                      (out.prompt_logprobs, ref[: len(prompt) - 1], prompt[1:])):
            worst, bad = logprob_errors(entries, rows, tokens)
            assert worst < TOL and bad == 0, f"prompt {i}: max abs error {worst:.2e}, {bad} mismatched entries"


def test_n3_greedy_sequences_equal_hf(case) -> None:
    _, prompts, refs, engine = case
    outs = engine.generate(input_ids=prompts, sampling_params=greedy(n=N))
    assert [(o.index, o.token_ids) for o in outs] == [(k % N, refs[k // N]) for k in range(N * len(prompts))]


def test_n3_seeded_samples_reproduce_and_differ(case) -> None:
    _, prompts, _, engine = case
    seeded = SamplingParams(n=N, temperature=0.8, seed=1234, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    first, again = (engine.generate(input_ids=prompts, sampling_params=seeded) for _ in range(2))
    assert [(o.index, o.token_ids) for o in first] == [(o.index, o.token_ids) for o in again]
    distinct = sum(len({tuple(o.token_ids) for o in first[k : k + N]}) == N for k in range(0, len(first), N))
    assert distinct > 0
