"""Multi-head latent attention on the GPU at DeepSeek's shapes (latent 512 + rope 64 per cache row; 16 heads as
DeepSeek-V2-Lite, 128 as V3 at tp 1), against the torch references: split-KV decode at batches 1 / 8 / 64 with
histories up to 4096 and the graph path's preallocated buffers, decode captured in a CUDA graph and replayed with
other lengths (the kernel alone, and ``forward_mla`` of the Triton backend on an `MLAKVPool`), extend with and
without cached prefixes. bf16 first; float16 and float32 (exact ``ieee`` matmuls) where cheap."""

from __future__ import annotations

import importlib

import pytest
import torch

from ..pool_helpers import TOL, random_table, rel_err
from . import randn, require_gpus
from .test_cuda_attention import capture

require_gpus()
pytestmark = pytest.mark.cuda

mla = importlib.import_module("xinf_sglang.kernels.attention.mla")

CUDA = torch.device("cuda")
DV, DPE = 512, 64  # kv_lora_rank, qk_rope_head_dim
HEADS = {"v2-lite": 16, "v3": 128}
SCALE = (128 + 64) ** -0.5  # 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)
# (cached prefix, new tokens) per request
EXTEND_CASES = {
    "1 req, 2048 new": [(0, 2048)],
    "4 reqs, prefixes 0-3000": [(0, 512), (1024, 256), (2048, 1), (3000, 700)],
    "8 reqs, 1024 cached + 64 new": [(1024, 64)] * 8,
}


def latent_cache(seq: list[int], dtype: torch.dtype, width: int):
    """A cache ``[slots + 1, 1, 576]`` holding exactly these histories at scattered slots: ``(kv, table, rows)``."""
    return (randn(sum(seq) + 1, 1, DV + DPE, dtype=dtype), *random_table(seq, sum(seq), width, CUDA))


def graph_buffers(bs: int, h: int) -> dict:
    """The split count of the batch and the preallocated partials and tickets, as the CUDA-graph path holds them."""
    splits = mla.mla_num_splits(bs, h, torch.cuda.get_device_properties(CUDA).multi_processor_count)
    mid_o, mid_lse = mla.mla_intermediate_buffers(bs, h, splits, DV, CUDA)
    return dict(num_splits=splits, mid_o=mid_o, mid_lse=mid_lse, split_counters=mla.mla_split_counters(bs, h, CUDA))


@pytest.mark.parametrize("max_len", [1024, 4096])
@pytest.mark.parametrize("bs", [1, 8, 64])
@pytest.mark.parametrize("model", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mla_decode(dtype: torch.dtype, model: str, bs: int, max_len: int) -> None:
    """Request 0 has exactly ``max_len`` positions, the others uniform in [1, max_len]."""
    torch.manual_seed(bs + max_len)
    h = HEADS[model]
    seq = [max_len] + torch.randint(1, max_len + 1, (bs - 1,)).tolist()
    kv, table, rows = latent_cache(seq, dtype, max_len)
    q, lens = randn(bs, h, DV + DPE, dtype=dtype), torch.tensor(seq, device=CUDA)
    buffers = graph_buffers(bs, h)
    out = mla.mla_decode_triton(q, kv, table, rows, lens, SCALE, DV, **buffers)
    assert rel_err(out, mla.mla_decode_ref(q, kv, table, rows, lens, SCALE, DV)) < TOL[dtype]
    assert not buffers["split_counters"].any()  # the program that merged re-zeroed its ticket


@pytest.mark.parametrize("model", list(HEADS))
def test_mla_decode_float32_is_exact(model: str) -> None:
    """float32 runs ``ieee`` matmuls (no TF32): within summation-order error of the reference."""
    torch.manual_seed(3)
    h, seq = HEADS[model], [700, 33, 2048]
    kv, table, rows = latent_cache(seq, torch.float32, 2048)
    q, lens = randn(3, h, DV + DPE, dtype=torch.float32), torch.tensor(seq, device=CUDA)
    out = mla.mla_decode_triton(q, kv, table, rows, lens, SCALE, DV)
    assert rel_err(out, mla.mla_decode_ref(q, kv, table, rows, lens, SCALE, DV)) < TOL[torch.float32]


@pytest.mark.parametrize("model", list(HEADS))
def test_mla_decode_replays_in_a_cuda_graph(model: str) -> None:
    """Captured with fixed buffers and split count at length 300, replayed with mixed, all-1 and full lengths."""
    torch.manual_seed(1)
    h, bs, width, dtype = HEADS[model], 8, 4096, torch.bfloat16
    kv, table, rows = latent_cache([width] * bs, dtype, width)
    lens = torch.full((bs,), 300, device=CUDA)
    q = randn(bs, h, DV + DPE, dtype=dtype)
    out, buffers = torch.empty(bs, h, DV, dtype=dtype, device=CUDA), graph_buffers(bs, h)
    graph = capture(lambda: mla.mla_decode_triton(q, kv, table, rows, lens, SCALE, DV, out=out, **buffers))
    mixed = torch.randint(1, width + 1, (bs,), generator=torch.Generator().manual_seed(1))
    mixed[0], mixed[-1] = width, 1
    for new_lens in (mixed, torch.ones(bs, dtype=torch.int64), torch.full((bs,), width)):
        lens.copy_(new_lens)
        q.copy_(randn(bs, h, DV + DPE, dtype=dtype))
        graph.replay()
        assert rel_err(out, mla.mla_decode_ref(q, kv, table, rows, lens, SCALE, DV)) < TOL[dtype]
        assert not buffers["split_counters"].any()  # every replay leaves the merge tickets at zero


@pytest.mark.parametrize("model", list(HEADS))
def test_backend_forward_mla_replays_in_a_cuda_graph(model: str) -> None:
    """The Triton backend on an `MLAKVPool`: decode ``forward_mla`` (store the step's rows, attend) captured with the
    graph state's buffers for batch 4 (one row padded: slot 0, length 1) and replayed twice with new rows and
    lengths; equal to the reference backend on a copy of the pool, the stored rows too."""
    from xinf_sglang.runtime.layers.attention.backend import TorchAttentionBackend
    from xinf_sglang.runtime.layers.attention.triton_backend import TritonAttentionBackend
    from xinf_sglang.runtime.mem_cache.kv_pool import MLAKVPool
    from xinf_sglang.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode

    torch.manual_seed(4)
    h, bs, width, dtype = HEADS[model], 4, 2048, torch.bfloat16
    pool = MLAKVPool(bs * width, 1, DV, DPE, dtype, CUDA)
    pool.k_buffers[0].copy_(randn(bs * width + 1, 1, DV + DPE, dtype=dtype))
    table = torch.zeros(bs + 1, width, dtype=torch.int32, device=CUDA)
    table[1:] = torch.arange(1, bs * width + 1, dtype=torch.int32, device=CUDA).view(bs, width)
    table[bs, :] = 0  # the padded row's positions map to the dummy slot
    rows, lens = torch.arange(1, bs + 1, device=CUDA), torch.full((bs,), 100, device=CUDA)
    loc = table[rows, lens - 1].long()  # the step's slots (the warm-up before capture stores there too)
    ones, arange = torch.ones(bs, dtype=torch.int64, device=CUDA), torch.arange(bs, device=CUDA)
    batch = ForwardBatch(ForwardMode.DECODE, arange.clone(), lens - 1, loc, rows, lens, ones, arange, arange)
    tri = TritonAttentionBackend(pool, table, SCALE, num_q_heads=h)
    tri.init_cuda_graph_state(max_bs=8, max_context_len=width)
    tri.init_forward_metadata_capture(batch)
    q, kv = randn(bs, h, DV + DPE, dtype=dtype), randn(bs, 1, DV + DPE, dtype=dtype)
    outs = []
    graph = capture(lambda: outs.append(tri.forward_mla(q, kv, 0, batch)))
    for step_lens in ([width, 1, 777, 1], [5, width, 129, 1]):
        lens.copy_(torch.tensor(step_lens, device=CUDA))
        loc.copy_(table[rows, lens - 1].long())
        q.copy_(randn(bs, h, DV + DPE, dtype=dtype))
        kv.copy_(randn(bs, 1, DV + DPE, dtype=dtype))
        ref_pool = MLAKVPool(bs * width, 1, DV, DPE, dtype, CUDA)
        ref_pool.k_buffers[0].copy_(pool.k_buffers[0])
        tri.init_forward_metadata_replay(batch)
        graph.replay()
        want = TorchAttentionBackend(ref_pool, table, SCALE).forward_mla(q, kv, 0, batch)
        assert rel_err(outs[-1][:3], want[:3]) < TOL[dtype]  # row 3 is padding: its rows land in slot 0
        assert torch.equal(pool.k_buffers[0][1:], ref_pool.k_buffers[0][1:])
        assert not tri.graph_state.split_counters.any()


@pytest.mark.parametrize("case", list(EXTEND_CASES))
@pytest.mark.parametrize("model", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mla_extend(dtype: torch.dtype, model: str, case: str) -> None:
    """New tokens over their cached prefix and themselves (causal)."""
    torch.manual_seed(len(case))
    h, reqs = HEADS[model], EXTEND_CASES[case]
    seq = [p + n for p, n in reqs]
    kv, table, rows = latent_cache(seq, dtype, max(seq))
    ext = torch.tensor([n for _, n in reqs], device=CUDA)
    q = randn(int(ext.sum()), h, DV + DPE, dtype=dtype)
    args = (q, kv, table, rows, torch.tensor(seq, device=CUDA), ext, torch.cumsum(ext, 0) - ext, SCALE, DV)
    out = mla.mla_extend_triton(*args, max_extend_len=max(n for _, n in reqs))
    assert rel_err(out, mla.mla_extend_ref(*args)) < TOL[dtype]


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("name", HEADS)
def test_mla_prep_matches_reference(name: str, tokens: int) -> None:
    """The query / cache-row assembly (kernels/mla_prep.py) at DeepSeek's dims in bf16, from the strided
    views the model passes, against the torch sequence (rotary rounding for rounding; the norm's sum order)."""
    prep = importlib.import_module("xinf_sglang.kernels.mla_prep")
    heads = HEADS[name]
    torch.manual_seed(tokens)
    q_latent = randn(heads, tokens, DV, dtype=torch.bfloat16).transpose(0, 1)
    q_pe = randn(tokens, heads, 128 + DPE, dtype=torch.bfloat16)[..., 128:]
    kv_a = randn(tokens, DV + DPE, dtype=torch.bfloat16, scale=3.0)
    angle = torch.rand(tokens, DPE // 2, device=CUDA) * 6
    cos, sin = (torch.cat([f(angle)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    weight = randn(DV, dtype=torch.bfloat16)
    got = prep.mla_prep(q_latent, q_pe, kv_a, cos, sin, weight, 1e-6, True)
    want = prep.mla_prep_ref(q_latent, q_pe, kv_a, cos, sin, weight, 1e-6, True)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and rel_err(g, w) < TOL[torch.bfloat16]
    assert torch.equal(got[0][..., :DV], q_latent) and torch.equal(got[0][..., DV:], want[0][..., DV:])
