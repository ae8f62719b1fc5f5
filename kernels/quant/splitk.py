"""One strided sum over parts, shared by the quantized GEMVs / skinny GEMMs (int4.py, int_gemv.py, fp8.py,
gguf_triton.py: each split wrote float32 partial sums to a ``[SPLIT_K, M, N]`` workspace) and the fused MoE
(kernels/moe/fused.py: the top-k weighted copies of each token): one small kernel sums the parts in a fixed order
(deterministic, CUDA-graph friendly: no atomics, no zeroing), adds the bias, rounds once."""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the references run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..pdl import pdl_kwargs

if triton is not None:
    from ..pdl import pdl_wait

    @triton.jit
    def _sum_parts_kernel(SRC, BIAS, OUT, N, row_stride, part_stride, PARTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        # OUT[row] = sum over parts p of SRC[row * row_stride + p * part_stride] (+ bias), in float32 and in part
        # order, rounded once; OUT is [rows, N] contiguous.
        pdl_wait(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        ptr = SRC + row * row_stride + cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in tl.static_range(PARTS):
            acc += tl.load(ptr, mask=mask, other=0.0)
            ptr += part_stride  # pointer arithmetic: 64-bit however large the workspace
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * N + cols, acc.to(OUT.dtype.element_ty), mask=mask)


def sum_parts(src: torch.Tensor, out: torch.Tensor, parts: int, row_stride: int, part_stride: int,
              bias: torch.Tensor | None = None) -> None:
    """``out[r] = sum_p src[r * row_stride + p * part_stride] (+ bias)`` for ``out [rows, N]``: float32 partial
    sums (or copies) reduced in a fixed order, one launch (the split-K workspace here, the top-k copies of a
    fused MoE in kernels/moe/fused.py)."""
    rows, n = out.shape
    block = min(triton.next_power_of_2(n), 1024)
    _sum_parts_kernel[(rows, triton.cdiv(n, block))](
        src, bias if bias is not None else src, out, n, row_stride, part_stride, PARTS=parts,
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4, **pdl_kwargs(src.device),
    )


def _splitk_reduce(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """The ``[SPLIT_K, M, N]`` workspace summed over its splits into ``out [M, N]``."""
    split, m, n = ws.shape
    sum_parts(ws, out, split, n, m * n, bias)
