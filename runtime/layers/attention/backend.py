"""The attention-backend seam: how a layer's attention reads and writes the KV pool.

A backend owns the per-batch metadata it needs (prepared once per forward, shared by all layers) and the K/V
store. ``TorchAttentionBackend`` is the reference (CPU and GPU); the Triton backend for CUDA implements the same
interface, plus the CUDA-graph hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from xinf_sglang.kernels import (
    NewToken,
    apply_rotary,
    decode_attention_ref,
    extend_attention_ref,
    store_kv_ref,
)

from ...model_executor.forward_batch import ForwardBatch, ForwardMode
from ...mem_cache.kv_pool import KVPool


class AttentionBackend(ABC):
    """Computes attention for one layer over the token pool.

    Contract: ``init_forward_metadata`` is called once per forward before any layer runs; ``forward`` rotates the
    new tokens' q and k, stores their K/V at ``batch.out_cache_loc`` and attends, so a request sees its cached
    prefix and its own new tokens (causally) and nothing else. Decode hands all three steps to ``forward_decode``
    (on the GPU one kernel for small batches); extend runs rotary and store-KV here, then ``forward_extend``.
    """

    def __init__(self, kv_pool: KVPool, req_to_token: torch.Tensor, sm_scale: float) -> None:
        self.kv_pool = kv_pool
        self.req_to_token = req_to_token
        self.sm_scale = sm_scale

    @abstractmethod
    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Prepare whatever the kernels need for this batch (split counts, index arrays)."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        layer_id: int, batch: ForwardBatch,
    ) -> torch.Tensor:
        """``q [T, Hq, D]``, ``k/v [T, Hkv, D]`` of the new tokens before rotary, ``cos/sin [T, D]`` at their
        positions -> attention output ``[T, Hq, D]``."""
        if batch.mode is ForwardMode.DECODE:
            return self.forward_decode(q, NewToken(k, v, cos, sin, batch.out_cache_loc), layer_id, batch)
        q, k = apply_rotary(q, k, cos, sin)
        self.store_kv(layer_id, batch.out_cache_loc, k, v)
        return self.forward_extend(q, layer_id, batch)

    def forward_mla(self, q: torch.Tensor, kv: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        """Multi-head latent attention with absorbed weights (DeepSeek): ``q [T, H, Dk]`` (the query in latent
        space, its rope part rotated), ``kv [T, 1, Dk]`` the new tokens' cache rows (normalised latent + rotated rope
        key, ``Dk = kv_lora_rank + qk_rope_head_dim``) -> ``[T, H, Dv]`` in latent space (``Dv = kv_lora_rank``).

        The pool is an `MLAKVPool`: one row per token shared by all heads, V a view of its first ``Dv`` columns, so
        this is multi-query attention with one KV head. Stores ``kv`` at ``batch.out_cache_loc``, then attends."""
        self.kv_pool.k_buffers[layer_id].index_copy_(0, batch.out_cache_loc, kv)
        if batch.mode is ForwardMode.DECODE:
            return self.mla_decode(q, layer_id, batch)
        return self.mla_extend(q, layer_id, batch)

    def mla_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        """One token per request over the latent cache (already holding this step's rows). The torch reference
        here (the CPU's path for MLA: the C++ kernel reads K and V of one width); the Triton backend overrides it."""
        return decode_attention_ref(
            q, self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id], self.req_to_token,
            batch.req_pool_indices, batch.seq_lens, self.sm_scale,
        )

    def mla_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        """New tokens over their cached prefix and themselves (causal), on the latent cache; reference here."""
        return extend_attention_ref(
            q, self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id], self.req_to_token,
            batch.req_pool_indices, batch.seq_lens, batch.extend_seq_lens, batch.extend_start_loc, self.sm_scale,
        )

    @abstractmethod
    def store_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None: ...

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        """Attention of rotated ``q`` whose K/V are already in the pool."""

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, new_token: NewToken, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        """Rotary, store-KV and attention of one token per request: ``q`` and ``new_token`` before rotary."""


class TorchAttentionBackend(AttentionBackend):
    """The reference backend: the torch references of kernels/, on any device."""

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        pass  # the references read everything they need from the batch

    def store_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        store_kv_ref(self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id], loc, k, v)

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        return extend_attention_ref(
            q,
            self.kv_pool.k_buffers[layer_id],
            self.kv_pool.v_buffers[layer_id],
            self.req_to_token,
            batch.req_pool_indices,
            batch.seq_lens,
            batch.extend_seq_lens,
            batch.extend_start_loc,
            self.sm_scale,
        )

    def forward_decode(self, q: torch.Tensor, new_token: NewToken, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        return decode_attention_ref(
            q,
            self.kv_pool.k_buffers[layer_id],
            self.kv_pool.v_buffers[layer_id],
            self.req_to_token,
            batch.req_pool_indices,
            batch.seq_lens,
            self.sm_scale,
            new_token,
        )
