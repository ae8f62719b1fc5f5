"""What one model forward needs to know about the batch: token ids, positions and where K/V live in the pool.

Filled by the model runner from the scheduler's batch; read by the model and the attention backend.
Tensors are on the model's device.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prefill: several new tokens per request, after a (possibly empty) cached prefix
    DECODE = "decode"  # one new token per request


@dataclass
class ForwardBatch:
    """One forward pass over ``T`` new tokens belonging to ``B`` requests.

    Invariant: for request b, its new tokens are rows ``extend_start_loc[b] : extend_start_loc[b] +
    extend_seq_lens[b]`` of the flat ``[T]`` arrays, at positions ``seq_lens[b] - extend_seq_lens[b]`` onwards, and
    their K/V go to the slots ``out_cache_loc`` of those rows, which equal
    ``req_to_token[req_pool_indices[b], seq_lens[b] - extend_seq_lens[b] : seq_lens[b]]``. In decode mode
    ``T == B`` and every ``extend_seq_lens`` is 1.
    """

    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_cache_loc: torch.Tensor  # [T] int64: the KV slot each new token's K/V is written to
    req_pool_indices: torch.Tensor  # [B] int64: each request's row of req_to_token
    seq_lens: torch.Tensor  # [B] int64: tokens in the KV cache once this step is done (prefix + new)
    extend_seq_lens: torch.Tensor  # [B] int64: new tokens of each request
    extend_start_loc: torch.Tensor  # [B] int64: offset of each request's first new token in the [T] arrays
    # [R] int64, R >= B: first the row of each request's last new token (the one sampled from), then the rows whose
    # logits score prompt tokens (runtime/sampling/logprobs.py; R == B unless a request of a prefill asks for them)
    logits_indices: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.req_pool_indices.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
