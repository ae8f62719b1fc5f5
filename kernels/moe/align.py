"""``moe_align_block_size``: the (token, k) pairs of a routing sorted by expert, each expert's group padded to the
GEMM's row block, so that every block of ``block_m`` rows belongs to one expert (the SGLang / vLLM contract).

Written in torch, vectorised (no Python per token or per expert) and without host synchronisation, so it runs on
CUDA and CPU alike and can be captured in a CUDA graph: the outputs have a fixed size that depends only on the
number of pairs, the expert count and ``block_m``.
"""

from __future__ import annotations

import torch


def max_padded_rows(num_pairs: int, block_m: int, num_experts: int) -> int:
    """Length of ``sorted_token_ids``: every pair once, plus at most ``block_m - 1`` padding rows per expert that
    received any pair (at most ``min(num_experts, num_pairs)`` of them)."""
    return num_pairs + min(num_experts, num_pairs) * (block_m - 1)


def moe_align_block_size(
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
