"""Row-wise argmax of logits (greedy decoding): ``argmax_ref`` is ``torch.argmax(-1)``, the ground truth and the
CPU path; ``argmax_triton`` computes the same index in two launches.

A decode step at batch 1 ends with one ``[1, vocab]`` row to reduce. torch reduces a row in one thread block
(28 us for 128256 logits on an H200); split into chunks with torch ops it took five small kernels. Here the first
launch takes the max and its first index in each chunk of each row (many programs, so the row is read at the
card's bandwidth), the second picks, per row, the first chunk that holds the row's max. Ties resolve to the first
maximal index, as torch documents for argmax.
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

# Chunks per row of the first launch; the second launch reduces this many (value, index) pairs per row.
ARGMAX_CHUNKS = 64


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: the first index of each row's maximum of ``logits [B, V]``."""
    return logits.argmax(dim=-1)


if triton is not None:

    @triton.jit
    def _chunk_argmax_kernel(X, VALS, IDX, stride_x, v, chunk, CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        best = tl.full([1], float("-inf"), tl.float32)
        best_i = tl.full([1], 0, tl.int64)
        start = c * chunk
        end = tl.minimum(start + chunk, v)
        # First chunk element for a row whose chunk is all -inf: the lowest index still wins ties below.
        best_i += start
        for i0 in range(start, end, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            x = tl.load(X + row * stride_x + offs, mask=offs < end, other=float("-inf")).to(tl.float32)
            m = tl.max(x, 0)
            # The first position of the tile's max; a later tile replaces the best only when strictly greater.
            i = tl.min(tl.where(x == m, offs, end), 0).to(tl.int64)
            take = m > best
            best_i = tl.where(take, i, best_i)
            best = tl.where(take, m, best)
        tl.store(VALS + row * CHUNKS + c + tl.arange(0, 1), best)
        tl.store(IDX + row * CHUNKS + c + tl.arange(0, 1), best_i)

    @triton.jit
    def _pick_chunk_kernel(VALS, IDX, OUT, CHUNKS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, CHUNKS)
        vals = tl.load(VALS + row * CHUNKS + offs)
        idx = tl.load(IDX + row * CHUNKS + offs)
        m = tl.max(vals, 0)
        # Chunks are in index order, and each holds its first maximal index: the smallest index among the
        # chunks that reach the row's max is the row's first maximal index.
        big = tl.full([CHUNKS], 2**62, tl.int64)
        tl.store(OUT + row + tl.arange(0, 1), tl.min(tl.where(vals == m, idx, big), 0) + tl.zeros([1], tl.int64))


def argmax_triton(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The contract of ``argmax_ref`` for ``logits [B, V]`` (float32, float16 or bfloat16, last dim contiguous),
    as two Triton launches. NaN logits are not supported (decoding never produces them)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use argmax_ref")
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"argmax_triton needs [B, V] logits with a contiguous last dim, got {tuple(logits.shape)}")
    b, v = logits.shape
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b == 0:
        return out
    if v == 0:
        raise ValueError("argmax of an empty row")
    vals = torch.empty((b, ARGMAX_CHUNKS), dtype=torch.float32, device=logits.device)
    idx = torch.empty((b, ARGMAX_CHUNKS), dtype=torch.int64, device=logits.device)
    chunk = triton.cdiv(v, ARGMAX_CHUNKS)
    _chunk_argmax_kernel[(b, ARGMAX_CHUNKS)](
        logits, vals, idx, logits.stride(0), v, chunk, CHUNKS=ARGMAX_CHUNKS,
        BLOCK=min(block, triton.next_power_of_2(chunk)), num_warps=4,
    )
    _pick_chunk_kernel[(b,)](vals, idx, out, CHUNKS=ARGMAX_CHUNKS, num_warps=1)
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Dispatching argmax: Triton for CUDA tensors of up to ``ARGMAX_CHUNKS`` rows (where one block per row is
    the bottleneck), torch otherwise. Contract as ``argmax_ref``."""
    if logits.is_cuda and triton is not None and logits.dim() == 2 and logits.shape[0] <= ARGMAX_CHUNKS:
        return argmax_triton(logits if logits.stride(-1) == 1 else logits.contiguous())
    return argmax_ref(logits)
