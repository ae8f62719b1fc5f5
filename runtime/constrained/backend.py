"""Grammar backends: compile a `GrammarSpec` once, hand each request its own `GrammarMatcher`.

`GrammarBackend` is the small interface the engine and scheduler use; `LLGuidanceBackend` is the default
implementation, on llguidance (Earley parser + lazy lexer DFA over the token trie; ~ms compiles, µs mask fills).

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
  requests use it, concurrent requests for a spec being compiled share that compilation, and failures,
  time-outs included, are cached too (so resending a pathological grammar costs nothing).

llguidance options (why):

- JSON: ``whitespace_flexible=False`` with separators ``","`` / ``":"``: compact JSON, no free whitespace between
  tokens (free whitespace lets a model pad output with endless newlines); ``lenient=False``: a keyword
  llguidance cannot enforce (``uniqueItems``, ``if/then/else``, ``not``, ``contains``, ``propertyNames``,
  ``dependentRequired``, unknown ``format``, ...) is an error, never silently dropped; ``coerce_one_of=False``:
  ``oneOf`` whose branches may overlap is an error instead of being weakened to ``anyOf``. They are passed as
  overrides, which take precedence over a schema's own ``x-guidance`` (that key is also rejected by the spec).
- Limits: llguidance's defaults (grammar size, lexer fuel, Earley items per step) bound compile and mask work;
  ``verbose_errors=False`` keeps error messages short (no parser-state or grammar dump).
- Tokenizer: llguidance gets a token table (`token_table.token_bytes`: each token's bytes from the tokenizer's
  own decoder pipeline), checked at startup against the tokenizer's decode for every token id (a mismatch is a
  `ConfigError` naming the tokens), not the tokenizer's JSON: llguidance misreads some decoders (the GGUF
  converter's ``ByteFallback, Fuse, Replace, ByteLevel`` made it see "Ġ" as two bytes instead of a space). The
  table is padded to the model's logits width, so padded rows exist in llguidance's mask (always 0) and a row of
  the scheduler's bitmask is filled in one call.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, InvalidRequestError
from .compile_worker import (
    LLGUIDANCE_JSON_OPTIONS,
    CompileProcess,
    GrammarDefinitionError,
    WorkerCrashed,
    grammar_definition,
    tokenizer_description,
)
from .matcher import GrammarMatcher, LLGuidanceMatcher, TokenPolicy, check_bitmask, clean_error
from .spec import GrammarSpec
from .token_table import lltokenizer, token_bytes, verify_token_bytes

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True, eq=False)
class LLGuidanceCompiledGrammar(CompiledGrammar):
    """llguidance's compiled form: the grammar definition and a pristine matcher every request copies."""

    grammar: str  # llguidance's JSON grammar definition
    template: Any  # llguidance.LLMatcher at the start state; only ever deep-copied (under the owner's lock)
    owner: object  # identity token of the backend whose tokenizer built `template`


class LLGuidanceBackend(GrammarBackend):
    """`GrammarBackend` on llguidance.

    Args:
        tokenizer: the model's Hugging Face fast tokenizer (anything with a ``backend_tokenizer``).
        vocab_size: the model's logits width; may exceed ``len(tokenizer)`` (padded embedding rows, which are
            never allowed).
        compile_timeout_s: longest a compilation may take before `compile`/`compile_async` fail with
            `InvalidRequestError` (counted from when that grammar's compile starts; queueing excluded).
        max_workers: compile threads (each with its own worker process when ``isolate_compiles``).
        eos_token_ids: the ids that end generation, allowed exactly where the grammar may end; default the
            tokenizer's ``eos_token_id``. Pass the model's generation-config EOS ids (e.g. Qwen's
            ``<|im_end|>`` and ``<|endoftext|>``); every other special token is never allowed.
        max_cache_entries: compiled grammars kept (least recently used evicted first).
        fill_threads: threads of llguidance's parallel batch fill (`fill_bitmasks`); None = its default.
        isolate_compiles: compile each new grammar first in a worker process that is killed at the time limit
            (see the module docstring); False compiles in the threads only.

    Raises:
        ConfigError: the tokenizer is not a fast tokenizer, ``vocab_size`` is smaller than the tokenizer, an EOS
            id is out of range or missing, or a numeric argument is out of range.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        compile_timeout_s: float = 10.0,
        max_workers: int = 2,
        *,
        eos_token_ids: Sequence[int] | None = None,
        max_cache_entries: int = 512,
        fill_threads: int | None = None,
        isolate_compiles: bool = True,
    ) -> None:
        import llguidance

        _check_positive_int("vocab_size", vocab_size)
        _check_positive_int("max_workers", max_workers)
        _check_positive_int("max_cache_entries", max_cache_entries)
        if fill_threads is not None:
            _check_positive_int("fill_threads", fill_threads)
        if not isinstance(compile_timeout_s, (int, float)) or not math.isfinite(compile_timeout_s) or compile_timeout_s <= 0:
            raise ConfigError(f"compile_timeout_s must be a finite number of seconds > 0; got {compile_timeout_s!r}")
        self._vocab_size = vocab_size
        self._timeout_s = float(compile_timeout_s)
        self._max_cache_entries = max_cache_entries
        self._lltok = _llguidance_tokenizer(tokenizer, vocab_size, eos_token_ids)
        self._policy = _token_policy(self._lltok, tokenizer, vocab_size, eos_token_ids)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")
        self._executor = llguidance.LLExecutor(fill_threads)
        # Default resource limits; verbose_errors off: a rejected token's message then names the token and the
        # failing byte instead of dumping parser state and the whole grammar (it goes back to the client).
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._isolate = isolate_compiles
        self._workers = _WorkerSlots(lambda: tokenizer_description(self._lltok))
        self._owner = object()
        self._lock = threading.Lock()  # guards the cache, the counters and template deep copies
        self._cache: OrderedDict[tuple[str, str], Future[LLGuidanceCompiledGrammar]] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._closed = False

    # ------------------------------------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def compile_timeout_s(self) -> float:
        """The compile time limit in seconds."""
        return self._timeout_s

    @property
    def policy(self) -> TokenPolicy:
        """Which tokens constrained output may contain (EOS ids, forbidden special ids, packed masks)."""
        return self._policy

    def cache_stats(self) -> dict[str, int]:
        """``{"hits", "misses", "entries"}``: a miss is a compilation started; a hit reuses a cached one."""
        with self._lock:
            return {"hits": self._hits, "misses": self._misses, "entries": len(self._cache)}

    # ------------------------------------------------------------------------------------------- compiling

    def compile_async(self, spec: GrammarSpec) -> Future[CompiledGrammar]:
        if self._closed:
            raise RuntimeError("grammar backend is closed")
        key = spec.cache_key
        with self._lock:
            inner = self._cache.get(key)
            submitted = inner is None
            if inner is not None:
                self._hits += 1
                self._cache.move_to_end(key)
            else:
                self._misses += 1
                inner = self._pool.submit(self._compile_blocking, spec)
                self._cache[key] = inner
                while len(self._cache) > self._max_cache_entries:
                    self._cache.popitem(last=False)
        if submitted:
            # Registered outside the lock: the callback takes it, and runs at once if the compile already ended.
            inner.add_done_callback(lambda f: self._forget_unexpected_failure(key, f))
        outer: Future[CompiledGrammar] = Future()
        outer.set_running_or_notify_cancel()  # a waiter cannot cancel it; it resolves or fails
        inner.add_done_callback(lambda f: _forward(f, outer))  # at once if `inner` is done
        return outer

    def _compile_blocking(self, spec: GrammarSpec) -> LLGuidanceCompiledGrammar:
        """Compile on a compile thread: first in its worker process under the time limit, then here.

        Raises:
            InvalidRequestError: any grammar problem, the time limit, or a crash of the worker on this grammar.
        """
        import llguidance

        if self._isolate:
            self._compile_in_worker(spec)
        start = time.perf_counter()
        grammar = self._grammar_definition(spec)
        template = llguidance.LLMatcher(self._lltok, grammar, log_level=0, limits=self._limits)
        # Compute the first mask here: some problems only show then (lexer limits), and the lexer states it
        # builds are carried into every deep copy, so the first decode step of each request is cheaper.
        if not template.is_error():
            scratch = np.empty(self._policy.num_words, dtype=np.int32)
            template.unsafe_compute_mask_ptr(scratch.ctypes.data, scratch.nbytes)
        if template.is_error():
            raise _compile_error(spec, template.get_error())
        warnings = tuple(template.get_grammar_warnings())
        if warnings:
            logger.debug("grammar %s compiled with warnings: %s", spec.kind, warnings)
        return LLGuidanceCompiledGrammar(
            spec=spec,
            compile_time_s=time.perf_counter() - start,
            warnings=warnings,
            grammar=grammar,
            template=template,
            owner=self._owner,
        )

    def _compile_in_worker(self, spec: GrammarSpec) -> None:
        """Run the compile in this thread's worker process under the time limit (see the module docstring).

        Raises:
            InvalidRequestError: the compile did not finish in time (the worker was killed) or crashed the worker.
        """
        worker = self._workers.mine()
        if worker is None:
            return  # no worker could be started (logged once): llguidance's limits are the bound
        try:
            finished = worker.run(spec.kind, spec.text, self._timeout_s)
        except WorkerCrashed as exc:
            logger.warning("grammar %s crashed the compile worker: %s", spec.describe(), exc)
            raise InvalidRequestError(
                f"the grammar compiler failed on this {spec.kind} ({exc}); simplify it: {spec.describe()}"
            ) from None
        if not finished:
            logger.warning("grammar %s exceeded the %g s compile limit; its compile was stopped",
                           spec.describe(), self._timeout_s)
            raise self._timeout_error(spec)

    @staticmethod
    def _grammar_definition(spec: GrammarSpec) -> str:
        """llguidance's grammar definition for ``spec``. Raises `InvalidRequestError` for untranslatable input."""
        try:
            return grammar_definition(spec.kind, spec.text)
        except GrammarDefinitionError as exc:
            raise InvalidRequestError(str(exc)) from None

    def _timeout_error(self, spec: GrammarSpec) -> InvalidRequestError:
        return InvalidRequestError(
            f"{spec.kind} took longer than the limit of {self._timeout_s:g} s to compile and was stopped; simplify "
            f"it (fewer or smaller bounded repeats, fewer alternatives, a smaller schema): {spec.describe()}"
        )

    def _forget_unexpected_failure(self, key: tuple[str, str], fut: Future[Any]) -> None:
        """Keep deterministic grammar errors cached, but not internal failures (they may not recur)."""
        exc = fut.exception() if not fut.cancelled() else None
        if fut.cancelled() or (exc is not None and not isinstance(exc, InvalidRequestError)):
            with self._lock:
                if self._cache.get(key) is fut:
                    del self._cache[key]

    # ------------------------------------------------------------------------------------------- matching

    def new_matcher(self, compiled: CompiledGrammar) -> LLGuidanceMatcher:
        if not isinstance(compiled, LLGuidanceCompiledGrammar) or compiled.owner is not self._owner:
            raise ValueError("compiled grammar was not produced by this LLGuidanceBackend")
        with self._lock:  # deep_copy borrows the template; serialise borrowers across threads
            ll_matcher = compiled.template.deep_copy()
        return LLGuidanceMatcher(ll_matcher, self._policy, compiled.spec)

    def fill_bitmasks(self, rows: Sequence[tuple[GrammarMatcher, int]], bitmask: torch.Tensor) -> None:
        """Fill many rows in one llguidance call (parallel over ``fill_threads``), then apply the token policy.

        Same rows as calling `GrammarMatcher.fill_bitmask` for each pair (failed matchers get an EOS-only row).
        Whether it beats that loop depends on the host's free cores: measure with ``scripts/bench_grammar.py``.
        """
        check_bitmask(bitmask, self._policy.num_words)
        if len({row for _, row in rows}) != len(rows):
            raise ValueError("fill_bitmasks rows must be distinct")
        words = bitmask.numpy()
        live: list[tuple[Any, int]] = []
        owners: list[tuple[LLGuidanceMatcher, int]] = []
        for matcher, row in rows:
            if not isinstance(matcher, LLGuidanceMatcher):
                raise TypeError(f"expected LLGuidanceMatcher, got {type(matcher).__name__}")
            if not 0 <= row < bitmask.shape[0]:
                raise IndexError(f"row {row} out of range for a bitmask of {bitmask.shape[0]} rows")
            if matcher.error() is not None:
                words[row] = self._policy.eos_mask
            else:
                live.append((matcher.ll_matcher, row))
                owners.append((matcher, row))
        if not live:
            return
        self._executor.unsafe_compute_mask_ptr(live, bitmask.data_ptr(), words.shape[1] * 4, bitmask.shape[0])
        for matcher, row in owners:
            matcher.sanitize_row(words[row])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._workers.close()


# ----------------------------------------------------------------------------------------------- helpers


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
            dst.set_exception(InvalidRequestError(str(exc)))
        else:
            dst.set_exception(exc)
    except InvalidStateError:
        pass


class _WorkerSlots:
    """One `CompileProcess` per compile thread, created on the thread's first compile; all killed on `close`.

    ``describe`` builds the tokenizer description the workers need (once, on first use: it walks the vocabulary).
    """

    def __init__(self, describe: Any) -> None:
        self._describe = describe
        self._description: Any = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[CompileProcess] = []
        self._broken: str | None = None  # why workers cannot be used here (then compiles run unisolated)
        self._closed = False

    def mine(self) -> CompileProcess | None:
        """This thread's worker, started if needed; None when workers cannot be started on this host."""
        worker = getattr(self._local, "worker", None)
        if worker is not None:
            return worker
        with self._lock:
            if self._closed or self._broken is not None:
                return None
            if self._description is None:
                self._description = self._describe()
            worker = CompileProcess(self._description)
            self._all.append(worker)
        try:
            # Start it now, with a trivial grammar, so that no request's time limit pays for the start.
            if not worker.run("regex", "a", timeout_s=60.0):
                raise RuntimeError("the compile worker did not compile a trivial grammar within 60 s")
        except (OSError, RuntimeError) as exc:
            with self._lock:
                self._broken = str(exc)
            logger.warning("grammar compile workers unavailable (%s): compiles are bounded by llguidance's limits "
                           "only and a timed-out compile cannot be stopped", exc)
            return None
        self._local.worker = worker
        return worker

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            worker.close()


def _llguidance_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int] | None) -> Any:
    """llguidance's tokenizer over the token table derived from ``tokenizer``'s decoder and checked against its
    decode for every token (`token_table`), padded to ``vocab_size`` rows."""
    table = token_bytes(tokenizer)
    start = time.perf_counter()
    verify_token_bytes(tokenizer, table)
    logger.debug("grammar token table (%s, %d tokens) verified in %.0f ms", table.decoder, len(table.tokens),
                 1000 * (time.perf_counter() - start))
    return lltokenizer(tokenizer, table, vocab_size, _eos_ids(tokenizer, eos_token_ids, len(table.tokens)))


def _token_policy(lltok: Any, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int] | None) -> TokenPolicy:
    num_tokens = _num_tokens(tokenizer)
    # llguidance's special tokens are the token table's (added tokens marked special and HF's special ids), plus
    # any token whose bytes start with llguidance's special marker 0xFF (never valid UTF-8, so never in output).
    special = {i for i in range(num_tokens) if lltok.is_special_token(i)}
    return TokenPolicy.build(vocab_size, num_tokens, special, _eos_ids(tokenizer, eos_token_ids, num_tokens))


def _num_tokens(tokenizer: Any) -> int:
    backend = tokenizer.backend_tokenizer
    return max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))


def _eos_ids(tokenizer: Any, eos_token_ids: Sequence[int] | None, num_tokens: int) -> list[int]:
    if eos_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ConfigError("the tokenizer has no eos_token_id; pass eos_token_ids to the grammar backend")
        ids = [int(eos)]
    else:
        ids = [int(i) for i in eos_token_ids]
        if not ids:
            raise ConfigError("eos_token_ids must list at least one token id")
    bad = [i for i in ids if not 0 <= i < num_tokens]
    if bad:
        raise ConfigError(f"eos_token_ids must be token ids in [0, {num_tokens}); got {bad}")
    return sorted(set(ids))


_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")


def _compile_error(spec: GrammarSpec, message: str) -> InvalidRequestError:
    """Turn llguidance's error into a request error that says what is wrong and what is allowed."""
    message = clean_error(message)
    unimplemented = _UNIMPLEMENTED.search(message)
    if spec.kind == "json_schema" and unimplemented:
        return InvalidRequestError(
            f"json_schema uses keywords that cannot be enforced during generation: {unimplemented.group(1)}. "
            "Remove them; the server rejects such schemas instead of ignoring the keywords. Unsupported: "
            "uniqueItems, if/then/else, not, contains, propertyNames, dependentRequired/dependentSchemas, "
            "unevaluatedProperties/unevaluatedItems"
        )
    if spec.kind == "json_schema" and "coerce_one_of" in message:
        return InvalidRequestError(
            "json_schema uses oneOf with alternatives that may overlap, which cannot be enforced exactly; "
            "use anyOf, or make the alternatives mutually exclusive (e.g. different types or const values)"
        )
    what = {
        "json_schema": "json_schema cannot be compiled",
        "regex": "regex does not compile (Rust regex syntax; no look-around or back-references)",
        "ebnf": "ebnf grammar does not compile (Lark with a `start:` rule, or GBNF with `root ::=`)",
        "choices": "choices do not compile",
    }[spec.kind]
    return InvalidRequestError(f"{what}: {message}")


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be an integer > 0; got {value!r}")


__all__ = [
    "CompiledGrammar",
    "GrammarBackend",
    "LLGUIDANCE_JSON_OPTIONS",
    "LLGuidanceBackend",
    "LLGuidanceCompiledGrammar",
]
