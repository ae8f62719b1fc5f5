"""``fused_topk``: greedy top-k routing of a mixture of experts in one launch (scores, choice, top-k, weights).

``fused_topk_ref`` is the torch definition (HF's): float32 scores (softmax over the experts, or a sigmoid per
expert), the choice ``scores + correction_bias``, its ``top_k`` largest (descending), the bare scores of the chosen
experts as weights, renormalised to sum to 1 (``renormalize``) and multiplied by ``scaling``. It takes an optional
``keep`` that masks the choice first (the grouped methods of DeepSeek V2 / V3, which the router builds), and is the
CPU path. At decode on CUDA those torch ops are ~8 launches per layer (float cast, softmax, topk's two kernels,
gather, sum, divide, int cast): 0.95 ms of a 4.8 ms Qwen3-30B-A3B batch-1 step on an H100 (48 layers, 2026-12-07),
more than the routed experts' own GEMMs at that size. ``_topk_kernel`` does one token row per program: the scores in
registers, ``top_k`` rounds of argmax (the first index of the maximum, as an equal-valued ``torch.topk`` may order
either way), the weights normalised in registers and stored once. Its exponentials are Triton's, so weights match
the reference to float32 rounding (not bit for bit); the ids are the same wherever no two scores tie.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..pdl import pdl_kwargs

SCORINGS = ("softmax", "sigmoid")
# The kernel keeps a row of scores in registers: up to this many experts (DeepSeek-V3 has 256).
TRITON_MAX_EXPERTS = 1024

if triton is not None:
    from ..pdl import pdl_wait

    @triton.jit
    def _topk_kernel(L, BIAS, W, I, E, sl, sw, si, scaling,
                     TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SOFTMAX: tl.constexpr,
                     HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_wait(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        ok = e < E
        x = tl.load(L + row * sl + e, mask=ok, other=float("-inf")).to(tl.float32)
        if SOFTMAX:
            p = tl.where(ok, tl.exp(x - tl.max(x, axis=0)), 0.0)
            score = p / tl.sum(p, axis=0)
        else:
            score = 1.0 / (1.0 + tl.exp(-x))
        choice = score
        if HAS_BIAS:
            choice += tl.load(BIAS + e, mask=ok, other=0.0).to(tl.float32)
        choice = tl.where(ok, choice, float("-inf"))
        kk = tl.arange(0, BLOCK_K)
        weights = tl.zeros([BLOCK_K], dtype=tl.float32)
        ids = tl.zeros([BLOCK_K], dtype=tl.int32)
        for k in tl.static_range(TOP_K):
            best = tl.argmax(choice, axis=0)
            hit = e == best
            weights = tl.where(kk == k, tl.sum(tl.where(hit, score, 0.0), axis=0), weights)
            ids = tl.where(kk == k, best.to(tl.int32), ids)
            choice = tl.where(hit, float("-inf"), choice)
        if RENORMALIZE:
            weights = weights / (tl.sum(weights, axis=0) + 1e-20)
        weights = weights * scaling
        tl.store(W + row * sw + kk, weights, mask=kk < TOP_K)
        tl.store(I + row * si + kk, ids, mask=kk < TOP_K)


def fused_topk_ref(logits: torch.Tensor, top_k: int, scoring: str = "softmax",
                   correction_bias: torch.Tensor | None = None, renormalize: bool = False, scaling: float = 1.0,
                   keep: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights float32 [T, top_k], ids int32 [T, top_k])`` from router ``logits [T, E]`` (module docstring);
    ``keep`` masks the choice before the top-k (grouped routing)."""
    scores = torch.softmax(logits.float(), dim=-1) if scoring == "softmax" else logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if keep is not None:
        choice = keep(choice)
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling != 1.0:
        weights = weights * scaling
    return weights, ids.to(torch.int32)


def fused_topk_triton(logits: torch.Tensor, top_k: int, scoring: str = "softmax",
                      correction_bias: torch.Tensor | None = None, renormalize: bool = False,
                      scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``_topk_kernel`` with the contract of ``fused_topk_ref`` (no ``keep``): one program per token row."""
    if triton is None:
        raise RuntimeError("triton is not installed; use fused_topk_ref")
    t, e = logits.shape
    if scoring not in SCORINGS or not 0 < top_k <= e or e > TRITON_MAX_EXPERTS:
        raise ValueError(f"fused_topk takes scoring in {SCORINGS}, 0 < top_k <= experts <= {TRITON_MAX_EXPERTS}; "
                         f"got {scoring!r}, top_k {top_k}, {e} experts")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    if t:
        _topk_kernel[(t,)](
            logits, correction_bias if correction_bias is not None else logits, weights, ids, e,
            logits.stride(0), weights.stride(0), ids.stride(0), float(scaling),
            TOP_K=top_k, BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k),
            SOFTMAX=scoring == "softmax", HAS_BIAS=correction_bias is not None, RENORMALIZE=renormalize,
            num_warps=1 if e <= 256 else 4, **pdl_kwargs(logits.device),
        )
    return weights, ids


def fused_topk(logits: torch.Tensor, top_k: int, scoring: str = "softmax",
               correction_bias: torch.Tensor | None = None, renormalize: bool = False,
               scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching greedy top-k routing (contract of ``fused_topk_ref``): the one-launch Triton kernel for CUDA
    logits when triton is installed and the experts fit it, the torch reference otherwise (the CPU path)."""
    if logits.is_cuda and triton is not None and logits.shape[-1] <= TRITON_MAX_EXPERTS:
        return fused_topk_triton(logits, top_k, scoring, correction_bias, renormalize, scaling)
    return fused_topk_ref(logits, top_k, scoring, correction_bias, renormalize, scaling)
