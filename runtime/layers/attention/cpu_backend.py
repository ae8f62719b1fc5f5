"""``CpuAttentionBackend``: decode and extend attention on the CPU through the C++ kernel of
``kernels/cpu/attention.py``, which reads the pool through the slot table (no per-step copy of the padded history,
no Python loop per request). ``attention_backend="torch"`` keeps the reference selectable for A/B runs.
"""

from __future__ import annotations

import torch

from xinf_sglang.kernels import NewToken, store_kv_ref
from xinf_sglang.kernels.cpu import attention as cpu_attention

from .backend import AttentionBackend
from ...model_executor.forward_batch import ForwardBatch
from ...mem_cache.kv_pool import KVPool


class CpuAttentionBackend(AttentionBackend):
    """Same contract as ``TorchAttentionBackend``, on CPU tensors. The kernel is built (or loaded from torch's
    extension cache) when the backend is created, so a missing compiler fails at startup, not at the first step."""

    def __init__(self, kv_pool: KVPool, req_to_token: torch.Tensor, sm_scale: float) -> None:
        super().__init__(kv_pool, req_to_token, sm_scale)
        if req_to_token.device.type != "cpu":
            raise ValueError("CpuAttentionBackend needs the KV pool and request table on the CPU")
        cpu_attention.load()
        # the pool's layout is fixed for the engine's life: checked here once (dtype, strides, table type)
        q_probe = torch.empty(0, kv_pool.k_buffers[0].shape[1], kv_pool.k_buffers[0].shape[2],
                              dtype=kv_pool.k_buffers[0].dtype)
        cpu_attention.check_inputs(q_probe, kv_pool.k_buffers[0], kv_pool.v_buffers[0], req_to_token)
        self._rows = self._lens = torch.empty(0, dtype=torch.int64)

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Validate the pool and make the index arrays int64-contiguous once per forward, not once per layer."""
        self._rows = batch.req_pool_indices.to(torch.int64).contiguous()
        self._lens = batch.seq_lens.to(torch.int64).contiguous()

    def store_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        store_kv_ref(self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id], loc, k, v)

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        return cpu_attention.extend_attention_cpu(
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
        return cpu_attention.decode_attention_cpu_unchecked(
            q,
            self.kv_pool.k_buffers[layer_id],
            self.kv_pool.v_buffers[layer_id],
            self.req_to_token,
            self._rows,
            self._lens,
            self.sm_scale,
            new_token,
        )
