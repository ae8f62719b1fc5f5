"""The scheduler in its own process: ``serve_scheduler`` is what a ``multiprocessing`` process runs.

It builds the same runtime the engine builds (``startup.build_runtime``: model, KV pool, runner, scheduler) and
runs the same ``SchedulerLoop``, reading ``messages.SchedulerInput`` from ``inbox`` and putting
``messages.Outputs`` / ``messages.Reply`` on ``outbox`` (both ``multiprocessing`` queues; every message is a
frozen dataclass that pickles). The front end keeps validating and tokenizing requests and compiling their
grammars before it sends them; this process has its own tokenizer (for detokenization and stop strings) and its
own grammar backend, built when the first constrained request arrives.
"""

from __future__ import annotations

import functools
from typing import Any

from ..config import EngineConfig
from ..constrained import GrammarBackend
from .intake import RequestBuilder
from .loop import SchedulerLoop
from ..engine.startup import build_runtime, make_grammar_backend

__all__ = ["serve_scheduler"]


def serve_scheduler(config: EngineConfig, inbox: Any, outbox: Any) -> None:
    """Build the runtime of ``config`` and serve its scheduler until a ``messages.Stop`` arrives."""

    @functools.cache  # one backend for the request builder and the sampler, built at the first constrained request
    def grammar_backend() -> GrammarBackend:
        return make_grammar_backend(config, rt.tokenizer, rt.model_config.vocab_size, rt.eos_token_ids)

    rt = build_runtime(config, grammar_backend)
    builder = RequestBuilder(rt.tokenizer, rt.device, grammar_backend)
    try:
        SchedulerLoop(rt.scheduler, builder, inbox, outbox, config.debug_invariants, config.stats_interval_s).run()
    finally:
        rt.close()
        if grammar_backend.cache_info().currsize:
            grammar_backend().close()
