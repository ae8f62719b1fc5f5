"""The fused-MoE experts on the GPU: one grouped GEMM kernel, launched twice (the SGLang / vLLM algorithm).

``moe_align_block_size`` sorts the (token, k) pairs by expert and pads each expert's group to ``BLOCK_SIZE_M`` rows,
so every row block of the GEMM belongs to one expert and multiplies by that expert's weight matrix only. Pass 1
reads the tokens' rows of x (pair ``p`` reads row ``p // K``) against ``w13[e]`` into ``[T*K, 2N]``; SiLU-and-mul
(``kernels.silu_and_mul``) makes ``[T*K, N]``; pass 2 multiplies by ``w2[e]`` with the routing weight applied in the
epilogue and writes float32 ``[T*K, H]``; a small kernel sums the K copies of each token in float32 and rounds once.
Padding rows carry the sentinel ``T*K``: their loads are masked and nothing is stored for them. The grid covers the
fixed-size sorted buffer (CUDA-graph friendly); programs past the padded total exit at once.

At decode the kernel is memory bound: a batch of one token reads K experts' weights once, which is the roofline.
This path is five launches (sort, GEMM, SiLU-and-mul, GEMM, sum), the last four with PDL on Hopper; decode-sized
calls (a few tokens) take decode.py's two GEMVs instead.
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..activation import silu_and_mul
from ..pdl import pdl_kwargs
from ..quant.splitk import sum_parts
from .align import (
    TRITON_MAX_PAIRS,
    moe_align_block_size_ref,
    moe_align_block_size_triton,
)
from .config import current_device_name, get_moe_config
from .decode import MOE_GEMV_MAX_TOKENS, fused_experts_gemv
from .reference import check_moe_args

if triton is not None:
    from ..pdl import pdl_wait


if triton is not None:

    # The routed row count and pair count change with every batch: not specialised on (their divisibility would
    # otherwise compile new variants as the batch size moves; they are only compared, never used in addresses).
    _jit_batch_free = triton.jit(do_not_specialize=["num_rows", "num_pairs"])

    @_jit_batch_free
    def _moe_gemm_kernel(
        A, B, C, TOPK_W, SORTED_IDS, EXPERT_IDS, NUM_POST,
        num_rows, num_pairs, N, K,
        sa_m, sb_e, sb_n, sb_k, sc_m,
        A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        # C[p, :] = A[p // A_ROW_DIV, :] @ B[e(p)]^T (* TOPK_W[p]) for the pairs p listed in SORTED_IDS.
        pdl_wait(USE_PDL)
        pid = tl.program_id(0)
        blocks_m = tl.cdiv(num_rows, BLOCK_M)
        blocks_n = tl.cdiv(N, BLOCK_N)
        # Grouped order: GROUP_M row blocks sweep the column blocks together, so their weight tiles stay in L2.
        per_group = GROUP_M * blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        if pid_m * BLOCK_M >= tl.load(NUM_POST):
            return  # past the padded total: only sentinels from here on
        expert = tl.load(EXPERT_IDS + pid_m).to(tl.int64)
        if expert < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(SORTED_IDS + offs_m, mask=offs_m < num_rows, other=num_pairs).to(tl.int64)
        row_ok = pair < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptr = A + (pair // A_ROW_DIV)[:, None] * sa_m + offs_k[None, :]
        b_ptr = B + expert * sb_e + offs_n.to(tl.int64)[None, :] * sb_n + offs_k[:, None] * sb_k
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptr, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptr, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < K - k0
                a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptr += BLOCK_K
            b_ptr += BLOCK_K * sb_k
        if MUL_WEIGHT:
            acc *= tl.load(TOPK_W + pair, mask=row_ok, other=0.0)[:, None]
        c_ptr = C + pair[:, None] * sc_m + offs_n[None, :]
        tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _topk_sum(src: torch.Tensor, tokens: int, topk: int, dtype: torch.dtype) -> torch.Tensor:
    """``src [T*K, H]`` float32 -> ``[T, H]`` in ``dtype``: one launch instead of torch's sum and cast."""
    hidden = src.shape[1]
    out = torch.empty((tokens, hidden), dtype=dtype, device=src.device)
    sum_parts(src, out, topk, topk * hidden, hidden)
    return out


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, routing: tuple, topk_weights, a_row_div: int,
                  config: dict[str, int]) -> None:
    """``c[p] = a[p // a_row_div] @ w[e(p)]^T`` (times ``topk_weights[p]`` if given) for the routed pairs."""
    sorted_ids, expert_ids, num_post = routing
    n, k = w.shape[1], w.shape[2]
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    grid = (triton.cdiv(sorted_ids.numel(), bm) * triton.cdiv(n, bn),)
    _moe_gemm_kernel[grid](
        a, w, c, topk_weights if topk_weights is not None else c, sorted_ids, expert_ids, num_post,
        sorted_ids.numel(), c.shape[0], n, k,
        a.stride(0), w.stride(0), w.stride(1), w.stride(2), c.stride(0),
        A_ROW_DIV=a_row_div, MUL_WEIGHT=topk_weights is not None, EVEN_K=k % bk == 0,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config["GROUP_SIZE_M"],
        num_warps=config["num_warps"], num_stages=config["num_stages"], **pdl_kwargs(a.device),
    )


def fused_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, *, config: dict[str, int] | None = None) -> torch.Tensor:
    """Triton launcher with the contract of ``fused_experts_ref``: up to ``MOE_GEMV_MAX_TOKENS`` tokens the two
    decode GEMVs (decode.py), else the grouped GEMMs. ``config`` overrides ``get_moe_config`` and forces the
    grouped GEMMs (the tuner passes each candidate). The weights need a contiguous last dim (never copied here)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use fused_experts_ref")
    check_moe_args(x, w13, w2, topk_weights, topk_ids)
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("w13 and w2 must have a contiguous last dim")
    t, k = topk_ids.shape
    num_experts, two_n, hidden = w13.shape
    if t == 0:
        return x.new_empty((0, hidden))
    x = x if x.stride(-1) == 1 else x.contiguous()
    if config is None and t <= MOE_GEMV_MAX_TOKENS:  # decode: two GEMVs (decode.py), no sort and no padding
        return fused_experts_gemv(x, w13, w2, topk_weights, topk_ids)
    cfg = config or get_moe_config(num_experts, two_n // 2, t, x.dtype, current_device_name(x.device))
    # At decode sizes the one-launch Triton sort; prefill-sized routings take the torch one (align.py says why).
    align = moe_align_block_size_triton if t * k <= TRITON_MAX_PAIRS else moe_align_block_size_ref
    routing = align(topk_ids, cfg["BLOCK_SIZE_M"], num_experts)
    gate_up = torch.empty((t * k, two_n), dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, routing, None, k, cfg)
    hidden_act = silu_and_mul(gate_up)
    out = torch.empty((t * k, hidden), dtype=torch.float32, device=x.device)
    _grouped_gemm(hidden_act, w2, out, routing, topk_weights.reshape(-1).to(torch.float32).contiguous(), 1, cfg)
    return _topk_sum(out, t, k, x.dtype)


def moe_workspace_bytes(num_tokens: int, topk: int, intermediate: int, hidden: int, dtype: torch.dtype,
                        num_experts: int, block_m: int = 128) -> int:
    """Peak temporary memory of one ``fused_experts_triton`` call (for the memory plan): the gate/up output and
    the activation in ``dtype``, the float32 per-pair output and its sum, and the routing buffers."""
    pairs = num_tokens * topk
    size = torch.tensor([], dtype=dtype).element_size()
    rows = pairs + min(num_experts, pairs) * (block_m - 1)
    routing = 4 * (rows + rows // block_m + 2) + 8 * 4 * pairs  # int32 outputs, int64 sort temporaries
    return pairs * 3 * intermediate * size + (pairs + num_tokens) * hidden * 4 + routing
