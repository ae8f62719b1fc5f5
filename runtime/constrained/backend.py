"""Grammar backends: compile a `GrammarSpec` once, hand each request its own `GrammarMatcher`.

`GrammarBackend` is the small interface the engine and scheduler use; `LLGuidanceBackend`
(llguidance_backend.py) is the default implementation. `CompileCache` is the cache part of the contract below,
for any implementation.

Compilation contract:

- ``compile_async(spec)`` never blocks: it returns a ``concurrent.futures.Future`` that resolves to a
  `CompiledGrammar`, or fails with `InvalidRequestError` when the grammar does not compile, uses a JSON-schema
  keyword that cannot be enforced, or takes longer than ``compile_timeout_s``. Compilation runs on the backend's
  compile threads (llguidance releases the GIL while it builds), so the scheduler's step loop is never stalled.
- ``compile(spec)`` is the blocking form (the engine validates a request before queueing it).
- The time limit of a grammar counts from when *its* compile starts on a compile thread, not from when it was
  queued: a request waiting behind other grammars is never failed for their cost. Each compile thread owns a
  worker process (`compile_worker.CompileProcess`) where every new grammar is compiled first; one that does not
  finish in time is really stopped (the process is killed, the thread is free for the next grammar) and the
  error names it (kind, hash and the start of its text). A grammar that crashes the worker is refused the same
  way instead of being compiled in the server. ``isolate_compiles=False`` skips the worker (tests, or where no
  subprocess may be started): then llguidance's limits are the only bound.
- Results are cached per backend instance, keyed by ``(kind, text)``: a spec is compiled once however many
  requests use it, concurrent requests for a spec being compiled share that compilation, and the grammar's own
  failures are cached too (so resending a pathological grammar costs nothing). A time-out is only kept once it
  recurs (`CompileTimeout`: the first may come from a loaded host, e.g. other compiles on the same cores), and a
  refusal caused by the server's state (`TransientCompileError`: the compile queue is full, no compile worker) is
  never kept.
- The compile queue is bounded (`CompileQueue`): a grammar that would wait behind more than ``max_queued`` others
  is refused at once (`CompileBusy`, naming the limit and its option), never queued without bound.
- The engine hands the `CompiledGrammar` to the scheduler with the request: the scheduler thread never compiles
  and never waits on this queue (a cache entry evicted by a burst of other grammars costs it nothing).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from ..errors import InvalidRequestError
from .matcher import GrammarMatcher
from .spec import GrammarSpec

__all__ = [
    "CompileBusy", "CompileCache", "CompileQueue", "CompileTimeout", "CompiledGrammar", "GrammarBackend",
    "TransientCompileError",
]

T = TypeVar("T")


class TransientCompileError(InvalidRequestError):
    """A constrained request refused for the server's state, not its grammar: the same grammar may compile later,
    so the refusal is never cached."""


class CompileBusy(TransientCompileError):
    """The compile queue is full (`CompileQueue`)."""


class CompileTimeout(InvalidRequestError):
    """A compile stopped at the time limit. Cached only when it recurs (`CompileCache`)."""


@dataclass(frozen=True, eq=False)
class CompiledGrammar:
    """A compiled, immutable grammar: shared by every request with the same spec (never mutate it)."""

    spec: GrammarSpec
    compile_time_s: float  # wall time of the server-side compilation (queueing and the worker's run excluded)
    warnings: tuple[str, ...]  # non-fatal remarks of the grammar engine (e.g. unused rules)


class GrammarBackend(ABC):
    """Compiles specs (cached, off the caller's thread) and creates per-request matchers."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Width of the logits (and of bitmask rows, in tokens) this backend fills masks for."""

    @abstractmethod
    def compile_async(self, spec: GrammarSpec) -> Future[CompiledGrammar]:
        """Start (or join, or reuse) the compilation of ``spec`` without blocking.

        The future resolves to a `CompiledGrammar` or fails with `InvalidRequestError` (bad grammar,
        unsupported keyword, time limit exceeded). Each call returns a new future; cancelling it is not possible.
        """

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Blocking `compile_async`. Raises `InvalidRequestError` naming the problem."""
        return self.compile_async(spec).result()

    @abstractmethod
    def new_matcher(self, compiled: CompiledGrammar) -> GrammarMatcher:
        """A fresh matcher at the start of ``compiled`` (which must come from this backend)."""

    @abstractmethod
    def cache_stats(self) -> dict[str, int]:
        """``{"hits", "misses", "entries"}`` of the compile cache: a miss is a compilation started."""

    def fill_bitmasks(self, rows: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None:
        """Fill ``bitmask[row]`` for each ``(matcher, row)`` pair (rows distinct). Backends may parallelise."""
        for matcher, row in rows:
            matcher.fill_bitmask(bitmask, row)

    def close(self) -> None:
        """Release worker threads; pending compilations are cancelled. Idempotent."""

    def __enter__(self) -> GrammarBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CompileCache(Generic[T]):
    """A backend's compile results by ``(kind, text)``, as the contract above says: one compilation per key
    (started on the first request, joined by the others while it runs), failures kept too, least recently used
    evicted beyond ``max_entries``. Thread-safe.

    Only `InvalidRequestError` failures stay cached: they are the grammar's fault and recur. Any other failure
    (an internal error, a cancellation at shutdown, a `TransientCompileError`) is dropped from the cache when it
    happens, so a later request compiles again; so is a key's first `CompileTimeout` (its second stays).
    """

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._lock = threading.Lock()  # guards the entries, the counters and the timed-out keys
        self._entries: OrderedDict[tuple[str, str], Future[T]] = OrderedDict()
        self._timed_out: OrderedDict[tuple[str, str], None] = OrderedDict()  # keys whose compile timed out once
        self._hits = 0
        self._misses = 0

    def get(self, key: tuple[str, str], start: Callable[[], Future[T]]) -> Future[T]:
        """A new future with the outcome of ``key``'s compilation, which ``start`` begins when none is cached
        (called under the cache's lock: it must only submit the work). Waiters cannot cancel it."""
        with self._lock:
            inner = self._entries.get(key)
            submitted = inner is None
            if inner is not None:
                self._hits += 1
                self._entries.move_to_end(key)
            else:
                self._misses += 1
                inner = start()
                self._entries[key] = inner
                while len(self._entries) > self._max_entries:
                    self._entries.popitem(last=False)
        if submitted:
            # Registered outside the lock: the callback takes it, and runs at once if the compile already ended.
            inner.add_done_callback(lambda f: self._forget_unexpected_failure(key, f))
        outer: Future[T] = Future()
        outer.set_running_or_notify_cancel()  # a waiter cannot cancel it; it resolves or fails
        inner.add_done_callback(lambda f: _forward(f, outer))  # at once if `inner` is done
        return outer

    def stats(self) -> dict[str, int]:
        """``{"hits", "misses", "entries"}``: a miss is a compilation started; a hit reuses a cached one."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "entries": len(self._entries)}

    def _forget_unexpected_failure(self, key: tuple[str, str], fut: Future[Any]) -> None:
        """Keep deterministic grammar errors cached, but not failures that may not recur."""
        exc = fut.exception() if not fut.cancelled() else None
        with self._lock:
            if exc is not None and isinstance(exc, CompileTimeout) and key not in self._timed_out:
                self._timed_out[key] = None  # the next time-out of this key is the grammar's own
                while len(self._timed_out) > self._max_entries:
                    self._timed_out.popitem(last=False)
            elif not (fut.cancelled() or _transient(exc)):
                return
            if self._entries.get(key) is fut:
                del self._entries[key]


class CompileQueue:
    """The compile threads and their queue, bounded: at most ``max_queued`` compiles wait for a thread (those
    running on one are not counted); one more is refused with `CompileBusy`. Thread-safe."""

    def __init__(self, max_workers: int, max_queued: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._waiting = 0

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on a compile thread; a future failed with `CompileBusy` when the queue is full."""
        with self._lock:
            busy = self._waiting >= self._max_queued
            self._waiting += not busy
        if busy:
            refused: Future[T] = Future()
            refused.set_exception(CompileBusy(
                f"the grammar compiler is busy: {self._max_queued} grammars are already waiting to compile "
                f"(grammar_max_queued_compiles={self._max_queued}); retry later, or launch the model with a larger "
                "grammar_max_queued_compiles or grammar_compile_workers"
            ))
            return refused
        return self._pool.submit(self._started, fn)

    def _started(self, fn: Callable[[], T]) -> T:
        with self._lock:
            self._waiting -= 1
        return fn()

    def shutdown(self) -> None:
        """Stop the threads; queued compiles are cancelled."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _transient(exc: BaseException | None) -> bool:
    """Whether a compile failure may not recur: anything but the grammar's own `InvalidRequestError`."""
    return exc is not None and (not isinstance(exc, InvalidRequestError) or isinstance(exc, TransientCompileError))


def _forward(src: Future[Any], dst: Future[Any]) -> None:
    """Copy ``src``'s outcome into ``dst`` (a fresh `InvalidRequestError` per waiter)."""
    try:
        if src.cancelled():
            dst.set_exception(InvalidRequestError("grammar compilation was cancelled (the server is shutting down)"))
            return
        exc = src.exception()
        if exc is None:
            dst.set_result(src.result())
        elif isinstance(exc, InvalidRequestError):
            # A fresh exception per waiter: the cached one is shared, and raising it would mutate its traceback.
            dst.set_exception(type(exc)(str(exc)))
        else:
            dst.set_exception(exc)
    except InvalidStateError:
        pass
