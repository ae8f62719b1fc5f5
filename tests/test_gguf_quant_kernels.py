"""GGUF block formats: the torch reference against llama.cpp's own Python reading (``gguf.quants``), and the C++ CPU
kernel (kernels/cpu/gguf.py) against the reference on fresh random blocks, for every kept type, several shapes and
row counts, each activation path, and each build (scalar, AVX2, and this CPU's own: AVX-512 + VNNI here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from xinf_sglang.kernels.cpu import gguf as cpu_gguf
from xinf_sglang.kernels.quant import GGUF_BLOCKS, dequantize_gguf, gguf_linear, gguf_linear_ref, random_gguf_blocks

TYPES = list(GGUF_BLOCKS)
BUILDS = ["DEFAULT", "AVX2", None]  # None: what torch reports for this CPU
# Worst error of one output against the float64 product of the dequantized weight, relative to the largest
# |x| . |w| of the call (what a float32 dot product of that length may lose, plus the activations' rounding):
# float32 activations ~1e-7 per term; int16 (Q16) 1/32767 of each 32-value block's max; int8 (Q8, llama.cpp's
# scheme) 1/127 of it.
TOLERANCE = {"f32": 2e-6, "q16": 1e-4, "q8": 2e-2}
# The tiles (many rows, AVX-512 VNNI builds) round the activations as Q16 does; the int32 sums are exact, so only the
# float sums' order differs (worst seen on these problems: 1.2e-5). Builds without them dequantize to float32.
TILE_ROWS = [1, 7, 8, 33, 64, 200]


def _tolerance_of_many_rows(build: str | None) -> float:
    return TOLERANCE["q16" if cpu_gguf.gemv_max_m(build) == cpu_gguf.GEMV_MAX_M else "f32"]


def _problem(qtype: str, n: int, k: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return random_gguf_blocks(n, k, qtype, g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, tol: float) -> float:
    """Assert ``y`` is ``x @ w.T + bias`` within ``tol`` of the magnitude bound; return the relative error."""
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    bound = (x.abs().double() @ w.abs().double().t()).max()
    err = float((y.double() - ref).abs().max() / bound)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert err <= tol, f"relative error {err:.3g} > {tol}"
    return err


@pytest.mark.parametrize("qtype", TYPES)
def test_reference_equals_llama_cpp_reading(qtype: str) -> None:
    from gguf import GGMLQuantizationType, quants

    blocks = random_gguf_blocks(7, 512, qtype, torch.Generator().manual_seed(1))
    theirs = quants.dequantize(blocks.reshape(7, -1).numpy(), GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(dequantize_gguf(blocks, qtype).numpy(), theirs)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("qtype", TYPES)
def test_kernel_dequantizes_exactly(qtype: str, build: str | None) -> None:
    blocks = random_gguf_blocks(37, 768, qtype, torch.Generator().manual_seed(2))
    got = cpu_gguf.gguf_dequantize_cpu(blocks, GGUF_BLOCKS[qtype], 768, isa=build)
    assert torch.equal(got, dequantize_gguf(blocks, qtype))


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("act", list(TOLERANCE))
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n,k", [(64, 256), (96, 1536), (5, 512)])
def test_decode_rows_match_the_reference(qtype: str, act: str, build: str | None, n: int, k: int) -> None:
    """Every row-group size of the decode path (8, 4, 2, 1 rows at a time: 7 = 4 + 2 + 1), with and without bias,
    whichever rows the dispatch sends it (`gguf_linear_cpu` up to ``gemv_max_m``, the pool's ``gemv`` beyond)."""
    pool = cpu_gguf._pool(torch.get_num_threads(), build)
    for m, with_bias in [(1, False), (2, True), (7, False), (32, True)]:
        w, x, b = _problem(qtype, n, k, m, seed=n * k + m)
        bias = b if with_bias else None
        if m <= cpu_gguf.gemv_max_m(build):
            y = cpu_gguf.gguf_linear_cpu(x, w, GGUF_BLOCKS[qtype], bias, act=act, isa=build)
        else:
            y = pool.gemv(x, w, GGUF_BLOCKS[qtype].ggml_type, bias, cpu_gguf.ACTIVATIONS.index(act))
        _check(y, x, dequantize_gguf(w, qtype), bias, TOLERANCE[act])


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n,k", [(64, 256), (96, 1536), (5, 512), (37, 768)])
def test_tiles_match_the_reference(qtype: str, build: str | None, n: int, k: int) -> None:
    """The many-row path on every row count of a 12-row step (1, 7 .. 200 rows: full steps and each remainder
    below 12) and on tiles of 16 columns with fewer real ones (5, 37), with and without bias."""
    pool = cpu_gguf._pool(torch.get_num_threads(), build)
    for m in TILE_ROWS:
        w, x, b = _problem(qtype, n, k, m, seed=n * k + m)
        bias = b if m % 2 else None
        y = pool.gemm(x, w, GGUF_BLOCKS[qtype].ggml_type, bias)
        _check(y, x, dequantize_gguf(w, qtype), bias, _tolerance_of_many_rows(build))


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("qtype", [t for t in TYPES if GGUF_BLOCKS[t].values == 32])
def test_decode_rows_of_an_odd_number_of_blocks(qtype: str, build: str | None) -> None:
    """The 512-bit build reads two 32-value blocks a step: 5 and 1 blocks per row leave one for the 256-bit step."""
    for k in (160, 32):
        for m in (1, 3, 8):
            w, x, b = _problem(qtype, 19, k, m, seed=k + m)
            y = cpu_gguf.gguf_linear_cpu(x, w, GGUF_BLOCKS[qtype], b, isa=build)
            _check(y, x, dequantize_gguf(w, qtype), b, TOLERANCE["q16"])


@pytest.mark.parametrize("qtype", TYPES)
def test_many_rows_take_the_tiles(qtype: str) -> None:
    w, x, b = _problem(qtype, 48, 512, cpu_gguf.gemv_max_m() + 9, seed=3)
    y = cpu_gguf.gguf_linear_cpu(x, w, GGUF_BLOCKS[qtype], b)
    assert torch.equal(y, cpu_gguf._pool(torch.get_num_threads()).gemm(x, w, GGUF_BLOCKS[qtype].ggml_type, b))
    _check(y, x, dequantize_gguf(w, qtype), b, _tolerance_of_many_rows(None))


def test_q8_activations_err_more_than_q16() -> None:
    """The measured reason for Q16 activations (docs/PERFORMANCE.md): llama.cpp's int8 rounding moves outputs by
    ~1e-3 of their bound, int16 by ~1e-5, at the same speed for one row."""
    w, x, _ = _problem("Q4_K", 256, 1536, 1, seed=4)
    ref = dequantize_gguf(w, "Q4_K")
    errs = {act: _check(cpu_gguf.gguf_linear_cpu(x, w, GGUF_BLOCKS["Q4_K"], act=act), x, ref, None, TOLERANCE[act])
            for act in TOLERANCE}
    assert errs["f32"] < errs["q16"] < errs["q8"] and errs["q16"] * 20 < errs["q8"]


def test_results_do_not_depend_on_the_thread_count_or_the_batch() -> None:
    """Each output is one dot product in a fixed order, whichever thread takes its chunk of rows; a row's result
    depends only on itself, not on the rows decoded beside it."""
    w, x, _ = _problem("Q6_K", 300, 512, 8, seed=5)
    block = GGUF_BLOCKS["Q6_K"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gguf.gguf_linear_cpu(x, w, block)
        torch.set_num_threads(2)
        two = cpu_gguf.gguf_linear_cpu(x, w, block)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    alone = torch.cat([cpu_gguf.gguf_linear_cpu(x[i:i + 1], w, block) for i in range(8)])
    assert torch.allclose(alone, one, rtol=0, atol=1e-6 * float(one.abs().max()))
    tiles = cpu_gguf._pool(torch.get_num_threads()).gemm
    assert torch.equal(torch.cat([tiles(x[i:i + 1], w, block.ggml_type, None) for i in range(8)]),
                       tiles(x, w, block.ggml_type, None))


def test_linear_rows_equals_the_checked_path_and_refuses_in_cpp() -> None:
    """The unchecked entry (GGUFLinearMethod's path) computes what gguf_linear_cpu does, for decode rows and for the
    tiles; the C++ refuses a weight, bias or x it cannot read."""
    block = GGUF_BLOCKS["Q4_1"]
    for m in (3, 40):
        w, x, b = _problem("Q4_1", 40, 128, m, seed=8)
        assert torch.equal(cpu_gguf.linear_rows(x, w, block, b), cpu_gguf.gguf_linear_cpu(x, w, block, b))
        for args in [(x[:, :64], w, b), (x, w, b[:39]), (x, w, b.double()), (x.t().contiguous().t(), w, None)]:
            with pytest.raises(RuntimeError):
                cpu_gguf.linear_rows(args[0], args[1], block, args[2])


def test_dispatch_takes_the_kernel_only_for_cpu_float32() -> None:
    w, x, b = _problem("Q4_0", 32, 64, 2, seed=6)
    assert cpu_gguf.supports(x, w, GGUF_BLOCKS["Q4_0"], b)
    assert not cpu_gguf.supports(x.double(), w, GGUF_BLOCKS["Q4_0"], b)
    assert not cpu_gguf.supports(x[:, :32], w, GGUF_BLOCKS["Q4_0"], b)
    ref = gguf_linear_ref(x.double(), w, "Q4_0", b.double())
    assert gguf_linear(x.double(), w, "Q4_0", b.double()).dtype == torch.float64
    assert torch.allclose(gguf_linear(x, w, "Q4_0", b).double(), ref, atol=1e-4)
    with pytest.raises(ValueError, match="gguf_linear_cpu takes"):
        cpu_gguf.gguf_linear_cpu(x.double(), w, GGUF_BLOCKS["Q4_0"])
