"""`LLGuidanceBackend`: the `GrammarBackend` on llguidance (Earley parser + lazy lexer DFA over the token trie;
~ms compiles, µs mask fills). Its compile contract is backend.py's.

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
  the scheduler's bitmask is filled in one call (llg_tokenizer.py).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, InvalidRequestError
from .backend import CompileCache, CompiledGrammar, CompileQueue, CompileTimeout, GrammarBackend, TransientCompileError
from .compile_worker import (
    GrammarDefinitionError,
    WorkerCrashed,
    WorkerSlots,
    grammar_definition,
    tokenizer_description,
)
from .llg_tokenizer import llguidance_tokenizer
from .matcher import GrammarMatcher, LLGuidanceMatcher, TokenPolicy, check_bitmask, clean_error
from .spec import GrammarSpec

__all__ = ["LLGuidanceBackend", "LLGuidanceCompiledGrammar"]

logger = logging.getLogger(__name__)


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
            (see backend.py's docstring); False compiles in the threads only. When no worker can be started (twice
            in a row), constrained requests are refused: a grammar is never compiled here without the time limit.
        max_queued_compiles: grammars that may wait for a compile thread; one more is refused (`CompileBusy`).

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
        max_queued_compiles: int = 64,
    ) -> None:
        import llguidance

        _check_positive_int("vocab_size", vocab_size)
        _check_positive_int("max_workers", max_workers)
        _check_positive_int("max_cache_entries", max_cache_entries)
        _check_positive_int("max_queued_compiles", max_queued_compiles)
        if fill_threads is not None:
            _check_positive_int("fill_threads", fill_threads)
        if not isinstance(compile_timeout_s, (int, float)) or not math.isfinite(compile_timeout_s) or compile_timeout_s <= 0:
            raise ConfigError(f"compile_timeout_s must be a finite number of seconds > 0; got {compile_timeout_s!r}")
        self._vocab_size = vocab_size
        self._timeout_s = float(compile_timeout_s)
        self._lltok, self._policy = llguidance_tokenizer(tokenizer, vocab_size, eos_token_ids)
        self._pool = CompileQueue(max_workers, max_queued_compiles)
        self._executor = llguidance.LLExecutor(fill_threads)
        # Default resource limits; verbose_errors off: a rejected token's message then names the token and the
        # failing byte instead of dumping parser state and the whole grammar (it goes back to the client).
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self._isolate = isolate_compiles
        self._workers = WorkerSlots(lambda: tokenizer_description(self._lltok))
        self._owner = object()
        self._lock = threading.Lock()  # guards template deep copies
        self._cache: CompileCache[CompiledGrammar] = CompileCache(max_cache_entries)
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
        return self._cache.stats()

    # ------------------------------------------------------------------------------------------- compiling

    def compile_async(self, spec: GrammarSpec) -> Future[CompiledGrammar]:
        if self._closed:
            raise RuntimeError("grammar backend is closed")
        return self._cache.get(spec.cache_key, lambda: self._pool.submit(lambda: self._compile_blocking(spec)))

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
        """Run the compile in this thread's worker process under the time limit (see backend.py's docstring).

        Raises:
            InvalidRequestError: the compile did not finish in time (the worker was killed) or crashed the worker.
            TransientCompileError: no worker could be started (see `WorkerSlots.mine`).
        """
        worker = self._workers.mine()
        if worker is None:  # never compile without the time limit: refuse instead
            raise TransientCompileError(
                f"constrained decoding is unavailable on this server: the grammar compile worker could not start "
                f"({self._workers.broken}); the server's log has the details, and relaunching the model retries"
            )
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

    def _timeout_error(self, spec: GrammarSpec) -> CompileTimeout:
        return CompileTimeout(
            f"{spec.kind} took longer than the limit of {self._timeout_s:g} s to compile and was stopped; simplify "
            f"it (fewer or smaller bounded repeats, fewer alternatives, a smaller schema): {spec.describe()}"
        )

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
        self._pool.shutdown()
        self._workers.close()


# ----------------------------------------------------------------------------------------------- helpers

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
