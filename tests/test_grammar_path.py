"""The grammar path under load (issue 28 point 5): the compiled grammar travels with the request (the scheduler
side never compiles, even when a burst of other grammars evicted the request's cache entry), the compile queue is
bounded with a "busy" refusal that names its option, a first time-out is not cached as the grammar's fault, and a
compile worker that cannot start is retried, then refused with a clear error (never compiled without the limit).
"""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from transformers import AutoTokenizer

from xinf_sglang.runtime import InvalidRequestError, SamplingParams
from xinf_sglang.runtime.constrained import GrammarSpec, LLGuidanceBackend
from xinf_sglang.runtime.constrained.backend import CompileBusy, CompileTimeout, TransientCompileError
from xinf_sglang.runtime.engine.messages import NewRequest
from xinf_sglang.runtime.scheduler.intake import RequestBuilder

from .engine_helpers import make_engine

SLOW_REGEX = GrammarSpec("regex", "a{1000}{1000}")  # ~1.2 s to compile on an idle 2-core runner
SLOW_LIMIT_S = 0.3


@pytest.fixture(scope="module")
def model_dir(tiny_model: Callable[..., Path]) -> Path:
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


def _message(spec: GrammarSpec, compiled: Any) -> NewRequest:
    params = SamplingParams(max_new_tokens=4, structured=spec)
    return NewRequest("r", (1, 2), params, frozenset(), 4, grammar=compiled)


def test_scheduler_side_makes_the_matcher_from_the_carried_grammar(tokenizer: Any) -> None:
    with LLGuidanceBackend(tokenizer, len(tokenizer), max_cache_entries=1) as be:
        spec = GrammarSpec.from_fields(regex="[0-9]+")
        msg = _message(spec, be.compile(spec))
        be.compile(GrammarSpec.from_fields(regex="[a-z]+"))  # a burst of other grammars evicts the entry
        before = be.cache_stats()
        req = RequestBuilder(tokenizer, torch.device("cpu"), lambda: be).build(msg)
        assert be.cache_stats() == before, "the scheduler side compiled (or looked up) the grammar again"
        assert req.grammar is not None and req.grammar.error() is None


def test_engine_sends_the_compiled_grammar_and_the_scheduler_never_compiles(model_dir: Path) -> None:
    engine = make_engine(model_dir, context_length=256)
    try:
        params = SamplingParams(max_new_tokens=4, regex="[0-9]+", temperature=0)
        [out] = engine.generate(prompt="hi", sampling_params=params)
        assert out.text.isdigit() or out.text == "", out.text
        # One compile by the engine; the scheduler side neither compiled nor looked the grammar up.
        assert engine.grammar_stats() == {"hits": 0, "misses": 1, "entries": 1}
    finally:
        engine.shutdown()


def test_a_message_sent_to_another_process_leaves_the_compiled_grammar_behind(tokenizer: Any) -> None:
    import pickle

    with LLGuidanceBackend(tokenizer, len(tokenizer)) as be:
        spec = GrammarSpec.from_fields(regex="[0-9]+")
        msg = _message(spec, be.compile(spec))
        copy = pickle.loads(pickle.dumps(msg))
        assert copy.grammar is None and copy == msg  # the grammar is not part of the message's equality


def test_full_compile_queue_is_refused_as_busy_and_not_cached(tokenizer: Any) -> None:
    with LLGuidanceBackend(tokenizer, len(tokenizer), compile_timeout_s=SLOW_LIMIT_S, max_workers=1,
                           max_queued_compiles=1) as be:
        be.compile(GrammarSpec.from_fields(regex="b"))  # the worker is started
        slow = be.compile_async(SLOW_REGEX)
        time.sleep(0.2)  # the one compile thread has taken it: the queue is empty again
        queued = be.compile_async(GrammarSpec.from_fields(regex="[0-9]"))
        refused = be.compile_async(GrammarSpec.from_fields(regex="[a-z]"))
        error = refused.exception(timeout=5)
        assert isinstance(error, CompileBusy), error
        assert "1 grammars are already waiting" in str(error) and "grammar_max_queued_compiles=1" in str(error)
        slow.exception(timeout=30)
        queued.result(timeout=30)
        # Not cached: once the queue has room the same grammar compiles.
        assert be.compile(GrammarSpec.from_fields(regex="[a-z]")).spec.text == "[a-z]"


def test_first_time_out_is_not_cached_a_second_one_is(tokenizer: Any) -> None:
    with LLGuidanceBackend(tokenizer, len(tokenizer), compile_timeout_s=SLOW_LIMIT_S, max_workers=1) as be:
        be.compile(GrammarSpec.from_fields(regex="b"))
        for _ in range(2):
            with pytest.raises(CompileTimeout, match="longer than the limit of 0.3 s"):
                be.compile(SLOW_REGEX)
        assert be.cache_stats()["misses"] == 3  # compiled again after the first time-out (a loaded host?)
        with pytest.raises(CompileTimeout):
            be.compile(SLOW_REGEX)
        assert be.cache_stats()["misses"] == 3  # the second time-out is the grammar's own: cached


def _python_that_fails_first(tmp_path: Path) -> str:
    """An interpreter whose first start exits at once (a transient failure), then runs the real one."""
    marker = tmp_path / "failed-once"
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\nif [ ! -e "{marker}" ]; then touch "{marker}"; exit 1; fi\nexec "{sys.executable}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_a_failed_worker_start_is_retried(tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", _python_that_fails_first(tmp_path))
    with LLGuidanceBackend(tokenizer, len(tokenizer), compile_timeout_s=SLOW_LIMIT_S, max_workers=1) as be:
        be.compile(GrammarSpec.from_fields(regex="b"))
        assert (tmp_path / "failed-once").exists()
        # The retried worker bounds compiles: the slow grammar is stopped at the limit.
        with pytest.raises(CompileTimeout):
            be.compile(SLOW_REGEX)


def test_no_worker_means_constrained_requests_are_refused(tokenizer: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with LLGuidanceBackend(tokenizer, len(tokenizer), max_workers=1) as be:
        for _ in range(2):  # refused each time, never cached as the grammar's fault, never compiled here
            with pytest.raises(TransientCompileError, match="grammar compile worker could not start"):
                be.compile(GrammarSpec.from_fields(regex="[0-9]+"))
        assert be.cache_stats()["misses"] == 2
        assert isinstance(TransientCompileError("x"), InvalidRequestError)  # a 400 for the client, not a crash
