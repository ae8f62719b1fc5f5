"""The GGUF Triton kernels (kernels/quant/gguf_triton.py) under the interpreter against their torch references on
fresh random blocks (``random_gguf_blocks``): the matmul of every kept block format in its three shapes (the GEMV
of one and of a few rows, the ``tl.dot`` tile), split K and a ragged K, bias, the row decoder of the embedding
lookup, launch-config defaults and the errors. Tiny shapes in float32 (the interpreter's half precision is not
exact); bf16 at real shapes is tests/cuda/test_cuda_gguf.py's. TRITON_INTERPRET=1 comes from tests/conftest.py."""

from __future__ import annotations

import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from xinf_sglang.kernels import quant as Q

from .pool_helpers import rel_err
from .test_kernels import (
    test_pdl_kernels_wait_before_any_memory_access as check_pdl_contract,
)

gt = importlib.import_module("xinf_sglang.kernels.quant.gguf_triton")
qconfig = importlib.import_module("xinf_sglang.kernels.quant.config")

INTERPRETED = isinstance(tl.sum, InterpretedFunction) and isinstance(gt._gguf_matmul_kernel, InterpretedFunction)
TYPES = list(Q.GGUF_BLOCKS)
# (rows M, launch config): the GEMV of one row split over K, the GEMV tile of a few rows, the 16-row tl.dot tile
# over two row blocks with GROUP_M 2. BLOCK_SIZE_K 64 is a quarter of a K-quant super-block.
SHAPES = {
    "gemv-1-split": (1, qconfig.make_config(1, 16, 64, 1, 2, 4, 2)),
    "gemv-3": (3, qconfig.make_config(4, 16, 32, 1, 1, 4, 2)),
    "dot-20": (20, qconfig.make_config(16, 16, 64, 2, 1, 4, 2)),
}


@pytest.fixture(autouse=True)
def _needs_interpreter() -> None:
    # Without TRITON_INTERPRET=1 before triton's import the kernels are compiled for a GPU that is not here.
    assert INTERPRETED, "triton was imported without TRITON_INTERPRET=1 (set it before importing triton)"


def _k(qtype: str) -> int:
    """A K of two super-blocks (K-quants) or three legacy blocks: with BLOCK_SIZE_K 64 the legacy K is ragged."""
    return 512 if Q.GGUF_BLOCKS[qtype].values == 256 else 96


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_matmul_matches_reference(qtype: str, shape: str) -> None:
    m, cfg = SHAPES[shape]
    g = torch.Generator().manual_seed(len(shape) * 31 + TYPES.index(qtype))
    k, n = _k(qtype), 24  # N not a multiple of BLOCK_SIZE_N: the clamped rows are never stored
    w = Q.random_gguf_blocks(n, k, qtype, g)
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    out = gt.gguf_linear_triton(x, w, qtype, bias if shape != "gemv-3" else None, config=cfg)
    want = Q.gguf_linear_ref(x, w, qtype, bias if shape != "gemv-3" else None)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_gguf_default_configs_and_leading_dims(qtype: str) -> None:
    """The launch configs ``get_quant_config`` picks (no tuned file for these shapes) at 1, 6 and 40 rows, with
    x of shape ``[2, M / 2, K]``: split K at decode, the tl.dot tile past 4 rows."""
    g = torch.Generator().manual_seed(7)
    k, n = 256, 40
    w = Q.random_gguf_blocks(n, k, qtype, g)
    for m in (1, 6, 40):
        x = torch.randn(m, k, generator=g).reshape(-1 if m == 1 else 2, *(() if m == 1 else (m // 2,)), k)
        out = gt.gguf_linear_triton(x, w, qtype)
        assert out.shape == (*x.shape[:-1], n)
        assert rel_err(out, Q.gguf_linear_ref(x, w, qtype)) < 1e-5


def test_gguf_default_config_shapes() -> None:
    """GEMV tiles up to 4 rows (split so a 4096-wide output fills ~264 programs), the 16-row tile up to 8."""
    cfg = {m: qconfig.default_config("gguf_q4_k", 4096, 4096, m) for m in (1, 3, 8, 64)}
    assert [cfg[m]["BLOCK_SIZE_M"] for m in (1, 3, 8, 64)] == [1, 4, 16, 64]
    assert cfg[1]["SPLIT_K"] == 2 and cfg[64]["SPLIT_K"] == 1
    with pytest.raises(ValueError, match="unknown quantized kernel"):
        qconfig.config_file_name("gguf_q2_k", 1, 1, "x", torch.bfloat16)


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_rows_match_reference(qtype: str) -> None:
    """The embedding lookup's row decoder: ids of any shape, repeated ids, rows dequantized to the model dtype."""
    g = torch.Generator().manual_seed(11)
    k = _k(qtype) * 2  # legacy: 192 = a 256-wide chunk cut short; K-quants: 1024 = four chunks
    w = Q.random_gguf_blocks(30, k, qtype, g)
    ids = torch.tensor([[3, 29, 0], [7, 7, 12]])
    out = gt.gguf_rows_triton(w, ids, qtype, k, torch.float32)
    assert torch.equal(out, Q.gguf_rows_ref(w, ids, qtype, torch.float32))
    assert torch.equal(out, Q.dequantize_gguf(w, qtype)[ids])


def test_gguf_triton_refuses_what_it_cannot_read() -> None:
    w = Q.random_gguf_blocks(8, 64, "Q8_0")
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="has no kernel"):
        gt.gguf_linear_triton(x, w, "Q2_K")
    with pytest.raises(ValueError, match="does not hold K=96"):
        gt.gguf_linear_triton(torch.randn(2, 96), w, "Q8_0")
    with pytest.raises(ValueError, match="contiguous uint8"):
        gt.gguf_linear_triton(x, w.transpose(0, 1), "Q8_0")
    with pytest.raises(ValueError, match="bias must have shape"):
        gt.gguf_linear_triton(x, w, "Q8_0", torch.zeros(3))
    with pytest.raises(ValueError, match="power of two >= 32"):
        gt.gguf_linear_triton(x, w, "Q8_0", config=qconfig.make_config(1, 16, 16, 1, 1, 4, 2))


@pytest.mark.parametrize("kernel", ["_gguf_matmul_kernel", "_gguf_rows_kernel"])
def test_pdl_kernels_wait_before_any_memory_access(kernel: str) -> None:
    check_pdl_contract(gt, kernel)
