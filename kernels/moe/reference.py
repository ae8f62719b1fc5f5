"""The torch reference of the fused MoE experts, which is also the CPU serving path.

Only the experts that received tokens are visited and only their weights are read: the flattened routing is
sorted once, each expert's rows are gathered, pushed through its gate/up and down projections as two small GEMMs and
scaled by their routing weights into one float32 row per (token, k); each token's K rows are then summed. At decode
on the CPU that is what makes a MoE model cost its active parameters, not its total ones.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..activation import silu_and_mul, silu_and_mul_ref
from ..linear import linear


def check_moe_args(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor) -> None:
    """Raise ValueError unless the shapes and dtypes fit the ``fused_experts`` contract."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"x must be [T, H], w13 [E, 2N, H], w2 [E, H, N]; got {tuple(x.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    t, h = x.shape
    e, two_n, h13 = w13.shape
    if two_n % 2 or h13 != h or tuple(w2.shape) != (e, h, two_n // 2):
        raise ValueError(f"w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit hidden {h}")
    if x.dtype != w13.dtype or x.dtype != w2.dtype:
        raise ValueError(f"x, w13 and w2 must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} / topk_ids {tuple(topk_ids.shape)} must be "
                         f"[{t}, K]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k topk_weights[t, k] * w2[e] @ (silu(w13[e, :N] @ x[t]) * (w13[e, N:] @ x[t]))`` with
    ``e = topk_ids[t, k]``; ``x [T, H]``, ``w13 [E, 2N, H]`` (gate rows then up rows), ``w2 [E, H, N]``,
    ``topk_weights [T, K]`` float32, ``topk_ids [T, K]`` int32/int64. Each expert's projections run in x's dtype
    (as the model's dense MLP does); the weighted sum over k is accumulated in float32 and rounded once to x's
    dtype. On CPU tensors the projections and the activation use the CPU kernels of kernels/ (threaded skinny GEMM
    for few rows, C++ SiLU-and-mul for float32); elsewhere plain torch, the ground truth for the Triton path."""
    check_moe_args(x, w13, w2, topk_weights, topk_ids)
    t, k = topk_ids.shape
    if t == 0:
        return x.new_zeros((0, x.shape[1]))
    on_cpu = x.device.type == "cpu"
    project = linear if on_cpu else F.linear
    act = silu_and_mul if on_cpu else silu_and_mul_ref
    flat = topk_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # one host sync: the loop needs the sizes
    pairs_by_expert = order.split(counts)
    weights = topk_weights.reshape(-1).to(torch.float32)
    # One float32 row per (token, k), each written once, then summed over k: index_copy_ of distinct rows is
    # cheap where index_add_ into the token rows measured ~1 ms for a single row on the CPU (torch 2.13).
    per_pair = torch.empty(t * k, x.shape[1], dtype=torch.float32, device=x.device)
    for e, pairs in enumerate(pairs_by_expert):
        if pairs.numel() == 0:  # an expert without tokens: its weights are never touched
            continue
        hidden = act(project(x.index_select(0, pairs // k), w13[e]))
        y = project(hidden, w2[e]).to(torch.float32) * weights.index_select(0, pairs)[:, None]
        per_pair.index_copy_(0, pairs, y)
    return per_pair.view(t, k, -1).sum(dim=1).to(x.dtype)
