"""The fused-MoE experts at decode sizes: two weight-streaming GEMV launches, no sort, no padding.

At a decode step of a few tokens every routed (token, k) pair reads one expert's weights once, so the layer is
bound by those bytes. The grouped GEMM (fused.py) pays five launches for it (sort, GEMM, SiLU-and-mul, GEMM, top-k
sum) and pads each pair to a 16-row ``tl.dot`` tile; at batch 1 the launches and their drains were a large share of
a Qwen3-30B-A3B step (48 sparse layers). Here, up to ``MOE_GEMV_MAX_TOKENS`` tokens:

1. ``_gate_up_kernel``, program (pair, column tile): ``x[token]`` against the gate rows and the up rows of the
   pair's expert (``w13[e, cols]`` and ``w13[e, I + cols]``), both rounded to x's dtype as the grouped path stores
   them, then SiLU(gate) * up (``kernels.activation.silu_mul``, the SiLU-and-mul kernel's roundings) -> ``act
   [T*K, I]`` in x's dtype: the activation is fused, no ``[T*K, 2I]`` buffer;
2. ``_down_kernel``, program (token x column tile, k): ``act[pair] @ w2[e, cols]^T`` times the routing weight, a
   float32 partial of the token's output; the K partials of a token are summed in k order by the tile's last
   program (``split_k_store``, kernels/quant/splitk.py), rounded once: the top-k sum is fused, deterministic.

Both are CUDA-core GEMVs over weights whose reduction dim is contiguous (``[2I, H]`` / ``[H, I]`` rows): each
thread loads 16 bytes along K, the ``[BLOCK_N, BLOCK_K]`` products accumulate elementwise in float32 and are
summed across threads once after the loop (as the FP8 GEMV, kernels/quant/fp8.py). Numerics equal the grouped
path's: gate/up rounded to x's dtype, the down projection and the weighted top-k sum in float32, rounded once.
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..pdl import pdl_kwargs
from ..quant.splitk import split_k_buffers

MOE_GEMV_MAX_TOKENS = 4
"""Tokens up to which ``fused_experts_triton`` takes these GEMVs: at more, pairs start to share experts and the
grouped GEMM reads each routed expert once for all its rows."""

GEMV_CONFIG = {"BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 256, "num_warps": 4}
"""Launch shape of both GEMVs: 16 output rows x 256 K values per step (a thread loads 8 bf16 values at once)."""

if triton is not None:
    from ..activation import silu_mul
    from ..pdl import pdl_wait
    from ..quant.splitk import split_k_store

    @triton.jit
    def _row_dot(x_ptr, w_ptr, K, sw_n, n_ok, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
        """float32 ``[BLOCK_N]``: rows ``w_ptr + n * sw_n`` (K contiguous) dotted with the vector at ``x_ptr``."""
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + tl.arange(0, BLOCK_N).to(tl.int64)[:, None] * sw_n + offs_k[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptr + k0 + offs_k)
                w = tl.load(w_ptrs + k0, mask=n_ok[:, None], other=0.0)
            else:
                k_ok = offs_k < K - k0
                x = tl.load(x_ptr + k0 + offs_k, mask=k_ok, other=0.0)
                w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        return tl.sum(acc, axis=1)

    @triton.jit
    def _gate_up_kernel(X, W13, IDS, ACT, I, H, TOPK, sx_t, sw_e, sw_n, EVEN_K: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
        # ACT[pair, cols] = silu(x[token] @ gate[e, cols]^T) * (x[token] @ up[e, cols]^T), pair = token * TOPK + k.
        pdl_wait(USE_PDL)
        pair = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols < I
        expert = tl.load(IDS + pair).to(tl.int64)
        x_ptr = X + (pair // TOPK).to(tl.int64) * sx_t
        w_ptr = W13 + expert * sw_e + (tl.program_id(1) * BLOCK_N).to(tl.int64) * sw_n  # rows past I: masked
        dtype = ACT.dtype.element_ty
        gate = _row_dot(x_ptr, w_ptr, H, sw_n, n_ok, EVEN_K, BLOCK_N, BLOCK_K).to(dtype).to(tl.float32)
        up = _row_dot(x_ptr, w_ptr + I * sw_n, H, sw_n, n_ok, EVEN_K, BLOCK_N, BLOCK_K).to(dtype).to(tl.float32)
        tl.store(ACT + pair.to(tl.int64) * I + cols, silu_mul(gate, up, dtype), mask=n_ok)

    @triton.jit
    def _down_kernel(ACT, W2, IDS, TOPK_W, OUT, PARTS, LOCKS, T, I, H, TOPK, sw_e, sw_n, EVEN_K: tl.constexpr,
                     SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
        # Program (token * tiles + tile, k): w[token, k] * act[pair] @ w2[e, cols]^T, summed over k by split_k_store.
        pdl_wait(USE_PDL)
        tiles = tl.cdiv(H, BLOCK_N)
        token = tl.program_id(0) // tiles
        n0 = (tl.program_id(0) % tiles) * BLOCK_N
        pair = token * TOPK + tl.program_id(1)
        cols = n0 + tl.arange(0, BLOCK_N)
        n_ok = cols < H
        expert = tl.load(IDS + pair).to(tl.int64)
        w_ptr = W2 + expert * sw_e + n0.to(tl.int64) * sw_n
        part = _row_dot(ACT + pair.to(tl.int64) * I, w_ptr, I, sw_n, n_ok, EVEN_K, BLOCK_N, BLOCK_K)
        part = (part * tl.load(TOPK_W + pair))[None, :]
        rows = tl.zeros([1, 1], dtype=tl.int32) + token
        split_k_store(part, OUT, PARTS, LOCKS, OUT, T, H, rows, cols[None, :], H, 1, SPLIT, False, False)


def fused_experts_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, config: dict[str, int] | None = None) -> torch.Tensor:
    """The decode-sized fused experts (module docstring): ``fused_experts_ref``'s contract for ``x [T, H]`` with
    contiguous rows, ``w13 [E, 2I, H]`` / ``w2 [E, H, I]`` with contiguous last dims (checked by the caller),
    ``T <= MOE_GEMV_MAX_TOKENS``. ``config`` overrides ``GEMV_CONFIG``."""
    cfg = config or GEMV_CONFIG
    bn, bk, warps = cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"], cfg["num_warps"]
    t, topk = topk_ids.shape
    hidden, inter = x.shape[1], w2.shape[2]
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    act = torch.empty((t * topk, inter), dtype=x.dtype, device=x.device)
    pdl = pdl_kwargs(x.device)
    _gate_up_kernel[(t * topk, triton.cdiv(inter, bn))](
        x, w13, ids, act, inter, hidden, topk, x.stride(0), w13.stride(0), w13.stride(1),
        EVEN_K=hidden % bk == 0, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **pdl,
    )
    out = torch.empty((t, hidden), dtype=x.dtype, device=x.device)
    tiles = t * triton.cdiv(hidden, bn)
    parts, locks = split_k_buffers(out, topk, tiles)
    _down_kernel[(tiles, topk)](
        act, w2, ids, weights, out, parts, locks, t, inter, hidden, topk, w2.stride(0), w2.stride(1),
        EVEN_K=inter % bk == 0, SPLIT=topk, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **pdl,
    )
    return out
