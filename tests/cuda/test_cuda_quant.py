"""The quantized-linear Triton paths (kernels/quant/) against their torch references on the GPU, at Llama-3.1-8B's
projection shapes (K = 4096; N = 4096 o_proj, 6144 qkv, 14336 half of gate_up, 28672 gate_up) for a decode token,
a decode batch of 8 (the split-K GEMV), 64 rows and a 512-row prefill chunk, in bf16 and fp16, with the launch
configs ``get_quant_config`` picks; plus act-order GPTQ, 8-bit GPTQ, down_proj's K = 14336, and CUDA-graph capture
of the decode calls; the decode GEMVs on CUDA cores (AWQ / GPTQ, weight-only FP8; what M <= 4 dispatches to) at
the same shapes against the references, against the ``tl.dot`` kernels, and under graph capture. The weights are
random words (every bit pattern is a valid AWQ / GPTQ weight) with random
scales, so no quantizer runs. The CPU tier (tests/test_kernels_quant.py) checks the same kernels under the
interpreter, the formats against their definitions included.

Tolerances: the int4 kernels multiply exactly the weights the reference dequantizes (the GEMM casts them once to
x's dtype, the GEMV keeps them in float32), so only the summation order and the output rounding differ: ``TOL``
(1e-2); so does the weight-only FP8 GEMV. The FP8 GEMMs are W8A8: against a
float32 emulation of the same activation quantization they agree to the output rounding; against the reference,
whose activations stay unquantized, within x's FP8 rounding (6%). FP8 needs Hopper (skipped elsewhere)."""

from __future__ import annotations

import functools
import importlib

import pytest
import torch
from torch.nn import functional as F

from ..pool_helpers import TOL, rel_err
from . import randn, require_gpus

require_gpus()
pytestmark = pytest.mark.cuda

Q = importlib.import_module("xinf_sglang.kernels.quant")
CUDA = torch.device("cuda")
K = 4096
NS = [4096, 6144, 14336, 28672]
MS = [1, 8, 64, 512]
DTYPES = [torch.bfloat16, torch.float16]
HOPPER = torch.cuda.get_device_capability() >= (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="FP8 W8A8 kernels are checked on Hopper (compute 9.0+) only; "
                                  f"this GPU is {torch.cuda.get_device_name()}")


def random_int_weight(fmt: str, n: int, k: int, group: int, bits: int = 4):
    """Random packed words and zeros, positive fp16 scales of ~1/(8 sqrt(K)) (outputs of order one)."""
    p = 32 // bits
    groups = k // group if group > 0 else 1
    shape = (k, n // 8) if fmt == "awq" else (k // p, n)
    qweight = torch.randint(-(2**31), 2**31, shape, dtype=torch.int32, device=CUDA)
    qzeros = torch.randint(-(2**31), 2**31, (groups, n // p), dtype=torch.int32, device=CUDA)
    scales = ((torch.rand(groups, n, device=CUDA) + 0.5) * (k**-0.5 / (1 << (bits - 1)))).half()
    return qweight, scales, qzeros


def random_fp8_weight(n: int, k: int, block: tuple[int, int] | None):
    """A random e4m3 weight and its float32 scales: ``[ceil(N/bn), ceil(K/bk)]`` blocks, or per channel."""
    weight = torch.randn(n, k, device=CUDA).to(torch.float8_e4m3fn)
    shape = (-(-n // block[0]), -(-k // block[1])) if block else (n,)
    return weight, (torch.rand(shape, device=CUDA) + 0.5) * k**-0.5


def emulated_w8a8(x: torch.Tensor, weight_dq: torch.Tensor, group: int) -> torch.Tensor:
    """float32: x quantized per token group as the reference quantizes it, times the float32 weight."""
    xq, xs = Q.fp8_quantize_per_token_group_ref(x, group)
    return F.linear(Q.dequantize_fp8_block(xq, xs, (1, group)), weight_dq)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_matches_reference(fmt: str, dtype: torch.dtype, n: int, m: int) -> None:
    torch.manual_seed(n + m)
    qweight, scales, qzeros = random_int_weight(fmt, n, K, 128)
    x, bias = randn(m, K, dtype=dtype), randn(n, dtype=dtype)
    out = Q.int4_linear(x, qweight, scales, qzeros, None, fmt, 128, bias)  # dispatches to Triton for CUDA tensors
    assert out.dtype == dtype and out.shape == (m, n)
    want = Q.int4_linear_ref(x, qweight, scales, qzeros, None, fmt, 128, bias)
    assert rel_err(out, want) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 8, 512])
@pytest.mark.parametrize("case", ["gptq-act-order", "gptq-8bit", "awq-g32", "gptq-per-channel", "awq-down-proj"])
def test_int4_variants(case: str, m: int) -> None:
    """Act-order (the per-row group gather), 8-bit GPTQ, groups of 32, one group, and down_proj (K = 14336)."""
    torch.manual_seed(m)
    fmt, k, group, bits = {"gptq-act-order": ("gptq", K, 128, 4), "gptq-8bit": ("gptq", K, 128, 8),
                           "awq-g32": ("awq", K, 32, 4), "gptq-per-channel": ("gptq", K, -1, 4),
                           "awq-down-proj": ("awq", 14336, 128, 4)}[case]
    qweight, scales, qzeros = random_int_weight(fmt, 4096, k, group, bits)
    g_idx = Q.act_order_g_idx(k, group).to(CUDA) if case == "gptq-act-order" else None
    x = randn(m, k, dtype=torch.bfloat16)
    out = Q.int4_linear(x, qweight, scales, qzeros, g_idx, fmt, group)
    assert rel_err(out, Q.int4_linear_ref(x, qweight, scales, qzeros, g_idx, fmt, group)) < TOL[torch.bfloat16]


@needs_hopper
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_block_matches_reference(dtype: torch.dtype, n: int, m: int) -> None:
    torch.manual_seed(n + m)
    weight, scale_inv = random_fp8_weight(n, K, (128, 128))
    x, bias = randn(m, K, dtype=dtype), randn(n, dtype=dtype)
    out = Q.fp8_block_linear_triton(x, weight, scale_inv, (128, 128), bias, gemv=False)  # W8A8 at every M
    assert out.dtype == dtype and out.shape == (m, n)
    w_dq = Q.dequantize_fp8_block(weight, scale_inv, (128, 128))
    assert rel_err(out, emulated_w8a8(x, w_dq, 128) + bias.float()) < TOL[dtype]
    assert rel_err(out, Q.fp8_block_linear_ref(x, weight, scale_inv, (128, 128), bias)) < 0.06


@needs_hopper
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n", [4096, 28672])
@pytest.mark.parametrize("path", ["scaled_mm", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_channel_matches_reference(dtype: torch.dtype, path: str, n: int, m: int) -> None:
    if path == "scaled_mm" and dtype != torch.bfloat16:
        pytest.skip("torch._scaled_mm's row-wise scaling writes bf16 only")
    torch.manual_seed(n + m)
    weight, scale = random_fp8_weight(n, K, None)
    x, bias = randn(m, K, dtype=dtype), randn(n, dtype=dtype)
    out = Q.fp8_channel_linear_triton(x, weight, scale, bias, use_scaled_mm=path == "scaled_mm", gemv=False)
    assert rel_err(out, emulated_w8a8(x, Q.dequantize_fp8_channel(weight, scale), K) + bias.float()) < TOL[dtype]
    assert rel_err(out, Q.fp8_channel_linear_ref(x, weight, scale, bias)) < 0.06


def test_fp8_group_quantization_is_bit_exact() -> None:
    """Scales and codes bit-exact against the reference: the kernel divides ``x / scale`` with ``div_rn`` (IEEE
    rounding, as torch does); Triton's default fast division was one ulp off and moved values sitting on an FP8
    rounding tie to the neighbouring code (H100, 2026-12-07)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 conversion before compute 8.9")
    x = randn(64, 14336, dtype=torch.bfloat16) * torch.logspace(-3, 3, 64, device=CUDA)[:, None].bfloat16()
    for group in (128, 14336):
        got_q, got_s = Q.fp8_quantize_per_token_group(x, group)
        want_q, want_s = Q.fp8_quantize_per_token_group_ref(x, group)
        assert torch.equal(got_s, want_s)
        assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))


def _graph_replay_matches_eager(fn, x: torch.Tensor) -> None:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(x)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x)
    x.copy_(randn(*x.shape, dtype=x.dtype))
    graph.replay()
    assert torch.equal(out, fn(x))


@pytest.mark.parametrize("m", [1, 8])
def test_int4_cuda_graph_replay_matches_eager(m: int) -> None:
    """The split-K GEMV and its reduce (workspace allocated in the capture) replay on new inputs."""
    qweight, scales, qzeros = random_int_weight("awq", 4096, K, 128)
    _graph_replay_matches_eager(lambda x: Q.int4_linear(x, qweight, scales, qzeros, None, "awq", 128),
                                randn(m, K, dtype=torch.bfloat16))


@needs_hopper
def test_fp8_cuda_graph_replay_matches_eager() -> None:
    weight, scale_inv = random_fp8_weight(6144, K, (128, 128))
    _graph_replay_matches_eager(lambda x: Q.fp8_block_linear(x, weight, scale_inv), randn(1, K, dtype=torch.bfloat16))


# ---------------------------------------------------------------- the decode GEMVs (M <= 4)

GEMV_MS = [1, 2, 3, 4]


@pytest.mark.parametrize("m", GEMV_MS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int_gemv_matches_reference(fmt: str, n: int, m: int) -> None:
    """What decode dispatches to (``int4_linear`` at M <= 4), in bf16 with bias, and the ``tl.dot`` kernel agrees."""
    torch.manual_seed(n + m)
    qweight, scales, qzeros = random_int_weight(fmt, n, K, 128)
    x, bias = randn(m, K, dtype=torch.bfloat16), randn(n, dtype=torch.bfloat16)
    out = Q.int4_linear(x, qweight, scales, qzeros, None, fmt, 128, bias)
    want = Q.int4_linear_ref(x, qweight, scales, qzeros, None, fmt, 128, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel_err(out, want) < TOL[torch.bfloat16]
    assert torch.equal(out, Q.int4_linear_triton(x, qweight, scales, qzeros, None, fmt, 128, bias, gemv=True))
    dot = Q.int4_linear_triton(x, qweight, scales, qzeros, None, fmt, 128, bias, gemv=False)
    assert rel_err(out, dot) < TOL[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("case", ["gptq-8bit", "awq-g32", "gptq-g32", "awq-per-channel", "gptq-per-channel",
                                  "awq-down-proj", "gptq-down-proj", "awq-ragged-n", "fp16"])
def test_int_gemv_variants(case: str, m: int) -> None:
    """8-bit GPTQ, groups of 32 (K steps capped at the group), one group, down_proj (K = 14336), N not a multiple
    of the strip (4104), fp16 activations; every launch config of the sweep's grid at qkv's shape."""
    torch.manual_seed(m)
    fmt, n, k, group, bits = {"gptq-8bit": ("gptq", 4096, K, 128, 8), "awq-g32": ("awq", 4096, K, 32, 4),
                              "gptq-g32": ("gptq", 4096, K, 32, 4), "awq-per-channel": ("awq", 4096, K, -1, 4),
                              "gptq-per-channel": ("gptq", 4096, K, -1, 4),
                              "awq-down-proj": ("awq", 4096, 14336, 128, 4),
                              "gptq-down-proj": ("gptq", 4096, 14336, 128, 4), "awq-ragged-n": ("awq", 4104, K, 128, 4),
                              "fp16": ("gptq", 6144, K, 128, 4)}[case]
    dtype = torch.float16 if case == "fp16" else torch.bfloat16
    qweight, scales, qzeros = random_int_weight(fmt, n, k, group, bits)
    x = randn(m, k, dtype=dtype)
    out = Q.int4_linear_triton(x, qweight, scales, qzeros, None, fmt, group, gemv=True)
    assert rel_err(out, Q.int4_linear_ref(x, qweight, scales, qzeros, None, fmt, group)) < TOL[dtype]


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int_gemv_sweep_grid(fmt: str) -> None:
    """Every launch shape the quant sweep tries compiles and computes the same product (qkv, M = 1)."""
    from xinf_sglang.runtime.bench.quant_sweep import launch_grid

    qweight, scales, qzeros = random_int_weight(fmt, 6144, K, 128)
    x = randn(1, K, dtype=torch.bfloat16)
    want = Q.int4_linear_ref(x, qweight, scales, qzeros, None, fmt, 128)
    for cfg in launch_grid(f"{fmt}_gemv", quick=False)[::3]:  # a third of it: each shape compiles
        out = Q.int4_linear_triton(x, qweight, scales, qzeros, None, fmt, 128, config=cfg, gemv=True)
        assert rel_err(out, want) < TOL[torch.bfloat16], cfg


@needs_hopper
@pytest.mark.parametrize("m", GEMV_MS)
@pytest.mark.parametrize("n", NS)
def test_fp8_gemv_matches_reference(n: int, m: int) -> None:
    """Weight-only: x is not quantized, so the GEMV meets the reference to the output rounding (block and channel
    scales; what ``fp8_block_linear`` / ``fp8_channel_linear`` dispatch to at M <= 4)."""
    torch.manual_seed(n + m)
    x, bias = randn(m, K, dtype=torch.bfloat16), randn(n, dtype=torch.bfloat16)
    weight, scale_inv = random_fp8_weight(n, K, (128, 128))
    out = Q.fp8_block_linear(x, weight, scale_inv, (128, 128), bias)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel_err(out, Q.fp8_block_linear_ref(x, weight, scale_inv, (128, 128), bias)) < TOL[torch.bfloat16]
    weight, scale = random_fp8_weight(n, K, None)
    out = Q.fp8_channel_linear(x, weight, scale, bias)
    assert rel_err(out, Q.fp8_channel_linear_ref(x, weight, scale, bias)) < TOL[torch.bfloat16]


@needs_hopper
@pytest.mark.parametrize("kind", ["fp8_block_gemv", "fp8_channel_gemv"])
def test_fp8_gemv_sweep_grid_and_down_proj(kind: str) -> None:
    """Every launch shape of the sweep's grid (qkv, M = 1), and down_proj's K = 14336 with the default."""
    from xinf_sglang.runtime.bench.quant_sweep import launch_grid

    block = (128, 128) if kind == "fp8_block_gemv" else None
    for n, k, grid in ((6144, K, launch_grid(kind, quick=False)), (4096, 14336, [None])):
        weight, scale = random_fp8_weight(n, k, block)
        x = randn(1, k, dtype=torch.bfloat16)
        if block:
            want = Q.fp8_block_linear_ref(x, weight, scale, block)
        else:
            want = Q.fp8_channel_linear_ref(x, weight, scale)
        for cfg in grid:
            if block:
                out = Q.fp8_block_linear_triton(x, weight, scale, block, config=cfg, gemv=True)
            else:
                out = Q.fp8_channel_linear_triton(x, weight, scale, config=cfg, gemv=True)
            assert rel_err(out, want) < TOL[torch.bfloat16], cfg


@pytest.mark.parametrize("fmt", ["awq", "gptq", "fp8"])
def test_gemv_cuda_graph_replay_matches_eager(fmt: str) -> None:
    """The GEMVs and their split-K reduce (workspace allocated in the capture) replay on new inputs."""
    if fmt == "fp8" and not HOPPER:
        pytest.skip("FP8 kernels are checked on Hopper")
    if fmt == "fp8":
        weight, scale_inv = random_fp8_weight(4096, K, (128, 128))

        def fn(x: torch.Tensor) -> torch.Tensor:
            return Q.fp8_block_linear(x, weight, scale_inv)
    else:
        qweight, scales, qzeros = random_int_weight(fmt, 4096, K, 128)

        def fn(x: torch.Tensor) -> torch.Tensor:
            return Q.int4_linear(x, qweight, scales, qzeros, None, fmt, 128)
    _graph_replay_matches_eager(fn, randn(1, K, dtype=torch.bfloat16))


@pytest.mark.parametrize("kind", ["awq", "gptq", "fp8", "int4_gemm"])
def test_split_k_in_kernel_is_deterministic(kind: str) -> None:
    """The splits summed by each tile's last program (kernels/quant/splitk.py): whichever program arrives last, the
    same bits (5 launches of a 16-way split, every output tile racing), equal to the reference, and the shared
    tile counters back at zero after every launch (a counter left non-zero would corrupt the next GEMV)."""
    if kind == "fp8" and not HOPPER:
        pytest.skip("FP8 kernels are checked on Hopper")
    from xinf_sglang.kernels.quant import config as qconfig
    from xinf_sglang.kernels.quant import splitk

    x = randn(4 if kind == "int4_gemm" else 1, K, dtype=torch.bfloat16)
    if kind == "fp8":
        weight, scale_inv = random_fp8_weight(6144, K, (128, 128))
        cfg = qconfig.make_config(1, 64, 128, 1, 16, 2, 2)
        fn = functools.partial(Q.fp8_block_linear_triton, x, weight, scale_inv, (128, 128), config=cfg, gemv=True)
        want = Q.fp8_block_linear_ref(x, weight, scale_inv, (128, 128))
    else:
        fmt = "awq" if kind == "awq" else "gptq"
        qweight, scales, qzeros = random_int_weight(fmt, 6144, K, 128)
        cfg = qconfig.make_config(16 if kind == "int4_gemm" else 1, 64, 64 if kind == "int4_gemm" else 128, 1, 16,
                                  2 if kind != "int4_gemm" else 4, 2)
        fn = functools.partial(Q.int4_linear_triton, x, qweight, scales, qzeros, None, fmt, 128, config=cfg,
                               gemv=kind != "int4_gemm")
        want = Q.int4_linear_ref(x, qweight, scales, qzeros, None, fmt, 128)
    first = fn()
    assert rel_err(first, want) < TOL[torch.bfloat16]
    for _ in range(4):
        assert torch.equal(fn(), first)
        assert not splitk.tile_locks(first.device).any()


@pytest.mark.parametrize("m", GEMV_MS)
@pytest.mark.parametrize("kind", ["awq", "gptq", "fp8"])
def test_gemv_silu_mul_epilogue(kind: str, m: int) -> None:
    """Llama-3.1-8B's gate_up (N = 28672) with ``silu_mul``: the GEMV's epilogue writes SiLU-and-mul of the halves
    (kernels/quant/splitk.py), against the reference product followed by SiLU-and-mul, with the shipped configs."""
    if kind == "fp8" and not HOPPER:
        pytest.skip("FP8 kernels are checked on Hopper")
    x = randn(m, K, dtype=torch.bfloat16)
    if kind == "fp8":
        weight, scale_inv = random_fp8_weight(28672, K, (128, 128))
        got = Q.fp8_block_linear(x, weight, scale_inv, silu_mul=True)
        full = Q.fp8_block_linear_ref(x, weight, scale_inv)
    else:
        qweight, scales, qzeros = random_int_weight(kind, 28672, K, 128)
        got = Q.int4_linear(x, qweight, scales, qzeros, None, kind, 128, silu_mul=True)
        full = Q.int4_linear_ref(x, qweight, scales, qzeros, None, kind, 128)
    want = F.silu(full[:, :14336].float()) * full[:, 14336:].float()
    assert got.shape == (m, 14336) and rel_err(got, want) < TOL[torch.bfloat16]
