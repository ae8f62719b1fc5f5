"""Tensor parallelism over 2 GPUs (NCCL): the runtime's greedy tokens on the tiny llama / qwen2 / qwen3 models
(float32) equal HF transformers' on one GPU, with CUDA graphs on (and really replayed on every rank) and off, without
the overlap schedule, in small prefill chunks and under retraction. Skipped unless the machine has 2 GPUs.

Decode under tp_size > 1 runs as CUDA-graph replays on every rank: every rank captures the same sizes in the same
order at the same point of startup, so the NCCL all-reduces and the logits gather inside the captures pair up across
ranks; rank 0 broadcasts each replay's header and filled static inputs outside its graph (``tp.LeaderGraphs``) and
the followers replay the graph of the same padded size. The CPU tier runs the ranks eagerly over gloo
(tests/test_tp.py)."""

from __future__ import annotations

import pytest

from . import require_gpus, uses_graphs

TP_SIZE = 2
require_gpus(TP_SIZE)
pytestmark = pytest.mark.cuda

from xinf_sglang.runtime import SamplingParams  # noqa: E402

from ..engine_helpers import hf_greedy, make_engine, varied_prompts  # noqa: E402

NEW_TOKENS = 48
DEVICE = "cuda"
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
REGIMES = {
    "graphs": dict(),
    "no graphs": dict(disable_cuda_graph=True),
    "graphs, no overlap": dict(overlap_schedule="off"),
    "chunked prefill 16": dict(chunked_prefill_size=16, max_prefill_tokens=32),
    "retraction (pool 260)": dict(max_total_tokens=260),
}


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def case(request, tiny_model):
    """(model dir, twelve prompts of 3-150 tokens, HF float32 greedy references on one GPU)."""
    model_dir = tiny_model(request.param)
    prompts = varied_prompts(model_dir, 12, min_len=3, max_len=150)
    return model_dir, prompts, [hf_greedy(model_dir, p, NEW_TOKENS, device=DEVICE) for p in prompts]


@pytest.mark.parametrize("regime", list(REGIMES))
def test_tp2_greedy_matches_hf(case, regime: str) -> None:
    model_dir, prompts, refs = case
    extra = REGIMES[regime]
    with make_engine(model_dir, device=DEVICE, tp_size=TP_SIZE, **extra) as engine:
        graphs = uses_graphs(engine)
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert [o.error for o in outs if o.error] == []
        assert [o.token_ids for o in outs] == refs
        assert engine.check_invariants() == []
        assert graphs is not extra.get("disable_cuda_graph", False)  # every other regime decodes as graph replays
        if "retraction" in regime:
            assert engine.metrics()["retractions"] > 0
