"""Constrained decoding: grammar specs, a grammar backend (llguidance by default), matchers and token bitmasks.

Flow: a request's structured-output field becomes a `GrammarSpec` once, when its `SamplingParams` is built
(`GrammarSpec.from_fields`: checked, parsed and measured); the engine checks it against its `GrammarLimits`,
compiles it with the backend (`compile` / `compile_async`, cached, time-bounded; a bad grammar is an
`InvalidRequestError`), and gives the request its own `GrammarMatcher` (`new_matcher`). Each step with a
constrained row, `BatchMask` fills the constrained rows of one bitmask in one batched call
(`GrammarBackend.fill_bitmasks`), resets the others to allow-all and masks the logits (`apply_bitmask_`); after
sampling each constrained request's token goes to its matcher's `accept_token`.

Modules: spec.py and limits.py (what a request asks, how big it may be), backend.py (the backend interface and
its compile cache), llguidance_backend.py (the default backend), compile_worker.py (compiles that can be
stopped), token_table.py, token_table_check.py and llg_tokenizer.py (the tokenizer as llguidance sees it),
matcher.py (per-request state), bitmask.py and batch_mask.py (the per-step mask).
"""

from .backend import CompiledGrammar, GrammarBackend
from .batch_mask import BatchMask
from .bitmask import allocate_bitmask, apply_bitmask_, bitmask_width, reset_rows_allow_all
from .compile_worker import LLGUIDANCE_JSON_OPTIONS
from .llguidance_backend import LLGuidanceBackend
from .matcher import GrammarMatcher, LLGuidanceMatcher, TokenPolicy
from .spec import GRAMMAR_KINDS, GrammarKind, GrammarLimits, GrammarSize, GrammarSpec

__all__ = [
    "GRAMMAR_KINDS",
    "LLGUIDANCE_JSON_OPTIONS",
    "BatchMask",
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarKind",
    "GrammarLimits",
    "GrammarMatcher",
    "GrammarSize",
    "GrammarSpec",
    "LLGuidanceBackend",
    "LLGuidanceMatcher",
    "TokenPolicy",
    "allocate_bitmask",
    "apply_bitmask_",
    "bitmask_width",
    "reset_rows_allow_all",
]
