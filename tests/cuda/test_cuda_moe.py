"""The fused-MoE Triton path (kernels/moe/) against its torch reference on the GPU, at the per-GPU shapes of
Qwen3-30B-A3B (128 experts of N=768, hidden 2048, top-8) and Mixtral-8x7B (8 experts of N=14336, hidden 4096, top-2),
for a decode token, a small decode batch, a decode batch and a prefill chunk, in bf16 and fp16 with the launch config
``get_moe_config`` picks (the shipped tuned file for this card when there is one, else the defaults); plus a CUDA
graph capture of the whole call (decode runs in graphs) and a small tuning run of ``sglite bench moe-tune``.
The CPU tier (tests/test_kernels_moe.py) checks the same kernel at tiny shapes under the interpreter."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from ..pool_helpers import TOL, rel_err
from . import randn, require_gpus

require_gpus()
pytestmark = pytest.mark.cuda

moe = importlib.import_module("xinf_sglang.kernels.moe")
CUDA = torch.device("cuda")
SHAPES = {  # name: (experts, intermediate, hidden, top-k)
    "qwen3-30b-a3b": (128, 768, 2048, 8),
    "mixtral-8x7b": (8, 14336, 4096, 2),
}


@pytest.fixture(scope="module")
def weights():
    """Random expert weights per (shape, dtype), made once: Mixtral's are 2.8 GB in half precision."""
    made: dict = {}

    def get(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if (name, dtype) not in made:
            made.clear()  # one set at a time on the card
            torch.manual_seed(0)
            e, n, h, _ = SHAPES[name]
            made[name, dtype] = (randn(e, 2 * n, h, dtype=dtype, scale=h**-0.5),
                                 randn(e, h, n, dtype=dtype, scale=n**-0.5))
        return made[name, dtype]

    return get


def _routing(tokens: int, experts: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(tokens, experts, device=CUDA)
    w, ids = torch.softmax(logits, dim=-1).topk(topk, dim=-1)
    return w, ids.to(torch.int32)


@pytest.mark.parametrize("tokens", [1, 4, 7, 64, 512])  # 1 and 4: the decode GEMVs (kernels/moe/decode.py)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", SHAPES)
def test_triton_matches_reference(weights, name: str, dtype: torch.dtype, tokens: int) -> None:
    e, _, h, k = SHAPES[name]
    w13, w2 = weights(name, dtype)
    torch.manual_seed(tokens)
    x = randn(tokens, h, dtype=dtype)
    topk_weights, topk_ids = _routing(tokens, e, k)
    out = moe.fused_experts(x, w13, w2, topk_weights, topk_ids)  # dispatches to Triton for CUDA tensors
    assert out.dtype == dtype and out.shape == (tokens, h)
    assert torch.equal(out, moe.fused_experts_triton(x, w13, w2, topk_weights, topk_ids))
    ref = moe.fused_experts_ref(x, w13, w2, topk_weights, topk_ids)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("tokens", [3, 7])
def test_float32_is_exact_to_float32_rounding(weights, tokens: int) -> None:
    """float32 runs IEEE dots (no TF32; the decode GEMVs at 3 tokens are CUDA-core FMAs): as close to the
    reference as float32 summation order allows."""
    e, _, h, k = SHAPES["qwen3-30b-a3b"]
    w13, w2 = weights("qwen3-30b-a3b", torch.float32)
    x = randn(tokens, h, dtype=torch.float32)
    topk_weights, topk_ids = _routing(tokens, e, k)
    out = moe.fused_experts_triton(x, w13, w2, topk_weights, topk_ids)
    assert rel_err(out, moe.fused_experts_ref(x, w13, w2, topk_weights, topk_ids)) < TOL[torch.float32]


def test_skewed_routing_and_idle_experts(weights) -> None:
    """Every token routed to the same few experts (one long group over many row blocks, most experts idle)."""
    _, _, h, k = SHAPES["qwen3-30b-a3b"]
    w13, w2 = weights("qwen3-30b-a3b", torch.bfloat16)
    x = randn(300, h, dtype=torch.bfloat16)
    topk_ids = torch.arange(k, device=CUDA, dtype=torch.int64).repeat(300, 1)
    topk_weights = torch.rand(300, k, device=CUDA)
    out = moe.fused_experts_triton(x, w13, w2, topk_weights, topk_ids)
    assert rel_err(out, moe.fused_experts_ref(x, w13, w2, topk_weights, topk_ids)) < TOL[torch.bfloat16]
    assert moe.fused_experts_triton(x[:0], w13, w2, topk_weights[:0], topk_ids[:0]).shape == (0, h)


@pytest.mark.parametrize("tokens", [2, 8, 512], ids=["decode-gemv", "triton-sort", "torch-sort"])
def test_cuda_graph_replay_matches_eager(weights, tokens: int) -> None:
    """The whole call (sorting included: the one-launch Triton sort at 64 pairs, the torch one at 4096) captured
    once, replayed on new routing: no host synchronisation inside."""
    e, _, h, k = SHAPES["qwen3-30b-a3b"]
    w13, w2 = weights("qwen3-30b-a3b", torch.bfloat16)
    x = randn(tokens, h, dtype=torch.bfloat16)
    topk_weights, topk_ids = _routing(tokens, e, k)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moe.fused_experts_triton(x, w13, w2, topk_weights, topk_ids)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.fused_experts_triton(x, w13, w2, topk_weights, topk_ids)
    new_weights, new_ids = _routing(tokens, e, k)
    x.copy_(randn(tokens, h, dtype=torch.bfloat16))
    topk_weights.copy_(new_weights)
    topk_ids.copy_(new_ids)
    graph.replay()
    assert torch.equal(out, moe.fused_experts_triton(x, w13, w2, topk_weights, topk_ids))


@pytest.mark.parametrize("tokens,block_m", [(1, 16), (7, 16), (64, 16), (256, 64), (200, 128)])
@pytest.mark.parametrize("name", SHAPES)
def test_align_triton_equals_torch(name: str, tokens: int, block_m: int) -> None:
    e, _, _, k = SHAPES[name]
    _, topk_ids = _routing(tokens, e, k)
    for got, want in zip(moe.moe_align_block_size_triton(topk_ids, block_m, e),
                         moe.moe_align_block_size_ref(topk_ids, block_m, e)):
        assert torch.equal(got, want)


def test_tuner_writes_a_config_that_is_then_used(tmp_path, monkeypatch) -> None:
    """A quick tuning run on a small shape (2 compile workers): the file is named for this card, every entry
    has the six keys, and ``get_moe_config`` reads it back."""
    from xinf_sglang.kernels.moe.config import CONFIG_KEYS
    from xinf_sglang.runtime.bench import moe_tune

    shape = moe_tune.MoeShape(8, 128, 256, 2, torch.bfloat16)
    path = moe_tune.tune(shape, [1, 64], tmp_path, quick=True, reps=3, workers=2)
    assert torch.cuda.get_device_name().replace(" ", "_") in path.name
    table = json.loads(path.read_text())
    assert sorted(table) == ["1", "64"] and all(set(c) == set(CONFIG_KEYS) for c in table.values())
    monkeypatch.setenv("SGLITE_MOE_CONFIG_DIR", str(tmp_path))
    assert moe.get_moe_config(8, 128, 60, torch.bfloat16) == table["64"]



@pytest.mark.parametrize("tokens", [1, 8, 4096])
@pytest.mark.parametrize("experts,top_k,scoring,bias,renormalize", [
    (128, 8, "softmax", False, True),  # Qwen3-MoE
    (8, 2, "softmax", False, True),  # Mixtral
    (64, 6, "softmax", False, False),  # DeepSeek-V2-Lite
    (256, 8, "sigmoid", True, True),  # sigmoid scores with a correction bias
])
def test_fused_topk_matches_reference(tokens: int, experts: int, top_k: int, scoring: str, bias: bool,
                                      renormalize: bool) -> None:
    """The one-launch greedy routing against its torch reference: float32 logits (no two scores tie) give the same
    experts and weights to float32 rounding, also replayed in a CUDA graph; bf16 logits (ties happen: either
    order is right) give experts of the same scores and the same weights."""
    logits = randn(tokens, experts, dtype=torch.float32, scale=3.0)
    correction = randn(experts, dtype=torch.float32, scale=0.1) if bias else None
    args = (top_k, scoring, correction, renormalize, 2.5)
    got_w, got_i = moe.fused_topk_triton(logits, *args)
    want_w, want_i = moe.fused_topk_ref(logits, *args)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_w, out_i = moe.fused_topk_triton(logits, *args)
    logits.copy_(randn(tokens, experts, dtype=torch.float32, scale=3.0))
    graph.replay()
    want_w, want_i = moe.fused_topk_ref(logits, *args)
    assert torch.equal(out_i, want_i)
    torch.testing.assert_close(out_w, want_w, rtol=1e-5, atol=1e-6)
    if not bias:
        half = logits.bfloat16()
        got_w, got_i = moe.fused_topk_triton(half, *args)
        want_w, want_i = moe.fused_topk_ref(half, *args)
        scores = torch.softmax(half.float(), -1) if scoring == "softmax" else half.float().sigmoid()
        assert torch.equal(scores.gather(1, got_i.long()), scores.gather(1, want_i.long()))
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
