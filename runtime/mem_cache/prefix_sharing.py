"""Prefix sharing between requests that run at the same time: the scheduler's glue to the radix cache.

Two mechanisms make concurrent requests with a common prefix (a system prompt, a few-shot header) compute it once:

* **Unfinished inserts** (SGLang's ``cache_unfinished_req``): once a prefill forward (a whole prompt or one chunk)
  is issued, every request of the batch puts its computed tokens into the radix tree and moves its lock onto them
  (``cache_prefilled``). A request admitted in a later step matches them while the first one still runs.
* **In-batch sharing**: a request admitted into a prefill batch reuses the prefix that an earlier request of the
  *same* batch computes in that forward (``BatchPrefixIndex``, in runtime/mem_cache/radix_cache.py): its request->token row
  points at the earlier request's fresh slots, and its own extend starts after them. This beats SGLang's way
  (deferring such requests one step under ``lpm``) by a step of latency and works under ``fcfs`` as well.

Why reading a peer's slots inside one forward is correct (both attention backends): in every layer the backend
stores the K/V of *all* new tokens of the batch into the pool (``AttentionBackend.forward``: rotary, ``store_kv``
for ``out_cache_loc``, then ``forward_extend``), and only then runs extend attention, which reads every key,
prefix or new, through ``req_to_token``. A borrowed prefix slot is written by the peer's store in that same layer
before any request's attention reads the pool, exactly as a request's own new tokens are: the torch reference runs
the two in order; on CUDA ``store_kv_triton`` and ``extend_attention_triton`` are launched in that order on one
stream (with PDL the extend kernel's programs wait for the store kernel's completion before their first load). The
K/V of a token depend only on the tokens before it, so the peer's K/V at those positions are exactly what the
borrower would have computed. Decode never borrows.

Slot ownership while a step is in flight: a borrowed slot belongs to the peer (or, below the peer's cached prefix,
to the tree under the peer's lock) until ``cache_prefilled`` runs; it inserts the batch's requests in batch order,
so a peer's tokens are in the tree before any borrower's insert, and every borrowed slot is then the tree's. If the
forward fails first, ``forget_borrowed`` drops the borrowed tokens from the borrowers' bookkeeping (their slots
are the peers', freed with the batch's ``out_cache_loc``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .allocator import ReqToTokenPool
from .prefix_cache import PrefixCache
from .radix_cache import BatchPrefixIndex
from ..scheduler.schedule_batch import Req, ScheduleBatch

__all__ = ["BatchPrefixIndex", "cache_prefilled", "forget_borrowed"]


def cache_prefilled(tree: PrefixCache, req_pool: ReqToTokenPool, reqs: Sequence[Req]) -> None:
    """After a prefill forward was issued and each request's ``kv_len`` counts its new tokens: insert every
    request's computed tokens (prompt so far; prompt + output for a re-prefilled retracted request) into the tree,
    locked by it, and point its request->token row at the tree's slots.

    Relies on: ``req_to_token[row, :kv_len]`` holds the K/V of ``fill_ids[:kv_len]`` (after this step's forward);
    the first ``prefix_len`` are not the request's own (the tree's under ``last_node``'s lock, or borrowed from an
    earlier request of ``reqs``). Afterwards ``prefix_len == kv_len``: the request owns no slot until it decodes.
    ``reqs`` must be in batch order (a borrower after the peers it borrowed from).
    """
    for req in reqs:
        row, n = req.req_pool_idx, req.kv_len
        slots = req_pool.table[row, :n].to(torch.int64)  # a copy: the row is rewritten below
        tree_slots, node = tree.cache_unfinished(req.fill_ids[:n], slots, req.prefix_len, req.last_node)
        # The whole row, not only the own part: a borrowed slot may have been the peer's duplicate of a token
        # the tree already had, freed just now by the peer's insert.
        req_pool.table[row, :n] = tree_slots.to(req_pool.table.device, torch.int32)
        req.prefix_len, req.last_node = n, node


def forget_borrowed(batch: ScheduleBatch) -> None:
    """A prefill batch whose forward never ran: its requests' borrowed prefix slots were their peers' new slots
    (freed with ``out_cache_loc``), so they hold only what they matched in the tree again."""
    for req, borrowed in zip(batch.reqs, batch.borrowed):
        req.kv_len -= borrowed
        req.prefix_len -= borrowed
