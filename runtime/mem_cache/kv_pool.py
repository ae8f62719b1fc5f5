"""The token-granular KV pool: per layer, one K and one V buffer indexed by slot.

Layout (shared with kernels/): ``k_buffers[layer]`` and ``v_buffers[layer]`` are ``[num_slots + 1, Hkv, D]``.
Slot 0 is the dummy slot: the allocator never hands it out, and padded rows (CUDA-graph batches) write there.
`MLAKVPool` is multi-head latent attention's layout: one row per token and layer shared by all heads.

On the CPU the buffers are zeroed by the operating system (`zeros`): a page becomes resident when a token first
writes it, so the process's memory follows the tokens used, not the pool's size.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model_loader.model_config import ModelConfig
from ..tp.distributed import TPInfo


# Where a CPU buffer starts: a cache line. calloc's large blocks start 16 bytes past a page, so a 128-byte head row
# (SmolLM2's bf16 D = 64) spanned 3 lines instead of 2; the CPU decode kernel's KV read at batch 40 took ~1.3x as
# long (issue 35).
_CPU_ALIGN = 64


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On the CPU through numpy's ``calloc``: a large one is fresh anonymous memory the kernel maps
    zero pages into on first touch, where ``torch.zeros`` writes (and so makes resident) every page at once; its
    first element starts a cache line."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(nbytes + _CPU_ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % _CPU_ALIGN
    return torch.from_numpy(raw[skip : skip + nbytes]).view(dtype).view(shape)


class KVPool:
    """K/V storage for ``num_slots`` tokens (plus the dummy slot 0) in every layer."""

    def __init__(
        self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.num_slots = num_slots
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.k_buffers = [zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v_buffers = [zeros(shape, dtype, device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """``num_kv_heads * head_dim * num_layers * 2 (K and V) * dtype_bytes``."""
        return num_kv_heads * head_dim * num_layers * 2 * torch.empty((), dtype=dtype).element_size()


class MLAKVPool(KVPool):
    """MLA's cache (DeepSeek): per layer one buffer ``[num_slots + 1, 1, kv_lora_rank + rope_dim]`` holding each
    token's normalised latent ``c_kv`` and rotated rope key ``k_pe``; ``v_buffers[layer]`` is a view of its first
    ``kv_lora_rank`` columns (the latent is the value of absorbed attention), so nothing is stored twice and the
    attention kernels see multi-query attention with one KV head."""

    def __init__(
        self, num_slots: int, num_layers: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = num_slots
        shape = (num_slots + 1, 1, kv_lora_rank + rope_dim)
        self.k_buffers = [zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v_buffers = [buf[..., :kv_lora_rank] for buf in self.k_buffers]

    @staticmethod
    def mla_bytes_per_token(num_layers: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype) -> int:
        """``(kv_lora_rank + rope_dim) * num_layers * dtype_bytes`` (DeepSeek-V3 in bf16: 576 * 61 * 2)."""
        return (kv_lora_rank + rope_dim) * num_layers * torch.empty((), dtype=dtype).element_size()


def make_kv_pool(mc: ModelConfig, tp: TPInfo, num_slots: int, dtype: torch.dtype, device: torch.device) -> KVPool:
    """The pool of rank ``tp`` for model ``mc``: MLA's latent rows (replicated on every rank), or this rank's KV
    heads (all of them replicated when there are fewer than ranks)."""
    if mc.mla is not None:
        return MLAKVPool(num_slots, mc.num_layers, mc.mla.kv_lora_rank, mc.mla.qk_rope_head_dim, dtype, device)
    return KVPool(num_slots, mc.num_layers, tp.kv_head_shard(mc.num_kv_heads).size, mc.head_dim, dtype, device)


def kv_bytes_per_token(mc: ModelConfig, tp: TPInfo, dtype: torch.dtype) -> int:
    """Bytes one token takes in rank ``tp``'s pool (what the memory plan divides by)."""
    if mc.mla is not None:
        return MLAKVPool.mla_bytes_per_token(mc.num_layers, mc.mla.kv_lora_rank, mc.mla.qk_rope_head_dim, dtype)
    return KVPool.bytes_per_token(mc.num_layers, tp.kv_head_shard(mc.num_kv_heads).size, mc.head_dim, dtype)
