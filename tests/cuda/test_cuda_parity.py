"""On the GPU, the runtime's greedy tokens on the tiny llama / qwen2 / qwen3 models and their mixtures of experts equal HF transformers' on the
same GPU in float32, in every regime: CUDA graphs with and without the overlap schedule, the Triton backend
without graphs, the torch reference backend, chunked prefill and retraction; graphs on and off give the same
tokens, and graph decoding really ran. In float16 / bfloat16 (where decode runs the skinny-linear kernels) tokens
are not expected to be identical (other kernels round differently and a random tiny model has near-ties): most
tokens must lie in the prefixes that agree with HF generate in the same dtype (measured on an H200: float16
94-100%, bfloat16 66-88%). The CPU tier checks the same regimes on the CPU (tests/test_parity.py)."""

from __future__ import annotations

import pytest
import torch

from . import require_gpus, uses_graphs

require_gpus()
pytestmark = pytest.mark.cuda

from xinf_sglang.runtime import SamplingParams  # noqa: E402

from ..engine_helpers import hf_greedy, make_engine, varied_prompts  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"]  # MoE: the Triton fused experts; DeepSeek: MLA kernels
NEW_TOKENS = 48
DEVICE = "cuda"
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
REGIMES = {
    "graphs + overlap": dict(overlap_schedule="on"),
    "graphs, no overlap": dict(overlap_schedule="off"),
    "triton, no graphs": dict(disable_cuda_graph=True),
    "torch reference": dict(attention_backend="torch", disable_cuda_graph=True),
    "chunked prefill 16": dict(chunked_prefill_size=16, max_prefill_tokens=32),
    "retraction (pool 260)": dict(max_total_tokens=260),  # the longest request alone fits, twelve at once do not
}
# Half precision is judged against HF's own half precision: both are compared with HF float32 (the share of all
# generated tokens that lie in prefixes agreeing with it), and sglite must stay at least this fraction of HF's share.
# A fixed share does not hold across GPUs: on a random tiny model bfloat16's 8-bit mantissa flips near-ties, and
# HF's own bf16 run agreed with its float32 run 66-88% on an H200 but less on an H100 (sglite bf16 vs HF bf16: 43%,
# 2026-12-07). A wrong kernel diverges within a few tokens everywhere and falls far below HF's share.
HALF_VS_HF_OWN = 0.8
HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tiny_model):
    """(model dir, twelve prompts of 3-150 tokens, HF float32 greedy references on the GPU) for one architecture."""
    model_dir = tiny_model(request.param)
    prompts = varied_prompts(model_dir, 12, min_len=3, max_len=150)
    return model_dir, prompts, [hf_greedy(model_dir, p, NEW_TOKENS, device=DEVICE) for p in prompts]


def cuda_engine(model_dir, **extra):
    return make_engine(model_dir, device=DEVICE, **extra)


@pytest.mark.parametrize("regime", list(REGIMES))
def test_greedy_matches_hf_float32(case, regime: str) -> None:
    model_dir, prompts, refs = case
    with cuda_engine(model_dir, **REGIMES[regime]) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o.token_ids for o in outs] == refs
        assert engine.check_invariants() == []
        assert uses_graphs(engine) is not REGIMES[regime].get("disable_cuda_graph", False)
        if "retraction" in regime:
            assert engine.metrics()["retractions"] > 0
        if regime == "graphs + overlap":
            assert engine.metrics()["overlapped_steps"] > NEW_TOKENS // 2


def test_cuda_graphs_on_and_off_give_the_same_tokens(case) -> None:
    """The same batch decoded as graph replays (padded to a captured size) and eagerly: identical tokens, also
    from the radix cache the second time."""
    model_dir, prompts, _ = case
    results = []
    for disable in (False, True):
        with cuda_engine(model_dir, disable_cuda_graph=disable) as engine:
            assert uses_graphs(engine) is not disable
            results.append([[o.token_ids for o in engine.generate(input_ids=prompts, sampling_params=GREEDY)]
                            for _ in range(2)])
    assert results[0] == results[1]


def agreeing_share(outs: list[list[int]], refs: list[list[int]]) -> float:
    """Share of all generated tokens lying in the prefixes where ``outs`` agree with ``refs``."""
    agreeing = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), NEW_TOKENS) for o, r in zip(outs, refs)]
    return sum(agreeing) / (NEW_TOKENS * len(refs))


@pytest.mark.parametrize("dtype", list(HALF_DTYPES))
def test_half_precision_stays_as_close_to_float32_as_hf_half_does(case, dtype: str) -> None:
    model_dir, prompts, refs = case
    hf_half = [hf_greedy(model_dir, p, NEW_TOKENS, device=DEVICE, dtype=HALF_DTYPES[dtype]) for p in prompts]
    with cuda_engine(model_dir, dtype=dtype) as engine:
        outs = [o.token_ids for o in engine.generate(input_ids=prompts, sampling_params=GREEDY)]
        assert engine.check_invariants() == []
    ours, hf_own = agreeing_share(outs, refs), agreeing_share(hf_half, refs)
    assert ours >= HALF_VS_HF_OWN * hf_own, (
        f"sglite {dtype} agrees with HF float32 on {ours:.0%} of the tokens, HF {dtype} on {hf_own:.0%}; "
        f"sglite vs HF {dtype}: {agreeing_share(outs, hf_half):.0%}")
