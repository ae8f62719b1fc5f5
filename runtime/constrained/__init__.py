"""Constrained decoding: grammar specs, a grammar backend (llguidance by default), matchers and token bitmasks.

Flow: the engine turns a request's structured-output field into a `GrammarSpec` (`GrammarSpec.from_fields`),
compiles it with the backend (`compile` / `compile_async`, cached, time-bounded; a bad grammar is an
`InvalidRequestError`), and gives the request its own `GrammarMatcher` (`new_matcher`). Each decode step the
scheduler fills the constrained rows of one `allocate_bitmask` tensor, resets the other rows with
`reset_rows_allow_all`, masks the logits with `apply_bitmask_`, samples, and feeds each constrained row's token to
`accept_token`.
"""

from .backend import LLGUIDANCE_JSON_OPTIONS, CompiledGrammar, GrammarBackend, LLGuidanceBackend
from .bitmask import allocate_bitmask, apply_bitmask_, bitmask_width, reset_rows_allow_all
from .matcher import GrammarMatcher, LLGuidanceMatcher, TokenPolicy
from .spec import GRAMMAR_KINDS, GrammarKind, GrammarLimits, GrammarSpec

__all__ = [
    "GRAMMAR_KINDS",
    "LLGUIDANCE_JSON_OPTIONS",
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarKind",
    "GrammarLimits",
    "GrammarMatcher",
    "GrammarSpec",
    "LLGuidanceBackend",
    "LLGuidanceMatcher",
    "TokenPolicy",
    "allocate_bitmask",
    "apply_bitmask_",
    "bitmask_width",
    "reset_rows_allow_all",
]
