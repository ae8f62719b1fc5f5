"""Mixture-of-experts kernels: the fused experts (routing already done) and what they are built from.

``fused_experts`` dispatches like every op of kernels/: for CUDA tensors when triton is installed, the decode GEMVs
(``decode.py``, up to ``MOE_GEMV_MAX_TOKENS`` tokens) or the Triton grouped GEMMs (``fused.py``);
``fused_experts_ref`` (``reference.py``, which visits only the experts that received tokens) otherwise, which is
also the CPU serving path. ``moe_align_block_size`` (``align.py``) sorts the routed pairs by
expert; ``get_moe_config`` (``config.py``) picks the tuned launch shape for a batch size; ``fused_topk``
(``topk.py``) is the greedy routing before them, in one launch on CUDA.
"""

from __future__ import annotations

import torch

from .align import (
    max_padded_rows,
    moe_align_block_size,
    moe_align_block_size_ref,
    moe_align_block_size_triton,
)
from .config import default_config, get_moe_config
from .fused import fused_experts_triton, moe_workspace_bytes, triton
from .reference import fused_experts_ref
from .topk import fused_topk, fused_topk_ref, fused_topk_triton


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """Dispatching fused MoE experts: ``x [T, H]``, ``w13 [E, 2N, H]`` (gate rows, then up rows), ``w2 [E, H, N]``,
    ``topk_weights [T, K]`` float32, ``topk_ids [T, K]`` int32/int64 -> ``[T, H]`` in x's dtype, the routing-weighted
    sum of the chosen experts' SwiGLU MLPs (contract of ``fused_experts_ref``). Triton for CUDA tensors (when triton
    is installed), the reference otherwise."""
    if x.is_cuda and triton is not None:
        return fused_experts_triton(x, w13, w2, topk_weights, topk_ids)
    return fused_experts_ref(x, w13, w2, topk_weights, topk_ids)


__all__ = [
    "default_config",
    "fused_experts",
    "fused_experts_ref",
    "fused_experts_triton",
    "fused_topk",
    "fused_topk_ref",
    "fused_topk_triton",
    "get_moe_config",
    "max_padded_rows",
    "moe_align_block_size",
    "moe_align_block_size_ref",
    "moe_align_block_size_triton",
    "moe_workspace_bytes",
]
