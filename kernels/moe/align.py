"""``moe_align_block_size``: the (token, k) pairs of a routing sorted by expert, each expert's group padded to the
GEMM's row block, so that every block of ``block_m`` rows belongs to one expert (the SGLang / vLLM contract).

``moe_align_block_size_ref`` is written in torch, vectorised (no Python per token or per expert) and without host
synchronisation, so it runs on CUDA and CPU alike and can be captured in a CUDA graph: the outputs have a fixed size
that depends only on the number of pairs, the expert count and ``block_m``. It is ~28 small kernels, though, which at
decode (a few microseconds each, even inside a graph) would cost more than the expert GEMMs themselves; so for small
routings (``TRITON_MAX_PAIRS``) on CUDA one Triton program does the whole job in one launch.
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

# Up to this many (token, k) pairs the single-program Triton kernel sorts them (its work is serial in the pairs:
# 64-pair chunks); beyond, prefill-sized routings, the torch version's launches are a small share of the GEMMs.
TRITON_MAX_PAIRS = 2048


def max_padded_rows(num_pairs: int, block_m: int, num_experts: int) -> int:
    """Length of ``sorted_token_ids``: every pair once, plus at most ``block_m - 1`` padding rows per expert that
    received any pair (at most ``min(num_experts, num_pairs)`` of them)."""
    return num_pairs + min(num_experts, num_pairs) * (block_m - 1)


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatching ``moe_align_block_size_ref`` (its contract): the one-launch Triton kernel for CUDA routings of
    at most ``TRITON_MAX_PAIRS`` pairs when triton is installed, the torch version otherwise."""
    if topk_ids.is_cuda and triton is not None and topk_ids.numel() <= TRITON_MAX_PAIRS:
        return moe_align_block_size_triton(topk_ids, block_m, num_experts)
    return moe_align_block_size_ref(topk_ids, block_m, num_experts)


def moe_align_block_size_ref(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the flattened ``topk_ids [T, K]`` (values in ``[0, num_experts)``) by expert and pad each group.

    Returns, on ``topk_ids``'s device:

    - ``sorted_token_ids`` int32 ``[max_padded_rows(T*K, block_m, E)]``: flat pair indices ``t * K + k``, expert 0's
      first (in pair order), each expert's group padded to a multiple of ``block_m`` with the sentinel ``T * K``;
      the tail past the padded total is the sentinel too.
    - ``expert_ids`` int32 ``[ceil(len(sorted_token_ids) / block_m)]``: the expert of each block of ``block_m``
      rows, -1 for blocks past the padded total.
    - ``num_tokens_post_padded`` int32 ``[1]``: the padded total (a multiple of ``block_m``).
    """
    if block_m <= 0 or num_experts <= 0:
        raise ValueError(f"block_m and num_experts must be positive, got {block_m} and {num_experts}")
    flat = topk_ids.reshape(-1).to(torch.int64)
    device, pairs = flat.device, flat.numel()
    length = max_padded_rows(pairs, block_m, num_experts)
    # scatter_add_ rather than bincount: bincount sizes its output from the data, a host synchronisation.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    # Position of each sorted pair inside its expert's group, moved to that group's padded start.
    rank = torch.arange(pairs, device=device) - (counts.cumsum(0) - counts)[expert_of]
    dest = (padded_end - padded)[expert_of] + rank
    sorted_ids = torch.full((length,), pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, length, block_m, device=device)
    # The first expert whose padded group ends after the block's start owns it (empty experts end where the
    # previous one does, so they are skipped).
    expert_ids = torch.searchsorted(padded_end, block_start, right=True)
    total = padded_end[-1:]
    expert_ids = torch.where(block_start < total, expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, total.to(torch.int32)


if triton is not None:

    @triton.jit
    def _align_kernel(IDS, SORTED, EXPERT_IDS, NUM_POST, pairs, num_experts, length, num_blocks, block_m,
                      PAD: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, BLOCK_B: tl.constexpr):
        # One program. Counting and ranking use a [CHUNK, BLOCK_E] one-hot of each chunk of pairs (no atomics, so
        # the order inside an expert is the pair order, as in the stable sort of the reference).
        experts = tl.arange(0, BLOCK_E)
        counts = tl.zeros([BLOCK_E], dtype=tl.int32)
        for c0 in range(0, pairs, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            ids = tl.load(IDS + offs, mask=offs < pairs, other=-1).to(tl.int32)
            counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        padded = (counts + block_m - 1) // block_m * block_m
        padded_end = tl.cumsum(padded, axis=0)
        total = tl.sum(padded, axis=0)
        tl.store(NUM_POST, total)
        # Sentinels where no pair goes: each expert's padding rows, then the tail past the padded total.
        pad = tl.arange(0, PAD)  # PAD >= block_m: the most padding rows one expert can have, rounded up
        pad_at = (padded_end - padded + counts)[:, None] + pad[None, :]
        tl.store(SORTED + pad_at, pairs, mask=pad[None, :] < (padded - counts)[:, None])
        for r0 in range(total, length, CHUNK):
            rows = r0 + tl.arange(0, CHUNK)
            tl.store(SORTED + rows, pairs, mask=rows < length)
        base = padded_end - padded
        for c0 in range(0, pairs, CHUNK):
            offs = c0 + tl.arange(0, CHUNK)
            ids = tl.load(IDS + offs, mask=offs < pairs, other=-1).to(tl.int32)
            hot = (ids[:, None] == experts[None, :]).to(tl.int32)
            before = tl.cumsum(hot, axis=0) - hot  # earlier pairs of the same expert in this chunk
            dest = tl.sum((base[None, :] + before) * hot, axis=1)
            tl.store(SORTED + dest, offs, mask=offs < pairs)
            base += tl.sum(hot, axis=0)
        for b0 in range(0, num_blocks, BLOCK_B):
            blocks = b0 + tl.arange(0, BLOCK_B)
            start = blocks * block_m
            ended = (padded_end[None, :] <= start[:, None]) & (experts[None, :] < num_experts)
            owner = tl.sum(ended.to(tl.int32), axis=1)  # experts whose groups end before the block: its index
            tl.store(EXPERT_IDS + blocks, tl.where(start < total, owner, -1), mask=blocks < num_blocks)


def moe_align_block_size_triton(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-launch Triton version of ``moe_align_block_size_ref`` (same outputs, bit for bit). Meant for small
    routings: one program walks the pairs in 64-pair chunks."""
    if triton is None:
        raise RuntimeError("triton is not installed; use moe_align_block_size_ref")
    if block_m <= 0 or num_experts <= 0:
        raise ValueError(f"block_m and num_experts must be positive, got {block_m} and {num_experts}")
    flat = topk_ids.reshape(-1)
    flat = flat if flat.is_contiguous() else flat.contiguous()
    pairs, device = flat.numel(), flat.device
    length = max_padded_rows(pairs, block_m, num_experts)
    num_blocks = triton.cdiv(length, block_m)
    sorted_ids = torch.empty(length, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_post = torch.empty(1, dtype=torch.int32, device=device)
    block_e = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](
        flat, sorted_ids, expert_ids, num_post, pairs, num_experts, length, num_blocks, block_m,
        PAD=triton.next_power_of_2(block_m), BLOCK_E=block_e,
        CHUNK=max(16, min(64, 8192 // block_e)), BLOCK_B=max(16, min(64, 8192 // block_e)), num_warps=4,
    )
    return sorted_ids, expert_ids, num_post
