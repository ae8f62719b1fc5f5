"""The split-K reduction shared by the quantized GEMVs / skinny GEMMs (int4.py, int_gemv.py, fp8.py,
gguf_triton.py): each split wrote float32 partial sums to a ``[SPLIT_K, M, N]`` workspace; one small kernel sums
them in split order (deterministic, CUDA-graph friendly: no atomics, no zeroing), adds the bias, rounds once."""

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
    def _splitk_reduce_kernel(WS, BIAS, Y, M, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        # Y[row] = sum over splits of WS[split, row] (+ bias), in float32 and in split order, rounded once.
        pdl_wait(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(WS + (s * M + row) * N + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, acc.to(Y.dtype.element_ty), mask=mask)


def _splitk_reduce(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    split, m, n = ws.shape
    block = min(triton.next_power_of_2(n), 1024)
    _splitk_reduce_kernel[(m, triton.cdiv(n, block))](
        ws, bias if bias is not None else ws, out, m, n, SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block,
        num_warps=4, **pdl_kwargs(ws.device),
    )
