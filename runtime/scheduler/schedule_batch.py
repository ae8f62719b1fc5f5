"""``ScheduleBatch``: what the scheduler decided to run this step, before it becomes tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model_executor.forward_batch import ForwardMode
from .request import Req


@dataclass
class ScheduleBatch:
    """Requests of one step and how many new tokens each runs.

    Invariant: ``extend_lens[i]`` new tokens of ``reqs[i]`` start at ``reqs[i].kv_len`` (the scheduler advances
    ``kv_len`` only after the forward), and ``out_cache_loc`` holds their slots in request order.
    """

    mode: ForwardMode
    reqs: list[Req]
    extend_lens: list[int]
    out_cache_loc: torch.Tensor  # [sum(extend_lens)] int64
    samples: list[bool]  # False for a prefill chunk that does not finish its prompt: nothing is sampled for it
    # Decode inputs still on the device: the tokens the previous (not yet resolved) step sampled, in request order.
    # None: the inputs are read from the requests (their last output token).
    input_ids: torch.Tensor | None = None
    # Set by the scheduler once the forward ran and each request's kv_len counts its slots of out_cache_loc;
    # until then those slots belong to the batch alone (a failed step must free them itself).
    kv_committed: bool = False
    # Prefill only: how many prefix tokens each request reads from slots an earlier request of this batch writes
    # in this forward (runtime/mem_cache/prefix_sharing.py); empty when none does.
    borrowed: list[int] = field(default_factory=list)
    # Prefill only: per request, the positions of its extend whose logits score a prompt token (runtime/sampling/logprobs.py);
    # None when no request of the batch scores its prompt (then only each request's last token gets logits).
    prompt_spans: list[range] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)
