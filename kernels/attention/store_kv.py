"""Write the K/V of new tokens into the token-granular KV pool.

``store_kv_ref`` is the ground truth (and the CPU path); ``store_kv_triton`` writes K and V of one token per
program in one launch (the eager version is two index_put launches plus dtype-cast copies).
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..pdl import pdl_kwargs

if triton is not None:
    from ..pdl import pdl_wait


def store_kv_ref(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """``k_buffer[loc[i]] = k[i]`` and the same for v. Buffers are ``[num_slots, Hkv, D]``, ``k/v [T, Hkv, D]``."""
    k_buffer[loc] = k.to(k_buffer.dtype)
    v_buffer[loc] = v.to(v_buffer.dtype)


if triton is not None:

    @triton.jit
    def _store_kv_kernel(
        KB, VB, LOC, K, V,
        skb_s, skb_h, svb_s, svb_h, sk_t, sk_h, sv_t, sv_h,
        n_heads, head_dim,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        pdl_wait(USE_PDL)
        tok = tl.program_id(0).to(tl.int64)
        slot = tl.load(LOC + tok).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
        cols = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < n_heads) & (cols < head_dim)
        k = tl.load(K + tok * sk_t + heads * sk_h + cols, mask=mask)
        v = tl.load(V + tok * sv_t + heads * sv_h + cols, mask=mask)
        tl.store(KB + slot * skb_s + heads * skb_h + cols, k.to(KB.dtype.element_ty), mask=mask)
        tl.store(VB + slot * svb_s + heads * svb_h + cols, v.to(VB.dtype.element_ty), mask=mask)


def store_kv_triton(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Triton launcher with the contract of ``store_kv_ref`` (in place on the buffers).

    ``k_buffer/v_buffer [num_slots, Hkv, D]`` (last dim contiguous), ``loc [T]`` int32/int64 slot per token,
    ``k/v [T, Hkv, D]`` (may be strided views, e.g. of a fused qkv projection; cast to the buffer dtype).
    Slots in ``loc`` must be distinct, except the dummy slot 0 that padded rows may share (what lands there is
    never read). Slots are not bounds-checked on the device.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use store_kv_ref")
    t, n_heads, d = k.shape
    if v.shape != k.shape or loc.shape != (t,):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)}, loc {tuple(loc.shape)} do not match")
    if k_buffer.shape[1:] != (n_heads, d) or v_buffer.shape[1:] != (n_heads, d):
        raise ValueError(f"buffers {tuple(k_buffer.shape)} / {tuple(v_buffer.shape)} do not hold [*, {n_heads}, {d}]")
    if k_buffer.stride(-1) != 1 or v_buffer.stride(-1) != 1:
        raise ValueError("k_buffer/v_buffer must be contiguous in the last dim (they are written in place)")
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    if t == 0:
        return
    block_d = triton.next_power_of_2(d)
    # About 1-2K elements per program: a few 16-byte vectors per thread, and enough programs for small batches.
    block_h = max(1, min(triton.next_power_of_2(n_heads), 2048 // block_d))
    grid = (t, triton.cdiv(n_heads, block_h))
    _store_kv_kernel[grid](
        k_buffer, v_buffer, loc.contiguous(), k, v,
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        n_heads, d,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4, **pdl_kwargs(k_buffer.device),
    )


def store_kv(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Dispatching store: Triton for CUDA tensors (when triton is installed), the reference elsewhere.

    ``k_buffer[loc[i]] = k[i]`` and ``v_buffer[loc[i]] = v[i]``, in place; shapes as in ``store_kv_ref``.
    """
    if k_buffer.is_cuda and triton is not None:
        store_kv_triton(k_buffer, v_buffer, loc, k, v)
    else:
        store_kv_ref(k_buffer, v_buffer, loc, k, v)
