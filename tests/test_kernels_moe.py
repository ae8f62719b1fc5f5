"""The fused-MoE kernels of kernels/moe/ on the CPU: the Triton grouped GEMMs under the interpreter against
``fused_experts_ref`` on fresh random inputs (tiny grids, float32: the interpreter's bf16 is not exact; half
precision is covered by tests/cuda/test_cuda_moe.py), the reference against a dense per-token loop, the invariants of
``moe_align_block_size``, and the launch-config lookup. TRITON_INTERPRET=1 comes from tests/conftest.py."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from xinf_sglang.kernels import (
    fused_experts,
    fused_experts_ref,
    get_moe_config,
    moe_align_block_size,
)

from .pool_helpers import rel_err

fused = importlib.import_module("xinf_sglang.kernels.moe.fused")
decode = importlib.import_module("xinf_sglang.kernels.moe.decode")
moe_config = importlib.import_module("xinf_sglang.kernels.moe.config")
align = importlib.import_module("xinf_sglang.kernels.moe.align")

INTERPRETED = isinstance(tl.sum, InterpretedFunction) and isinstance(fused._moe_gemm_kernel, InterpretedFunction)
TINY = moe_config.make_config(16, 16, 16, 1, 4, 2)  # the smallest tiles tl.dot takes: fast in the interpreter


def _weights(e: int, n: int, h: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(e, 2 * n, h) * h**-0.5).to(dtype), (torch.randn(e, h, n) * n**-0.5).to(dtype)


def _routing(t: int, e: int, k: int, skew: str = "softmax", ids_dtype=torch.int64):
    """Top-k routing of ``t`` tokens: softmax top-k of random logits, or ``"hot"`` (expert 0 in every token's
    top-k, most experts idle: one huge group and empty ones), ``"skip-last"`` (expert e-1 never chosen)."""
    logits = torch.randn(t, e)
    if skew == "hot":
        logits[:, 0] += 10.0
        logits[:, 2:] -= 5.0
    elif skew == "skip-last":
        logits[:, -1] = -1e9
    weights, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return weights.float(), ids.to(ids_dtype)


def _dense_loop(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The definition, one (token, k) at a time, in float64."""
    n = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = w13[e, :n].double() @ x[t].double(), w13[e, n:].double() @ x[t].double()
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.fixture(autouse=True)
def _needs_interpreter() -> None:
    # Without TRITON_INTERPRET=1 before triton's import the kernels are compiled for a GPU that is not here.
    assert INTERPRETED, "triton was imported without TRITON_INTERPRET=1 (set it before importing triton)"


# ---------------------------------------------------------------- the Triton path against the reference

CASES = [  # (tokens, experts, top-k, hidden, intermediate, routing, config changes)
    (0, 4, 2, 32, 16, "softmax", {}),
    (1, 4, 2, 32, 16, "softmax", {}),
    (1, 8, 1, 32, 16, "softmax", {}),
    (7, 4, 2, 40, 24, "softmax", {}),  # hidden and intermediate not multiples of the 16-wide tiles
    (9, 8, 3, 32, 16, "hot", {}),  # one expert gets every token (several row blocks), most get none
    (6, 5, 2, 32, 32, "skip-last", {"BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32}),
    (21, 3, 2, 32, 16, "softmax", {"GROUP_SIZE_M": 2}),  # grouped launch order over several row blocks
    (3, 4, 4, 32, 16, "softmax", {}),  # top-k = number of experts
]


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("t,e,k,h,n,skew,changes", CASES)
def test_triton_matches_reference(t, e, k, h, n, skew, changes, ids_dtype) -> None:
    torch.manual_seed(1000 * t + 10 * e + k)
    x = torch.randn(t, h)
    w13, w2 = _weights(e, n, h)
    weights, ids = _routing(t, e, k, skew, ids_dtype)
    out = fused.fused_experts_triton(x, w13, w2, weights, ids, config=TINY | changes)
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    assert out.shape == (t, h) and out.dtype == x.dtype
    if t:
        assert rel_err(out, ref) < 1e-5


def test_triton_with_the_looked_up_config() -> None:
    """No config given, more tokens than the decode GEMVs take: the grouped GEMMs with the default config for a
    decode-sized batch (16-row blocks, 64 x 128 tiles) on a tiny shape."""
    torch.manual_seed(3)
    t = decode.MOE_GEMV_MAX_TOKENS + 1
    x, (w13, w2) = torch.randn(t, 64), _weights(4, 32, 64)
    weights, ids = _routing(t, 4, 2)
    assert rel_err(fused.fused_experts_triton(x, w13, w2, weights, ids), fused_experts_ref(x, w13, w2, weights, ids)) < 1e-5


GEMV_CASES = [  # (tokens, experts, top-k, hidden, intermediate, routing, launch shape)
    (1, 4, 2, 32, 16, "softmax", (8, 16)),
    (1, 8, 1, 40, 24, "softmax", (16, 16)),  # top-1: no split; hidden / intermediate ragged against the steps
    (2, 4, 4, 48, 20, "softmax", (8, 32)),  # top-k = experts: both tokens read every expert
    (3, 8, 3, 32, 16, "hot", (16, 8)),  # every token routed to expert 0
    (4, 6, 2, 24, 40, "softmax", (8, 16)),
]


@pytest.mark.parametrize("t,e,k,h,n,skew,shape", GEMV_CASES)
def test_decode_gemvs_match_reference(t, e, k, h, n, skew, shape) -> None:
    """The decode path (kernels/moe/decode.py: gate/up + SiLU GEMV, down GEMV with the top-k sum in the kernel)
    against the reference and the dense definition, and its dispatch: up to ``MOE_GEMV_MAX_TOKENS`` tokens without
    a config. Twice: the shared split-K counters are left zero by the first call."""
    torch.manual_seed(100 * t + e + k)
    x = torch.randn(t, h)
    w13, w2 = _weights(e, n, h)
    weights, ids = _routing(t, e, k, skew)
    cfg = {"BLOCK_SIZE_N": shape[0], "BLOCK_SIZE_K": shape[1], "num_warps": 1}
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    first = decode.fused_experts_gemv(x, w13, w2, weights, ids, cfg)
    assert rel_err(first, ref) < 1e-5
    assert rel_err(first.double(), _dense_loop(x, w13, w2, weights, ids)) < 1e-5
    assert torch.equal(decode.fused_experts_gemv(x, w13, w2, weights, ids, cfg), first)
    assert rel_err(fused.fused_experts_triton(x, w13, w2, weights, ids), ref) < 1e-5  # the default shape


def test_dispatch_on_cpu_is_the_reference() -> None:
    torch.manual_seed(4)
    x, (w13, w2) = torch.randn(5, 32), _weights(4, 16, 32)
    weights, ids = _routing(5, 4, 2)
    assert torch.equal(fused_experts(x, w13, w2, weights, ids), fused_experts_ref(x, w13, w2, weights, ids))


# ---------------------------------------------------------------- the reference (the CPU path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,e,k,skew", [(1, 4, 2, "softmax"), (13, 8, 2, "hot"), (40, 6, 3, "skip-last")])
def test_reference_matches_dense_loop(t, e, k, skew, dtype) -> None:
    torch.manual_seed(t + e)
    x = torch.randn(t, 24).to(dtype)
    w13, w2 = _weights(e, 20, 24, dtype)
    weights, ids = _routing(t, e, k, skew)
    out = fused_experts_ref(x, w13, w2, weights, ids)
    assert out.dtype == dtype
    assert rel_err(out, _dense_loop(x, w13, w2, weights, ids)) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_reference_reads_only_the_selected_experts() -> None:
    """The weights of experts no token chose are NaN: an output that touched them would be NaN."""
    torch.manual_seed(5)
    x, (w13, w2) = torch.randn(6, 32), _weights(8, 16, 32)
    ids = torch.tensor([[1, 3], [3, 1], [1, 6], [6, 3], [1, 3], [3, 6]])
    weights = torch.rand(6, 2)
    clean = fused_experts_ref(x, w13, w2, weights, ids)
    idle = [e for e in range(8) if e not in (1, 3, 6)]
    w13[idle], w2[idle] = float("nan"), float("nan")
    assert torch.equal(fused_experts_ref(x, w13, w2, weights, ids), clean)


def test_reference_rejects_mismatched_shapes() -> None:
    x, (w13, w2) = torch.randn(2, 32), _weights(4, 16, 32)
    weights, ids = _routing(2, 4, 2)
    with pytest.raises(ValueError, match="hidden"):
        fused_experts_ref(torch.randn(2, 30), w13, w2, weights, ids)
    with pytest.raises(ValueError, match="int32 or int64"):
        fused_experts_ref(x, w13, w2, weights, ids.float())


# ---------------------------------------------------------------- moe_align_block_size


@pytest.mark.parametrize("t,e,k,block_m,skew", [
    (0, 4, 2, 16, "softmax"), (1, 4, 2, 16, "softmax"), (1, 64, 8, 16, "softmax"), (33, 8, 2, 4, "hot"),
    (50, 16, 4, 16, "skip-last"), (17, 3, 3, 1, "softmax"), (100, 32, 2, 64, "softmax"),
])
def test_align_block_size_invariants(t, e, k, block_m, skew) -> None:
    torch.manual_seed(t * 7 + e)
    _, ids = _routing(t, e, k, skew, torch.int32)
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, block_m, e)
    pairs = t * k
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=e)
    total = int(((counts + block_m - 1) // block_m * block_m).sum())
    assert sorted_ids.dtype == expert_ids.dtype == num_post.dtype == torch.int32
    assert sorted_ids.numel() == align.max_padded_rows(pairs, block_m, e) >= total
    assert expert_ids.numel() == -(-sorted_ids.numel() // block_m)
    assert num_post.tolist() == [total] and total % block_m == 0
    real = sorted_ids[sorted_ids != pairs].long()
    assert sorted(real.tolist()) == list(range(pairs))  # every (token, k) exactly once
    assert (sorted_ids[total:] == pairs).all()
    blocks = sorted_ids[: sorted_ids.numel() // block_m * block_m].view(-1, block_m)
    for b in range(total // block_m):
        owner = int(expert_ids[b])
        members = blocks[b][blocks[b] != pairs].long()
        assert members.numel() > 0 and (flat[members] == owner).all()  # padding never fills a whole block
        assert (members.diff() > 0).all()  # pair order kept within an expert
    assert (expert_ids[: total // block_m].diff() >= 0).all()  # one run of blocks per expert, in expert order
    assert (expert_ids[total // block_m:] == -1).all()


@pytest.mark.parametrize("t,e,k,block_m,skew", [
    (0, 4, 2, 16, "softmax"), (1, 4, 2, 16, "softmax"), (1, 128, 8, 16, "softmax"), (33, 8, 2, 4, "hot"),
    (50, 16, 4, 16, "skip-last"), (17, 3, 3, 1, "softmax"), (100, 32, 2, 64, "softmax"), (9, 5, 2, 3, "hot"),
    (300, 8, 2, 128, "softmax"),
])
def test_align_triton_equals_torch(t, e, k, block_m, skew) -> None:
    """The one-launch kernel gives the torch version's outputs bit for bit (sizes, order, padding, -1 blocks)."""
    torch.manual_seed(t * 3 + e)
    _, ids = _routing(t, e, k, skew, torch.int32 if t % 2 else torch.int64)
    for got, want in zip(align.moe_align_block_size_triton(ids, block_m, e), align.moe_align_block_size_ref(ids, block_m, e)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_triton_path_with_the_torch_sort(monkeypatch) -> None:
    """Routings over ``TRITON_MAX_PAIRS`` pairs (prefill) are sorted by the torch version: same result."""
    monkeypatch.setattr(fused, "TRITON_MAX_PAIRS", 4)
    torch.manual_seed(6)
    x, (w13, w2) = torch.randn(7, 32), _weights(4, 16, 32)
    weights, ids = _routing(7, 4, 2)
    out = fused.fused_experts_triton(x, w13, w2, weights, ids, config=TINY)
    assert rel_err(out, fused_experts_ref(x, w13, w2, weights, ids)) < 1e-5


# ---------------------------------------------------------------- launch configs


def test_default_config_without_a_file(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SGLITE_MOE_CONFIG_DIR", str(tmp_path))
    decode = get_moe_config(128, 768, 1, torch.bfloat16, "No GPU")
    prefill = get_moe_config(128, 768, 4096, torch.bfloat16, "No GPU")
    assert decode == moe_config.default_config(128, 1) and decode["BLOCK_SIZE_M"] == 16
    assert prefill["BLOCK_SIZE_M"] >= 64 and set(prefill) == set(moe_config.CONFIG_KEYS)


def test_nearest_tuned_batch_size_wins(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SGLITE_MOE_CONFIG_DIR", str(tmp_path))
    name = moe_config.config_file_name(8, 14336, "NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert name == "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json"
    table = {str(m): dict(TINY, BLOCK_SIZE_M=bm) for m, bm in ((1, 16), (64, 32), (256, 64), (4096, 128))}
    (tmp_path / name).write_text(json.dumps(table))
    pick = {m: get_moe_config(8, 14336, m, torch.bfloat16, "NVIDIA H100 80GB HBM3")["BLOCK_SIZE_M"]
            for m in (1, 2, 32, 33, 100, 160, 161, 3000, 100000)}
    assert pick == {1: 16, 2: 16, 32: 16, 33: 32, 100: 32, 160: 32, 161: 64, 3000: 128, 100000: 128}
    assert get_moe_config(8, 14336, 64, "float16", "NVIDIA H100 80GB HBM3") == moe_config.default_config(8, 64)


def test_an_h200_takes_the_h100_file_unless_it_has_its_own(monkeypatch, tmp_path, caplog) -> None:
    """The H200 is the H100's die with other memory: without a file of its own it reads the H100's (logged)."""
    monkeypatch.setenv("SGLITE_MOE_CONFIG_DIR", str(tmp_path))
    h100 = {"1": dict(TINY, BLOCK_SIZE_M=16, BLOCK_SIZE_N=32)}
    (tmp_path / moe_config.config_file_name(8, 14336, "NVIDIA H100 80GB HBM3", torch.bfloat16)).write_text(
        json.dumps(h100))
    with caplog.at_level("INFO"):
        assert get_moe_config(8, 14336, 1, torch.bfloat16, "NVIDIA H200")["BLOCK_SIZE_N"] == 32
    assert "using the NVIDIA H100 80GB HBM3 file" in caplog.text
    h200 = {"1": dict(TINY, BLOCK_SIZE_M=16, BLOCK_SIZE_N=64)}
    (tmp_path / moe_config.config_file_name(8, 14336, "NVIDIA H200", torch.bfloat16)).write_text(json.dumps(h200))
    assert get_moe_config(8, 14336, 1, torch.bfloat16, "NVIDIA H200")["BLOCK_SIZE_N"] == 64
    assert get_moe_config(8, 14336, 1, torch.bfloat16, "NVIDIA A100-SXM4-80GB") == moe_config.default_config(8, 1)


def test_shipped_config_files_are_well_formed() -> None:
    for path in moe_config.CONFIG_DIR.glob("*.json"):
        assert path.name.startswith("E=") and ",N=" in path.name and ",device_name=" in path.name, path.name
        for m, cfg in json.loads(path.read_text()).items():
            assert int(m) > 0 and set(cfg) == set(moe_config.CONFIG_KEYS), path.name
            assert cfg["BLOCK_SIZE_M"] >= 16 and cfg["BLOCK_SIZE_N"] >= 16 and cfg["BLOCK_SIZE_K"] >= 16


def test_workspace_estimate_counts_the_float32_output() -> None:
    size = fused.moe_workspace_bytes(4096, 8, 768, 2048, torch.bfloat16, 128)
    assert size > 4096 * 8 * (3 * 768 * 2 + 2048 * 4)


@pytest.mark.parametrize("module,kernel", [(fused, "_moe_gemm_kernel"), (decode, "_gate_up_kernel"),
                                           (decode, "_down_kernel")])
def test_moe_kernels_wait_before_any_memory_access(module, kernel: str) -> None:
    """The PDL contract of kernels/pdl.py, checked the way tests/test_kernels.py checks the other kernels."""
    from .test_kernels import test_pdl_kernels_wait_before_any_memory_access as check

    check(module, kernel)
