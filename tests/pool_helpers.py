"""Random KV pools and request->token tables for the attention kernel tests (Triton and CPU alike)."""

from __future__ import annotations

import torch


def random_pool(num_slots: int, hkv: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V buffers of ``num_slots + 1`` slots (slot 0 is the reserved dummy slot)."""
    return torch.randn(num_slots + 1, hkv, d).to(dtype), torch.randn(num_slots + 1, hkv, d).to(dtype)


def random_table(seq_lens: list[int], num_slots: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A table with spare rows (pool indices are not 0..B-1) and scattered, distinct slots >= 1; returns
    ``(req_to_token, req_pool_indices)``."""
    rows = 2 * len(seq_lens) + 1
    table = torch.zeros(rows, width, dtype=torch.int32)
    req_pool_indices = torch.randperm(rows)[: len(seq_lens)]
    slots = (torch.randperm(num_slots) + 1).int()
    used = 0
    for row, n in zip(req_pool_indices.tolist(), seq_lens):
        table[row, :n] = slots[used : used + n]
        used += n
    return table, req_pool_indices
