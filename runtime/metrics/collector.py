"""Request-level measurements the scheduler takes where the events happen: latency histograms and finish reasons.

``LatencyStats`` lives in ``SchedulerStats`` (the scheduler's one place for its counters) and is updated on the
scheduler's thread only: queue time at a request's first admission (``prefill.py``), time to first token and
inter-token latency when a step's tokens are resolved (``Scheduler._resolve``), end-to-end latency and the
finish reason when a request leaves (``DecodeManager.retire_finished``, ``Scheduler._abort_req``), the batch size
of every launched step. Each observation is a ``bisect`` and two additions on plain Python numbers, with no lock:
nothing else touches them. Readers get a ``LatencySnapshot`` (frozen, picklable) through the scheduler's
``GetMetrics`` query, taken between two steps, so a scrape never sees a half-updated histogram.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC), the clock of ``NewRequest.arrival``, so they are comparable
across the engine's and a scheduler process's side.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, get_args

from ..engine.outputs import FinishReason

if TYPE_CHECKING:
    from ..scheduler.schedule_batch import Req

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "FINISH_REASONS",
    "Histogram",
    "HistogramSnapshot",
    "LATENCY_BUCKETS",
    "LatencySnapshot",
    "LatencyStats",
    "TOKEN_GAP_BUCKETS",
]

FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)
# Upper bounds (seconds) of the queue-time, TTFT and end-to-end buckets; +Inf is implied.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Inter-token gaps are milliseconds on a GPU and tens of milliseconds on a CPU.
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class HistogramSnapshot:
    """A histogram at one moment: ``counts[i]`` observations in ``(bounds[i-1], bounds[i]]``, and the last entry
    those above every bound (Prometheus' ``+Inf`` bucket). Not cumulative; ``cumulative()`` is."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        """Observations ``<= bounds[i]`` for each bound, then the total (the ``le`` buckets of the text format)."""
        out, total = [], 0
        for c in self.counts:
            total += c
            out.append(total)
        return out

    def minus(self, earlier: "HistogramSnapshot") -> "HistogramSnapshot":
        """The observations made since ``earlier`` (a snapshot of the same histogram)."""
        counts = tuple(a - b for a, b in zip(self.counts, earlier.counts))
        return HistogramSnapshot(self.bounds, counts, self.sum - earlier.sum)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile estimated as Prometheus' ``histogram_quantile`` does (linear inside the bucket it
        falls in; the highest finite bound when it falls above them); None without observations."""
        total = self.count
        if total == 0:
            return None
        rank, seen = q * total, 0
        for i, c in enumerate(self.counts):
            if c and seen + c >= rank:
                if i == len(self.bounds):
                    return float(self.bounds[-1])
                lower = self.bounds[i - 1] if i else 0.0
                return lower + (self.bounds[i] - lower) * (rank - seen) / c
            seen += c
        return float(self.bounds[-1])


class Histogram:
    """Fixed buckets, observed on one thread: ``observe`` is a ``bisect`` and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (``le`` is inclusive).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.bounds, tuple(self.counts), self.sum)


@dataclass(frozen=True)
class LatencySnapshot:
    """``LatencyStats`` at one moment (part of ``messages.MetricsSnapshot``)."""

    queue_time: HistogramSnapshot
    time_to_first_token: HistogramSnapshot
    inter_token_latency: HistogramSnapshot
    e2e_latency: HistogramSnapshot
    prefill_batch_size: HistogramSnapshot
    decode_batch_size: HistogramSnapshot
    finish_reasons: tuple[tuple[str, int], ...]  # (reason, requests) for every FinishReason, in FINISH_REASONS order


@dataclass
class LatencyStats:
    """The histograms and the finish-reason counts; see the module docstring for where each is observed."""

    queue_time: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(TOKEN_GAP_BUCKETS))
    e2e_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    prefill_batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    decode_batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    finish_reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))

    def admitted(self, req: "Req") -> None:
        """``req`` was admitted for the first time: it waited from its arrival until now."""
        self.queue_time.observe(time.monotonic() - req.arrival)

    def tokens_resolved(self, reqs: list["Req"]) -> None:
        """A step's tokens were appended: time every request of ``reqs`` whose output grew since it was last timed
        (its first token: TTFT from arrival; a later one: the gap since its previous token). A retracted request
        keeps its output and its count, so re-prefilling it times nothing twice."""
        now = time.monotonic()
        for req in reqs:
            n = len(req.output_ids)
            if n == req.timed_tokens:
                continue
            if req.timed_tokens == 0:
                self.time_to_first_token.observe(now - req.arrival)
            else:
                self.inter_token_latency.observe(now - req.last_token_at)
            req.timed_tokens, req.last_token_at = n, now

    def finished(self, req: "Req", reason: str) -> None:
        """``req`` left the scheduler with ``reason`` (its finish reason, or ``"abort"``)."""
        self.e2e_latency.observe(time.monotonic() - req.arrival)
        self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1

    def snapshot(self) -> LatencySnapshot:
        return LatencySnapshot(
            queue_time=self.queue_time.snapshot(),
            time_to_first_token=self.time_to_first_token.snapshot(),
            inter_token_latency=self.inter_token_latency.snapshot(),
            e2e_latency=self.e2e_latency.snapshot(),
            prefill_batch_size=self.prefill_batch_size.snapshot(),
            decode_batch_size=self.decode_batch_size.snapshot(),
            finish_reasons=tuple(self.finish_reasons.items()),
        )
