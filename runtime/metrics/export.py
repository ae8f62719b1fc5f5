"""What one Prometheus scrape of an engine shows, and its text exposition (format 0.0.4).

``collect(engine)`` gathers a ``MetricsView``: the scheduler's ``MetricsSnapshot`` (taken on the scheduler's
thread between two steps, through the ``GetMetrics`` query, so counters and histograms are mutually consistent),
the memory plan the engine allocated by (the theoretical side), the memory measured now (process RSS; on CUDA
what torch's allocator holds), and the grammar backend's compile counters. ``render(view, labels)`` writes it as
Prometheus text; every series carries ``labels`` (the Xinference plugin passes model uid, replica and engine).
Every number comes from the place that already keeps it: nothing here counts anything itself.

With tensor parallelism rank 0 owns the scheduler, the plan and the endpoint; the measured memory is rank 0's
process (the plan is the same on every rank: the pool is sized by the minimum over ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
import torch

from ..mem_cache.memory_plan import MemoryPlan
from ..engine.messages import MetricsSnapshot
from .collector import HistogramSnapshot

__all__ = ["MeasuredMemory", "MetricsSource", "MetricsView", "collect", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class MeasuredMemory:
    """Memory in use now, in bytes. ``device_*`` are None off CUDA."""

    process_rss: int
    device_allocated: int | None = None  # torch.cuda.memory_allocated: live tensors
    device_reserved: int | None = None  # torch.cuda.memory_reserved: held by the caching allocator

    @classmethod
    def now(cls, device: torch.device) -> "MeasuredMemory":
        rss = psutil.Process().memory_info().rss
        if device.type != "cuda":
            return cls(rss)
        return cls(rss, torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


@dataclass(frozen=True)
class MetricsView:
    """Everything one scrape shows."""

    snapshot: MetricsSnapshot
    plan: MemoryPlan
    memory: MeasuredMemory
    grammar_compiles: int  # grammars compiled (cache misses) by the engine's backend
    grammar_cache_hits: int


class MetricsSource(Protocol):
    """What a scrape reads of an engine (``Engine`` is one). A protocol, so that metrics/ does not import the
    engine that imports it."""

    memory_plan: MemoryPlan
    device: torch.device

    def grammar_stats(self) -> dict[str, int]: ...

    def metrics_snapshot(self, timeout: float = 60.0) -> MetricsSnapshot: ...


def collect(engine: MetricsSource, timeout: float = 10.0) -> MetricsView:
    """The view of ``engine`` now; waits for the step in progress to end (at most ``timeout`` seconds)."""
    grammar = engine.grammar_stats()
    return MetricsView(
        snapshot=engine.metrics_snapshot(timeout),
        plan=engine.memory_plan,
        memory=MeasuredMemory.now(engine.device),
        grammar_compiles=grammar.get("misses", 0),
        grammar_cache_hits=grammar.get("hits", 0),
    )


Sample = tuple[str, Mapping[str, str], float]  # (name suffix, extra labels, value)

# (metric, MetricsSnapshot field, help): the snapshot's scalar gauges and counters, exported as they are.
_GAUGES = (
    ("sglite_running_requests", "running_requests", "Requests decoding or being prefilled."),
    ("sglite_waiting_requests", "waiting_requests", "Requests queued for admission (retracted ones included)."),
    ("sglite_kv_total_tokens", "kv_total_tokens", "KV pool size in tokens."),
    ("sglite_kv_used_tokens", "kv_used_tokens", "KV pool tokens not free: held by requests or by the prefix cache."),
    ("sglite_kv_evictable_tokens", "kv_evictable_tokens", "KV tokens held only by the prefix cache (reclaimable)."),
    ("sglite_kv_free_tokens", "kv_free_tokens", "KV pool tokens free."),
    ("sglite_new_token_ratio", "new_token_ratio", "Share of running requests' remaining tokens admission reserves."),
)
_COUNTERS = (
    ("sglite_prompt_tokens_total", "prompt_tokens_total", "Prompt tokens of admitted requests."),
    ("sglite_cached_prompt_tokens_total", "cached_prompt_tokens_total", "Prompt tokens served by the prefix cache."),
    ("sglite_generated_tokens_total", "generated_tokens_total", "Output tokens generated."),
    ("sglite_prefill_tokens_total", "prefill_tokens_total", "Tokens computed by prefill steps (cache hits excluded)."),
    ("sglite_retractions_total", "retractions", "Running requests sent back to the queue (preemptions included)."),
    ("sglite_preemptions_total", "preemptions", "Retractions made for a more urgent request (priority policy)."),
    ("sglite_prefill_steps_total", "prefill_steps", "Prefill (extend) steps launched."),
    ("sglite_decode_steps_total", "decode_steps", "Decode steps launched."),
    ("sglite_prefill_seconds_total", "prefill_seconds_total", "Wall time of steps that launched or resolved a prefill."),
    ("sglite_decode_seconds_total", "decode_seconds_total", "Wall time of the other steps."),
)
_HISTOGRAMS = (
    ("sglite_queue_time_seconds", "queue_time", "Arrival to first admission."),
    ("sglite_time_to_first_token_seconds", "time_to_first_token", "Arrival to the first output token."),
    ("sglite_inter_token_latency_seconds", "inter_token_latency", "Gap between two output tokens of a request."),
    ("sglite_e2e_request_latency_seconds", "e2e_latency", "Arrival to finish (aborts included)."),
)


def render(view: MetricsView, labels: Mapping[str, str]) -> str:
    """``view`` in the Prometheus text format; every sample carries ``labels``."""
    snap, out = view.snapshot, _Text(labels)
    for name, key, text in _GAUGES:
        out.family(name, "gauge", text, [("", {}, getattr(snap, key))])
    usage = (snap.kv_used_tokens - snap.kv_evictable_tokens) / max(snap.kv_total_tokens, 1)
    out.family("sglite_token_usage_ratio", "gauge", "KV tokens held by requests / pool size (SGLang's token usage).",
               [("", {}, usage)])
    for name, key, text in _COUNTERS:
        out.family(name, "counter", text, [("", {}, getattr(snap, key))])
    out.family("sglite_finished_requests_total", "counter", "Requests that left the scheduler, by finish reason.",
               [("", {"finish_reason": reason}, n) for reason, n in snap.latency.finish_reasons])
    out.family("sglite_grammar_compiles_total", "counter", "Grammars compiled (constrained decoding; cache misses).",
               [("", {}, view.grammar_compiles)])
    out.family("sglite_grammar_cache_hits_total", "counter", "Constrained requests that reused a compiled grammar.",
               [("", {}, view.grammar_cache_hits)])
    for name, key, text in _HISTOGRAMS:
        out.family(name, "histogram", text, _histogram(getattr(snap.latency, key)))
    batches = [*_histogram(snap.latency.prefill_batch_size, {"mode": "prefill"}),
               *_histogram(snap.latency.decode_batch_size, {"mode": "decode"})]
    out.family("sglite_batch_size", "histogram", "Requests per launched step, by mode.", batches)
    _memory(out, view.plan, view.memory)
    return out.text()


def _memory(out: "_Text", plan: MemoryPlan, memory: MeasuredMemory) -> None:
    """The plan (what startup sized) next to what is measured now."""
    parts = {
        "weights": plan.weights_bytes,
        "kv_pool": plan.kv_pool_bytes,
        "request_table": plan.req_table_bytes,
        "activations_reserve": plan.activation_reserve_bytes,
    }
    out.family("sglite_memory_plan_bytes", "gauge", "Memory the startup plan sized, by component (theoretical).",
               [("", {"component": k}, v) for k, v in parts.items()])
    out.family("sglite_kv_bytes_per_token", "gauge", "KV cache bytes one token takes.", [("", {}, plan.kv_bytes_per_token)])
    out.family("sglite_max_running_requests", "gauge", "Decode batch bound (request table rows).",
               [("", {}, plan.max_running_requests)])
    out.family("sglite_context_length_tokens", "gauge", "Longest prompt + output of one request.",
               [("", {}, plan.context_length)])
    out.family("sglite_process_resident_memory_bytes", "gauge", "Resident memory of the engine's process (measured).",
               [("", {}, memory.process_rss)])
    if memory.device_allocated is not None:
        out.family("sglite_device_memory_allocated_bytes", "gauge", "Device memory in live tensors (measured).",
                   [("", {}, memory.device_allocated)])
        out.family("sglite_device_memory_reserved_bytes", "gauge", "Device memory held by torch's allocator.",
                   [("", {}, memory.device_reserved)])


def _histogram(h: HistogramSnapshot, extra: Mapping[str, str] | None = None) -> list[Sample]:
    extra = dict(extra or {})
    cumulative = h.cumulative()
    bounds = [_number(b) for b in h.bounds] + ["+Inf"]
    samples: list[Sample] = [("_bucket", {**extra, "le": le}, n) for le, n in zip(bounds, cumulative)]
    return samples + [("_sum", extra, h.sum), ("_count", extra, cumulative[-1])]


class _Text:
    """Prometheus text lines: ``# HELP`` / ``# TYPE`` per family, then its samples."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        self.labels = dict(labels)
        self.lines: list[str] = []

    def family(self, name: str, kind: str, text: str, samples: Iterable[Sample]) -> None:
        self.lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for suffix, extra, value in samples:
            self.lines.append(f"{name}{suffix}{_labels({**self.labels, **extra})} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    escape: Callable[[Any], str] = lambda v: str(v).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
