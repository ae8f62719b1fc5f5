"""``StatsLog``: the periodic stats line of a busy scheduler, in the shape SGLang's scheduler logs it.

SGLang logs ``Decode batch. #running-req: 1, #token: 38, token usage: 0.00, gen throughput (token/s): 97.21,
#queue-req: 0`` every ``decode_log_interval`` decode steps. sglite logs the same fields, plus the prefix cache's
hit rate and the median queue time, every ``stats_interval_s`` seconds of work (``EngineConfig``), and nothing
while idle: the line is written from the scheduler loop right before a step, never from a timer. Throughput, hit
rate and queue time cover the window since the previous line; a window that saw no work for a whole interval
starts afresh, so a line after a quiet spell does not average the quiet in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .collector import HistogramSnapshot

if TYPE_CHECKING:
    from ..scheduler.scheduler import Scheduler

logger = logging.getLogger("xinf_sglang.runtime.scheduler")

__all__ = ["StatsLog", "stats_line"]


@dataclass(frozen=True)
class _Window:
    """The counters when a window started."""

    at: float
    generated: int
    prompt: int
    cached: int
    queue_time: HistogramSnapshot

    @classmethod
    def now(cls, sched: "Scheduler", at: float) -> "_Window":
        s = sched.stats
        return cls(at, s.generated_tokens, s.prompt_tokens, s.cached_prompt_tokens, s.latency.queue_time.snapshot())


class StatsLog:
    """Call ``tick(scheduler)`` before every step while there is work; it writes a line once ``interval_s`` of work
    has passed since the last one. Runs on the scheduler's thread; a tick that is not due costs one clock read."""

    def __init__(self, interval_s: float, write: Callable[[str], None] = logger.info) -> None:
        if interval_s <= 0:
            raise ValueError(f"stats_interval_s must be > 0 for a StatsLog (0 turns it off); got {interval_s}")
        self.interval_s = interval_s
        self.write = write
        self._window: _Window | None = None
        self._last_tick = 0.0

    def tick(self, sched: "Scheduler") -> None:
        now = time.monotonic()
        window = self._window
        if window is None or now - self._last_tick >= self.interval_s:
            self._window = _Window.now(sched, now)  # first work, or work after a quiet spell: a fresh window
        elif now - window.at >= self.interval_s:
            self.write(stats_line(sched, window, now))
            self._window = _Window.now(sched, now)
        self._last_tick = now


def stats_line(sched: "Scheduler", since: _Window, now: float) -> str:
    """The line for the window from ``since`` to ``now``."""
    s, kv = sched.stats, sched.kv
    total = kv.allocator.size
    used = total - kv.allocator.available - kv.cache.evictable_size()  # SGLang's #token: held by live requests
    prompt, cached = s.prompt_tokens - since.prompt, s.cached_prompt_tokens - since.cached
    hit_rate = f"{cached / prompt:.2f}" if prompt else "n/a"
    throughput = (s.generated_tokens - since.generated) / max(now - since.at, 1e-9)
    p50 = s.latency.queue_time.snapshot().minus(since.queue_time).quantile(0.5)
    queue = f"{p50:.3f}" if p50 is not None else "n/a"
    running = len(sched.running) + (1 if sched.chunked is not None else 0)
    return (
        f"Decode batch. #running-req: {running}, #token: {used}, token usage: {used / max(total, 1):.2f}, "
        f"cache hit rate: {hit_rate}, gen throughput (token/s): {throughput:.2f}, #queue-req: {len(sched.waiting)}, "
        f"queue time p50 (s): {queue}"
    )
