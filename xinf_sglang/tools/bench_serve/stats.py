"""A run's outcomes -> :class:`RunResult`, and its JSON line with SGLang ``bench_serving``'s key names.

Only completed requests enter the latencies and token counts. Throughputs divide by the run's wall time;
``concurrency`` is the sum of E2E latencies over the wall time (requests in flight on average). The cache hit
rate is cached prompt tokens / prompt tokens, over the requests whose usage reports ``cached_tokens`` (None when
none does); ``cache_hit_rate_per_turn`` is the same per turn index. Percentiles are numpy's (linear); an empty
distribution is all zeros, as in SGLang. Names sglite adds: ``failed``, ``total_cached_tokens``,
``cache_hit_rate``, ``cache_hit_rate_per_turn``, ``p90_*``/``std_*`` for every latency, ``first_error``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .client import RequestOutcome
from .runner import RunOutcomes


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency, in milliseconds."""

    mean: float
    median: float
    std: float
    p90: float
    p99: float


def distribution_ms(values_s: Sequence[float]) -> Distribution:
    """``values_s`` (seconds) summarized in milliseconds; all zeros when empty."""
    if not values_s:
        return Distribution(0.0, 0.0, 0.0, 0.0, 0.0)
    ms = np.asarray(values_s, dtype=float) * 1000.0
    return Distribution(float(ms.mean()), float(np.median(ms)), float(ms.std()),
                        float(np.percentile(ms, 90)), float(np.percentile(ms, 99)))


@dataclass(frozen=True)
class RunResult:
    """What one run of one model at one concurrency level measured."""

    model_id: str
    role: str  # "model" or "baseline"
    dataset_name: str
    request_rate: float
    max_concurrency: int | None
    completed: int
    failed: int
    duration: float
    total_input_tokens: int
    total_output_tokens: int
    total_cached_tokens: int | None
    cache_hit_rate: float | None
    cache_hit_rate_per_turn: list[float | None]
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e_latency: Distribution
    concurrency: float
    first_error: str

    def as_json(self) -> dict[str, Any]:
        """The flat JSON line: SGLang's names (``request_throughput``, ``p99_ttft_ms``, ...) where they exist."""
        d = max(self.duration, 1e-9)
        line: dict[str, Any] = {
            "model_id": self.model_id, "role": self.role, "dataset_name": self.dataset_name,
            "request_rate": "inf" if math.isinf(self.request_rate) else self.request_rate,  # JSON has no inf
            "max_concurrency": self.max_concurrency, "completed": self.completed, "failed": self.failed,
            "duration": self.duration, "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens, "total_cached_tokens": self.total_cached_tokens,
            "request_throughput": self.completed / d, "input_throughput": self.total_input_tokens / d,
            "output_throughput": self.total_output_tokens / d,
            "total_throughput": (self.total_input_tokens + self.total_output_tokens) / d,
            "cache_hit_rate": self.cache_hit_rate, "cache_hit_rate_per_turn": self.cache_hit_rate_per_turn,
        }
        for name in ("ttft", "tpot", "itl", "e2e_latency"):
            dist: Distribution = getattr(self, name)
            for stat in ("mean", "median", "std", "p90", "p99"):
                line[f"{stat}_{name}_ms"] = getattr(dist, stat)
        line.update(concurrency=self.concurrency, first_error=self.first_error)
        return line


def summarize(run: RunOutcomes, model_id: str, role: str, dataset_name: str, request_rate: float,
              max_concurrency: int | None) -> RunResult:
    """The :class:`RunResult` of one run's outcomes."""
    done = [o for o in run.outcomes if o.ok]
    failed = [o for o in run.outcomes if not o.ok]
    turns = max((o.turn for o in run.outcomes), default=-1) + 1
    rate, cached = cache_hit_rate(done)
    return RunResult(
        model_id=model_id, role=role, dataset_name=dataset_name, request_rate=request_rate,
        max_concurrency=max_concurrency, completed=len(done), failed=len(failed), duration=run.duration_s,
        total_input_tokens=sum(o.prompt_tokens for o in done),
        total_output_tokens=sum(o.completion_tokens for o in done), total_cached_tokens=cached,
        cache_hit_rate=rate,
        cache_hit_rate_per_turn=[cache_hit_rate([o for o in done if o.turn == t])[0] for t in range(turns)],
        ttft=distribution_ms([o.ttft_s for o in done]),
        tpot=distribution_ms([o.tpot_s for o in done if o.tpot_s is not None]),
        itl=distribution_ms([gap for o in done for gap in o.itl_s]),
        e2e_latency=distribution_ms([o.e2e_s for o in done]),
        concurrency=sum(o.e2e_s for o in done) / max(run.duration_s, 1e-9),
        first_error=failed[0].error if failed else "",
    )


def cache_hit_rate(outcomes: Sequence[RequestOutcome]) -> tuple[float | None, int | None]:
    """(cached / prompt tokens, cached tokens) over the outcomes that report cached tokens; (None, None) if none."""
    reporting = [o for o in outcomes if o.cached_tokens is not None]
    if not reporting:
        return None, None
    cached = sum(o.cached_tokens or 0 for o in reporting)
    prompt = sum(o.prompt_tokens for o in reporting)
    return (cached / prompt if prompt else 0.0), cached
