"""Extend (prefill) attention: new tokens of each request against its cached prefix and, causally, each other.

Same pool layout as decode attention. The K/V of the new tokens is already stored in the pool (at
``req_to_token[row, prefix_len : seq_len]``) when attention runs, so prefix and new keys are read one way.

The Triton path is flash attention over the pool: grid ``(Hq, q_blocks, B)``, a program takes BLOCK_M new tokens
of one request for one query head and streams that request's keys (through ``req_to_token``) from position 0 up to
its last query's position, with an online softmax; keys after a query's position are masked (causal on positions,
so a cached prefix is fully visible to every new token). Query heads vary fastest in the launch order, so the
programs of one KV group run together and share their K/V tiles through L2 (GQA).
"""

from __future__ import annotations

import torch

from .pool_layout import (
    attention_output,
    check_attention_shapes,
    check_tile_sizes,
    dot_precision,
    head_block,
    last_dim_contiguous,
    log2_scale,
)

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..pdl import pdl_kwargs

if triton is not None:
    from ..pdl import pdl_wait
    from .pool_layout import attend_pool_tile


def extend_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """``q [T, Hq, D]`` (new tokens of all requests, concatenated) -> ``o [T, Hq, Dv]`` (``Dv <= D``: V may be
    narrower than K, as MLA's latent).

    Request b owns rows ``extend_start_loc[b] : + extend_seq_lens[b]`` of q; its prefix length is
    ``seq_lens[b] - extend_seq_lens[b]``; its new token j (position ``prefix + j``) sees positions ``<= prefix + j``.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    out = q.new_empty(q.shape[0], num_q_heads, v_buffer.shape[-1])
    rows = req_pool_indices.tolist()
    for row, total, n, start in zip(rows, seq_lens.tolist(), extend_seq_lens.tolist(), extend_start_loc.tolist()):
        if n == 0:
            continue
        slots = req_to_token[row, :total].long()
        k = k_buffer[slots].to(torch.float32)  # [L, Hkv, D]
        v = v_buffer[slots].to(torch.float32)
        qi = q[start : start + n].view(n, num_kv_heads, group, head_dim).to(torch.float32)
        scores = torch.einsum("nhgd,lhd->hgnl", qi, k) * sm_scale
        q_pos = torch.arange(total - n, total, device=q.device)[:, None]
        k_pos = torch.arange(total, device=q.device)[None, :]
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        o = torch.einsum("hgnl,lhd->nhgd", scores.softmax(-1), v)
        out[start : start + n] = o.reshape(n, num_q_heads, v.shape[-1]).to(q.dtype)
    return out


if triton is not None:

    @triton.jit
    def _extend_kernel(
        Q, KB, VB, OUT, REQ_TO_TOKEN, REQ_IDX, SEQ_LENS, EXT_LENS, EXT_START,
        qk_scale,  # sm_scale * log2(e): scores live in base 2 so the softmax uses exp2
        sq_t, sq_h, sk_s, sk_h, sv_s, sv_h, so_t, so_h, s_rt,
        group, head_dim,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        pdl_wait(USE_PDL)
        h = tl.program_id(0)
        m0 = tl.program_id(1) * BLOCK_M
        b = tl.program_id(2).to(tl.int64)
        ext_len = tl.load(EXT_LENS + b)
        if m0 < ext_len:  # the grid covers the longest extend; shorter requests' extra blocks do nothing
            seq_len = tl.load(SEQ_LENS + b)
            start = tl.load(EXT_START + b)
            row = tl.load(REQ_IDX + b).to(tl.int64)
            prefix = seq_len - ext_len
            kvh = h // group
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < ext_len
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < head_dim
            q_rows = (start + offs_m).to(tl.int64)
            q = tl.load(
                Q + q_rows[:, None] * sq_t + h * sq_h + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0,
            )
            q_pos = prefix + offs_m
            # Keys past the block's last query position are invisible to the whole block: stop there.
            end = prefix + tl.minimum(m0 + BLOCK_M, ext_len)
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for n0 in range(0, end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < end
                # Position 0 is visible to every row and lies in the first tile, so m is finite from then on.
                visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
                m, l, acc = attend_pool_tile(
                    q, m, l, acc, REQ_TO_TOKEN, row, s_rt, KB, VB, kvh, sk_s, sk_h, sv_s, sv_h,
                    offs_n, mask_n, visible, offs_d, mask_d, qk_scale, DOT_PRECISION,
                )
            res = acc / l[:, None]
            tl.store(
                OUT + q_rows[:, None] * so_t + h * so_h + offs_d[None, :],
                res.to(OUT.dtype.element_ty),
                mask=mask_m[:, None] & mask_d[None, :],
            )


def _extend_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): tiles that keep q + two stages of K/V tiles within shared memory."""
    if dtype == torch.float32:  # 4-byte tiles
        return (64, 32, 4) if head_dim <= 128 else (32, 32, 4)
    if head_dim <= 64:
        return 128, 64, 4
    if head_dim <= 128:
        return 128, 64, 8
    return 64, 32, 4


def extend_attention_triton(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, extend_seq_lens: torch.Tensor,
    extend_start_loc: torch.Tensor, sm_scale: float, *, max_extend_len: int | None = None,
    out: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """Flash extend attention with the contract of ``extend_attention_ref``; returns ``o [T, Hq, D]``.

    ``q [T, Hq, D]`` (may be a strided view with a contiguous last dim), pool buffers ``[num_slots, Hkv, D]``,
    ``req_to_token [rows, ctx]`` int32/int64, the ``[B]`` int64 arrays on the device. ``Hq`` must be a multiple of
    ``Hkv``. ``max_extend_len`` (a host int >= max(extend_seq_lens)) sizes the grid; when None it is read from the
    device (one sync). Rows of ``out`` that belong to no request are left untouched. ``block_m``/``block_n``
    override the tile sizes (powers of two >= 16; tests use small ones).
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use extend_attention_ref")
    t, n_q, n_kv = check_attention_shapes(q, k_buffer, v_buffer)
    bs = req_pool_indices.shape[0]
    if any(x.shape != (bs,) for x in (seq_lens, extend_seq_lens, extend_start_loc)):
        raise ValueError(f"req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc must all be [{bs}]")
    q = last_dim_contiguous(q)
    out = attention_output(out, q)
    if bs == 0 or t == 0:
        return out
    if max_extend_len is None:
        max_extend_len = int(extend_seq_lens.max())
    if max_extend_len <= 0:
        return out
    block_m, block_n, num_warps = _extend_tiles(q, block_m, block_n)
    grid = (n_q, triton.cdiv(max_extend_len, block_m), bs)
    _extend_kernel[grid](
        q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc,
        log2_scale(sm_scale),
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1), req_to_token.stride(0),
        n_q // n_kv, q.shape[2],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(q.shape[2]),
        DOT_PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=2, **pdl_kwargs(q.device),
    )
    return out


def _extend_tiles(q: torch.Tensor, block_m: int | None, block_n: int | None) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` for ``q``: the caller's tile sizes (checked) where given, else
    ``_extend_config``'s."""
    cfg_m, cfg_n, num_warps = _extend_config(q.dtype, q.shape[2])
    block_m, block_n = block_m or cfg_m, block_n or cfg_n
    check_tile_sizes(block_m=block_m, block_n=block_n)
    return block_m, block_n, num_warps


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Dispatching extend attention: Triton for CUDA tensors when triton is installed, the reference elsewhere.
    Contract as ``extend_attention_ref``."""
    if q.is_cuda and triton is not None:
        return extend_attention_triton(
            q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc,
            sm_scale,
        )
    return extend_attention_ref(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, sm_scale
    )
