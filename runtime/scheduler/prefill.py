"""Prefill admission: which waiting requests enter the next prefill (extend) batch, under the token budgets.

Budgets (SGLang's): a new request needs ``extend + min(max_new_tokens left, RESERVE_CLIP)`` tokens of room, where
room is the free (or evictable) pool minus the reservation for the running requests' future tokens; a batch holds
at most ``max_prefill_tokens`` new tokens and the free rows of the running batch; a prompt longer than
``chunked_prefill_size`` is prefilled in chunks, one chunked request at a time. A batch scores at most
``max_scored_prompt_tokens`` prompt positions (echo + logprobs: a [vocab] row of logits and log-softmax each, reserved
by the memory plan), so a scoring request's chunk ends where that budget does. Requests are considered in policy
order and admission stops at the first one that does not fit (no skipping ahead, so a large request at the head
is not starved). ``admission_need`` is the one place this arithmetic lives: both the admission and the
"could anything be admitted now" check use it, on the same request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model_executor.forward_batch import ForwardMode
from ..sampling.logprobs import prompt_spans
from ..mem_cache.prefix_cache import PrefixBatchIndex
from .schedule_batch import Req, ScheduleBatch
from .decode import DecodeManager
from .kv import KVManager
from .limits import RESERVE_CLIP, SchedulerLimits, SchedulerStats
from .policy import PriorityOrder, order_waiting
from .preemption import Preemption

__all__ = ["AdmissionNeed", "PrefillManager", "admission_need", "scoring_limit"]


@dataclass(frozen=True)
class AdmissionNeed:
    extend: int  # tokens to prefill: prompt + kept output minus the cached (or borrowed) prefix
    reserve: int  # tokens admission sets aside: ``extend`` + the clipped future output

    def fits(self, room: int, free: int, alone: bool) -> bool:
        """Whether the request may be admitted with ``room`` tokens left after the reservations. A request that
        would run ``alone`` (nothing running, nothing admitted before it) only needs its prefill to fit the
        ``free`` pool: waiting for room nobody else will free would stall it forever."""
        return self.reserve <= room or (alone and self.extend <= free)


def admission_need(req: Req, prefix_len: int) -> AdmissionNeed:
    """What admitting ``req`` costs when ``prefix_len`` of its tokens are already computed."""
    extend = len(req.input_ids) + len(req.output_ids) - prefix_len
    return AdmissionNeed(extend, extend + min(req.remaining_new_tokens, RESERVE_CLIP))


class PrefillManager:
    """Owns the waiting queue and the one request being prefilled in chunks (``chunked``).

    A request is in at most one of ``waiting``, ``chunked`` and the running batch; a chunked request holds a row
    and the K/V of its chunks so far (``kv_len``), and its next chunk runs before any other admission.
    """

    def __init__(self, limits: SchedulerLimits, kv: KVManager, decode: DecodeManager, stats: SchedulerStats):
        self.limits = limits
        self.kv = kv
        self.decode = decode
        self.stats = stats
        self.waiting: deque[Req] = deque()
        self.chunked: Req | None = None
        self.order = PriorityOrder(limits.low_priority_values_first)
        self.preemption: Preemption | None = None
        if limits.schedule_policy == "priority" and limits.preemption_threshold is not None:
            self.preemption = Preemption(self.order, limits.preemption_threshold, decode, self.head_fits)

    def requeue(self, req: Req) -> None:
        """Put a retracted request back at the head of the queue (it keeps its place in arrival order)."""
        self.waiting.appendleft(req)

    def remove(self, req: Req) -> None:
        """Forget ``req`` (aborted): out of the queue, or no longer the chunked request."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req is self.chunked:
            self.chunked = None

    def ordered(self) -> list[Req]:
        """The waiting requests in the order the policy admits them."""
        prefix_len = lambda r: len(self.kv.match(r)[0])  # noqa: E731
        return order_waiting(self.limits.schedule_policy, self.waiting, prefix_len, self.order)

    def _room(self) -> int:
        return self.kv.free_tokens() - self.decode.reserved()

    def head_fits(self, req: Req, without: Sequence[Req] = ()) -> bool:
        """Whether ``req``, first in policy order, would be admitted now; with ``without``: if those running
        requests were retracted first (their whole KV counted as freed, an upper bound)."""
        running = len(self.decode.running) - len(without)
        if running >= self.limits.max_running_requests:
            return False
        free = self.kv.free_tokens() + sum(r.kv_len for r in without)
        need = admission_need(req, len(self.kv.match(req)[0]))
        return need.fits(free - self.decode.reserved(without), free, alone=running == 0)

    def admission_possible(self) -> bool:
        """Whether ``schedule`` would return a batch now: the chunked request's next chunk fits the pool, or the
        first waiting request *in policy order* fits (admission stops at the first that does not), or would fit
        once the priority preemption made room for it."""
        if self.chunked is not None:
            return self._next_chunk_len() <= self.kv.free_tokens()
        rows_full = len(self.decode.running) >= self.limits.max_running_requests
        if not self.waiting or (rows_full and self.preemption is None):
            return False
        first = self.ordered()[0]
        return self.head_fits(first) or (self.preemption is not None and self.preemption.could_make_room(first))

    def schedule(self) -> ScheduleBatch | None:
        """The next prefill batch (its requests hold rows and slots, and left ``waiting``), or None."""
        if self.chunked is not None:
            return self._schedule_chunk()
        if not self.waiting:
            return None
        if self.preemption is not None:
            self.preemption.make_room(self.ordered()[0])
        return self._schedule_new()

    def _next_chunk_len(self) -> int:
        req, lim = self.chunked, self.limits
        assert req is not None
        n = min(req.extend_len, lim.chunked_prefill_size, lim.max_prefill_tokens)
        return min(n, scoring_limit(req, req.kv_len, lim.max_scored_prompt_tokens))

    def _schedule_chunk(self) -> ScheduleBatch | None:
        """The chunked request's next chunk, alone: it must run before anyone is admitted behind it."""
        req, n = self.chunked, self._next_chunk_len()
        got = self.kv.alloc_slots(n)
        if got is None:
            return None  # the decode of running requests frees room (or retracts) first
        done = n == req.extend_len
        if done:
            self.chunked = None
        return ScheduleBatch(ForwardMode.EXTEND, [req], [n], got, [done and _samples(req)],
                             prompt_spans=prompt_spans([req], [n]))

    def _schedule_new(self) -> ScheduleBatch | None:
        """Admit waiting requests in policy order until one does not fit or a budget is spent."""
        lim = self.limits
        token_budget, room, score_budget = lim.max_prefill_tokens, self._room(), lim.max_scored_prompt_tokens
        free_rows = lim.max_running_requests - len(self.decode.running)
        peers = self.kv.batch_index()
        reqs, lens, samples, slots, borrowed = [], [], [], [], []
        for req in self.ordered():
            if len(reqs) >= free_rows or token_budget <= 0:
                break
            prefix_slots, node, shared = self._match_in_batch(req, peers)
            need = admission_need(req, len(prefix_slots))
            if not need.fits(room, self.kv.free_tokens(), alone=not self.decode.running and not reqs):
                break  # no skipping ahead: a large request at the head must not starve
            n = min(need.extend, lim.chunked_prefill_size, token_budget,
                    scoring_limit(req, len(prefix_slots), score_budget))
            if n == 0 or (n < need.extend and self.chunked is not None):
                break  # no scoring rows left in this batch, or one chunked request at a time
            got = self._admit(req, n, prefix_slots, node)
            if got is None:
                break
            reqs.append(req), lens.append(n), samples.append(n == need.extend and _samples(req)), slots.append(got)
            borrowed.append(shared)
            peers.add(req.fill_ids[: req.kv_len + n], torch.cat([prefix_slots, got]))
            if n < need.extend:
                self.chunked = req
            token_budget -= n
            score_budget -= len(req.prompt_logit_positions(req.kv_len, n))
            room -= need.reserve
        if not reqs:
            return None
        for req in reqs:
            self.waiting.remove(req)
        return ScheduleBatch(ForwardMode.EXTEND, reqs, lens, torch.cat(slots), samples, borrowed=borrowed,
                             prompt_spans=prompt_spans(reqs, lens))

    def _match_in_batch(self, req: Req, peers: PrefixBatchIndex) -> tuple[torch.Tensor, object, int]:
        """``KVManager.match`` lengthened by what the requests admitted before ``req`` into this prefill batch
        compute of its tokens (``peers``), and how many of the slots are theirs (borrowed). The node covers only
        the cache's part: the borrowed slots stay valid because their owners run in the same forward, and enter
        the cache before ``req``'s own insert (``cache_prefilled``)."""
        prefix_slots, node = self.kv.match(req)
        prefix_slots, borrowed = peers.extend_prefix(req.fill_ids[: req.cache_match_len], prefix_slots)
        return prefix_slots, node, borrowed

    def _admit(self, req: Req, n: int, prefix_slots: torch.Tensor, node: object) -> torch.Tensor | None:
        """``KVManager.admit``, counting the prompt and its cached part at the request's first admission."""
        got = self.kv.admit(req, n, prefix_slots, node)
        if got is not None and not req.admitted_once:
            req.admitted_once = True
            req.cached_tokens = min(req.prefix_len, len(req.input_ids))
            self.stats.prompt_tokens += len(req.input_ids)
            self.stats.cached_prompt_tokens += req.cached_tokens
            self.stats.latency.admitted(req)
        return got


def scoring_limit(req: Req, start: int, budget: int) -> int:
    """Most new tokens from position ``start`` whose extend scores at most ``budget`` prompt positions: the tokens
    before the first scored one are free, each after it costs one row. Unbounded when nothing is left to score."""
    if not req.prompt_logprobs_pending:
        return req.extend_len
    return max(req.first_scored_position - 1 - start, 0) + budget


def _samples(req: Req) -> bool:
    """Whether the end of ``req``'s prefill samples a token: not for a prompt that is only scored
    (``max_new_tokens=0`` with prompt logprobs), which finishes once prefilled."""
    return req.max_new_tokens > 0
