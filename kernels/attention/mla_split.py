"""How MLA decode splits the work: head blocks, the split count, and the buffers the splits need.

A program of ``mla_decode_kernel`` takes ``block_h`` heads of one request over one range of positions ("split").
Splits exist to fill the GPU when the batch is small, as in dense decode (decode_split.py), but they cost more
here: each split of a request writes and the merge reads back ``H x Dv`` float32 partials (256 KiB at
DeepSeek-V3's 128 heads x 512), against ``positions x 1152`` bytes of cache it saves reading on one SM. Dense
decode's 16 programs per SM would make that traffic larger than the cache itself at batch 64 (33 splits of
128 positions), so MLA aims at fewer programs (``MLA_PROGRAMS_PER_SM``). Like dense decode the count depends on
the batch size only (CUDA graphs), each request using only the splits its length warrants.
"""

from __future__ import annotations

import math

import torch

from .decode_split import DECODE_MAX_SPLITS, DECODE_MIN_SPLIT_TOKENS, DEFAULT_NUM_SMS

__all__ = [
    "MLA_BLOCK_H",
    "MLA_MIN_SPLIT_TOKENS",
    "MLA_PROGRAMS_PER_SM",
    "mla_head_blocks",
    "mla_intermediate_buffers",
    "mla_num_splits",
    "mla_split_counters",
]

# Heads per decode program: the M of its matmuls (tl.dot's minimum is 16; fewer heads are padded with zero rows).
# 16 keeps the [16, 512] float32 accumulator at 64 registers a thread over 4 warps; 32 halves the L2 reads of the
# cache at 128 heads for twice the registers (a sweep choice: `python -m xinf_sglang.runtime.bench.mla_decode`).
MLA_BLOCK_H = 16
# Programs per SM the split count aims for (dense decode: 16). Not yet measured on a GPU: the benchmark sweeps it.
MLA_PROGRAMS_PER_SM = 4
# Shortest split worth its merge; requests shorter than this use one split.
MLA_MIN_SPLIT_TOKENS = DECODE_MIN_SPLIT_TOKENS


def mla_head_blocks(num_heads: int, block_h: int = MLA_BLOCK_H) -> int:
    """Programs per (request, split): ``ceil(num_heads / block_h)``."""
    return -(-num_heads // block_h)


def mla_num_splits(
    batch_size: int,
    num_heads: int,
    num_sms: int = DEFAULT_NUM_SMS,
    max_seq_len: int | None = None,
    min_split_tokens: int = MLA_MIN_SPLIT_TOKENS,
    block_h: int = MLA_BLOCK_H,
    programs_per_sm: int = MLA_PROGRAMS_PER_SM,
) -> int:
    """Splits per (request, head block), in ``[1, DECODE_MAX_SPLITS]``: about ``programs_per_sm * num_sms``
    programs in all. ``max_seq_len`` (a host int, when known without a device sync) caps the count at
    ``ceil(max_seq_len / min_split_tokens)``; leave it None for CUDA graphs (then it depends on the batch only)."""
    if min(batch_size, num_heads, num_sms, min_split_tokens, block_h, programs_per_sm) < 1:
        raise ValueError("batch_size, num_heads, num_sms, min_split_tokens, block_h, programs_per_sm must be >= 1")
    splits = math.ceil(programs_per_sm * num_sms / (batch_size * mla_head_blocks(num_heads, block_h)))
    if max_seq_len is not None:
        splits = min(splits, math.ceil(max(max_seq_len, 1) / min_split_tokens))
    return max(1, min(splits, DECODE_MAX_SPLITS))


def mla_intermediate_buffers(
    batch_size: int, num_heads: int, num_splits: int, v_head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate ``(mid_o [B, H, S, Dv], mid_lse [B, H, S])`` float32 for ``mla_decode_triton``."""
    mid_o = torch.empty((batch_size, num_heads, num_splits, v_head_dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((batch_size, num_heads, num_splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse


def mla_split_counters(
    batch_size: int, num_heads: int, device: torch.device, block_h: int = MLA_BLOCK_H
) -> torch.Tensor:
    """Zeroed int32 ``[B * head blocks]`` merge tickets for ``mla_decode_triton``; every launch leaves them zeroed,
    so one buffer serves every layer and step (and a CUDA graph)."""
    return torch.zeros(batch_size * mla_head_blocks(num_heads, block_h), dtype=torch.int32, device=device)
