"""The messages between the engine (the front end) and the scheduler: frozen, picklable dataclasses.

Everything that enters the scheduler is one of `SchedulerInput`; everything that leaves it is an `Outputs` (the
chunks of one step, each keyed by its request id) or a `Reply` (keyed by the query id it answers). Nothing here
holds a callable, a tensor, a tokenizer or a grammar matcher, so the same scheduler runs on a thread behind a
``queue.SimpleQueue`` pair (``Engine``) or in another process behind a ``multiprocessing`` queue pair
(`runtime/scheduler/process.py`).

Where the work is done:

* The engine validates and tokenizes a request, and compiles its grammar (a grammar that does not compile is
  refused before anything is queued), then sends a `NewRequest` carrying the `GrammarSpec` (``params.structured``)
  and the `CompiledGrammar` (``grammar``). The scheduler side builds its ``Req`` from it
  (`runtime/scheduler/intake.py`): a matcher from the compiled grammar, never a compile on the scheduler thread.
  The compiled grammar holds llguidance objects, which do not pickle: a `NewRequest` sent to another process
  arrives without it, and that process's own backend compiles the spec once more.
* Detokenization and stop strings run on the scheduler side, right after sampling (``OutputProcessor``): a stop
  string must finish the request there, before its next step is scheduled, and it is found in the text, so the
  text is made where the decision is. The chunks then carry text already cut at the stop string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Union

from ..metrics.collector import LatencySnapshot
from .outputs import StreamChunk
from ..sampling.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ..constrained.backend import CompiledGrammar

__all__ = [
    "Abort",
    "AddRequests",
    "CheckIdle",
    "FlushCache",
    "GetMetrics",
    "MetricsSnapshot",
    "NewRequest",
    "Outputs",
    "Query",
    "Reply",
    "SchedulerInput",
    "SchedulerOutput",
    "Stop",
]


@dataclass(frozen=True)
class NewRequest:
    """A validated, tokenized request, ready to queue."""

    rid: str
    input_ids: tuple[int, ...]
    params: SamplingParams  # a copy the scheduler side owns
    stop_token_ids: frozenset[int]  # EOS ids (unless ignore_eos) + params.stop_token_ids
    max_new_tokens: int  # params.max_new_tokens clamped to the context length (0: queued only to score the prompt)
    priority: int = 0  # only ordered by under schedule_policy="priority"
    arrival: float = field(default_factory=time.monotonic)  # CLOCK_MONOTONIC: one clock for every process
    grammar: "CompiledGrammar | None" = field(default=None, compare=False, repr=False)  # params.structured, compiled

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the compiled grammar (llguidance objects do not pickle; see the module docstring)."""
        return {**self.__dict__, "grammar": None}


@dataclass(frozen=True)
class AddRequests:
    """Queue these requests together (one batch reaches the scheduler as one message, whatever the timing)."""

    requests: tuple[NewRequest, ...]


@dataclass(frozen=True)
class Abort:
    """Finish request ``rid`` wherever it is; a no-op for an unknown id."""

    rid: str


@dataclass(frozen=True)
class Stop:
    """Abort every request and end the scheduler loop."""


@dataclass(frozen=True)
class Query:
    """A message that gets a `Reply` with the same ``query_id``."""

    query_id: int


@dataclass(frozen=True)
class GetMetrics(Query):
    """Reply: a `MetricsSnapshot` taken between two steps."""


@dataclass(frozen=True)
class FlushCache(Query):
    """Evict every cached prefix no request uses. Reply: the number of KV tokens freed."""


@dataclass(frozen=True)
class CheckIdle(Query):
    """Reply: the idle-invariant violations as a tuple of strings (``("scheduler is not idle",)`` while busy)."""


SchedulerInput = Union[AddRequests, Abort, Stop, GetMetrics, FlushCache, CheckIdle]


@dataclass(frozen=True)
class MetricsSnapshot:
    """The scheduler's counters at one moment between two steps (``Engine.metrics`` returns ``as_dict()``)."""

    kv_total_tokens: int
    kv_free_tokens: int
    kv_evictable_tokens: int
    kv_used_tokens: int
    running_requests: int
    waiting_requests: int
    cache_hit_rate: float
    prompt_tokens_total: int
    cached_prompt_tokens_total: int
    generated_tokens_total: int
    finished_requests: int
    aborted_requests: int
    retractions: int  # every retraction, priority preemptions included
    preemptions: int  # retractions made for a higher-priority request (schedule_policy="priority")
    prefill_steps: int
    decode_steps: int
    peak_running_requests: int
    peak_prefill_tokens: int
    overlapped_steps: int
    prefill_tokens_total: int
    prefill_seconds_total: float
    decode_seconds_total: float
    grammar_mask_steps: int
    grammar_mask_ms_per_step: float
    new_token_ratio: float
    latency: LatencySnapshot  # histograms (queue time, TTFT, inter-token, e2e, batch sizes) and finish reasons

    def as_dict(self) -> dict[str, float | int]:
        """The scalar counters (``latency`` stays on the snapshot)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latency"}


@dataclass(frozen=True)
class Outputs:
    """The chunks one step (or one handled message) produced, in order; each names its request."""

    chunks: tuple[StreamChunk, ...]


@dataclass(frozen=True)
class Reply:
    """The answer to the `Query` with ``query_id``: its value, or the error that handling it raised."""

    query_id: int
    value: MetricsSnapshot | int | tuple[str, ...] | None = None
    error: str | None = None


SchedulerOutput = Union[Outputs, Reply]
