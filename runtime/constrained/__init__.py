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

from __future__ import annotations

from ..lazy_exports import lazy_getattr

# Public name -> the submodule defining it, imported on first use: the plugin's engine classes need only the light
# spec / limits modules when Xinference's supervisor and worker build their engine tables, and importing the
# package must not pull in llguidance, the kernels and triton there (they load in the model process, when used).
_EXPORTS = {
    "GRAMMAR_KINDS": "spec",
    "LLGUIDANCE_JSON_OPTIONS": "compile_worker",
    "BatchMask": "batch_mask",
    "CompiledGrammar": "backend",
    "GrammarBackend": "backend",
    "GrammarKind": "spec",
    "GrammarLimits": "spec",
    "GrammarMatcher": "matcher",
    "GrammarSize": "spec",
    "GrammarSpec": "spec",
    "LLGuidanceBackend": "llguidance_backend",
    "LLGuidanceMatcher": "matcher",
    "TokenPolicy": "matcher",
    "allocate_bitmask": "bitmask",
    "apply_bitmask_": "bitmask",
    "bitmask_width": "bitmask",
    "reset_rows_allow_all": "bitmask",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
