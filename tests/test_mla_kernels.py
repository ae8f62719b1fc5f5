"""Multi-head latent attention (kernels/attention/mla.py) on the CPU: the Triton decode and extend kernels under the
interpreter against their torch references on fresh random inputs (tiny grids, float32: the interpreter's half
precision is not exact; bf16 at DeepSeek's shapes is in tests/cuda/test_cuda_mla.py), the split policy, and the
Triton backend's MLA path (an `MLAKVPool`, its V a strided view of the cache) against the reference backend,
CUDA-graph metadata included. TRITON_INTERPRET=1 comes from tests/conftest.py."""

from __future__ import annotations

import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from . import test_kernels  # the PDL contract check and the backend batches, reused (a module: not collected)
from .pool_helpers import TOL, random_table, rel_err  # noqa: E402

mla, mla_kernels, mla_split = (importlib.import_module(f"xinf_sglang.kernels.attention.{name}")
                               for name in ("mla", "mla_kernels", "mla_split"))
mla_prep = importlib.import_module("xinf_sglang.kernels.mla_prep")

INTERPRETED = isinstance(tl.sum, InterpretedFunction) and isinstance(mla_kernels.mla_decode_kernel, InterpretedFunction)
SCALE = 0.3  # a model's own softmax scale, not 1/sqrt(Dk)


@pytest.fixture(autouse=True)
def _needs_interpreter() -> None:
    assert INTERPRETED, "triton was imported without TRITON_INTERPRET=1 (set it before importing triton)"


def latent_cache(seq: list[int], dk: int, width: int | None = None):
    """An MLA cache ``[slots + 1, 1, dk]`` holding these histories at scattered slots, and its table:
    ``(kv, req_to_token, req_pool_indices)``."""
    kv = torch.randn(sum(seq) + 1, 1, dk)
    return (kv, *random_table(seq, sum(seq), width or max(seq) + 3))


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("h", [1, 4, 16])
@pytest.mark.parametrize("seq", [[1], [37], [5, 70, 1, 33]], ids=["len1", "len37", "mixed"])
@pytest.mark.parametrize("splits", [1, 3, None], ids=["1split", "3splits", "auto"])
@pytest.mark.parametrize("dv,dpe", [(32, 16), (24, 8)], ids=["32+16", "24+8"])
def test_mla_decode_matches_reference(dv: int, dpe: int, h: int, seq: list[int], splits: int | None) -> None:
    """Dv + rope of powers of two and not (masked columns), histories of mixed lengths split in tiles of 16
    (``min_split_tokens`` 8 so short ones split too; ``None`` = the policy's count for the batch)."""
    torch.manual_seed(h * 100 + len(seq))
    kv, table, rows = latent_cache(seq, dv + dpe)
    q, lens = torch.randn(len(seq), h, dv + dpe), torch.tensor(seq)
    want = mla.mla_decode_ref(q, kv, table, rows, lens, SCALE, dv)
    counters = mla.mla_split_counters(len(seq), h, q.device)
    got = mla.mla_decode_triton(q, kv, table, rows, lens, SCALE, dv, num_splits=splits, min_split_tokens=8,
                                split_counters=counters)
    assert got.shape == (len(seq), h, dv) and rel_err(got, want) < TOL[torch.float32]
    assert not counters.any()  # the program that merged re-zeroed its ticket


def test_mla_decode_at_deepseek_dims_with_fixed_buffers() -> None:
    """The real 512 + 64 row, 16 heads (V2-Lite), as the CUDA-graph path runs it: oversized preallocated partials
    (views of one flat buffer), one counter buffer for two launches, a strided q (a view of a wider tensor), an
    empty padded row (zeros) and an ``out`` buffer."""
    torch.manual_seed(5)
    dv, dpe, h = 512, 64, 16
    seq = [40, 0, 9]
    kv, table, rows = latent_cache([max(n, 1) for n in seq], dv + dpe)
    lens = torch.tensor(seq)
    wide = torch.randn(len(seq), h, dv + dpe + 8)
    q = wide[..., 4 : 4 + dv + dpe]
    flat_o, flat_lse = torch.empty(8 * h * 4 * dv), torch.empty(8 * h * 4)
    mid_o, mid_lse = flat_o[: 3 * h * 4 * dv].view(3, h, 4, dv), flat_lse[: 3 * h * 4].view(3, h, 4)
    counters, out = mla.mla_split_counters(8, h, q.device), torch.full((3, h, dv), float("nan"))
    want = mla.mla_decode_ref(q, kv, table, rows, lens, SCALE, dv)
    for _ in range(2):
        mla.mla_decode_triton(q, kv, table, rows, lens, SCALE, dv, num_splits=4, min_split_tokens=8, mid_o=mid_o,
                              mid_lse=mid_lse, split_counters=counters, out=out)
        # the reference's empty row is 0/0: compared with the zeros the kernel promises instead
        assert rel_err(out[[0, 2]], want[[0, 2]]) < TOL[torch.float32] and not counters.any()
        assert torch.equal(out[1], torch.zeros(h, dv))


def test_mla_decode_rejects_what_does_not_fit() -> None:
    kv, table, rows = latent_cache([4], 48)
    q, lens = torch.randn(1, 4, 48), torch.tensor([4])
    with pytest.raises(ValueError, match="v_head_dim"):
        mla.mla_decode_triton(q, kv, table, rows, lens, SCALE, 48)
    with pytest.raises(ValueError, match=r"kv_buffer must be \[slots, 1, 48\]"):
        mla.mla_decode_triton(q, kv.expand(-1, 2, -1), table, rows, lens, SCALE, 32)
    with pytest.raises(ValueError, match="mid_o"):
        mla.mla_decode_triton(q, kv, table, rows, lens, SCALE, 32, num_splits=2,
                              mid_o=torch.empty(1, 4, 2, 48), mid_lse=torch.empty(1, 4, 2))
    with pytest.raises(ValueError, match="split_counters"):
        mla.mla_decode_triton(q, kv, table, rows, lens, SCALE, 32, split_counters=torch.zeros(0, dtype=torch.int32))


# ---------------------------------------------------------------- extend

# (cached prefix, new tokens) per request
EXTEND_CASES = {
    "one request, no prefix": [(0, 21)],
    "prefixes of different lengths": [(0, 5), (13, 1), (30, 17), (3, 2)],
    "a request without new tokens": [(7, 3), (9, 0), (0, 1)],
}


@pytest.mark.parametrize("h", [1, 4, 16])
@pytest.mark.parametrize("case", list(EXTEND_CASES), ids=list(EXTEND_CASES))
@pytest.mark.parametrize("block_m,dv,dpe", [(16, 32, 16), (32, 24, 8)])
def test_mla_extend_matches_reference(h: int, case: str, block_m: int, dv: int, dpe: int) -> None:
    """New tokens against their cached prefix and themselves (causal); ``block_m`` query rows per program are tokens
    x heads (one token of 16 heads, or 32 tokens of one head...); Dv + rope of powers of two and not."""
    reqs = EXTEND_CASES[case]
    torch.manual_seed(h + block_m + len(reqs))
    seq = [p + n for p, n in reqs]
    kv, table, rows = latent_cache([max(s, 1) for s in seq], dv + dpe)
    ext = torch.tensor([n for _, n in reqs])
    start = torch.cumsum(ext, 0) - ext
    q = torch.randn(int(ext.sum()), h, dv + dpe)
    args = (q, kv, table, rows, torch.tensor(seq), ext, start, SCALE, dv)
    got = mla.mla_extend_triton(*args, block_m=block_m, block_n=16)
    assert rel_err(got, mla.mla_extend_ref(*args)) < TOL[torch.float32]


def test_mla_extend_at_deepseek_dims() -> None:
    """The real 512 + 64 row with 16 heads, a cached prefix and a strided q; the grid sized by ``max_extend_len``."""
    torch.manual_seed(9)
    dv, dpe, h = 512, 64, 16
    reqs = [(6, 3), (0, 2)]
    seq = [p + n for p, n in reqs]
    kv, table, rows = latent_cache(seq, dv + dpe)
    ext = torch.tensor([n for _, n in reqs])
    q = torch.randn(int(ext.sum()), h + 2, dv + dpe)[:, 1 : h + 1]
    args = (q, kv, table, rows, torch.tensor(seq), ext, torch.cumsum(ext, 0) - ext, SCALE, dv)
    got = mla.mla_extend_triton(*args, max_extend_len=3)
    assert rel_err(got, mla.mla_extend_ref(*args)) < TOL[torch.float32]


def test_dispatchers_use_the_references_on_cpu_tensors() -> None:
    torch.manual_seed(2)
    kv, table, rows = latent_cache([6, 3], 48)
    q, lens = torch.randn(2, 4, 48), torch.tensor([6, 3])
    assert torch.equal(mla.mla_decode(q, kv, table, rows, lens, SCALE, 32),
                       mla.mla_decode_ref(q, kv, table, rows, lens, SCALE, 32))
    ext, start = torch.tensor([1, 1]), torch.tensor([0, 1])
    assert torch.equal(mla.mla_extend(q, kv, table, rows, lens, ext, start, SCALE, 32),
                       mla.mla_extend_ref(q, kv, table, rows, lens, ext, start, SCALE, 32))


# ---------------------------------------------------------------- split policy and the PDL contract


def test_split_count_depends_on_the_batch_and_heads_only() -> None:
    """Fewer splits for more heads or requests (the partials are H x Dv per split), capped by the context bound,
    always in [1, DECODE_MAX_SPLITS]."""
    one = [mla.mla_num_splits(bs, 16) for bs in (1, 8, 64, 1024)]
    assert one == sorted(one, reverse=True) and one[0] <= 64 and one[-1] == 1
    assert mla.mla_num_splits(8, 128) < mla.mla_num_splits(8, 16)
    assert mla.mla_num_splits(1, 16, max_seq_len=300, min_split_tokens=128) == 3
    assert mla.mla_head_blocks(128) == 8 and mla.mla_head_blocks(1) == 1
    with pytest.raises(ValueError):
        mla.mla_num_splits(0, 16)


@pytest.mark.parametrize("kernel", ["mla_decode_kernel", "mla_extend_kernel"])
def test_mla_kernels_wait_before_any_memory_access(kernel: str) -> None:
    """The PDL contract of kernels/pdl.py, checked the way tests/test_kernels.py checks the other kernels."""
    test_kernels.test_pdl_kernels_wait_before_any_memory_access(mla_kernels, kernel)


# ---------------------------------------------------------------- the query / cache-row assembly


@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved", "rotate-half"])
@pytest.mark.parametrize("t,h,dv,r", [(1, 4, 32, 16), (3, 2, 24, 8)])
def test_mla_prep_matches_reference(interleave: bool, t: int, h: int, dv: int, r: int) -> None:
    """One launch for q = [q_latent | rope(q_pe)] and the cache rows [norm(latent) | rope(k_pe)], reading the
    strided views the model has (a transposed bmm output, a slice of the q projection, the kv_a output), against
    the torch sequence; a ragged latent width (24) for the masked norm."""
    torch.manual_seed(t * 10 + h)
    q_latent = torch.randn(h, t, dv).transpose(0, 1)  # [T, H, Dv], strides (Dv, T * Dv, 1)
    q_pe = torch.randn(t, h, 40 + r)[..., 40:]  # a slice of the per-head projection
    kv_a = torch.randn(t, dv + r) * 3
    angle = torch.rand(t, r // 2) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    weight = torch.randn(dv)
    got = mla_prep.mla_prep_triton(q_latent, q_pe, kv_a, cos, sin, weight, 1e-6, interleave)
    want = mla_prep.mla_prep_ref(q_latent, q_pe, kv_a, cos, sin, weight, 1e-6, interleave)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < 1e-6
    assert torch.equal(got[0][..., :dv], q_latent)  # the latent query is copied as it is
    with pytest.raises(ValueError, match="do not fit"):
        mla_prep.mla_prep_triton(q_latent, q_pe, kv_a[:, 1:], cos, sin, weight, 1e-6, interleave)


def test_mla_prep_kernel_waits_before_any_memory_access() -> None:
    test_kernels.test_pdl_kernels_wait_before_any_memory_access(mla_prep, "_mla_prep_kernel")


# ---------------------------------------------------------------- the Triton backend on an MLA pool


def test_triton_backend_mla_matches_torch_backend() -> None:
    """``forward_mla`` (store the rows, then attend) through an extend and the decode after it, then the CUDA-graph
    metadata: partials Dv wide, merge tickets per head block, split count from the batch size only."""
    from xinf_sglang.runtime.layers.attention.backend import TorchAttentionBackend
    from xinf_sglang.runtime.layers.attention.triton_backend import TritonAttentionBackend
    from xinf_sglang.runtime.mem_cache.kv_pool import MLAKVPool

    torch.manual_seed(31)
    h, dv, dpe, num_slots, layers = 20, 32, 16, 120, 2  # 20 heads: two head blocks, the second partly padded
    table, extend, decode = test_kernels._backend_batches(num_slots)
    pools = [MLAKVPool(num_slots, layers, dv, dpe, torch.float32, torch.device("cpu")) for _ in range(2)]
    for layer in range(layers):  # the cached prefixes: the same random rows in both pools
        cached = torch.randn(num_slots + 1, 1, dv + dpe)
        for pool in pools:
            pool.k_buffers[layer].copy_(cached)
    assert pools[1].v_buffers[0].stride(0) == dv + dpe  # V is the strided latent view, not a copy
    ref = TorchAttentionBackend(pools[0], table, SCALE)
    tri = TritonAttentionBackend(pools[1], table, SCALE, num_q_heads=h, min_split_tokens=4)
    for batch in (extend, decode):
        ref.init_forward_metadata(batch)
        tri.init_forward_metadata(batch)
        for layer in range(layers):
            q, kv = torch.randn(batch.num_tokens, h, dv + dpe), torch.randn(batch.num_tokens, 1, dv + dpe)
            want = ref.forward_mla(q, kv, layer, batch)
            got = tri.forward_mla(q, kv, layer, batch)
            assert got.shape == (batch.num_tokens, h, dv) and rel_err(got, want) < 1e-5, (batch.mode, layer)
    for layer in range(layers):
        assert torch.equal(pools[0].k_buffers[layer], pools[1].k_buffers[layer])
    tri.init_cuda_graph_state(max_bs=4, max_context_len=48)
    tri.init_forward_metadata_capture(decode)
    captured = tri.metadata
    assert captured.mid_o.shape[1:] == (h, captured.num_splits, dv) and captured.split_counters.numel() == 4 * 2
    assert captured.num_splits == mla.mla_num_splits(3, h, tri.num_sms, 48, 4)
    q, kv = torch.randn(decode.num_tokens, h, dv + dpe), torch.randn(decode.num_tokens, 1, dv + dpe)
    want = ref.forward_mla(q, kv, 0, decode)
    assert rel_err(tri.forward_mla(q, kv, 0, decode), want) < 1e-5 and not captured.split_counters.any()
    tri.init_forward_metadata_replay(decode)
    assert tri.metadata.num_splits == captured.num_splits
    assert tri.metadata.mid_o.data_ptr() == captured.mid_o.data_ptr() == tri.graph_state.mid_o_flat.data_ptr()


def test_triton_backend_mla_needs_the_head_count() -> None:
    from xinf_sglang.runtime.layers.attention.triton_backend import TritonAttentionBackend
    from xinf_sglang.runtime.mem_cache.kv_pool import MLAKVPool

    pool = MLAKVPool(8, 1, 32, 16, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="num_q_heads"):
        TritonAttentionBackend(pool, torch.zeros(2, 8, dtype=torch.int32), SCALE)


def test_the_benchmark_refuses_without_a_gpu() -> None:
    from xinf_sglang.runtime.bench import mla_decode

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the benchmark would run")
    with pytest.raises(SystemExit, match="GPU"):
        mla_decode.main(["--batch", "1"])


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_tiny_deepseek_with_the_triton_mla_backend_matches_hf(arch: str, tiny_model, monkeypatch) -> None:
    """The whole wiring: the engine's DeepSeek models (latent 32 + rope 8) on the Triton backend (interpreted; the
    CPU engine otherwise runs the torch reference), greedy tokens = HF's through chunked prefill, a mixed batch,
    decode with split histories, and cached prefixes on a second pass."""
    from xinf_sglang.runtime import SamplingParams
    from xinf_sglang.runtime.engine import startup
    from xinf_sglang.runtime.layers.attention.triton_backend import TritonAttentionBackend

    from .engine_helpers import hf_greedy, make_engine, varied_prompts

    def triton_backend(choice, kv_pool, req_to_token, cfg, device, tp):
        return TritonAttentionBackend(kv_pool, req_to_token, cfg.attention_scale, num_q_heads=cfg.num_heads // tp.size,
                                      min_split_tokens=8)

    monkeypatch.setattr(startup, "_make_attention_backend", triton_backend)
    model_dir = tiny_model(arch)
    prompts = varied_prompts(model_dir, 4, min_len=3, max_len=60)
    refs = [hf_greedy(model_dir, p, 12) for p in prompts]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    with make_engine(model_dir, chunked_prefill_size=16, max_prefill_tokens=32) as engine:
        assert engine.run_on_scheduler(lambda scheduler: isinstance(scheduler.runner.attn, TritonAttentionBackend))
        for _ in range(2):
            assert [o.token_ids for o in engine.generate(input_ids=prompts, sampling_params=greedy)] == refs
        assert engine.check_invariants() == []
