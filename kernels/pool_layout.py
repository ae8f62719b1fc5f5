"""The token-pool layout the attention kernels share, and the one check of it that their launchers run.

``q [N, Hq, D]``; ``k_buffer`` and ``v_buffer`` ``[num_slots, Hkv, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA).
"""

from __future__ import annotations

import torch


def check_attention_shapes(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> tuple[int, int, int]:
    """Return ``(N, Hq, Hkv)`` after checking the shared layout; raise ``ValueError`` saying what does not fit."""
    n, n_q, d = q.shape
    n_kv = k_buffer.shape[1]
    if n_kv < 1 or n_q % n_kv:
        raise ValueError(f"query heads ({n_q}) must be a multiple of KV heads ({n_kv})")
    if k_buffer.shape[2] != d or v_buffer.shape != k_buffer.shape:
        raise ValueError(f"k/v buffers {tuple(k_buffer.shape)} / {tuple(v_buffer.shape)} do not match q head_dim {d}")
    return n, n_q, n_kv
