"""Decode attention: one new query token per request against its whole KV history in the token pool.

Layout shared with the runtime: ``k_buffer/v_buffer [num_slots, Hkv, D]`` (slot 0 is the dummy slot padded
rows write to), ``req_to_token [rows, context_len]`` maps (request row, position) -> slot. Position
``seq_lens[b] - 1`` is the step's own token. Either its K/V is already in the pool (stored by ``store_kv``), or
the caller hands it over as a ``NewToken`` before rotary: the kernel then rotates q and k itself, stores the K/V
at ``NewToken.loc`` and attends to it from registers, so rotary, store-KV and attention are one launch instead of
three (at batch 1 the launches, not the bytes, are what attention costs).

The Triton path is split-KV "flash decoding" in one launch: each program attends one range of positions
("split") of one request for one KV head, and the last program of each (request, KV head) merges the splits'
partial results. This module holds the contract (the torch reference and ``NewToken``), the launcher and the
dispatcher; decode_split.py chooses the split count and launch shape (and allocates the buffers the splits
need), decode_attention_kernel.py is the Triton kernel. The split policy's names are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode_split import (
    DECODE_MAX_SPLITS,
    DECODE_MIN_SPLIT_TOKENS,
    DECODE_SMALL_BATCH,
    decode_intermediate_buffers,
    decode_launch_shape,
    decode_num_splits,
    decode_split_counters,
    num_sms_of,
)
from .pool_layout import (
    attention_output,
    check_attention_shapes,
    check_tile_sizes,
    dot_precision,
    head_block,
    last_dim_contiguous,
    log2_scale,
)
from ..rotary import apply_rotary_ref, apply_rotary_triton
from .store_kv import store_kv_ref, store_kv_triton

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..pdl import pdl_kwargs

if triton is not None:
    from .decode_attention_kernel import decode_kernel

__all__ = [
    "DECODE_MAX_SPLITS",
    "DECODE_MIN_SPLIT_TOKENS",
    "DECODE_SMALL_BATCH",
    "NewToken",
    "decode_attention",
    "decode_attention_ref",
    "decode_attention_triton",
    "decode_intermediate_buffers",
    "decode_launch_shape",
    "decode_num_splits",
    "decode_split_counters",
    "num_sms_of",
]


@dataclass(frozen=True)
class NewToken:
    """The decode step's own token of each request, not yet rotated nor stored: ``k/v [B, Hkv, D]`` (strided views
    of a fused qkv projection are fine), its rotary ``cos/sin [B, D]`` (``rotary_cos_sin`` at position
    ``seq_lens - 1``), and the pool slot ``loc [B]`` it goes to, which ``req_to_token`` already maps that position
    to (as for every position). With it, decode attention takes q before rotary."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    loc: torch.Tensor


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    new_token: NewToken | None = None,
) -> torch.Tensor:
    """``q [B, Hq, D]`` -> ``o [B, Hq, Dv]``; request b attends to positions ``[0, seq_lens[b])``.

    Query heads are grouped per KV head (GQA: head h uses KV head ``h // (Hq // Hkv)``). Computed in float32. V may be
    narrower than K (``Dv <= D``; MLA reads its latent as V through a view of the K buffer).
    With ``new_token``: q and ``new_token.k`` are rotated first (``apply_rotary_ref``) and every row's token K/V
    stored at ``new_token.loc`` (``store_kv_ref``).
    """
    if new_token is not None:
        q, k = apply_rotary_ref(q, new_token.k, new_token.cos, new_token.sin)
        store_kv_ref(k_buffer, v_buffer, new_token.loc, k, new_token.v)
    bs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    max_len = int(seq_lens.max())
    slots = req_to_token[req_pool_indices, :max_len].long()
    k = k_buffer[slots].to(torch.float32)  # [B, L, Hkv, D]
    v = v_buffer[slots].to(torch.float32)
    qg = q.view(bs, num_kv_heads, group, head_dim).to(torch.float32)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * sm_scale
    pad = torch.arange(max_len, device=q.device)[None, :] >= seq_lens[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgl,blhd->bhgd", scores.softmax(-1), v)
    return out.reshape(bs, num_q_heads, v.shape[-1]).to(q.dtype)


@dataclass(frozen=True)
class _DecodeLaunch:
    """The grid depth and compile-time parameters of one ``decode_kernel`` launch."""

    num_splits: int
    block_g: int
    block_d: int
    block_n: int
    early_tile: bool
    num_warps: int
    num_stages: int
    precision: str

    @classmethod
    def choose(
        cls, q: torch.Tensor, n_kv: int, num_splits: int, block_n: int | None, num_warps: int | None,
        num_stages: int | None, early_tile: bool | None,
    ) -> _DecodeLaunch:
        """The launch for ``q [B, Hq, D]``: the caller's overrides, else the measured defaults."""
        bs, n_q, d = q.shape
        if block_n is None:
            # 128-position half-precision tiles measured best on Hopper (`sglite bench kernels --sweep attention`;
            # docs/perf-history.md); fp32 tiles are twice the bytes, so they stay small enough for the pipeline
            # stages to fit in shared memory.
            block_n = 32 if q.dtype == torch.float32 else 128
        check_tile_sizes(block_n=block_n)
        default_warps, default_stages = decode_launch_shape(bs)
        return cls(
            num_splits=num_splits,
            # tl.dot needs M >= 16: small groups are padded with zero query rows (free: decode is bandwidth-bound).
            block_g=max(16, triton.next_power_of_2(n_q // n_kv)),
            block_d=head_block(d),
            block_n=block_n,
            early_tile=bs <= DECODE_SMALL_BATCH if early_tile is None else early_tile,
            num_warps=num_warps or default_warps,
            num_stages=num_stages or default_stages,
            precision=dot_precision(q.dtype),
        )


def decode_attention_triton(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float, *,
    num_splits: int | None = None, max_seq_len: int | None = None, mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None, split_counters: torch.Tensor | None = None, out: torch.Tensor | None = None,
    new_token: NewToken | None = None, min_split_tokens: int = DECODE_MIN_SPLIT_TOKENS, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, early_tile: bool | None = None,
    one_launch: bool | None = None,
) -> torch.Tensor:
    """Split-KV decode attention with the contract of ``decode_attention_ref``; returns ``o [B, Hq, D]``.

    ``q [B, Hq, D]`` (last dim contiguous), pool buffers ``[num_slots, Hkv, D]``, ``req_to_token [rows, ctx]``
    int32/int64, ``req_pool_indices`` / ``seq_lens [B]`` int64 on the device. ``Hq`` must be a multiple of ``Hkv``.
    Every request needs ``seq_lens[b] >= 1`` for a meaningful output (a row with 0 gets zeros, not NaN).
    ``new_token`` (rotary + store-KV in the same launch): its k and cos/sin in q's dtype, ``loc`` int32/int64.

    Split count: ``num_splits`` fixed by the caller, else ``decode_num_splits(B, Hkv, SMs, max_seq_len)``;
    ``num_warps`` / ``num_stages`` default to ``decode_launch_shape(B)``. ``early_tile``: load each program's
    first history tile into registers before the PDL wait (positions stored by earlier steps: no kernel of the
    step writes them), so only q and the new token are read after it; by default for batches of at most
    ``DECODE_SMALL_BATCH`` rows, the ones where the kernel is on the critical path. ``mid_o`` / ``mid_lse`` /
    ``split_counters``: preallocated buffers (``decode_intermediate_buffers``, ``decode_split_counters``).

    ``new_token`` is handled in the same launch for batches of at most ``DECODE_SMALL_BATCH`` rows; larger
    batches run the rotary and store-KV kernels first and then attend over the pool (measured faster there:
    docs/perf-history.md). ``one_launch`` overrides that choice (a tuning switch); the contract is the same
    either way.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use decode_attention_ref")
    bs, n_q, n_kv = _check_decode_inputs(q, k_buffer, v_buffer, req_pool_indices, seq_lens, min_split_tokens)
    q = last_dim_contiguous(q)
    new_token = _checked_new_token(new_token, q, n_kv)
    if new_token is not None and not (bs <= DECODE_SMALL_BATCH if one_launch is None else one_launch):
        q, k = apply_rotary_triton(q, new_token.k, new_token.cos, new_token.sin)
        store_kv_triton(k_buffer, v_buffer, new_token.loc, k, new_token.v)
        new_token = None
    out = attention_output(out, q)
    if bs == 0:
        return out
    splits = _split_count(num_splits, q, n_kv, max_seq_len, min_split_tokens)
    mid_o, mid_lse = _checked_partials(mid_o, mid_lse, q, splits)
    launch = _DecodeLaunch.choose(q, n_kv, splits, block_n, num_warps, num_stages, early_tile)
    split_counters = _checked_counters(split_counters, bs, n_kv, q.device)
    _launch(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse, split_counters, out,
            new_token, sm_scale, min_split_tokens, launch)
    return out


def _check_decode_inputs(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor, min_split_tokens: int,
) -> tuple[int, int, int]:
    """``(B, Hq, Hkv)`` after checking the shapes and ``min_split_tokens``; ValueError saying what does not fit."""
    bs, n_q, n_kv = check_attention_shapes(q, k_buffer, v_buffer)
    if req_pool_indices.shape != (bs,) or seq_lens.shape != (bs,):
        raise ValueError(f"req_pool_indices / seq_lens must be [{bs}]")
    if min_split_tokens < 1:
        raise ValueError(f"min_split_tokens must be >= 1, got {min_split_tokens}")
    return bs, n_q, n_kv


def _split_count(
    num_splits: int | None, q: torch.Tensor, n_kv: int, max_seq_len: int | None, min_split_tokens: int
) -> int:
    """The caller's split count after checking it, else ``decode_num_splits`` for ``q``'s batch and device."""
    if num_splits is None:
        num_splits = decode_num_splits(q.shape[0], n_kv, num_sms_of(q.device), max_seq_len, min_split_tokens)
    if not 1 <= num_splits <= DECODE_MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {DECODE_MAX_SPLITS}], got {num_splits}")
    return num_splits


def _checked_partials(
    mid_o: torch.Tensor | None, mid_lse: torch.Tensor | None, q: torch.Tensor, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial-output buffers: the caller's after checking they hold ``num_splits`` splits of ``q``'s rows and
    heads (they may be larger: CUDA graphs share one pair across batch sizes), else new ones."""
    bs, n_q, d = q.shape
    if mid_o is None or mid_lse is None:
        return decode_intermediate_buffers(bs, n_q, num_splits, d, q.device)
    if (
        mid_o.dtype != torch.float32 or mid_lse.dtype != torch.float32
        or mid_o.dim() != 4 or mid_o.shape[0] < bs or mid_o.shape[1] != n_q or mid_o.shape[2] < num_splits
        or mid_o.shape[3] != d or mid_o.stride(-1) != 1
        or mid_lse.dim() != 3 or mid_lse.shape[0] < bs or mid_lse.shape[1] != n_q or mid_lse.shape[2] < num_splits
        or mid_lse.stride(-1) != 1
    ):
        raise ValueError(
            f"mid_o must be float32 [>={bs}, {n_q}, >={num_splits}, {d}] and mid_lse float32 "
            f"[>={bs}, {n_q}, >={num_splits}], got {tuple(mid_o.shape)} {mid_o.dtype} / "
            f"{tuple(mid_lse.shape)} {mid_lse.dtype}"
        )
    return mid_o, mid_lse


def _checked_counters(counters: torch.Tensor | None, bs: int, n_kv: int, device: torch.device) -> torch.Tensor:
    """The ticket counters: the caller's after checking them, else new zeroed ones."""
    if counters is None:
        return decode_split_counters(bs, n_kv, device)
    if counters.dtype != torch.int32 or counters.numel() < bs * n_kv:
        raise ValueError(f"split_counters must be int32 with >= {bs * n_kv} elements (decode_split_counters)")
    return counters


def _launch(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, mid_o: torch.Tensor, mid_lse: torch.Tensor,
    counters: torch.Tensor, out: torch.Tensor, new_token: NewToken | None, sm_scale: float, min_split_tokens: int,
    launch: _DecodeLaunch,
) -> None:
    """One ``decode_kernel`` launch over grid ``(B, Hkv, num_splits)`` with checked inputs."""
    bs, n_q, d = q.shape
    n_kv = k_buffer.shape[1]
    # Without a new token its pointer arguments are never read: q stands in for them.
    nt = new_token or NewToken(q, q, q[:, 0], q[:, 0], seq_lens)
    decode_kernel[(bs, n_kv, launch.num_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse, counters, out,
        nt.k, nt.v, nt.cos, nt.sin, nt.loc,
        log2_scale(sm_scale),
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0), nt.k.stride(0), nt.k.stride(1), nt.v.stride(0), nt.v.stride(1),
        nt.cos.stride(0), nt.sin.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        n_q // n_kv, d, n_kv, launch.num_splits, min_split_tokens,
        BLOCK_G=launch.block_g, BLOCK_D=launch.block_d, BLOCK_N=launch.block_n,
        BLOCK_S=triton.next_power_of_2(launch.num_splits), EARLY_TILE=launch.early_tile,
        NEW_TOKEN=new_token is not None, DOT_PRECISION=launch.precision,
        num_warps=launch.num_warps, num_stages=launch.num_stages, **pdl_kwargs(q.device),
    )


def _checked_new_token(new_token: NewToken | None, q: torch.Tensor, n_kv: int) -> NewToken | None:
    """``new_token`` with contiguous last dims, after checking it fits ``q``; ValueError saying what does not."""
    if new_token is None:
        return None
    bs, _, d = q.shape
    k, v, cos, sin, loc = new_token.k, new_token.v, new_token.cos, new_token.sin, new_token.loc
    if k.shape != (bs, n_kv, d) or v.shape != (bs, n_kv, d):
        raise ValueError(f"new_token k/v must be [{bs}, {n_kv}, {d}], got {tuple(k.shape)} / {tuple(v.shape)}")
    if cos.shape != (bs, d) or sin.shape != (bs, d) or loc.shape != (bs,):
        raise ValueError(
            f"new_token cos/sin must be [{bs}, {d}] and loc [{bs}], got {tuple(cos.shape)} / {tuple(sin.shape)} / "
            f"{tuple(loc.shape)}"
        )
    if not k.dtype == cos.dtype == sin.dtype == q.dtype:
        raise ValueError(
            f"new_token k and cos/sin must have q's dtype {q.dtype} (the rotation rounds to it), got {k.dtype} / "
            f"{cos.dtype} / {sin.dtype}"
        )
    if d % 2:
        raise ValueError(f"head_dim must be even for the rotate-half layout, got {d}")
    k, v, cos, sin = (last_dim_contiguous(x) for x in (k, v, cos, sin))
    return NewToken(k, v, cos, sin, loc)


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    new_token: NewToken | None = None,
) -> torch.Tensor:
    """Dispatching decode attention: Triton (split-KV, split count from the batch size) for CUDA tensors when
    triton is installed, the reference elsewhere. Contract as ``decode_attention_ref``."""
    args = (q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, sm_scale)
    if q.is_cuda and triton is not None:
        return decode_attention_triton(*args, new_token=new_token)
    return decode_attention_ref(*args, new_token)

