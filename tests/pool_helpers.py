"""Helpers of the kernel tests (Triton on the CPU interpreter, the CPU kernels, and the GPU tier in tests/cuda/):
random KV pools and request->token tables on a device, and how kernel outputs are compared with their references."""

from __future__ import annotations

import torch

# rel_err bounds against the torch references: float32 kernels differ in summation order only; half precision
# rounds intermediate results (bf16 only on a GPU: the Triton interpreter's bf16 arithmetic is not exact).
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def random_pool(num_slots: int, hkv: int, d: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """K and V buffers of ``num_slots + 1`` slots (slot 0 is the reserved dummy slot)."""
    return tuple(torch.randn(num_slots + 1, hkv, d, device=device).to(dtype) for _ in range(2))


def random_table(seq_lens: list[int], num_slots: int, width: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
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
    return table.to(device), req_pool_indices.to(device)
