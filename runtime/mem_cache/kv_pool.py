"""The token-granular KV pool: per layer, one K and one V buffer indexed by slot.

Layout (shared with kernels/): ``k_buffers[layer]`` and ``v_buffers[layer]`` are ``[num_slots + 1, Hkv, D]``.
Slot 0 is the dummy slot: the allocator never hands it out, and padded rows (CUDA-graph batches) write there.
"""

from __future__ import annotations

import torch


class KVPool:
    """K/V storage for ``num_slots`` tokens (plus the dummy slot 0) in every layer."""

    def __init__(
        self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.num_slots = num_slots
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """``num_kv_heads * head_dim * num_layers * 2 (K and V) * dtype_bytes``."""
        return num_kv_heads * head_dim * num_layers * 2 * torch.empty((), dtype=dtype).element_size()
