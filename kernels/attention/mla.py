"""Multi-head latent attention (MLA, DeepSeek) with absorbed weights over its cache: the contract, the launchers
and the dispatchers (the Triton kernels are in mla_kernels.py, the split policy in mla_split.py).

Layout: ``kv_buffer [num_slots, 1, Dk]`` holds per token the normalised latent (the first ``Dv`` columns, the value)
and the rotated rope key (the last ``Dk - Dv``), one row shared by every head (slot 0 is the dummy slot); the query
is ``q [N, H, Dk]`` in the same space. So MLA is multi-query attention with one KV head whose V is a prefix of K:
``o = softmax(q . K^T * sm_scale) . K[:, :Dv]``, ``o [N, H, Dv]``. The references are the dense ones
(decode_attention.py, extend_attention.py) with V the view ``kv_buffer[..., :Dv]``; the kernels read each cache row
once for a block of heads and use its latent part as both key and value.

Decode is split-KV like the dense path (a program per (head block, split, request), partials merged in the same
launch); its split count depends on the batch size only, its buffers can be preallocated, so it replays in CUDA
graphs. Extend is causal flash attention over the cached prefix and the new tokens, read through ``req_to_token``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode_attention import decode_attention_ref
from .decode_split import DECODE_MAX_SPLITS, num_sms_of
from .extend_attention import extend_attention_ref
from .mla_split import (
    MLA_BLOCK_H,
    MLA_MIN_SPLIT_TOKENS,
    mla_head_blocks,
    mla_intermediate_buffers,
    mla_num_splits,
    mla_split_counters,
)
from .pool_layout import check_tile_sizes, dot_precision, head_block, last_dim_contiguous, log2_scale

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..pdl import pdl_kwargs

if triton is not None:
    from .mla_kernels import mla_decode_kernel, mla_extend_kernel

__all__ = [
    "MLA_BLOCK_H",
    "MLA_MIN_SPLIT_TOKENS",
    "mla_decode",
    "mla_decode_ref",
    "mla_decode_triton",
    "mla_extend",
    "mla_extend_ref",
    "mla_extend_triton",
    "mla_head_blocks",
    "mla_intermediate_buffers",
    "mla_num_splits",
    "mla_split_counters",
]


def mla_decode_ref(
    q: torch.Tensor, kv_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor, sm_scale: float, v_head_dim: int,
) -> torch.Tensor:
    """``q [B, H, Dk]`` -> ``o [B, H, Dv]`` (``Dv = v_head_dim``); request b attends to the cache rows of positions
    ``[0, seq_lens[b])``, whose first ``Dv`` columns are the value. Computed in float32."""
    v = kv_buffer[..., :v_head_dim]
    return decode_attention_ref(q, kv_buffer, v, req_to_token, req_pool_indices, seq_lens, sm_scale)


def mla_extend_ref(
    q: torch.Tensor, kv_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor, extend_seq_lens: torch.Tensor, extend_start_loc: torch.Tensor, sm_scale: float,
    v_head_dim: int,
) -> torch.Tensor:
    """``q [T, H, Dk]`` (new tokens of all requests, concatenated) -> ``o [T, H, Dv]``. Request b owns rows
    ``extend_start_loc[b] : + extend_seq_lens[b]``; its new token j (position ``prefix + j``, prefix =
    ``seq_lens[b] - extend_seq_lens[b]``) sees positions ``<= prefix + j``, its own row already in the cache."""
    v = kv_buffer[..., :v_head_dim]
    return extend_attention_ref(
        q, kv_buffer, v, req_to_token, req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, sm_scale
    )


def _check_mla_shapes(q: torch.Tensor, kv_buffer: torch.Tensor, v_head_dim: int) -> tuple[int, int, int, int]:
    """``(N, H, Dv, Dpe)`` after checking the layout; ValueError saying what does not fit."""
    if q.dim() != 3 or kv_buffer.dim() != 3:
        raise ValueError(f"q must be [N, H, Dk] and kv_buffer [slots, 1, Dk], got {tuple(q.shape)} / "
                         f"{tuple(kv_buffer.shape)}")
    n, h, dk = q.shape
    if kv_buffer.shape[1] != 1 or kv_buffer.shape[2] != dk:
        raise ValueError(f"kv_buffer must be [slots, 1, {dk}] (one row per token for all heads), got "
                         f"{tuple(kv_buffer.shape)}")
    if not 0 < v_head_dim < dk:
        raise ValueError(f"v_head_dim must be in (0, {dk}): the latent followed by a rope part, got {v_head_dim}")
    if kv_buffer.stride(-1) != 1 or kv_buffer.dtype != q.dtype:
        raise ValueError(f"kv_buffer needs a contiguous last dim and q's dtype {q.dtype}, got {kv_buffer.dtype}")
    return n, h, v_head_dim, dk - v_head_dim


def _mla_output(out: torch.Tensor | None, q: torch.Tensor, dv: int) -> torch.Tensor:
    """The output buffer ``[N, H, Dv]`` in q's dtype: ``out`` after checking it, or a new one."""
    shape = (q.shape[0], q.shape[1], dv)
    if out is None:
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    if tuple(out.shape) != shape or out.stride(-1) != 1 or out.dtype != q.dtype:
        raise ValueError(f"out must be {q.dtype} {list(shape)} with a contiguous last dim, got {tuple(out.shape)}")
    return out


@dataclass(frozen=True)
class MLADecodeLaunch:
    """Compile-time parameters of one ``mla_decode_kernel`` launch (the defaults: ``choose``)."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int

    @classmethod
    def choose(cls, dtype: torch.dtype, block_h: int | None = None, block_n: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None) -> MLADecodeLaunch:
        """The caller's overrides, else the defaults. Half precision: 32-row tiles, two stages (2 x 36 KiB of
        shared memory at Dk 576), 4 warps for the ``[16, 512]`` float32 accumulator (64 registers a thread), as
        SGLang's grouped MLA decode kernel; float32 tiles are twice the bytes, so half the rows."""
        launch = cls(block_h or MLA_BLOCK_H, block_n or (16 if dtype == torch.float32 else 32),
                     num_warps or 4, num_stages or 2)
        check_tile_sizes(block_h=launch.block_h, block_n=launch.block_n)
        return launch


def mla_decode_triton(
    q: torch.Tensor, kv_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor, sm_scale: float, v_head_dim: int, *, num_splits: int | None = None,
    max_seq_len: int | None = None, mid_o: torch.Tensor | None = None, mid_lse: torch.Tensor | None = None,
    split_counters: torch.Tensor | None = None, out: torch.Tensor | None = None,
    min_split_tokens: int = MLA_MIN_SPLIT_TOKENS, launch: MLADecodeLaunch | None = None,
) -> torch.Tensor:
    """Split-KV MLA decode with the contract of ``mla_decode_ref``; returns ``o [B, H, Dv]``.

    ``q [B, H, Dk]`` (last dim contiguous), ``kv_buffer [slots, 1, Dk]`` in q's dtype, ``req_to_token [rows, ctx]``
    int32/int64, ``req_pool_indices`` / ``seq_lens [B]`` int64 on the device. A row with ``seq_lens[b] == 0`` gets
    zeros. Split count: ``num_splits`` (1..DECODE_MAX_SPLITS) fixed by the caller, else ``mla_num_splits`` of the
    batch (capped by ``max_seq_len`` when given). ``mid_o`` / ``mid_lse`` / ``split_counters`` (from
    ``mla_intermediate_buffers`` / ``mla_split_counters``, may be larger) make the launch allocation-free, as CUDA
    graphs need; no host sync either way. ``launch``: tile sizes and launch shape (``MLADecodeLaunch.choose``).
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use mla_decode_ref")
    bs, h, dv, dpe = _check_mla_shapes(q, kv_buffer, v_head_dim)
    if req_pool_indices.shape != (bs,) or seq_lens.shape != (bs,) or min_split_tokens < 1:
        raise ValueError(f"req_pool_indices / seq_lens must be [{bs}] and min_split_tokens >= 1")
    q = last_dim_contiguous(q)
    out = _mla_output(out, q, dv)
    if bs == 0:
        return out
    launch = launch or MLADecodeLaunch.choose(q.dtype)
    if num_splits is None:
        num_splits = mla_num_splits(bs, h, num_sms_of(q.device), max_seq_len, min_split_tokens, launch.block_h)
    if not 1 <= num_splits <= DECODE_MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {DECODE_MAX_SPLITS}], got {num_splits}")
    n_hb = mla_head_blocks(h, launch.block_h)
    mid_o, mid_lse = _checked_partials(mid_o, mid_lse, bs, h, num_splits, dv, q.device)
    if split_counters is None:
        split_counters = mla_split_counters(bs, h, q.device, launch.block_h)
    elif split_counters.dtype != torch.int32 or split_counters.numel() < bs * n_hb:
        raise ValueError(f"split_counters must be int32 with >= {bs * n_hb} elements (mla_split_counters)")
    mla_decode_kernel[(n_hb, num_splits, bs)](
        q, kv_buffer, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse, split_counters, out,
        log2_scale(sm_scale), q.stride(0), q.stride(1), kv_buffer.stride(0), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), h, dv, dpe, n_hb, num_splits, min_split_tokens,
        BLOCK_H=launch.block_h, BLOCK_DV=head_block(dv), BLOCK_DPE=head_block(dpe), BLOCK_N=launch.block_n,
        BLOCK_S=triton.next_power_of_2(num_splits), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=launch.num_warps, num_stages=launch.num_stages, **pdl_kwargs(q.device),
    )
    return out


def _checked_partials(
    mid_o: torch.Tensor | None, mid_lse: torch.Tensor | None, bs: int, h: int, num_splits: int, dv: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial-output buffers: the caller's after checking they hold ``num_splits`` splits of ``bs`` rows of
    ``h`` heads (they may be larger: CUDA graphs share one pair across batch sizes), else new ones."""
    if mid_o is None or mid_lse is None:
        return mla_intermediate_buffers(bs, h, num_splits, dv, device)
    if (
        mid_o.dtype != torch.float32 or mid_lse.dtype != torch.float32
        or mid_o.dim() != 4 or mid_o.shape[0] < bs or mid_o.shape[1] != h or mid_o.shape[2] < num_splits
        or mid_o.shape[3] != dv or mid_o.stride(-1) != 1
        or mid_lse.dim() != 3 or mid_lse.shape[0] < bs or mid_lse.shape[1] != h or mid_lse.shape[2] < num_splits
    ):
        raise ValueError(
            f"mid_o must be float32 [>={bs}, {h}, >={num_splits}, {dv}] and mid_lse float32 [>={bs}, {h}, "
            f">={num_splits}], got {tuple(mid_o.shape)} {mid_o.dtype} / {tuple(mid_lse.shape)} {mid_lse.dtype}"
        )
    return mid_o, mid_lse


def _extend_tiles(dtype: torch.dtype, h: int, block_m: int | None, block_n: int | None) -> tuple[int, int, int, int]:
    """``(BLOCK_T, BLOCK_H, BLOCK_N, num_warps)`` of the extend kernel. ``BLOCK_M = BLOCK_T * BLOCK_H`` query rows
    (32 in half precision: the ``[32, 512]`` float32 accumulator takes 64 registers a thread over 8 warps; 16 in
    float32), as many heads of one token as fit, then several tokens."""
    half = dtype != torch.float32
    block_m, block_n = block_m or (32 if half else 16), block_n or (32 if half else 16)
    check_tile_sizes(block_m=block_m, block_n=block_n)
    block_h = min(triton.next_power_of_2(h), block_m)
    return block_m // block_h, block_h, block_n, 8 if half else 4


def mla_extend_triton(
    q: torch.Tensor, kv_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor, extend_seq_lens: torch.Tensor, extend_start_loc: torch.Tensor, sm_scale: float,
    v_head_dim: int, *, max_extend_len: int | None = None, out: torch.Tensor | None = None,
    block_m: int | None = None, block_n: int | None = None, num_stages: int = 2,
) -> torch.Tensor:
    """Causal flash MLA extend with the contract of ``mla_extend_ref``; returns ``o [T, H, Dv]``.

    ``q [T, H, Dk]`` (a strided view with a contiguous last dim is fine), the ``[B]`` int64 arrays on the device.
    ``max_extend_len`` (a host int >= max(extend_seq_lens)) sizes the grid; None reads it from the device (one
    sync). Rows of ``out`` that belong to no request are left untouched. ``block_m`` (query rows = tokens x heads
    of a program) / ``block_n`` (cache rows per tile): powers of two >= 16.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use mla_extend_ref")
    t, h, dv, dpe = _check_mla_shapes(q, kv_buffer, v_head_dim)
    bs = req_pool_indices.shape[0]
    if any(x.shape != (bs,) for x in (seq_lens, extend_seq_lens, extend_start_loc)):
        raise ValueError(f"req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc must all be [{bs}]")
    q = last_dim_contiguous(q)
    out = _mla_output(out, q, dv)
    if bs == 0 or t == 0:
        return out
    if max_extend_len is None:
        max_extend_len = int(extend_seq_lens.max())
    if max_extend_len <= 0:
        return out
    block_t, block_h, block_n, num_warps = _extend_tiles(q.dtype, h, block_m, block_n)
    n_hb = triton.cdiv(h, block_h)
    grid = (n_hb * triton.cdiv(max_extend_len, block_t), bs)
    mla_extend_kernel[grid](
        q, kv_buffer, out, req_to_token, req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc,
        log2_scale(sm_scale), q.stride(0), q.stride(1), kv_buffer.stride(0), out.stride(0), out.stride(1),
        req_to_token.stride(0), h, dv, dpe, n_hb,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_DV=head_block(dv), BLOCK_DPE=head_block(dpe), BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages, **pdl_kwargs(q.device),
    )
    return out


def mla_decode(
    q: torch.Tensor, kv_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor, sm_scale: float, v_head_dim: int,
) -> torch.Tensor:
    """Dispatching MLA decode: Triton for CUDA tensors when triton is installed, the reference elsewhere. Contract as
    ``mla_decode_ref``."""
    args = (q, kv_buffer, req_to_token, req_pool_indices, seq_lens, sm_scale, v_head_dim)
    if q.is_cuda and triton is not None:
        return mla_decode_triton(*args)
    return mla_decode_ref(*args)


def mla_extend(
    q: torch.Tensor, kv_buffer: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor, extend_seq_lens: torch.Tensor, extend_start_loc: torch.Tensor, sm_scale: float,
    v_head_dim: int,
) -> torch.Tensor:
    """Dispatching MLA extend: Triton for CUDA tensors when triton is installed, the reference elsewhere. Contract as
    ``mla_extend_ref``."""
    args = (q, kv_buffer, req_to_token, req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, sm_scale,
            v_head_dim)
    if q.is_cuda and triton is not None:
        return mla_extend_triton(*args)
    return mla_extend_ref(*args)
