"""The Triton attention backend for CUDA: the seam of attention.py implemented with the kernels of kernels/.

Per forward, ``init_forward_metadata`` decides what all layers share: for decode the split count of the split-KV
kernel and its intermediate buffers, for extend the grid height (the longest extend). Layers then only launch.
Decode passes the step's token to the decode kernel before rotary (``NewToken``): for batches of up to
``DECODE_SMALL_BATCH`` rows rotary, store-KV and attention are one launch (kernels/attention/decode_attention.py).

CUDA graphs (decode only): ``init_cuda_graph_state`` allocates intermediate buffers once, big enough for every
batch size up to ``max_bs``; ``init_forward_metadata_capture`` / ``_replay`` give a batch of size ``bs`` a split
count that depends on ``bs`` alone and views of those fixed buffers, so a graph captured for ``bs`` replays with
the same grid and the same addresses whatever the sequence lengths are. The graph runner owns the static input
tensors (``req_pool_indices``, ``seq_lens``, ``out_cache_loc``) and updates them in place before a replay; padded
rows should point at a request row whose positions map to the dummy slot 0 with ``seq_lens >= 1`` (a padded row
with ``seq_lens == 0`` is harmless too: its output is zeros).

MLA (the pool is an `MLAKVPool`): ``mla_decode`` / ``mla_extend`` run the kernels of kernels/attention/mla.py through
the same metadata and CUDA-graph buffers; for MLA the split count follows ``mla_num_splits`` (programs per head
block of ``num_q_heads``), the partials are ``Dv`` (the latent) wide and the merge tickets count head blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from xinf_sglang.kernels.attention.decode_attention import (
    DECODE_MIN_SPLIT_TOKENS,
    NewToken,
    decode_attention_triton,
    decode_intermediate_buffers,
    decode_num_splits,
    decode_split_counters,
    num_sms_of,
)
from xinf_sglang.kernels.attention.extend_attention import extend_attention_triton
from xinf_sglang.kernels.attention.mla import (
    mla_decode_triton,
    mla_extend_triton,
    mla_head_blocks,
    mla_num_splits,
)
from xinf_sglang.kernels.attention.store_kv import store_kv_triton

from .backend import AttentionBackend
from ...model_executor.forward_batch import ForwardBatch, ForwardMode
from ...mem_cache.kv_pool import KVPool, MLAKVPool


@dataclass
class _DecodeMetadata:
    num_splits: int
    # float32 [B, Hq, num_splits, D] / [B, Hq, num_splits]; None until the first layer allocates them when the
    # backend was built without num_q_heads (then shared by the remaining layers of the forward).
    mid_o: torch.Tensor | None
    mid_lse: torch.Tensor | None
    split_counters: torch.Tensor  # int32 [>= B * Hkv], zero between launches (each launch re-zeroes it)


@dataclass
class _ExtendMetadata:
    max_extend_len: int  # host int: sizes the grid of the extend kernel


@dataclass
class _GraphState:
    max_bs: int
    max_context_len: int
    mid_o_flat: torch.Tensor  # float32, viewed as [bs, Hq, splits(bs), Dv] for each captured bs
    mid_lse_flat: torch.Tensor  # float32, viewed as [bs, Hq, splits(bs)]
    split_counters: torch.Tensor  # int32 [max_bs * merge groups], shared by every captured bs


class TritonAttentionBackend(AttentionBackend):
    """Attention over the token pool with Triton kernels (CUDA tensors; CPU ones only under TRITON_INTERPRET=1).

    ``num_q_heads`` (the model's attention heads) lets the decode buffers be allocated up front; it is required for
    CUDA graphs and for MLA pools (the split count depends on it). Without it they are sized from the first layer's q
    in each forward.
    """

    def __init__(
        self,
        kv_pool: KVPool,
        req_to_token: torch.Tensor,
        sm_scale: float,
        *,
        num_q_heads: int | None = None,
        min_split_tokens: int = DECODE_MIN_SPLIT_TOKENS,
    ) -> None:
        super().__init__(kv_pool, req_to_token, sm_scale)
        k0 = kv_pool.k_buffers[0]
        if not k0.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            # CPU tensors only work under the Triton interpreter (the CPU tests use it that way).
            raise ValueError(f"TritonAttentionBackend needs the KV pool on a CUDA device, got {k0.device}")
        _, self.num_kv_heads, self.head_dim = k0.shape
        # MLA: one cache row per token, V a view of its first Dv (latent) columns; the decode partials are Dv wide.
        self.is_mla = isinstance(kv_pool, MLAKVPool)
        self.v_head_dim = kv_pool.v_buffers[0].shape[-1]
        if self.is_mla and num_q_heads is None:
            raise ValueError("an MLA pool needs TritonAttentionBackend(..., num_q_heads=<model heads>)")
        if num_q_heads is not None and (num_q_heads < 1 or num_q_heads % self.num_kv_heads):
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads ({self.num_kv_heads})")
        if min_split_tokens < 1:
            raise ValueError(f"min_split_tokens must be >= 1, got {min_split_tokens}")
        self.num_q_heads = num_q_heads
        self.min_split_tokens = min_split_tokens
        self.device = k0.device
        self.num_sms = num_sms_of(self.device)  # asked once: the split heuristic needs it every decode step
        self.metadata: _DecodeMetadata | _ExtendMetadata | None = None
        self.graph_state: _GraphState | None = None

    # ------------------------------------------------------------------ per-forward metadata

    def init_forward_metadata(self, batch: ForwardBatch) -> None:
        """Decode: split count from the batch size (no device sync) and the intermediate buffers. Extend: the
        longest extend, read from the device once here instead of once per layer."""
        if batch.mode is ForwardMode.DECODE:
            bs = batch.batch_size
            num_splits = self._num_splits(bs, None)
            mid_o = mid_lse = None
            if self.num_q_heads is not None:
                mid_o, mid_lse = decode_intermediate_buffers(
                    bs, self.num_q_heads, num_splits, self.v_head_dim, self.device
                )
            counters = decode_split_counters(bs, self._merge_groups(), self.device)  # one memset per forward
            self.metadata = _DecodeMetadata(num_splits, mid_o, mid_lse, counters)
        else:
            self.metadata = _ExtendMetadata(int(batch.extend_seq_lens.max()) if batch.batch_size else 0)

    def _num_splits(self, bs: int, max_context_len: int | None) -> int:
        """The decode split count of a batch of ``bs`` (capped by ``max_context_len`` when given): the dense
        policy, or MLA's (programs per head block of the query heads)."""
        if self.is_mla:
            return mla_num_splits(bs, self.num_q_heads, self.num_sms, max_context_len, self.min_split_tokens)
        return decode_num_splits(
            bs, self.num_kv_heads, self.num_sms, max_seq_len=max_context_len, min_split_tokens=self.min_split_tokens
        )

    def _merge_groups(self) -> int:
        """Merge tickets per request: one per KV head (dense), one per head block (MLA)."""
        return mla_head_blocks(self.num_q_heads) if self.is_mla else self.num_kv_heads

    # ------------------------------------------------------------------ the seam

    def store_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        store_kv_triton(self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id], loc, k, v)

    def forward_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        md = self.metadata
        if not isinstance(md, _ExtendMetadata):
            raise RuntimeError("init_forward_metadata was not called for this extend batch")
        return extend_attention_triton(
            q,
            self.kv_pool.k_buffers[layer_id],
            self.kv_pool.v_buffers[layer_id],
            self.req_to_token,
            batch.req_pool_indices,
            batch.seq_lens,
            batch.extend_seq_lens,
            batch.extend_start_loc,
            self.sm_scale,
            max_extend_len=md.max_extend_len,
        )

    def forward_decode(self, q: torch.Tensor, new_token: NewToken, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        md = self.metadata
        if not isinstance(md, _DecodeMetadata):
            raise RuntimeError("init_forward_metadata was not called for this decode batch")
        if md.mid_o is None:  # no num_q_heads at construction: the first layer sizes the buffers for all layers
            md.mid_o, md.mid_lse = decode_intermediate_buffers(
                q.shape[0], q.shape[1], md.num_splits, self.head_dim, q.device
            )
        return decode_attention_triton(
            q,
            self.kv_pool.k_buffers[layer_id],
            self.kv_pool.v_buffers[layer_id],
            self.req_to_token,
            batch.req_pool_indices,
            batch.seq_lens,
            self.sm_scale,
            num_splits=md.num_splits,
            mid_o=md.mid_o,
            mid_lse=md.mid_lse,
            split_counters=md.split_counters,
            new_token=new_token,
            min_split_tokens=self.min_split_tokens,
        )

    def mla_decode(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        """MLA decode over the latent cache (this step's rows already stored) with the forward's split count and
        buffers; the reference for a pool that is not an `MLAKVPool`."""
        if not self.is_mla:
            return super().mla_decode(q, layer_id, batch)
        md = self.metadata
        if not isinstance(md, _DecodeMetadata):
            raise RuntimeError("init_forward_metadata was not called for this decode batch")
        return mla_decode_triton(
            q, self.kv_pool.k_buffers[layer_id], self.req_to_token, batch.req_pool_indices, batch.seq_lens,
            self.sm_scale, self.v_head_dim, num_splits=md.num_splits, mid_o=md.mid_o, mid_lse=md.mid_lse,
            split_counters=md.split_counters, min_split_tokens=self.min_split_tokens,
        )

    def mla_extend(self, q: torch.Tensor, layer_id: int, batch: ForwardBatch) -> torch.Tensor:
        """MLA extend (causal over prefix + new tokens) on the latent cache; the reference for other pools."""
        if not self.is_mla:
            return super().mla_extend(q, layer_id, batch)
        md = self.metadata
        if not isinstance(md, _ExtendMetadata):
            raise RuntimeError("init_forward_metadata was not called for this extend batch")
        return mla_extend_triton(
            q, self.kv_pool.k_buffers[layer_id], self.req_to_token, batch.req_pool_indices, batch.seq_lens,
            batch.extend_seq_lens, batch.extend_start_loc, self.sm_scale, self.v_head_dim,
            max_extend_len=md.max_extend_len,
        )

    # ------------------------------------------------------------------ CUDA graphs (decode)

    def _graph_num_splits(self, bs: int, max_context_len: int) -> int:
        # Depends on bs (and the fixed context bound) only, never on this step's lengths: the grid is baked into
        # the graph. Splits beyond ceil(max_context_len / min_split_tokens) could never be used, so none is made.
        return self._num_splits(bs, max_context_len)

    def init_cuda_graph_state(self, max_bs: int, max_context_len: int) -> None:
        """Allocate the decode intermediate buffers every captured batch size (1..max_bs) will use."""
        if self.num_q_heads is None:
            raise ValueError("CUDA graphs need TritonAttentionBackend(..., num_q_heads=<model heads>)")
        if max_bs < 1 or max_context_len < 1:
            raise ValueError(f"max_bs and max_context_len must be >= 1, got {max_bs} / {max_context_len}")
        # Small batches take many splits, large ones few: size for the largest bs * splits(bs) over all sizes.
        rows = max(bs * self._graph_num_splits(bs, max_context_len) for bs in range(1, max_bs + 1))
        self.graph_state = _GraphState(
            max_bs=max_bs,
            max_context_len=max_context_len,
            mid_o_flat=torch.empty(rows * self.num_q_heads * self.v_head_dim, dtype=torch.float32, device=self.device),
            mid_lse_flat=torch.empty(rows * self.num_q_heads, dtype=torch.float32, device=self.device),
            split_counters=decode_split_counters(max_bs, self._merge_groups(), self.device),
        )

    def _graph_metadata(self, batch: ForwardBatch) -> _DecodeMetadata:
        gs = self.graph_state
        if gs is None:
            raise RuntimeError("init_cuda_graph_state must be called before capturing or replaying")
        if batch.mode is not ForwardMode.DECODE:
            raise ValueError("only decode batches run as CUDA graphs")
        bs = batch.batch_size
        if not 1 <= bs <= gs.max_bs:
            raise ValueError(f"graph batch size {bs} is outside [1, {gs.max_bs}]")
        splits = self._graph_num_splits(bs, gs.max_context_len)
        hq, d = self.num_q_heads, self.v_head_dim
        mid_o = gs.mid_o_flat[: bs * hq * splits * d].view(bs, hq, splits, d)
        mid_lse = gs.mid_lse_flat[: bs * hq * splits].view(bs, hq, splits)
        return _DecodeMetadata(splits, mid_o, mid_lse, gs.split_counters)

    def init_forward_metadata_capture(self, batch: ForwardBatch) -> None:
        """Before capturing the decode graph of ``batch.batch_size``: fixed split count and fixed buffer views."""
        self.metadata = self._graph_metadata(batch)

    def init_forward_metadata_replay(self, batch: ForwardBatch) -> None:
        """Before replaying: the same (host-side) metadata as at capture. Nothing is launched or synced; the kernels
        read the new lengths from the static tensors the graph runner refilled."""
        self.metadata = self._graph_metadata(batch)
