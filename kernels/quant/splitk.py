"""Split-K for the quantized GEMVs / skinny GEMMs (int_gemv.py, int4.py, fp8.py, gguf_triton.py) and one strided
sum over parts (also the fused MoE's top-k sum, kernels/moe/fused.py).

A decode GEMV splits K over programs so that a small weight still fills the GPU; the splits' float32 partial sums
must then be added. A second kernel for that (``sum_parts``) costs a launch and a drain per linear, a real share of
a 10-30 us GEMV. So the sum happens in the GEMV itself (`split_k_store`, the "serial split-K fixup" of CUTLASS and
Marlin): every program of an output tile writes its partial to a ``[SPLIT, M, N]`` float32 workspace and bumps the
tile's counter; the program that sees the count reach ``SPLIT - 1`` is the last, reads all partials back in split
order (deterministic: the same sum whichever program comes last, bit-equal to ``sum_parts``), adds the bias, rounds
once, stores, and sets the counter back to zero for the next launch. The counters (`tile_locks`) are one zeroed
int32 array per device, allocated once: every launch leaves them zero, and launches on a stream do not overlap
(PDL kernels wait for their predecessor before their first memory access), so one array serves every GEMV, CUDA
graphs included. No atomics on the data, no zeroing launch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

try:  # triton is optional (absent on macOS / Windows): then only the references run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..activation import silu_and_mul
from ..pdl import pdl_kwargs

TILE_LOCKS = 1 << 18
"""Output tiles one split-K launch may have (the grid's first axis): 1 MB of counters per device."""

if triton is not None:
    from ..activation import silu_mul
    from ..pdl import pdl_wait

    @triton.jit
    def _store_out(acc, Y, BIAS, N, rows, cols, ok, sy_m, HAS_BIAS: tl.constexpr):
        """``Y[rows, cols] = acc (+ bias[cols])`` rounded once to Y's dtype."""
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(Y + rows.to(tl.int64) * sy_m + cols, acc.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _sum_splits(ws, ok, M, N, SPLIT: tl.constexpr):
        """The ``SPLIT`` partials at ``ws`` (``M * N`` apart) summed in split order, read from L2 (``.cg``: not
        this SM's L1, which may hold stale lines of the reused workspace)."""
        total = tl.load(ws, mask=ok, other=0.0, cache_modifier=".cg")
        for p in range(1, SPLIT):
            total += tl.load(ws + p * M * N, mask=ok, other=0.0, cache_modifier=".cg")
        return total

    @triton.jit
    def _store_glu(acc, Y, WS, LOCKS, BIAS, M, N, rows, cols, ok, sy_m, glu_tiles, SPLIT: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
        """SwiGLU epilogue: column tile ``t`` of the gate half pairs with tile ``t + glu_tiles`` of the up half
        (``N / 2`` a multiple of the tile width); the last of the pair's ``2 * SPLIT`` programs writes
        ``Y[rows, :N/2] = silu(gate) * up`` (gate and up each rounded to Y's dtype first, as the unfused path
        stores them)."""
        tl.store(WS + tl.program_id(1).to(tl.int64) * M * N + rows * N + cols, acc, mask=ok)
        tl.debug_barrier()  # every thread's partial is written before the release below
        lock = LOCKS + tl.program_id(0) % glu_tiles
        if tl.atomic_add(lock, 1, sem="acq_rel") == 2 * SPLIT - 1:
            half = N // 2
            g_cols = cols % half  # the gate columns of the pair, whichever half this program computed
            gate = _sum_splits(WS + rows * N + g_cols, ok, M, N, SPLIT)
            up = _sum_splits(WS + rows * N + g_cols + half, ok, M, N, SPLIT)
            tl.store(lock, 0)
            if HAS_BIAS:
                gate += tl.load(BIAS + g_cols).to(tl.float32)
                up += tl.load(BIAS + g_cols + half).to(tl.float32)
            dt = Y.dtype.element_ty
            out = silu_mul(gate.to(dt).to(tl.float32), up.to(dt).to(tl.float32), dt)
            tl.store(Y + rows.to(tl.int64) * sy_m + g_cols, out, mask=ok)

    @triton.jit
    def split_k_store(acc, Y, WS, LOCKS, BIAS, M, N, rows, cols, sy_m, glu_tiles, SPLIT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, GLU: tl.constexpr):
        """Epilogue of a split-K program (``program_id(0)`` the output tile, ``program_id(1)`` the split): ``acc``
        is its float32 partial of ``Y[rows, cols]`` (``rows`` / ``cols`` broadcast to ``acc``'s shape). With
        ``SPLIT`` 1 it is stored (+ bias); else written to ``WS [SPLIT, M, N]`` and the tile's last program sums
        the ``SPLIT`` partials in order into Y (module docstring). ``GLU`` (GEMVs whose ``program_id(0)`` is the
        column tile, ``glu_tiles`` tiles per half): ``Y [M, N / 2]`` gets SiLU-and-mul of the two halves."""
        ok = (rows < M) & (cols < N)
        if GLU:
            _store_glu(acc, Y, WS, LOCKS, BIAS, M, N, rows, cols, ok, sy_m, glu_tiles, SPLIT, HAS_BIAS)
        elif SPLIT > 1:
            ws = WS + rows * N + cols
            tl.store(ws + tl.program_id(1).to(tl.int64) * M * N, acc, mask=ok)
            tl.debug_barrier()  # every thread's partial is written before the release below
            lock = LOCKS + tl.program_id(0)
            if tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT - 1:  # the other SPLIT - 1 partials are visible
                total = _sum_splits(ws, ok, M, N, SPLIT)
                tl.store(lock, 0)
                _store_out(total, Y, BIAS, N, rows, cols, ok, sy_m, HAS_BIAS)
        else:
            _store_out(acc, Y, BIAS, N, rows, cols, ok, sy_m, HAS_BIAS)

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


@functools.cache
def tile_locks(device: torch.device) -> torch.Tensor:
    """The split-K tile counters of ``device``: ``TILE_LOCKS`` int32 zeros, allocated on first use and shared by
    every launch (each leaves them zero)."""
    return torch.zeros(TILE_LOCKS, dtype=torch.int32, device=device)


def split_k_buffers(out: torch.Tensor, split: int, tiles: int,
                    n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(WS, LOCKS)`` for a launch of ``tiles`` output tiles x ``split`` K splits into ``out [M, N]``: the float32
    ``[split, M, N]`` partial sums and the device's tile counters; ``out`` twice (unused) when ``split`` is 1.
    ``n``: the product's width when ``out`` is narrower (SwiGLU's ``N / 2``): then always a workspace, even at
    ``split`` 1 (the gate and up halves meet there).

    Raises:
        ValueError: more than ``TILE_LOCKS`` tiles with a split (a launch config far outside decode sizes).
    """
    if split == 1 and n is None:
        return out, out
    if tiles > TILE_LOCKS:
        raise ValueError(f"a split-K launch has at most {TILE_LOCKS} output tiles, got {tiles}: "
                         "use SPLIT_K=1 for a grid this large")
    shape = (split, out.shape[0], n or out.shape[1])
    return torch.empty(shape, dtype=torch.float32, device=out.device), tile_locks(out.device)


def glu_unfused(out: torch.Tensor, product: Callable[[torch.Tensor], None]) -> None:
    """SwiGLU where the epilogue cannot pair the column tiles (``N / 2`` not a whole number of them): ``product``
    writes the ``[M, N]`` result into a temporary, then SiLU-and-mul of its halves goes into ``out [M, N / 2]``."""
    full = torch.empty((out.shape[0], 2 * out.shape[1]), dtype=out.dtype, device=out.device)
    product(full)
    out.copy_(silu_and_mul(full))


def sum_parts(src: torch.Tensor, out: torch.Tensor, parts: int, row_stride: int, part_stride: int,
              bias: torch.Tensor | None = None) -> None:
    """``out[r] = sum_p src[r * row_stride + p * part_stride] (+ bias)`` for ``out [rows, N]``: float32 partial
    sums (or copies) reduced in a fixed order, one launch (the top-k copies of a fused MoE in
    kernels/moe/fused.py; the reference order of `split_k_store`)."""
    rows, n = out.shape
    block = min(triton.next_power_of_2(n), 1024)
    _sum_parts_kernel[(rows, triton.cdiv(n, block))](
        src, bias if bias is not None else src, out, n, row_stride, part_stride, PARTS=parts,
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4, **pdl_kwargs(src.device),
    )
