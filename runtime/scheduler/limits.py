"""The scheduler's fixed limits and its counters: plain values shared by its parts."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..mem_cache.memory_plan import MemoryPlan
from ..metrics.collector import LatencyStats

__all__ = ["RESERVE_CLIP", "SchedulerLimits", "SchedulerStats"]

# Admission reserves at most this many future tokens per request (SGLang's clip), so one huge max_new_tokens does
# not block admission forever.
RESERVE_CLIP = 4096


@dataclass(frozen=True)
class SchedulerLimits:
    max_running_requests: int
    max_prefill_tokens: int
    chunked_prefill_size: int
    schedule_policy: str  # a key of policy.POLICIES: "fcfs" | "lpm" | "priority"
    overlap: bool = False  # launch decode step t+1 before processing step t's outputs (see Scheduler.step)
    low_priority_values_first: bool = False  # priority policy: smaller Req.priority values are more urgent
    # priority policy: a waiting request preempts running ones less urgent by more than this; None: never preempt
    preemption_threshold: int | None = None
    # most prompt positions one step scores (logits + log-softmax rows); startup passes the memory plan's, which
    # reserved their memory (this default is the plan's CPU default)
    max_scored_prompt_tokens: int = 256
    # the plan these budgets came from: an out-of-memory step's error says what to relaunch with (None: nothing)
    memory_plan: MemoryPlan | None = None


@dataclass
class SchedulerStats:
    prompt_tokens: int = 0  # prompt tokens of admitted requests (first admission only)
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    retractions: int = 0  # priority preemptions included
    preemptions: int = 0  # retractions that made room for a more urgent request
    prefill_steps: int = 0
    decode_steps: int = 0
    peak_running_requests: int = 0  # largest decode batch so far
    peak_prefill_tokens: int = 0  # largest prefill batch so far, in new tokens
    overlapped_steps: int = 0  # decode steps launched before the previous step was resolved
    prefill_tokens: int = 0  # new tokens computed by prefill steps (cached prefixes excluded)
    prefill_seconds: float = 0.0  # wall time of steps that launched or resolved a prefill
    decode_seconds: float = 0.0  # wall time of the other steps
    latency: LatencyStats = field(default_factory=LatencyStats)  # histograms and finish reasons (runtime/metrics/collector.py)

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
