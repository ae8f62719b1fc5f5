"""Write the K/V of new tokens into the token-granular KV pool."""

from __future__ import annotations

import torch


def store_kv_ref(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """``k_buffer[loc[i]] = k[i]`` and the same for v. Buffers are ``[num_slots, Hkv, D]``, ``k/v [T, Hkv, D]``."""
    k_buffer[loc] = k.to(k_buffer.dtype)
    v_buffer[loc] = v.to(v_buffer.dtype)


def store_kv(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Dispatching store: Triton on CUDA, the reference elsewhere."""
    store_kv_ref(k_buffer, v_buffer, loc, k, v)
