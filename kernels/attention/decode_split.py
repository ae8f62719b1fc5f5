"""How decode attention splits the work: the split count, the launch shape, and the buffers the splits need.

Why split: at decode the batch gives only ``B * Hkv`` programs (8 for Llama-3-8B at batch 1, on a GPU with 132
SMs), and each would stream the whole history alone. Splitting the positions makes enough programs to keep every
SM reading memory. ``decode_num_splits`` picks the count from the batch size; each request then uses only as many
of those splits as its own length warrants (at least ``min_split_tokens`` positions per split), the others exit at
once, so the grid does not depend on the sequence lengths (what CUDA graphs need).

Each split writes a partial output and its log-sum-exp (``decode_intermediate_buffers``) and takes a ticket from a
per-(request, KV head) counter (``decode_split_counters``) before the last one merges them
(decode_attention_kernel.py). Callers that launch many times (every layer, CUDA graphs) allocate them once.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DECODE_MAX_SPLITS",
    "DECODE_MIN_SPLIT_TOKENS",
    "DECODE_PROGRAMS_PER_SM",
    "DECODE_SMALL_BATCH",
    "DEFAULT_NUM_SMS",
    "decode_intermediate_buffers",
    "decode_launch_shape",
    "decode_num_splits",
    "decode_split_counters",
    "num_sms_of",
]

# Programs per SM the split heuristic aims for. Several waves of short programs beat one wave of long ones: with
# histories of mixed lengths the longest request's program otherwise sets the step time alone (on an H100 with
# 78 requests of 1..6000 tokens, 4 splits per request instead of 1 took a step from 413 to 375 us;
# `sglite bench kernels --sweep attention`, docs/perf-history.md).
DECODE_PROGRAMS_PER_SM = 16
# A split shorter than this costs more in its own merge (partials written, a ticket, the last program reading
# them back) than it saves; requests shorter than this use one split. 512 was tried (one split for the 128-384
# token histories of benchmark (a)): faster in a chain of decode layers at a fixed 384-token history, but
# batch-1 decode of Llama-3.1-8B on an H200 went from 222.2 to 219.8 tok/s, and a 1024-token history at batch 1
# from 13.4 to 18.5 us (docs/perf-history.md).
DECODE_MIN_SPLIT_TOKENS = 128
# Upper bound on splits: bounds the merge loop and the intermediate buffers.
DECODE_MAX_SPLITS = 64
# Batches up to this size are latency-bound (the kernel sits on each layer's critical path with little to read);
# larger ones are bandwidth-bound. The launch shape differs (decode_launch_shape).
DECODE_SMALL_BATCH = 8
# H100 and H200 SXM; used when the device cannot be asked (the CPU interpreter).
DEFAULT_NUM_SMS = 132


def decode_num_splits(
    batch_size: int,
    num_kv_heads: int,
    num_sms: int = DEFAULT_NUM_SMS,
    max_seq_len: int | None = None,
    min_split_tokens: int = DECODE_MIN_SPLIT_TOKENS,
    max_splits: int = DECODE_MAX_SPLITS,
) -> int:
    """How many KV splits the kernel launches per (request, KV head); at least 1, at most ``max_splits``.

    Aims at ``DECODE_PROGRAMS_PER_SM * num_sms`` programs in all: a small batch gets many splits, a batch that
    already fills the GPU gets one. With ``max_seq_len`` (a host int, when known without a device sync) the count
    is also capped at ``ceil(max_seq_len / min_split_tokens)`` so no program is launched only to exit. Leave it None
    for CUDA graphs: the count then depends on the batch size only.
    """
    if batch_size < 1 or num_kv_heads < 1 or num_sms < 1 or min_split_tokens < 1 or max_splits < 1:
        raise ValueError("batch_size, num_kv_heads, num_sms, min_split_tokens and max_splits must be >= 1")
    splits = math.ceil(DECODE_PROGRAMS_PER_SM * num_sms / (batch_size * num_kv_heads))
    if max_seq_len is not None:
        splits = min(splits, math.ceil(max(max_seq_len, 1) / min_split_tokens))
    return max(1, min(splits, max_splits))


def decode_launch_shape(batch_size: int) -> tuple[int, int]:
    """``(num_warps, num_stages)`` of the decode kernel for a batch of ``batch_size`` rows.

    Measured on an H200 (docs/perf-history.md), end to end and in the layer chain (``sglite bench kernels --sweep
    chain``):
    - At batch 1 a handful of programs is on each layer's critical path, and 8 warps (more loads in flight per
      program) were faster: Llama-3.1-8B decode 223.4-223.8 tok/s against 222.1-222.9 with 4.
    - At batch 8, 4 warps were faster end to end: 1666-1672 tok/s against 1618-1619 with 8.
    - At batch 32-128, with 1-6000-token histories, the kernel is bandwidth-bound alone. There 4 warps with a 2-deep
      pipeline were 4-6% faster than 3 stages, and 8 warps were 3-5% slower.
    """
    if batch_size == 1:
        return 8, 3
    return (4, 3) if batch_size <= DECODE_SMALL_BATCH else (4, 2)


def num_sms_of(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; ``DEFAULT_NUM_SMS`` for anything else."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def decode_intermediate_buffers(
    batch_size: int, num_q_heads: int, num_splits: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate ``(mid_o [B, Hq, S, D], mid_lse [B, Hq, S])`` float32 for ``decode_attention_triton``."""
    mid_o = torch.empty((batch_size, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((batch_size, num_q_heads, num_splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse


def decode_split_counters(batch_size: int, num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 ``[B * Hkv]`` ticket counters for ``decode_attention_triton``; every launch leaves them zeroed,
    so one buffer serves every layer and step (and a CUDA graph)."""
    return torch.zeros(batch_size * num_kv_heads, dtype=torch.int32, device=device)
