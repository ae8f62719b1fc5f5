"""Let sglite match ``ggufv2`` specs: a wrapper around Xinference 4.1's ``check_format_with_engine``.

That function (in ``xinference.model.llm``, consulted before any engine's ``match`` while the per-model engine
table is built) hard-codes ``ggufv2`` to the llama.cpp and vLLM engines. Without the wrapper sglite's GGUF support
is invisible to Xinference (launch fails with "cannot be run on engine sglite").

Applied by the engine-registration hook (:func:`xinf_sglang.registration.engine_tables.register_llm_engine`),
which runs while ``xinference.model.llm`` bootstraps, once per process; the marker on the wrapper makes a second
call a no-op.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

_MODULE = "xinference.model.llm"
_MARK = "__sglite_ggufv2__"


def allow_gguf_format(engine_name: str) -> bool:
    """Make ``check_format_with_engine`` answer True for (``ggufv2``, ``engine_name``), deferring to the original
    for everything else. Returns whether the wrapper is in place; a missing function is logged, never raised."""
    module = sys.modules.get(_MODULE)
    original = getattr(module, "check_format_with_engine", None)
    if original is None:
        logger.warning("sglite: %s.check_format_with_engine not found; ggufv2 models will not list %s",
                       _MODULE, engine_name)
        return False
    if getattr(original, _MARK, False):
        return True

    def check_format_with_engine(model_format: Any, engine: Any) -> bool:
        if model_format == "ggufv2" and engine == engine_name:
            return True
        return original(model_format, engine)

    setattr(check_format_with_engine, _MARK, True)
    setattr(module, "check_format_with_engine", check_format_with_engine)
    return True
