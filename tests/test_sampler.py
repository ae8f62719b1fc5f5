"""Tests for the batched sampler: greedy, filters, temperature, seeds, banned tokens and penalties."""

from __future__ import annotations

import random

import pytest
import torch

from xinf_sglang.runtime.sampling.sampler import SamplingBatch, make_generator, sample
from xinf_sglang.runtime.sampling.sampling_params import SamplingParams

CPU = torch.device("cpu")


def build(
    params: list[SamplingParams],
    vocab_size: int,
    outputs: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    banned: list[list[int]] | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params=params,
        output_ids=outputs or [[] for _ in range(n)],
        prompt_ids=prompts or [[] for _ in range(n)],
        generators=generators or [None] * n,
        banned_token_ids=banned or [[] for _ in range(n)],
        vocab_size=vocab_size,
        device=CPU,
    )


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, **kw: list) -> torch.Tensor:
    """`n` independent samples of one row: the row repeated n times in one batch."""
    batch = build([params] * n, logits_row.shape[0], **kw)
    return sample(logits_row.repeat(n, 1), batch)


# --- greedy and filters that reduce to greedy ------------------------------------------------------------------


def test_all_greedy_is_argmax_on_the_fast_path() -> None:
    logits = random_logits(8, 100)
    batch = build([SamplingParams(temperature=0)] * 8, 100)
    assert batch.random is None and batch.penalties is None and batch.banned is None
    expected = logits.argmax(-1)
    assert torch.equal(sample(logits, batch), expected)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1),
        SamplingParams(top_k=1, temperature=5.0),
        SamplingParams(top_p=1e-6),
        SamplingParams(top_p=1e-6, temperature=3.0),
        SamplingParams(min_p=1.0),
        SamplingParams(top_k=1, top_p=0.5, min_p=0.3),
    ],
    ids=["top_k=1", "top_k=1,T=5", "top_p~0", "top_p~0,T=3", "min_p=1", "all"],
)
def test_filters_that_keep_one_token_equal_greedy(params: SamplingParams) -> None:
    torch.manual_seed(0)
    logits = random_logits(64, 500)
    expected = logits.argmax(-1)
    assert torch.equal(sample(logits.clone(), build([params] * 64, 500)), expected)


def test_mixed_greedy_and_sampled_rows() -> None:
    torch.manual_seed(0)
    logits = random_logits(6, 50)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1)] * 3
    assert torch.equal(sample(logits.clone(), build(params, 50)), logits.argmax(-1))


def test_bf16_logits_accepted() -> None:
    logits = random_logits(4, 30).bfloat16()
    out = sample(logits, build([SamplingParams(temperature=0)] * 4, 30))
    assert out.dtype == torch.int64 and torch.equal(out, logits.float().argmax(-1))


# --- the kept sets of top_k / top_p / min_p ----------------------------------------------------------------------


def reference_support(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Tokens top_k, then top_p (on the renormalised top_k), then min_p keep; plain Python over one row."""
    probs = torch.softmax(logits / p.temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    if p.top_k > 0:
        order = order[: p.top_k]
    mass = sum(probs[t] for t in order)
    kept, acc = [], 0.0
    for t in order:
        if acc >= p.top_p * mass:
            break
        kept.append(t)
        acc += probs[t]
    top = probs[kept[0]]
    return {t for t in kept if probs[t] >= p.min_p * top}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.6),
        SamplingParams(min_p=0.2),
        SamplingParams(top_k=8, top_p=0.7),
        SamplingParams(top_k=10, top_p=0.9, min_p=0.1, temperature=0.8),
    ],
    ids=["top_k", "top_p", "min_p", "top_k+top_p", "all+temperature"],
)
def test_samples_cover_exactly_the_kept_set(params: SamplingParams) -> None:
    torch.manual_seed(1)
    logits = random_logits(1, 40, seed=3, scale=1.0)[0]
    expected = reference_support(logits, params)
    assert 1 < len(expected) < 40  # the case is not degenerate
    seen = set(draws(logits, params, 20000).tolist())
    assert seen == expected


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    probs = torch.tensor([0.4, 0.25, 0.19, 0.16])  # 0.5 * 0.4 = 0.2: tokens 2 and 3 must go
    torch.manual_seed(0)
    seen = set(draws(probs.log(), SamplingParams(min_p=0.5), 5000).tolist())
    assert seen == {0, 1}


def test_filters_of_other_rows_do_not_touch_a_row() -> None:
    torch.manual_seed(0)
    logits = random_logits(1, 20, scale=0.5)[0]
    batch = build([SamplingParams(top_k=1), SamplingParams()] * 2000, 20)
    out = sample(logits.repeat(4000, 1), batch)
    assert set(out[0::2].tolist()) == {int(logits.argmax())}
    assert len(set(out[1::2].tolist())) == 20  # the unfiltered rows still reach every token


# --- temperature: the draw distribution ----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    expected = torch.softmax(logits / temperature, dim=-1)
    n = 40000
    torch.manual_seed(1234)
    counts = torch.bincount(draws(logits, SamplingParams(temperature=temperature), n), minlength=6)
    # Binomial standard deviation is at most sqrt(0.25 / n) = 0.0025; 0.015 is 6 sigma.
    assert torch.allclose(counts / n, expected, atol=0.015)


def test_seeded_row_distribution_matches_softmax() -> None:
    logits = torch.tensor([0.3, -0.2, 1.1, 0.0])
    expected = torch.softmax(logits, dim=-1)
    g = make_generator(7, CPU)
    n = 4000
    batch = build([SamplingParams(seed=7)], 4, generators=[g])
    tokens = torch.cat([sample(logits.unsqueeze(0).clone(), batch) for _ in range(n)])
    assert torch.allclose(torch.bincount(tokens, minlength=4) / n, expected, atol=0.05)


# --- seeds ---------------------------------------------------------------------------------------------------------


def run_steps(logit_steps: list[torch.Tensor], make_batch, row: int) -> list[int]:
    """Sample every step with a fresh batch from `make_batch()`; return row `row`'s tokens."""
    return [int(sample(step.clone(), make_batch())[row]) for step in logit_steps]


def test_same_seed_same_tokens_and_other_seed_differs() -> None:
    vocab = 1000
    steps = [random_logits(1, vocab, seed=s, scale=0.1) for s in range(30)]
    p = SamplingParams(seed=42, top_p=0.95)

    def tokens(seed: int) -> list[int]:
        g = make_generator(seed, CPU)
        return run_steps(steps, lambda: build([p], vocab, generators=[g]), 0)

    assert tokens(42) == tokens(42)
    assert tokens(42) != tokens(43)


def test_seeded_row_unaffected_by_batch_mates() -> None:
    vocab = 300
    seeded = SamplingParams(seed=5, temperature=0.9)
    alone_steps = [random_logits(1, vocab, seed=100 + s) for s in range(20)]

    g = make_generator(5, CPU)
    alone = run_steps(alone_steps, lambda: build([seeded], vocab, generators=[g]), 0)

    mates = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.5, min_p=0.1),
        SamplingParams(seed=9),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5),
    ]
    for position in (0, 2, len(mates)):
        params = mates[:position] + [seeded] + mates[position:]
        n = len(params)
        steps = []
        for s, row in enumerate(alone_steps):
            others = random_logits(n, vocab, seed=900 + s)
            others[position] = row[0]
            steps.append(others)
        g_seeded, g_mate = make_generator(5, CPU), make_generator(9, CPU)
        generators = [g_seeded if p is seeded else g_mate if p.seed == 9 else None for p in params]
        banned = [[] if p is seeded else [1, 2, 3] for p in params]
        outputs = [[4, 4, 7] if p is not seeded else [] for p in params]
        batch_fn = lambda: build(params, vocab, generators=generators, banned=banned, outputs=outputs)  # noqa: E731
        torch.manual_seed(position)  # unseeded rows draw from the global generator; it must not matter
        assert run_steps(steps, batch_fn, position) == alone


def test_make_generator() -> None:
    assert make_generator(None, CPU) is None
    a, b = make_generator(3, CPU), make_generator(3, CPU)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# --- banned tokens -------------------------------------------------------------------------------------------------


def test_banned_tokens_never_sampled() -> None:
    vocab = 10
    logits = torch.zeros(vocab)
    logits[:3] = 10.0  # the banned tokens are by far the most likely
    banned = [0, 1, 2]
    torch.manual_seed(0)
    out = draws(logits, SamplingParams(temperature=1.5), 5000, banned=[banned] * 5000)
    assert not set(out.tolist()) & set(banned)
    assert set(out.tolist()) == set(range(3, vocab))


def test_banned_tokens_in_greedy_rows_and_only_their_row() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0], [5.0, 4.0, 3.0]])
    batch = build([SamplingParams(temperature=0)] * 2, 3, banned=[[0], []])
    assert sample(logits, batch).tolist() == [1, 0]


# --- penalties -----------------------------------------------------------------------------------------------------


def reference_penalties(
    logits: list[float], p: SamplingParams, prompt: list[int], output: list[int]
) -> list[float]:
    """Straightforward per-row penalties: HF repetition over prompt + output, OpenAI frequency/presence over output."""
    out = list(logits)
    for token in set(prompt) | set(output):
        value = out[token]
        out[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
    for token in set(output):
        count = output.count(token)
        out[token] -= count * p.frequency_penalty + p.presence_penalty
    return out


@pytest.mark.parametrize("seed", range(5))
def test_penalties_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    vocab, rows = 50, 8
    params = []
    for _ in range(rows):
        kind = rng.choice(["none", "rep", "additive", "all"])
        params.append(
            SamplingParams(
                temperature=0,
                repetition_penalty=rng.uniform(0.5, 2.0) if kind in ("rep", "all") else 1.0,
                frequency_penalty=rng.uniform(-2, 2) if kind in ("additive", "all") else 0.0,
                presence_penalty=rng.uniform(-2, 2) if kind in ("additive", "all") else 0.0,
            )
        )
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 20))] for _ in range(rows)]
    outputs = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 30))] for _ in range(rows)]
    logits = random_logits(rows, vocab, seed=seed)
    expected = torch.tensor(
        [reference_penalties(logits[i].tolist(), params[i], prompts[i], outputs[i]) for i in range(rows)]
    )
    work = logits.clone()
    tokens = sample(work, build(params, vocab, outputs=outputs, prompts=prompts))
    # All rows are greedy, so `sample` leaves exactly the penalised logits behind (they are consumed in place).
    assert torch.allclose(work, expected, atol=1e-5)
    assert torch.equal(tokens, expected.argmax(-1))


def test_no_penalty_tensors_without_penalties() -> None:
    batch = build([SamplingParams(), SamplingParams(temperature=0)], 10, outputs=[[1, 2], [3]])
    assert batch.penalties is None


def test_penalties_only_built_for_rows_that_use_them() -> None:
    params = [SamplingParams(), SamplingParams(presence_penalty=1.0), SamplingParams()]
    batch = build(params, 10, outputs=[[1], [2, 2], [3]])
    assert batch.penalties is not None
    assert batch.penalties.rows.tolist() == [1]
    assert batch.penalties.seen is None  # no repetition penalty anywhere
    assert batch.penalties.counts is not None and batch.penalties.counts[0, 2] == 2


def test_presence_penalty_steers_sampling_away_from_repeats() -> None:
    logits = torch.zeros(4)
    torch.manual_seed(0)
    out = draws(logits, SamplingParams(presence_penalty=2.0), 4000, outputs=[[0, 1]] * 4000)
    freq = torch.bincount(out, minlength=4) / 4000
    # exp(-2) relative weight: tokens 0 and 1 are ~7x less likely than 2 and 3.
    assert freq[0] < 0.1 and freq[1] < 0.1 and freq[2] > 0.35 and freq[3] > 0.35


# --- engine bugs are loud ------------------------------------------------------------------------------------------


def test_build_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingBatch.build([SamplingParams()], [[]], [[]], [None, None], [[]], 10, CPU)


def test_build_rejects_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match="banned_token_ids"):
        build([SamplingParams()], 10, banned=[[10]])
    with pytest.raises(ValueError, match="output_ids"):
        build([SamplingParams(frequency_penalty=1.0)], 10, outputs=[[-1]])


def test_sample_rejects_wrong_shape() -> None:
    batch = build([SamplingParams()] * 2, 10)
    with pytest.raises(ValueError, match=r"\[2, 10\]"):
        sample(torch.zeros(2, 11), batch)


def test_logit_bias_bans_and_forces_tokens() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    top = logits.argmax(-1).tolist()
    params = [
        SamplingParams(temperature=0.0, logit_bias={top[0]: -100.0}),
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}),
        SamplingParams(temperature=0.0),
    ]
    batch = SamplingBatch.build(params, [[]] * 3, [[]] * 3, [None] * 3, [[]] * 3, 50, "cpu")
    out = sample(logits.clone(), batch).tolist()
    assert out[0] != top[0] and out[1] == 7 and out[2] == top[2]
