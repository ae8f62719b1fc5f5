"""The quantized-linear kernels of kernels/quant/ on the CPU: each format's dequantization against a loop written
from the format's definition (bit by bit), the pack / unpack round trips, and the Triton kernels under the
interpreter against their references on fresh random inputs (tiny shapes, float32 activations: the interpreter's
half precision is not exact; bf16 / fp16 at real shapes are tests/cuda/test_cuda_quant.py's). The FP8 kernels run
here too: the interpreter holds FP8 tensors as bytes and its FP8 ``tl.dot`` is exact; its fp32 -> fp8 cast is not,
which the quantization kernel sidesteps (kernels/quant/fp8.py). TRITON_INTERPRET=1 comes from tests/conftest.py."""

from __future__ import annotations

import functools
import importlib
import json

import pytest
import torch
from torch.nn import functional as F

triton = pytest.importorskip("triton")

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from xinf_sglang.kernels import quant as Q

from .pool_helpers import rel_err
from .test_kernels import (
    test_pdl_kernels_wait_before_any_memory_access as check_pdl_contract,
)

fp8 = importlib.import_module("xinf_sglang.kernels.quant.fp8")
int4 = importlib.import_module("xinf_sglang.kernels.quant.int4")
int_gemv = importlib.import_module("xinf_sglang.kernels.quant.int_gemv")
splitk = importlib.import_module("xinf_sglang.kernels.quant.splitk")
qconfig = importlib.import_module("xinf_sglang.kernels.quant.config")
ref = importlib.import_module("xinf_sglang.kernels.quant.reference")

INTERPRETED = isinstance(tl.sum, InterpretedFunction) and isinstance(int4._int4_gemm_kernel, InterpretedFunction)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its 8 (AutoAWQ's pack)


@pytest.fixture(autouse=True)
def _needs_interpreter() -> None:
    # Without TRITON_INTERPRET=1 before triton's import the kernels are compiled for a GPU that is not here.
    assert INTERPRETED, "triton was imported without TRITON_INTERPRET=1 (set it before importing triton)"


def tiny(block_m: int = 16, block_n: int = 16, block_k: int = 32, split_k: int = 1, group_m: int = 1) -> dict:
    """A launch config with small tiles: fast in the interpreter, several tiles per test shape."""
    return qconfig.make_config(block_m, block_n, block_k, group_m, split_k, 4, 2)


def bits_of(word: int, shift: int, bits: int) -> int:
    return (int(word) & 0xFFFFFFFF) >> shift & ((1 << bits) - 1)


# ---------------------------------------------------------------- the references against the definitions


def awq_slow(qweight, scales, qzeros, group_size: int) -> torch.Tensor:
    """AWQ by its definition, one weight at a time: w[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = k if group_size == -1 else group_size
    w = torch.empty(n, k, dtype=torch.float64)
    for kk in range(k):
        for nn in range(n):
            shift = 4 * AWQ_ORDER.index(nn % 8)
            q = bits_of(qweight[kk, nn // 8], shift, 4)
            z = bits_of(qzeros[kk // g, nn // 8], shift, 4)
            w[nn, kk] = (q - z) * float(scales[kk // g, nn])
    return w


def gptq_slow(qweight, scales, qzeros, g_idx, group_size: int, bits: int) -> torch.Tensor:
    """GPTQ v1 by its definition: q packed along K, zeros stored minus one, group of row k = g_idx[k]."""
    p = 32 // bits
    k, n = qweight.shape[0] * p, qweight.shape[1]
    g = k if group_size == -1 else group_size
    w = torch.empty(n, k, dtype=torch.float64)
    for kk in range(k):
        grp = kk // g if g_idx is None else int(g_idx[kk])
        for nn in range(n):
            q = bits_of(qweight[kk // p, nn], bits * (kk % p), bits)
            z = bits_of(qzeros[grp, nn // p], bits * (nn % p), bits) + 1
            w[nn, kk] = (q - z) * float(scales[grp, nn])
    return w


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_awq_dequantize_matches_the_definition(group_size: int, sym: bool) -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    q, z, s = Q.quantize_int(w, 4, group_size, sym)
    qweight, qzeros = Q.pack_awq(q, z)
    assert qweight.shape == (64, 2) and qweight.dtype == torch.int32
    assert torch.equal(ref.unpack_along_cols(qweight, 4, ref.AWQ_ORDER), q)  # the round trip
    assert torch.equal(ref.unpack_along_cols(qzeros, 4, ref.AWQ_ORDER), z)
    got = Q.dequantize_awq(qweight, s.half(), qzeros, group_size)
    assert torch.allclose(got.double(), awq_slow(qweight, s.half(), qzeros, group_size), atol=1e-6)
    assert rel_err(got, w) < 0.15  # and it is the weight, 4-bit rounded


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_dequantize_matches_the_definition(bits: int, act_order: bool, sym: bool) -> None:
    torch.manual_seed(2)
    w = torch.randn(8, 64)
    g_idx = Q.act_order_g_idx(64, 16) if act_order else None
    q, z, s = Q.quantize_int(w, bits, 16, sym, g_idx)
    qweight, qzeros = Q.pack_gptq(q, z, bits)
    assert qweight.shape == (64 * bits // 32, 8)
    if sym:
        assert bool((ref.unpack_along_cols(qzeros, bits) == (1 << (bits - 1)) - 1).all())  # 8 - 1 stored
    got = Q.dequantize_gptq(qweight, s.half(), qzeros, g_idx, 16, bits)
    assert torch.allclose(got.double(), gptq_slow(qweight, s.half(), qzeros, g_idx, 16, bits), atol=1e-6)
    assert rel_err(got, w) < (0.15 if bits == 4 else 0.01)


def test_act_order_g_idx_is_non_monotonic_with_full_groups() -> None:
    g_idx = Q.act_order_g_idx(256, 32, torch.Generator().manual_seed(0))
    assert bool((g_idx[1:] < g_idx[:-1]).any())
    assert torch.bincount(g_idx).tolist() == [32] * 8
    assert not Q.trivial_g_idx(g_idx, 32)
    assert Q.trivial_g_idx(torch.arange(256, dtype=torch.int32) // 32, 32) and Q.trivial_g_idx(None, 32)


def test_gptq_v1_refuses_a_zero_point_of_zero() -> None:
    with pytest.raises(ValueError, match="zero - 1"):
        Q.pack_gptq(torch.zeros(8, 8, dtype=torch.int32), torch.zeros(1, 8, dtype=torch.int32))


def test_fp8_block_dequantize_matches_the_definition() -> None:
    torch.manual_seed(3)
    w = torch.randn(40, 72)  # neither dim a multiple of its block: partial blocks at the edges
    wq, scale_inv = Q.quantize_fp8_block(w, (16, 32))
    assert wq.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 3)
    slow = torch.tensor([[float(wq[n, k]) * float(scale_inv[n // 16, k // 32]) for k in range(72)]
                         for n in range(40)], dtype=torch.float64)
    assert torch.allclose(Q.dequantize_fp8_block(wq, scale_inv, (16, 32)).double(), slow)
    assert rel_err(Q.dequantize_fp8_block(wq, scale_inv, (16, 32)), w) < 0.05
    wc, sc = Q.quantize_fp8_channel(w)
    assert torch.allclose(Q.dequantize_fp8_channel(wc, sc), wc.float() * sc[:, None])
    assert torch.equal(Q.dequantize_fp8_channel(wc, sc[:, None]), Q.dequantize_fp8_channel(wc, sc))


def test_cpu_dispatch_is_the_reference() -> None:
    torch.manual_seed(4)
    x, w = torch.randn(3, 64), torch.randn(16, 64)
    wq, si = Q.quantize_fp8_block(w, (16, 32))
    assert torch.equal(Q.fp8_block_linear(x, wq, si, (16, 32)), Q.fp8_block_linear_ref(x, wq, si, (16, 32)))
    q, z, s = Q.quantize_int(w, 4, 32, False)
    qw, qz = Q.pack_awq(q, z)
    assert torch.equal(Q.int4_linear(x, qw, s, qz, None, "awq", 32), Q.int4_linear_ref(x, qw, s, qz, None, "awq", 32))
    assert rel_err(Q.int4_linear(x, qw, s, qz, None, "awq", 32), F.linear(x, w)) < 0.15


# ---------------------------------------------------------------- FP8 kernels under the interpreter


@pytest.mark.parametrize("m,k,group", [(1, 128, 32), (3, 72, 32), (8, 256, 128), (17, 96, 96)])
def test_fp8_group_quantization_is_bit_exact(m: int, k: int, group: int) -> None:
    torch.manual_seed(m * k)
    x = torch.randn(m, k) * torch.logspace(-4, 2, m)[:, None]  # rows over six decades, subnormal FP8 included
    x[0, :group] = 0.0  # an all-zero group: the epsilon scale, zeros out
    got_q, got_s = Q.fp8_quantize_per_token_group_triton(x, group)
    want_q, want_s = Q.fp8_quantize_per_token_group_ref(x, group)
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))


def emulated_w8a8(x: torch.Tensor, weight_dq: torch.Tensor, group: int) -> torch.Tensor:
    """What the W8A8 GEMM computes, in float64: x quantized as the reference quantizes it, times the weight."""
    xq, xs = Q.fp8_quantize_per_token_group_ref(x, group)
    return F.linear(Q.dequantize_fp8_block(xq, xs, (1, group)).double(), weight_dq.double())


@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize("n,k,block", [(48, 96, (16, 32)), (40, 64, (32, 32)), (32, 128, (128, 128))])
def test_fp8_block_linear_matches_the_reference(m: int, n: int, k: int, block: tuple[int, int]) -> None:
    torch.manual_seed(m + n + k)
    x, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    wq, si = Q.quantize_fp8_block(w, block)
    got = Q.fp8_block_linear_triton(x, wq, si, block, bias, config=tiny(block_k=32), gemv=False)
    want = emulated_w8a8(x, Q.dequantize_fp8_block(wq, si, block), block[1]) + bias.double()
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, Q.fp8_block_linear_ref(x, wq, si, block, bias)) < 0.06  # x's FP8 rounding


@pytest.mark.parametrize("scale_shape", ["channel", "column", "tensor"])
@pytest.mark.parametrize("m", [1, 17])
def test_fp8_channel_linear_matches_the_reference(m: int, scale_shape: str) -> None:
    torch.manual_seed(m)
    x, w = torch.randn(m, 96), torch.randn(40, 96)
    wq, scale = Q.quantize_fp8_channel(w)
    scale = {"channel": scale, "column": scale[:, None], "tensor": scale.max().reshape(())}[scale_shape]
    if scale_shape == "tensor":
        wq = (w / scale).to(torch.float8_e4m3fn)
    got = Q.fp8_channel_linear_triton(x, wq, scale, config=tiny(block_k=32), use_scaled_mm=False, gemv=False)
    assert rel_err(got, emulated_w8a8(x, Q.dequantize_fp8_channel(wq, scale), 96)) < 1e-5
    assert rel_err(got, Q.fp8_channel_linear_ref(x, wq, scale)) < 0.06


# ---------------------------------------------------------------- int4 kernel under the interpreter


def int_weight(fmt: str, n: int, k: int, group: int, bits: int = 4, act_order: bool = False, sym: bool = False):
    """Random ``(qweight, scales fp16, qzeros, g_idx)`` of one format, quantized from a random float weight."""
    g_idx = Q.act_order_g_idx(k, group) if act_order else None
    q, z, s = Q.quantize_int(torch.randn(n, k), bits, group, sym, g_idx)
    qweight, qzeros = Q.pack_awq(q, z) if fmt == "awq" else Q.pack_gptq(q, z, bits)
    return qweight, s.half(), qzeros, g_idx


INT_CASES = [  # (format, group size, bits, act-order, sym)
    ("awq", 32, 4, False, False), ("awq", 128, 4, False, True), ("awq", -1, 4, False, False),
    ("gptq", 32, 4, False, True), ("gptq", 128, 4, False, False), ("gptq", -1, 4, False, False),
    ("gptq", 32, 4, True, False), ("gptq", 128, 4, True, True), ("gptq", 32, 8, False, False),
    ("gptq", 128, 8, True, False),
]


@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize("fmt,group,bits,act_order,sym", INT_CASES)
def test_int4_linear_matches_the_reference(fmt: str, group: int, bits: int, act_order: bool, sym: bool,
                                           m: int) -> None:
    torch.manual_seed(m + group + bits)
    n, k = 48, 256
    qweight, scales, qzeros, g_idx = int_weight(fmt, n, k, group, bits, act_order, sym)
    x, bias = torch.randn(m, k), torch.randn(n)
    want = Q.int4_linear_ref(x, qweight, scales, qzeros, g_idx, fmt, group, bias)
    # 64-wide K steps: inside one group of 128 (one scale row a step), across groups of 32 (a gather per row).
    for cfg in (tiny(block_k=64), tiny(block_k=64, split_k=3)):
        got = Q.int4_linear_triton(x, qweight, scales, qzeros, g_idx, fmt, group, bias, config=cfg, gemv=False)
        assert rel_err(got, want) < 1e-5, cfg


@pytest.mark.parametrize("m", [1, 17])
def test_int4_default_configs_and_ragged_shapes(m: int) -> None:
    """The configs ``get_quant_config`` picks (at m=1 the CUDA-core GEMV's, split K), and K not a multiple of the
    K step."""
    torch.manual_seed(m)
    k = 1120  # 8 full 128-wide K steps and a 96-row rest; split in 4 at m=1 (3 splits once rounded to steps)
    assert Q.get_quant_config("int4", 24, k, 1, torch.float32, "No GPU")["SPLIT_K"] == 4
    assert Q.get_quant_config("gptq_gemv", 24, k, 1, torch.float32, "No GPU")["SPLIT_K"] == 4
    for fmt in ("awq", "gptq"):
        qweight, scales, qzeros, _ = int_weight(fmt, 24, k, 32)
        x = torch.randn(m, k)
        want = Q.int4_linear_ref(x, qweight, scales, qzeros, None, fmt, 32)
        got = Q.int4_linear_triton(x, qweight, scales, qzeros, None, fmt, 32)
        assert rel_err(got, want) < 1e-5


def test_int4_batched_leading_dims_and_empty() -> None:
    qweight, scales, qzeros, _ = int_weight("gptq", 16, 64, 32)
    x = torch.randn(2, 3, 64)
    got = Q.int4_linear_triton(x, qweight, scales, qzeros, None, "gptq", 32, config=tiny())
    assert got.shape == (2, 3, 16)
    assert rel_err(got, Q.int4_linear_ref(x, qweight, scales, qzeros, None, "gptq", 32)) < 1e-5
    assert Q.int4_linear_triton(x[:0], qweight, scales, qzeros, None, "gptq", 32).shape == (0, 3, 16)


# ---------------------------------------------------------------- the decode GEMVs (CUDA cores) under the interpreter


def gemv_config(block_n: int, block_k: int, split_k: int = 1, num_warps: int = 4) -> dict:
    """A GEMV launch config (``BLOCK_SIZE_M`` unused: the launcher takes M rounded up to a power of two)."""
    return qconfig.make_config(1, block_n, block_k, 1, split_k, num_warps, 2)


GEMV_CASES = [  # (format, group size, bits, sym, K): K = 200 is ragged against every K step
    ("awq", 32, 4, False, 256), ("awq", 128, 4, True, 256), ("awq", -1, 4, False, 200),
    ("gptq", 32, 4, True, 256), ("gptq", 128, 4, False, 256), ("gptq", -1, 4, False, 200),
    ("gptq", 32, 8, False, 256), ("gptq", -1, 8, True, 200),
]


@pytest.mark.parametrize("fmt,group,bits,sym,k", GEMV_CASES)
def test_int_gemv_matches_the_reference(fmt: str, group: int, bits: int, sym: bool, k: int) -> None:
    """AWQ / GPTQ GEMV against ``int4_linear_ref`` for M = 1..4, with bias: strips that do not divide N = 48,
    K steps inside one group of 128, capped at a group of 32, past a ragged K, split K."""
    torch.manual_seed(group + bits + k)
    n = 48
    qweight, scales, qzeros, _ = int_weight(fmt, n, k, group, bits, sym=sym)
    bias = torch.randn(n)
    configs = [gemv_config(32, 64), gemv_config(16 if fmt == "gptq" else 64, 128, split_k=3, num_warps=2)]
    for m in (1, 2, 3, 4):
        x = torch.randn(m, k)
        want = Q.int4_linear_ref(x, qweight, scales, qzeros, None, fmt, group, bias)
        got = Q.int4_linear_triton(x, qweight, scales, qzeros, None, fmt, group, bias, config=configs[m % 2],
                                   gemv=True)
        assert rel_err(got, want) < 1e-5, (m, configs[m % 2])


def test_int_gemv_dispatch(monkeypatch) -> None:
    """Up to ``INT_GEMV_MAX_M`` rows the GEMV runs by default, act-order stays with the ``tl.dot`` kernel (and
    refuses ``gemv=True``), 5+ rows take the ``tl.dot`` kernel."""
    calls = []
    monkeypatch.setattr(int4, "_int_gemv", lambda *a: calls.append(a[0].shape[0]) or int4_gemv(*a))
    for m in (1, qconfig.INT_GEMV_MAX_M, qconfig.INT_GEMV_MAX_M + 1):
        qweight, scales, qzeros, _ = int_weight("awq", 16, 64, 32)
        x = torch.randn(m, 64)
        got = Q.int4_linear_triton(x, qweight, scales, qzeros, None, "awq", 32)
        assert rel_err(got, Q.int4_linear_ref(x, qweight, scales, qzeros, None, "awq", 32)) < 1e-5
    assert calls == [1, qconfig.INT_GEMV_MAX_M]
    qweight, scales, qzeros, g_idx = int_weight("gptq", 16, 64, 32, act_order=True)
    x = torch.randn(1, 64)
    got = Q.int4_linear_triton(x, qweight, scales, qzeros, g_idx, "gptq", 32)
    assert rel_err(got, Q.int4_linear_ref(x, qweight, scales, qzeros, g_idx, "gptq", 32)) < 1e-5
    assert calls == [1, qconfig.INT_GEMV_MAX_M]
    with pytest.raises(ValueError, match="act-order"):
        Q.int4_linear_triton(x, qweight, scales, qzeros, g_idx, "gptq", 32, gemv=True)


int4_gemv = int4._int_gemv


@pytest.mark.parametrize("n,k,block", [(48, 96, (16, 32)), (40, 200, (16, 64)), (32, 128, (128, 128))])
def test_fp8_block_gemv_matches_the_reference(n: int, k: int, block: tuple[int, int]) -> None:
    """The weight-only FP8 GEMV multiplies x unquantized: equal to ``fp8_block_linear_ref`` to the summation order,
    for M = 1..4, partial N / K blocks at the edges, K steps capped at the weight's K block, split K."""
    torch.manual_seed(n + k)
    w, bias = torch.randn(n, k), torch.randn(n)
    wq, si = Q.quantize_fp8_block(w, block)
    configs = [gemv_config(16, 64), gemv_config(8, 128, split_k=3, num_warps=2)]
    for m in (1, 2, 3, 4):
        x = torch.randn(m, k)
        got = Q.fp8_block_linear_triton(x, wq, si, block, bias, config=configs[m % 2])
        assert rel_err(got, Q.fp8_block_linear_ref(x, wq, si, block, bias)) < 1e-5, (m, configs[m % 2])


@pytest.mark.parametrize("scale_shape", ["channel", "tensor"])
def test_fp8_channel_gemv_matches_the_reference(scale_shape: str) -> None:
    torch.manual_seed(5)
    w, bias = torch.randn(40, 200), torch.randn(40)
    wq, scale = Q.quantize_fp8_channel(w)
    if scale_shape == "tensor":
        scale = scale.max().reshape(())
        wq = (w / scale).to(torch.float8_e4m3fn)
    for m, cfg in ((1, gemv_config(16, 64)), (4, gemv_config(32, 128, split_k=2))):
        x = torch.randn(m, 200)
        got = Q.fp8_channel_linear_triton(x, wq, scale, bias, config=cfg)
        assert rel_err(got, Q.fp8_channel_linear_ref(x, wq, scale, bias)) < 1e-5, m


# ---------------------------------------------------------------- split K summed in the kernel


@triton.jit
def _split_parts_kernel(P, Y, WS, LOCKS, BIAS, M, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Program (tile, split) stores the given partial P[split] of its tile through split_k_store.
    rows = tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    acc = tl.load(P + tl.program_id(1) * M * N + rows * N + cols, mask=(rows < M) & (cols < N), other=0.0)
    splitk.split_k_store(acc, Y, WS, LOCKS, BIAS, M, N, rows, cols, N, 1, SPLIT, HAS_BIAS, False)


@pytest.mark.parametrize("split,with_bias", [(1, True), (2, False), (5, True)])
def test_split_k_store_sums_the_parts_in_order(split: int, with_bias: bool) -> None:
    """The tile's last program sums the partials in split order (bit-equal to ``sum_parts``, the two-launch
    reduce), adds the bias, rounds once into Y's dtype, over ragged tiles; the counters are left zero for the next
    launch, so a second launch into the same counters gives the same bits."""
    torch.manual_seed(split)
    m, n, bn = 3, 40, 16
    parts = torch.randn(split, m, n) * torch.logspace(-3, 3, n)  # mixed magnitudes: order-sensitive sums
    bias = torch.randn(n) if with_bias else None
    want = torch.empty(m, n, dtype=torch.float16)
    splitk.sum_parts(parts, want, split, n, m * n, bias)
    for _ in range(2):
        out = torch.full((m, n), float("nan"), dtype=torch.float16)
        ws, locks = splitk.split_k_buffers(out, split, triton.cdiv(n, bn))
        _split_parts_kernel[(triton.cdiv(n, bn), split)](parts, out, ws, locks, bias if with_bias else out, m, n,
                                                         SPLIT=split, HAS_BIAS=with_bias, BLOCK_M=4, BLOCK_N=bn)
        assert torch.equal(out, want)
        assert not splitk.tile_locks(out.device).any()


@pytest.mark.parametrize("kind", ["awq", "gptq", "fp8_block", "fp8_channel"])
def test_gemv_silu_mul_epilogue(kind: str) -> None:
    """A gate/up projection with ``silu_mul``: the GEMV writes SiLU-and-mul of the halves itself (the pair of column
    tiles meets in the split-K workspace), equal to the reference product followed by SiLU-and-mul, for M = 1..4,
    with and without a split, with bias; N / 2 not a whole number of tiles takes the product, then SiLU-and-mul."""
    torch.manual_seed(len(kind))
    n, k = 96, 256
    bias = torch.randn(n)
    if kind.startswith("fp8"):
        w = torch.randn(n, k)
        wq, scale = Q.quantize_fp8_block(w, (16, 64)) if kind == "fp8_block" else Q.quantize_fp8_channel(w)
        def product(x, cfg=None, silu_mul=False):  # noqa: E306
            if kind == "fp8_block":
                return Q.fp8_block_linear_triton(x, wq, scale, (16, 64), bias, config=cfg, silu_mul=silu_mul)
            return Q.fp8_channel_linear_triton(x, wq, scale, bias, config=cfg, silu_mul=silu_mul)
        ref = functools.partial(Q.fp8_block_linear_ref, weight=wq, weight_scale_inv=scale, block_size=(16, 64),
                                bias=bias) if kind == "fp8_block" else functools.partial(
            Q.fp8_channel_linear_ref, weight=wq, weight_scale=scale, bias=bias)
    else:
        qweight, scales, qzeros, _ = int_weight(kind, n, k, 32)
        def product(x, cfg=None, silu_mul=False):  # noqa: E306
            return Q.int4_linear_triton(x, qweight, scales, qzeros, None, kind, 32, bias, config=cfg, gemv=True,
                                        silu_mul=silu_mul)
        ref = functools.partial(Q.int4_linear_ref, qweight=qweight, scales=scales, qzeros=qzeros, g_idx=None,
                                fmt=kind, group_size=32, bias=bias)
    tile = 8 if kind == "awq" else 16  # AWQ's tile is at least one word of 8 columns
    configs = [gemv_config(tile, 64), gemv_config(tile, 64, split_k=3, num_warps=2), gemv_config(32, 64)]
    for m in (1, 2, 3, 4):
        x = torch.randn(m, k)
        want = F.silu(ref(x)[:, : n // 2]) * ref(x)[:, n // 2:]
        for cfg in configs:  # the last: N / 2 = 48 is not a whole number of 32-column tiles
            got = product(x, cfg, silu_mul=True)
            assert got.shape == (m, n // 2) and rel_err(got, want) < 1e-5, (m, cfg)
    assert not splitk.tile_locks(x.device).any()
    assert Q.int4_linear(torch.randn(2, k), *int_weight("awq", n, k, 32)[:3], None, "awq", 32,
                         silu_mul=True).shape == (2, n // 2)  # the CPU dispatcher: the reference, then SiLU-and-mul


def test_split_k_buffers_refuse_a_grid_past_the_counters() -> None:
    out = torch.empty(2, 8)
    assert splitk.split_k_buffers(out, 1, splitk.TILE_LOCKS + 1) == (out, out)
    with pytest.raises(ValueError, match="at most .* output tiles"):
        splitk.split_k_buffers(out, 2, splitk.TILE_LOCKS + 1)


# ---------------------------------------------------------------- launch configs and the PDL contract


def test_default_configs(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SGLITE_QUANT_CONFIG_DIR", str(tmp_path))
    decode = Q.get_quant_config("int4", 4096, 4096, 1, torch.bfloat16, "No GPU")
    assert decode["BLOCK_SIZE_M"] == 16 and decode["SPLIT_K"] > 1  # 4096 columns alone do not fill the SMs
    assert Q.get_quant_config("int4", 28672, 4096, 1, torch.bfloat16, "No GPU")["SPLIT_K"] == 1
    assert Q.get_quant_config("fp8_block", 4096, 4096, 512, torch.bfloat16, "No GPU")["BLOCK_SIZE_M"] >= 64
    for kind in qconfig.GEMV_KINDS:  # the H100 sweep's consensus: many programs of a few K steps each
        cfg = Q.get_quant_config(kind, 4096, 4096, 1, torch.bfloat16, "No GPU")
        assert -(-4096 // cfg["BLOCK_SIZE_N"]) * cfg["SPLIT_K"] >= 264, kind  # >= 2 per SM of an H100
        assert 4096 // cfg["SPLIT_K"] >= 2 * cfg["BLOCK_SIZE_K"], kind  # each split keeps two K steps
        small = Q.get_quant_config(kind, 256, 512, 1, torch.bfloat16, "No GPU")  # the split shrinks with K
        assert 512 // small["SPLIT_K"] >= 2 * small["BLOCK_SIZE_K"] or small["SPLIT_K"] == 1, kind
    with pytest.raises(ValueError, match="unknown quantized kernel"):
        qconfig.config_file_name("nf4", 1, 1, "x", torch.bfloat16)


def test_nearest_tuned_row_count_wins(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SGLITE_QUANT_CONFIG_DIR", str(tmp_path))
    name = qconfig.config_file_name("int4", 4096, 14336, "NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert name == "kind=int4,N=4096,K=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=bfloat16.json"
    table = {str(m): tiny(block_n=bn) for m, bn in ((1, 32), (64, 64), (512, 128))}
    (tmp_path / name).write_text(json.dumps(table))
    pick = {m: Q.get_quant_config("int4", 4096, 14336, m, torch.bfloat16, "NVIDIA H100 80GB HBM3")["BLOCK_SIZE_N"]
            for m in (1, 32, 33, 288, 289, 4096)}
    assert pick == {1: 32, 32: 32, 33: 64, 288: 64, 289: 128, 4096: 128}


def test_sweep_writes_tuned_files_that_the_lookup_reads(monkeypatch, tmp_path) -> None:
    """``bench kernels --sweep quant --config-out``: the best M = 1 config over AWQ + GPTQ summed (one int4 kernel)
    and per FP8 kind; larger M get the defaults, so a prefill batch never takes the decode GEMV's entry."""
    from xinf_sglang.runtime.bench.quant_sweep import write_tuned_configs

    fast, slow = tiny(block_n=32), tiny(block_n=128)
    rows = [{"kind": "awq", "m": 1, "weight": "qkv", "grid": [[1.0, fast], [2.0, slow]]},
            {"kind": "gptq", "m": 1, "weight": "qkv", "grid": [[1.5, slow], [9.0, fast]]},  # summed: slow wins
            {"kind": "fp8_block", "m": 1, "weight": "qkv", "grid": [[1.0, fast], [float("inf"), slow]]},
            {"kind": "fp8_block", "m": 8, "weight": "qkv"}, {"kind": "bf16", "m": 1, "weight": "qkv"},
            {"kind": "awq_gemv", "m": 1, "weight": "qkv", "grid": [[3.0, slow], [2.0, fast]]}]  # a kind of its own
    paths = write_tuned_configs(rows, {"qkv": (6144, 4096)}, tmp_path, "NVIDIA H100 80GB HBM3", "bfloat16")
    assert sorted(p.name.split(",")[0] for p in paths) == ["kind=awq_gemv", "kind=fp8_block", "kind=int4"]
    monkeypatch.setenv("SGLITE_QUANT_CONFIG_DIR", str(tmp_path))
    pick = functools.partial(Q.get_quant_config, n=6144, k=4096, dtype=torch.bfloat16,
                             device="NVIDIA H100 80GB HBM3")
    assert pick("int4", m=1) == slow and pick("int4", m=8) == slow and pick("fp8_block", m=4) == fast
    assert pick("awq_gemv", m=1) == fast and pick("awq_gemv", m=4) == fast
    assert pick("int4", m=512) == qconfig.default_config("int4", 6144, 4096, 256)


def test_shipped_config_files_are_well_formed() -> None:
    for path in qconfig.CONFIG_DIR.glob("*.json"):
        assert path.name.startswith("kind=") and ",N=" in path.name and ",device_name=" in path.name, path.name
        for m, cfg in json.loads(path.read_text()).items():
            assert int(m) > 0 and set(cfg) == set(qconfig.CONFIG_KEYS), path.name


@pytest.mark.parametrize("module,kernel", [(fp8, "_group_quant_kernel"), (fp8, "_fp8_gemm_kernel"),
                                           (fp8, "_fp8_gemv_kernel"), (int4, "_int4_gemm_kernel"),
                                           (int_gemv, "_int_gemv_kernel"), (splitk, "_sum_parts_kernel")])
def test_pdl_kernels_wait_before_any_memory_access(module, kernel: str) -> None:
    check_pdl_contract(module, kernel)
