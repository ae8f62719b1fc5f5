"""The scheduler: continuous batching over the token pool with radix prefix reuse.

Each step it either admits waiting requests into a prefill (extend) batch under the token budgets, or runs one
decode step for every running request. When the pool cannot hold the next decode step it retracts the requests
with the fewest decoded tokens back to the waiting queue (their output is kept and re-prefilled later). Prefixes
are shared while requests run (runtime/prefix_sharing.py): each prefill (chunk) enters the radix tree right after its
forward is issued, and a request reuses what an earlier request of its own prefill batch computes. Everything
here runs on the scheduler thread; other threads talk to it only through the engine's inbox.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from .allocator import ReqToTokenPool, TokenAllocator
from .forward_batch import ForwardMode
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .prefix_sharing import BatchPrefixIndex, cache_prefilled, forget_borrowed
from .radix_cache import RadixCache, TreeNode
from .request import Req
from .schedule_batch import ScheduleBatch

logger = logging.getLogger(__name__)

# Admission reserves at most this many future tokens per request (SGLang's clip), so one huge max_new_tokens does
# not block admission forever.
RESERVE_CLIP = 4096
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001


@dataclass(frozen=True)
class SchedulerLimits:
    max_running_requests: int
    max_prefill_tokens: int
    chunked_prefill_size: int
    schedule_policy: str  # "fcfs" | "lpm"
    disable_radix_cache: bool
    overlap: bool = False  # launch decode step t+1 before processing step t's outputs (see Scheduler.step)


@dataclass
class SchedulerStats:
    prompt_tokens: int = 0  # prompt tokens of admitted requests (first admission only)
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    retractions: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    peak_running_requests: int = 0  # largest decode batch so far
    peak_prefill_tokens: int = 0  # largest prefill batch so far, in new tokens
    overlapped_steps: int = 0  # decode steps launched before the previous step was resolved
    prefill_tokens: int = 0  # new tokens computed by prefill steps (cached prefixes excluded)
    prefill_seconds: float = 0.0  # wall time of steps that launched or resolved a prefill
    decode_seconds: float = 0.0  # wall time of the other steps

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class Launched:
    """A step whose forward and sampling were issued to the device but whose tokens were not processed yet."""

    batch: ScheduleBatch
    sampled: list[Req]  # requests that get a token from this step, in the order of ``tokens``
    tokens: torch.Tensor  # int64 on the device
    host: torch.Tensor  # the same tokens, copied (asynchronously on CUDA) to the host
    copied: torch.cuda.Event | None  # set once ``host`` holds them (None: already there)


class Scheduler:
    def __init__(
        self,
        limits: SchedulerLimits,
        runner: ModelRunner,
        allocator: TokenAllocator,
        req_pool: ReqToTokenPool,
        tree: RadixCache,
        outputs: OutputProcessor,
    ) -> None:
        self.limits = limits
        self.runner = runner
        self.allocator = allocator
        self.req_pool = req_pool
        self.tree = tree
        self.outputs = outputs
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.chunked: Req | None = None  # the one request whose prompt is being prefilled in chunks
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.stats = SchedulerStats()
        self.inflight: Launched | None = None  # overlap mode: the launched step not yet resolved
        # The batch of the step in progress: its prefilled requests are neither waiting nor running until the step
        # resolves, so an exception in between must still find them (abort_all).
        self.stepping: ScheduleBatch | None = None
        self._pinned = [_pinned_buffer(limits.max_running_requests, runner.device) for _ in range(2)]

    # ---- queue operations (called from the engine's inbox handler, on the scheduler thread) ----

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def abort(self, rid: str, error: str | None = None) -> bool:
        """Finish request ``rid`` wherever it is, free its KV and send its last chunk. False if unknown.

        Called between steps, when every live request is waiting, chunked or running."""
        for req in [*self.waiting, *self.running] + ([self.chunked] if self.chunked else []):
            if req.rid == rid:
                self._abort_req(req, error)
                return True
        return False

    def abort_all(self, error: str) -> None:
        """Abort every request (after a failed step, at shutdown), also those of the step that was interrupted;
        a launched step is dropped unprocessed."""
        stepped = [*(self.inflight.batch.reqs if self.inflight else []), *(self.stepping.reqs if self.stepping else [])]
        if self.stepping is not None and not self.stepping.kv_committed:
            self.allocator.free(self.stepping.out_cache_loc)
            forget_borrowed(self.stepping)
        for req in [*self.waiting, *self.running, *stepped] + ([self.chunked] if self.chunked else []):
            if not req.finished:
                self._abort_req(req, error)
        self.inflight = self.stepping = None

    def _abort_req(self, req: Req, error: str | None) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        if req is self.chunked:
            self.chunked = None
        self._release_kv(req)
        self._finish_aborted(req, error)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.inflight)

    # ---- one step ----

    def step(self) -> bool:
        """Run one step; False when there was nothing to do.

        A step is launched (forward and sampling issued, tokens left on the device) and later resolved (tokens
        appended, finishes decided, chunks sent). Without overlap a step is resolved right after its launch. With
        overlap, while the batch stays the same, decode step t+1 is launched from step t's device tokens *before*
        step t is resolved, so the CPU work of resolving overlaps the device's work. A request that step t
        finishes still gets a token from step t+1; resolving t+1 drops it.
        """
        start = time.perf_counter()
        if self.inflight is not None:
            launched, self.inflight = self.inflight, None
            if self._can_chain(launched):
                self.stepping = self._chained_decode(launched)
                self.inflight = self._launch(self.stepping)
                self.stats.overlapped_steps += 1
            self._resolve(launched)
            self.stepping = None
            self._account(launched.batch.mode, start)
            return True
        batch = self._schedule_prefill()
        if batch is None:
            batch = self._schedule_decode()
        if batch is None:
            return False
        self.stepping = batch
        launched = self._launch(batch)
        if self.limits.overlap and batch.mode is ForwardMode.DECODE:
            self.inflight = launched
        else:
            self._resolve(launched)
        self.stepping = None
        self._account(batch.mode, start)
        return True

    def _account(self, mode: ForwardMode, start: float) -> None:
        elapsed = time.perf_counter() - start
        if mode is ForwardMode.EXTEND:
            self.stats.prefill_seconds += elapsed
        else:
            self.stats.decode_seconds += elapsed

    def _launch(self, batch: ScheduleBatch) -> Launched:
        logits = self.runner.forward(batch)
        for req, n in zip(batch.reqs, batch.extend_lens):
            req.kv_len += n
        batch.kv_committed = True
        if batch.mode is ForwardMode.EXTEND and not self.limits.disable_radix_cache:
            cache_prefilled(self.tree, self.req_pool, batch.reqs)  # later requests match them from now on
        rows = [i for i, s in enumerate(batch.samples) if s]
        sampled = [batch.reqs[i] for i in rows]
        if len(rows) != len(batch.reqs):
            logits = logits[rows]
        tokens = self.runner.sample(logits, sampled) if sampled else torch.empty(0, dtype=torch.int64)
        host, copied = tokens, None
        if tokens.is_cuda:
            self._pinned.reverse()  # alternate: the other buffer may still be read by the step being resolved
            host = self._pinned[0][: len(sampled)]
            host.copy_(tokens, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        if batch.mode is ForwardMode.EXTEND:
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += batch.num_tokens
            self.stats.peak_prefill_tokens = max(self.stats.peak_prefill_tokens, batch.num_tokens)
        else:
            self.stats.decode_steps += 1
            self.stats.peak_running_requests = max(self.stats.peak_running_requests, len(batch.reqs))
            self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        return Launched(batch, sampled, tokens, host, copied)

    def _resolve(self, launched: Launched) -> None:
        if launched.copied is not None:
            launched.copied.synchronize()
        for req, tok in zip(launched.sampled, launched.host.tolist()):
            if req.finished:
                continue  # finished or aborted after this step was launched: its token is dropped
            self.outputs.append_token(req, tok)
            self.stats.generated_tokens += 1
        if launched.batch.mode is ForwardMode.EXTEND:
            # Prefilled requests join the running batch, also those that finished on their first token (retiring
            # them releases their KV); only requests aborted meanwhile, which hold nothing any more, stay out.
            self.running.extend(
                r for r in launched.sampled if r is not self.chunked and r.req_pool_idx is not None
            )
        self._retire_finished()

    def _can_chain(self, launched: Launched) -> bool:
        """Whether the next decode step can be launched before ``launched`` is resolved: it decodes, every running
        request's next step does not depend on the token still in flight, no waiting request could be admitted
        instead, and the pool has a slot for every running request without retracting."""
        if launched.batch.mode is not ForwardMode.DECODE or not self.running or self.chunked is not None:
            return False
        if not all(_overlap_safe(r) for r in self.running):
            return False
        if self._free_tokens() < len(self.running):
            return False
        return not self._admission_possible()

    def _admission_possible(self) -> bool:
        """The admission test of ``_schedule_prefill`` for the request at the head of the queue."""
        if not self.waiting or len(self.running) >= self.limits.max_running_requests:
            return False
        head = self.waiting[0]
        prefix, _ = self._match(head)
        need = len(head.input_ids) + len(head.output_ids) - len(prefix) + min(head.remaining_new_tokens, RESERVE_CLIP)
        return need <= self._free_tokens() - self._reserved_for_running()

    def _chained_decode(self, launched: Launched) -> ScheduleBatch:
        """The next decode step of the running requests, its inputs gathered from ``launched``'s device tokens."""
        reqs = list(self.running)
        position = {id(r): i for i, r in enumerate(launched.sampled)}
        rows = [position[id(r)] for r in reqs]  # every running request was in the launched decode step
        inputs = launched.tokens
        if rows != list(range(len(launched.sampled))):
            index = torch.tensor(rows, dtype=torch.int64, pin_memory=inputs.is_cuda)  # an async copy: no host wait
            inputs = inputs[index.to(inputs.device, non_blocking=True)]
        got = self._alloc_slots(len(reqs))
        assert got is not None  # _can_chain checked the room
        return ScheduleBatch(ForwardMode.DECODE, reqs, [1] * len(reqs), got, [True] * len(reqs), input_ids=inputs)

    def _retire_finished(self) -> None:
        still = []
        for req in self.running:
            if req.finished:
                self._release_kv(req)
                self.stats.finished_requests += 1
            else:
                still.append(req)
        self.running = still

    # ---- prefill admission ----

    def _schedule_prefill(self) -> ScheduleBatch | None:
        if not self.waiting and self.chunked is None:
            return None
        lim = self.limits
        token_budget = lim.max_prefill_tokens
        room = self._free_tokens() - self._reserved_for_running()
        reqs: list[Req] = []
        lens: list[int] = []
        samples: list[bool] = []
        slots: list[torch.Tensor] = []

        if self.chunked is not None:
            req = self.chunked
            n = min(req.extend_len, lim.chunked_prefill_size, token_budget)
            got = self._alloc_slots(n)
            if got is None:
                return None  # the decode of running requests frees room (or retracts) first
            done = n == req.extend_len
            reqs.append(req), lens.append(n), samples.append(done), slots.append(got)
            token_budget -= n
            room -= n
            if done:
                self.chunked = None
            # the next chunk's forward must run before any other request is admitted behind this one
            return ScheduleBatch(ForwardMode.EXTEND, reqs, lens, torch.cat(slots), samples)

        free_rows = lim.max_running_requests - len(self.running)
        peers = None if lim.disable_radix_cache else BatchPrefixIndex(self.allocator)
        borrowed: list[int] = []
        for req in self._ordered_waiting():
            if len(reqs) >= free_rows or token_budget <= 0:
                break
            prefix_slots, node, shared = self._match_in_batch(req, peers)
            extend = len(req.input_ids) + len(req.output_ids) - len(prefix_slots)
            need = extend + min(req.remaining_new_tokens, RESERVE_CLIP)
            alone = not self.running and not reqs
            if need > room and not (alone and extend <= self._free_tokens()):
                break  # no skipping ahead: a large request at the head must not starve
            n = min(extend, lim.chunked_prefill_size, token_budget)
            if n < extend and self.chunked is not None:
                break
            got = self._admit(req, n, prefix_slots, node)
            if got is None:
                break
            reqs.append(req), lens.append(n), samples.append(n == extend), slots.append(got)
            borrowed.append(shared)
            if peers is not None:
                peers.add(req.fill_ids[: req.kv_len + n], torch.cat([prefix_slots, got]))
            if n < extend:
                self.chunked = req
            token_budget -= n
            room -= need
        if not reqs:
            return None
        for req in reqs:
            self.waiting.remove(req)
        return ScheduleBatch(ForwardMode.EXTEND, reqs, lens, torch.cat(slots), samples, borrowed=borrowed)

    def _ordered_waiting(self) -> list[Req]:
        if self.limits.schedule_policy == "lpm" and not self.limits.disable_radix_cache and len(self.waiting) <= 128:
            # Longest prefix first: requests sharing a cached prefix run while it is hot. Beyond 128 waiting
            # requests the matching costs more than it saves; fall back to arrival order.
            return sorted(self.waiting, key=lambda r: -self._peek_prefix_len(r))
        return list(self.waiting)

    def _peek_prefix_len(self, req: Req) -> int:
        return len(self._match(req)[0])

    def _match(self, req: Req) -> tuple[torch.Tensor, "TreeNode | None"]:
        """The cached prefix of ``req`` and its node, always leaving one token uncached to compute logits from.

        The slots are only safe to use until the next eviction unless the node is locked (``_admit`` locks it).
        """
        if self.limits.disable_radix_cache:
            return torch.empty(0, dtype=torch.int64), None
        return self.tree.match_prefix(req.fill_ids[:-1])

    def _match_in_batch(
        self, req: Req, peers: BatchPrefixIndex | None
    ) -> tuple[torch.Tensor, "TreeNode | None", int]:
        """``_match`` lengthened by what the requests admitted before ``req`` into this prefill batch compute of
        its tokens (``peers``; None without a radix cache), and how many of the slots are theirs (borrowed). The
        node covers only the tree's part: the borrowed slots stay valid because their owners run in the same
        forward, and enter the tree before ``req``'s own insert (``cache_prefilled``)."""
        prefix_slots, node = self._match(req)
        if peers is None:
            return prefix_slots, node, 0
        prefix_slots, borrowed = peers.extend_prefix(req.fill_ids[:-1], prefix_slots)
        return prefix_slots, node, borrowed

    def _admit(self, req: Req, n: int, prefix_slots: torch.Tensor, node: "TreeNode | None") -> torch.Tensor | None:
        """Give ``req`` a table row, lock its cached prefix and return ``n`` new slots for it; None (and nothing
        changed) if there is no free row or the pool cannot provide them."""
        row = self.req_pool.alloc()
        if row is None:
            return None
        if node is not None:
            self.tree.lock(node)  # before allocating: eviction must not take the prefix we are about to use
        got = self._alloc_slots(n)
        if got is None:
            if node is not None:
                self.tree.unlock(node)
            self.req_pool.free(row)
            return None
        prefix_len = len(prefix_slots)
        self.req_pool.table[row, :prefix_len] = prefix_slots.to(self.req_pool.table.device, torch.int32)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = row, node, prefix_len, prefix_len
        if not req.admitted_once:
            req.admitted_once = True
            req.cached_tokens = min(prefix_len, len(req.input_ids))
            self.stats.prompt_tokens += len(req.input_ids)
            self.stats.cached_prompt_tokens += req.cached_tokens
        return got

    # ---- decode ----

    def _schedule_decode(self) -> ScheduleBatch | None:
        if not self.running:
            return None
        while self._free_tokens() < len(self.running) and len(self.running) > 1:
            self._retract_one()
        if self._free_tokens() < len(self.running):
            # A lone request has filled the whole pool: it cannot grow, and there is nobody to retract.
            req = self.running[0]
            logger.warning("request %s filled the KV pool (%d tokens); finishing it", req.rid, req.kv_len)
            self.outputs.finish(req, "length")
            self._retire_finished()
            return None
        got = self._alloc_slots(len(self.running))
        assert got is not None  # guaranteed by the loop above
        reqs = list(self.running)
        return ScheduleBatch(ForwardMode.DECODE, reqs, [1] * len(reqs), got, [True] * len(reqs))

    def _retract_one(self) -> None:
        """Send the request with the fewest decoded tokens (latest arrival on ties) back to the queue."""
        self.retract(min(self.running, key=lambda r: (len(r.output_ids), -r.arrival)))

    def retract(self, victim: Req) -> None:
        """Move a running request back to the head of the queue: its KV goes to the radix cache (evictable), its
        output and its grammar state stay, and it is re-prefilled when admitted again."""
        self.running.remove(victim)
        self._release_kv(victim)
        victim.retractions += 1
        self.waiting.appendleft(victim)
        self.stats.retractions += 1
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        logger.info("retracted request %s (%d output tokens kept) to free KV", victim.rid, len(victim.output_ids))

    # ---- KV bookkeeping ----

    def _free_tokens(self) -> int:
        return self.allocator.available + (0 if self.limits.disable_radix_cache else self.tree.evictable_size())

    def _reserved_for_running(self) -> int:
        reserved = sum(min(r.remaining_new_tokens, RESERVE_CLIP) for r in self.running) * self.new_token_ratio
        return int(reserved)

    def _alloc_slots(self, n: int) -> torch.Tensor | None:
        if self.allocator.available < n and not self.limits.disable_radix_cache:
            self.tree.evict(n - self.allocator.available)
        return self.allocator.alloc(n)

    def _release_kv(self, req: Req) -> None:
        """Return a request's KV: its tokens go into the radix cache (or are freed without one), its lock and its
        table row are released. Afterwards the request holds nothing."""
        if req.req_pool_idx is None:
            return
        row, kv_len = req.req_pool_idx, req.kv_len
        slots = self.req_pool.table[row, :kv_len].to(torch.int64).clone()
        if self.limits.disable_radix_cache:
            self.allocator.free(slots)
        else:
            tokens = req.fill_ids[:kv_len]
            already = self.tree.insert(tokens, slots)
            # The tree keeps its own slots for the part it already had; ours for that part beyond our locked
            # prefix are duplicates (another request inserted the same tokens meanwhile).
            if already > req.prefix_len:
                self.allocator.free(slots[req.prefix_len : already])
            if req.last_node is not None:
                self.tree.unlock(req.last_node)
        self.req_pool.free(row)
        req.req_pool_idx, req.last_node, req.prefix_len, req.kv_len = None, None, 0, 0

    def _finish_aborted(self, req: Req, error: str | None) -> None:
        self.stats.aborted_requests += 1
        self.outputs.finish(req, "abort", error=error)

    # ---- checks ----

    def idle_invariant_violations(self) -> list[str]:
        """Empty when idle bookkeeping is exact: ``free + evictable == total`` and no request holds anything."""
        problems = []
        if self.has_work:
            return ["scheduler is not idle"]
        evictable = 0 if self.limits.disable_radix_cache else self.tree.evictable_size()
        if self.allocator.available + evictable != self.allocator.size:
            problems.append(
                f"free {self.allocator.available} + evictable {evictable} != total {self.allocator.size}"
            )
        if not self.limits.disable_radix_cache and self.tree.protected_size() != 0:
            problems.append(f"{self.tree.protected_size()} cached tokens still locked")
        if self.req_pool.available != self.req_pool.rows:
            problems.append(f"{self.req_pool.rows - self.req_pool.available} request rows still held")
        return problems


def _overlap_safe(req: Req) -> bool:
    """Whether the next step of ``req`` can be sampled before its last token is known on the host: no grammar
    (its mask depends on that token), no penalties (they count it), no stop-token ban still pending."""
    p = req.params
    uses_penalty = p.frequency_penalty != 0 or p.presence_penalty != 0 or p.repetition_penalty != 1.0
    return req.grammar is None and not uses_penalty and len(req.output_ids) >= p.min_new_tokens


def _pinned_buffer(n: int, device: torch.device) -> torch.Tensor:
    """Host memory for sampled tokens; page-locked on CUDA so the device-to-host copy is asynchronous."""
    return torch.empty(n, dtype=torch.int64, pin_memory=device.type == "cuda")
