"""Decode and extend attention over the token pool on the CPU: a small C++ kernel (``load_inline``, OpenMP).

Contracts are those of ``decode_attention_ref`` and ``extend_attention_ref``; the references stay the ground truth
(tests compare both on random inputs). What the kernel does differently:

- It reads K/V rows straight out of the pool through the slot table (``req_to_token``), block by block, with an
  online softmax: no per-step copy of each request's padded history (the reference gathers ``k_buffer[slots]``,
  ``[B, max_len, Hkv, D]``, in every layer at every step, about as many bytes per step as the weights).
- One work item is (request, KV head) in decode (a request and all its KV heads once the batch has >= 4 requests
  per thread: they share cache lines) and (request, KV head, block of 16 new tokens) in extend; one pass
  over a KV head's keys serves every query head of its group (GQA). Items run on torch's intra-op threads
  (OpenMP, dynamic schedule, since items differ in length); a small call stays on the calling thread, because on a
  loaded two-core machine waking a second thread costs more than ~50 µs of work.
- Decode splits each (request, KV head)'s keys into up to 8 chunks of whole blocks (a function of the length only)
  whose softmax states are merged in order (attention_tiles_source.py); a batch of a request or two, too few
  items for the threads, runs one item per chunk on all threads (SmolLM2 Q4_1 batch 1: ~77 -> ~60 µs per call).
- Decode with a ``NewToken`` rotates q and the new k, stores the new K/V and attends in the same item: one call
  per layer instead of a dozen small torch ops.
- With AVX-512 (built with those flags where the CPU has them), each block of 64 keys is transposed once (K to
  [D, 64]), and the block's [rows, 64] scores and P @ V come from register-blocked micro-kernels (up to 6 query
  rows x 64 lanes in registers): no horizontal sum per (row, key). bf16 keys stay bf16 where the CPU has AVX-512
  BF16 (``vdpbf16ps`` over pairs of head dims with the bf16 query; fp16/float keys are converted to float). P @ V
  of bf16 values takes them as pairs of keys with the probabilities rounded to bf16 (``vdpbf16ps``, head dims a
  multiple of 32; attention_pv_source.py); other values are converted to float once per block. The block's
  softmax runs in 16-lane vectors. A row's result does not depend on how rows are tiled or which thread runs its
  item. Other CPUs keep one dot product per (row, key).

The C++ source is in attention_source.py. Compiled once per machine kind on first use and cached by torch
in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); a source change rebuilds it. Needs g++ and
ninja.
"""

from __future__ import annotations

import functools

import torch

from .attention_source import CPU_ATTENTION_CPP, CPU_ATTENTION_FUNCTIONS
from .build import load_cpp
from ..attention.decode_attention import NewToken
from ..attention.pool_layout import last_dim_contiguous


@functools.cache
def load():
    """The compiled extension, built on the first call of the process or loaded from torch's cache; later calls
    return it at once (the hot path takes no lock: two first calls racing are serialised by torch's build lock).

    Raises RuntimeError naming the cause and the way out (``attention_backend="torch"``) when it cannot be built
    (a failure is not cached: the next call tries again).
    """
    return load_cpp(
        "sglite_cpu_attention", CPU_ATTENTION_CPP, CPU_ATTENTION_FUNCTIONS, "CPU attention kernel",
        "run the torch reference instead with attention_backend='torch'", avx512=True, bf16=True,
    )


def check_inputs(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor) -> None:
    """Raise ValueError unless q, the pool and the table are what the kernel reads: CPU tensors, one dtype,
    ``Hq`` a multiple of ``Hkv``, one head dim, an int32 table with contiguous rows, pool rows contiguous."""
    if q.device.type != "cpu":
        raise ValueError(f"the CPU attention kernel needs CPU tensors, got {q.device}")
    if not q.dtype == k_buffer.dtype == v_buffer.dtype:
        raise ValueError(f"q ({q.dtype}) and the K/V pool ({k_buffer.dtype}, {v_buffer.dtype}) must share a dtype")
    if q.shape[1] % k_buffer.shape[1] or q.shape[2] != k_buffer.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit the pool's [slots, Hkv, D] {tuple(k_buffer.shape)}")
    if req_to_token.dtype != torch.int32 or req_to_token.stride(1) != 1:
        raise ValueError("req_to_token must be int32 with contiguous rows")
    for t in (k_buffer, v_buffer):
        if t.stride(2) != 1:
            raise ValueError("the K/V pool needs a contiguous last dim")


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def decode_attention_cpu(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    new_token: NewToken | None = None,
) -> torch.Tensor:
    """The contract of ``decode_attention_ref`` on CPU tensors: ``q [B, Hq, D]`` -> ``o [B, Hq, D]``, request b
    attends to positions ``[0, seq_lens[b])``; with ``new_token``, q and its k are rotated first and its K/V stored
    at ``new_token.loc`` (in place on the pool). ``req_to_token`` is int32; rows of q/k/v may be strided views."""
    check_inputs(q, k_buffer, v_buffer, req_to_token)
    return decode_attention_cpu_unchecked(
        q, k_buffer, v_buffer, req_to_token, _i64(req_pool_indices), _i64(seq_lens), sm_scale, new_token
    )


def decode_attention_cpu_unchecked(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    new_token: NewToken | None = None,
) -> torch.Tensor:
    """``decode_attention_cpu`` without its checks, for a caller that validated the pool once and passes
    contiguous int64 ``req_pool_indices``/``seq_lens`` (the backend, once per forward instead of once per layer)."""
    mod = load()
    q = last_dim_contiguous(q)
    out = torch.empty(q.shape, dtype=q.dtype)
    args = (k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, out, float(sm_scale))
    if new_token is None:
        mod.decode_attention(q, *args)
    else:
        nt = new_token
        k, v, cos, sin = (last_dim_contiguous(x) for x in (nt.k, nt.v, nt.cos.to(q.dtype), nt.sin.to(q.dtype)))
        mod.decode_attention_new_token(q, k, v, cos, sin, _i64(nt.loc), *args)
    return out


def extend_attention_cpu(
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
    """The contract of ``extend_attention_ref`` on CPU tensors: ``q [T, Hq, D]`` (rotated, the new tokens' K/V
    already in the pool) -> ``o [T, Hq, D]``; new token j of request b sees positions ``<= prefix_b + j``. Rows of
    q not owned by any request are left uninitialised, as the reference leaves them."""
    check_inputs(q, k_buffer, v_buffer, req_to_token)
    mod = load()
    q = last_dim_contiguous(q)
    out = torch.empty(q.shape, dtype=q.dtype)
    mod.extend_attention(
        q, k_buffer, v_buffer, req_to_token, _i64(req_pool_indices), _i64(seq_lens), _i64(extend_seq_lens),
        _i64(extend_start_loc), out, float(sm_scale),
    )
    return out

