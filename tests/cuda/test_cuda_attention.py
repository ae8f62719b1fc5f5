"""Attention over the token pool on the GPU at Llama-3.1-8B's shapes, against the torch references, in float32,
float16 and bfloat16: split-KV decode attention (the new token already in the pool, and handed over before rotary
as ``NewToken``: rotary + store-KV + attention in one launch, the pool it leaves compared too) at batches 1 / 8 / 64
with histories up to 4096; decode attention captured in a CUDA graph and replayed with other lengths; whole decode
layers as a chain of kernels in a CUDA graph (what programmatic dependent launch must keep ordered); extend
attention with and without cached prefixes."""

from __future__ import annotations

import importlib

import pytest
import torch

from ..pool_helpers import TOL, random_pool, random_table, rel_err
from . import randn, require_gpus

require_gpus()
pytestmark = pytest.mark.cuda

from xinf_sglang.kernels import pdl  # noqa: E402
from xinf_sglang.runtime.bench.layer_chain import LayerChain  # noqa: E402

# By module name: the package re-exports functions named like these modules.
dec, ext, rotary = (importlib.import_module(f"xinf_sglang.kernels.{name}")
                    for name in ("attention.decode_attention", "attention.extend_attention", "rotary"))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.device("cuda")
# (cached prefix, new tokens) per request
EXTEND_CASES = {
    "1 req, 4096 new": [(0, 4096)],
    "4 reqs, prefixes 0-3000": [(0, 512), (1024, 256), (2048, 1), (3000, 1000)],
    "8 reqs, 2048 cached + 128 new": [(2048, 128)] * 8,
}


def pool_for(seq: list[int], shape, dtype: torch.dtype, width: int):
    """K/V pool holding exactly these histories at scattered slots; ``(kb, vb, table, rows)``."""
    kb, vb = random_pool(sum(seq), shape.kv_heads, shape.head_dim, dtype, CUDA)
    return (kb, vb, *random_table(seq, sum(seq), width, CUDA))


def decode_buffers(bs: int, shape) -> dict:
    """The launcher's preallocated split buffers and merge counters, as the CUDA-graph path holds them."""
    splits = dec.decode_num_splits(bs, shape.kv_heads, dec.num_sms_of(CUDA))
    mid_o, mid_lse = dec.decode_intermediate_buffers(bs, shape.heads, splits, shape.head_dim, CUDA)
    return dict(num_splits=splits, mid_o=mid_o, mid_lse=mid_lse,
                split_counters=dec.decode_split_counters(bs, shape.kv_heads, CUDA))


@pytest.mark.parametrize("max_len", [1024, 4096])
@pytest.mark.parametrize("bs", [1, 8, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["in-pool", "new-token"])
def test_decode_attention(shape, fused: bool, dtype: torch.dtype, bs: int, max_len: int) -> None:
    """Request 0 has exactly ``max_len`` positions, the others uniform in [max_len / 2, max_len]."""
    gen = torch.Generator().manual_seed(bs * max_len)
    torch.manual_seed(bs + max_len)
    seq = [max_len] + torch.randint(max_len // 2, max_len + 1, (bs - 1,), generator=gen).tolist()
    kb, vb, table, rows = pool_for(seq, shape, dtype, width=max_len)
    seq_lens = torch.tensor(seq, device=CUDA)
    q = randn(bs, shape.heads, shape.head_dim, dtype=dtype)
    scale = shape.head_dim**-0.5
    new = None
    if fused:
        cos, sin = rotary.rotary_cos_sin(shape.inv_freq(CUDA), seq_lens - 1, dtype)
        k, v = (randn(bs, shape.kv_heads, shape.head_dim, dtype=dtype) for _ in range(2))
        new = dec.NewToken(k, v, cos, sin, table[rows, seq_lens - 1].long())
    kr, vr = kb.clone(), vb.clone()
    want = dec.decode_attention_ref(q, kr, vr, table, rows, seq_lens, scale, new)
    buffers = decode_buffers(bs, shape)
    out = dec.decode_attention_triton(q, kb, vb, table, rows, seq_lens, scale, new_token=new, **buffers)
    assert max(rel_err(out, want), rel_err(kb, kr), rel_err(vb, vr)) < TOL[dtype]
    assert not buffers["split_counters"].any()  # the program that merged a request's splits re-zeroed its ticket


def capture(fn) -> torch.cuda.CUDAGraph:
    """``fn`` compiled and warmed up on a side stream (capture needs that), then captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_replays_in_a_cuda_graph(shape, dtype: torch.dtype) -> None:
    """Captured with fixed buffers and split count at length 300, replayed with mixed, all-1 and full lengths."""
    torch.manual_seed(1)
    bs, width = 8, 4096
    kb, vb, table, rows = pool_for([width] * bs, shape, dtype, width=width)
    seq_lens = torch.full((bs,), 300, device=CUDA)
    q = randn(bs, shape.heads, shape.head_dim, dtype=dtype)
    out, buffers, scale = torch.empty_like(q), decode_buffers(bs, shape), shape.head_dim**-0.5
    graph = capture(lambda: dec.decode_attention_triton(q, kb, vb, table, rows, seq_lens, scale, out=out, **buffers))
    mixed = torch.randint(1, width + 1, (bs,), generator=torch.Generator().manual_seed(1))
    mixed[0], mixed[-1] = width, 1
    for lens in (mixed, torch.ones(bs, dtype=torch.int64), torch.full((bs,), width)):
        seq_lens.copy_(lens)
        q.copy_(randn(bs, shape.heads, shape.head_dim, dtype=dtype))
        graph.replay()
        assert rel_err(out, dec.decode_attention_ref(q, kb, vb, table, rows, seq_lens, scale)) < TOL[dtype]
        assert not buffers["split_counters"].any()  # every replay leaves the merge tickets at zero


@pytest.mark.parametrize("bs", [1, 8])
def test_decode_layers_replay_in_a_cuda_graph(shape, bs: int) -> None:
    """Four decode layers as the model chains the kernels (every kernel reads what the one before wrote; the skinny
    linear at these <= 8 rows), captured and replayed with fresh inputs: equal to the float32 references, and bit
    for bit to the same kernels run eagerly. A kernel that read its input before the previous one had written it
    (programmatic dependent launch gone wrong, ``pdl.pdl_supported``) gives an O(1) error here."""
    torch.manual_seed(bs)
    dtype = torch.float16
    chain = LayerChain.build(shape, bs, ctx=384, layers=4, dtype=dtype, device=CUDA)
    h_in = randn(bs, shape.hidden, dtype=dtype)
    outs = []
    graph = capture(lambda: outs.append(chain.run(h_in)))
    for _ in range(3):
        h_in.copy_(randn(bs, shape.hidden, dtype=dtype))
        graph.replay()
        out = outs[-1]  # the captured run's output buffer, which every replay rewrites
        fp32_pools = [(kb.float(), vb.float()) for kb, vb in chain.pools]
        assert rel_err(out, chain.run(h_in.float(), ref=True, pools=fp32_pools)) < TOL[dtype], pdl.pdl_supported(CUDA)
        assert torch.equal(out, chain.run(h_in))
        assert not chain.decode_buffers["split_counters"].any()


@pytest.mark.parametrize("case", list(EXTEND_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_extend_attention(shape, dtype: torch.dtype, case: str) -> None:
    torch.manual_seed(len(case))
    reqs = EXTEND_CASES[case]
    seq = [p + n for p, n in reqs]
    kb, vb, table, rows = pool_for(seq, shape, dtype, width=max(seq))
    ext_lens = torch.tensor([n for _, n in reqs], device=CUDA)
    start = torch.cumsum(ext_lens, 0) - ext_lens
    q = randn(int(ext_lens.sum()), shape.heads, shape.head_dim, dtype=dtype)
    args = (q, kb, vb, table, rows, torch.tensor(seq, device=CUDA), ext_lens, start, shape.head_dim**-0.5)
    out = ext.extend_attention_triton(*args, max_extend_len=max(n for _, n in reqs))
    assert rel_err(out, ext.extend_attention_ref(*args)) < TOL[dtype]
