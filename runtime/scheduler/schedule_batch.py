"""What the scheduler holds: ``Req``, the state of one request from admission to finish (fields say who fills
them), and ``ScheduleBatch``, what the scheduler decided to run this step, before it becomes tensors.

A ``Req`` never leaves the scheduler side: the engine sends a ``messages.NewRequest`` and the scheduler side
builds the ``Req`` from it (``scheduler/intake.py``), with the objects that cannot cross a process boundary
(detokenizer, stop-string matcher, seeded generator, grammar matcher).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..engine.outputs import FinishReason, TokenLogprob
from ..model_executor.forward_batch import ForwardMode
from ..sampling.sampling_batch import RequestBias
from ..sampling.sampling_params import SamplingParams
from .detokenizer import IncrementalDetokenizer, StopStringMatcher

if TYPE_CHECKING:
    from ..mem_cache.radix_cache import TreeNode


@dataclass(eq=False)
class Req:
    """One request. Invariant while it holds KV (``req_pool_idx`` set): ``req_to_token[req_pool_idx, :kv_len]`` are
    the slots of ``fill_ids[:kv_len]``; the first ``prefix_len`` of them belong to the radix cache (locked through
    ``last_node``), the rest are the request's own. Exception, only while the prefill step that admitted it is in
    flight: part of the prefix may be borrowed from an earlier request of that batch (runtime/mem_cache/prefix_sharing.py)."""

    # copied from the NewRequest message
    rid: str
    input_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]  # EOS ids (unless ignore_eos) + params.stop_token_ids
    max_new_tokens: int  # params.max_new_tokens clamped to the context length
    arrival: float = field(default_factory=time.monotonic)
    priority: int = 0  # schedule_policy="priority" orders and preempts by it

    # filled by the scheduler and the output processor
    output_ids: list[int] = field(default_factory=list)
    req_pool_idx: int | None = None
    prefix_len: int = 0  # tokens of fill_ids whose slots are the radix cache's (matched, or inserted after prefill)
    last_node: "TreeNode | None" = None  # locked radix node covering the prefix
    kv_len: int = 0  # tokens of fill_ids whose K/V is in the pool
    cached_tokens: int = 0  # prompt tokens served by the cache at the first admission (usage + hit rate)
    admitted_once: bool = False
    finish_reason: FinishReason | None = None
    matched_stop: str | int | None = None
    error: str | None = None
    generator: torch.Generator | None = None  # per-request seed
    logit_bias: RequestBias | None = None  # params.logit_bias as device tensors, built once (intake)
    detok: IncrementalDetokenizer | None = None  # None when the engine runs without a tokenizer
    stop_matcher: StopStringMatcher = field(default_factory=lambda: StopStringMatcher([]))
    grammar: Any = None  # GrammarMatcher, for constrained requests
    retractions: int = 0  # priority preemptions included
    timed_tokens: int = 0  # output tokens LatencyStats has timed (TTFT, inter-token gaps)
    last_token_at: float = 0.0  # time.monotonic() when the last of them was resolved
    # SamplingParams.prompt_logprobs_start set: the prompt logprobs computed so far, in position order (the scheduler
    # appends each prefill chunk's); the output processor sends them with the first chunk. None: not asked.
    prompt_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose K/V the request needs: prompt + output so far."""
        return self.input_ids + self.output_ids

    @property
    def first_scored_position(self) -> int:
        """The first prompt position whose logprob is returned (position 0 has no context to be scored in)."""
        return max(self.params.prompt_logprobs_start or 0, 1)

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Whether some asked prompt logprobs are not computed yet (so the prompt from the start position on must
        still run through the model)."""
        if self.prompt_logprobs is None:
            return False
        return len(self.prompt_logprobs) < len(self.input_ids) - self.first_scored_position

    @property
    def cache_match_len(self) -> int:
        """How many leading tokens of ``fill_ids`` may come from the prefix cache: all but the last (its logits
        are needed), and none from the prompt logprob start on while those are pending (their logits are
        needed too: the token at position p is scored by the logits at p - 1)."""
        limit = len(self.input_ids) + len(self.output_ids) - 1
        if self.prompt_logprobs_pending:
            limit = min(limit, self.first_scored_position - 1)
        return limit

    def prompt_logit_positions(self, start: int, n: int) -> range:
        """Of an extend of positions ``[start, start + n)``, those ``q`` whose logits score prompt token ``q + 1``
        and are still pending (empty when nothing is)."""
        if not self.prompt_logprobs_pending:
            return range(0)
        return range(max(start, self.first_scored_position - 1), min(start + n, len(self.input_ids) - 1))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def extend_len(self) -> int:
        """Tokens still to prefill before the request can decode."""
        return len(self.input_ids) + len(self.output_ids) - self.kv_len

    @property
    def remaining_new_tokens(self) -> int:
        return max(0, self.max_new_tokens - len(self.output_ids))


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
