"""How sglite plugs into Xinference's engine tables (xinference 4.1): the engine-registration hook.

Facts this module relies on (read from the xinference 4.1.0 source):

- ``xinference.model.llm._install`` fills ``SUPPORTED_ENGINES`` with the built-in engines, then runs the
  callbacks registered through ``xinference.engine_hooks.register_engine_registration_hook("LLM", hook)``
  (on a copy of the table), then loads the model families and builds the per-model ``LLM_ENGINES`` table by
  calling every engine class's ``match``. It runs once per process, the first time ``xinference.model`` is
  imported; :mod:`xinf_sglang._autoload` registers :func:`register_llm_engine` just before that.
- ``--context-length`` is mapped to an engine-native key through
  ``xinference.model.llm.context_length.CONTEXT_LENGTH_KEYS``; an engine missing there rejects the option.
- Families that restrict engines by virtualenv markers: see :mod:`xinf_sglang.registration.engine_name` (the
  engine classes declare sglite there from their ``match``).

The hook imports the engine classes; they never import this module (no cycle). A model subprocess starts by
importing the engine package (unpickling its engine object), which bootstraps Xinference before its class modules
start (see :mod:`xinf_sglang.serving.engine`), so the hook always finds the classes complete.

Nothing here imports ``xinference`` at module level: this module is imported while ``xinference.model`` is
being imported.
"""

from __future__ import annotations

import logging
from typing import MutableMapping

from ..compat.gguf_format import allow_gguf_format
from .engine_name import ENGINE_NAME

logger = logging.getLogger(__name__)


def register_llm_engine(table: MutableMapping[str, list[type]]) -> None:
    """Xinference LLM engine-registration hook: add ``sglite`` to ``table`` (the ``SUPPORTED_ENGINES`` copy).

    Idempotent (replaces its own entry). Never raises: if the engine cannot be imported, Xinference keeps
    running without it and a warning says why.
    """
    set_context_length_key()
    allow_gguf_format(ENGINE_NAME)
    try:
        # From the defining modules, not the package: when the package's own import started this bootstrap, the
        # package is still half-initialised (its class modules are not).
        from ..serving.engine.chat_model import SgliteChatModel
        from ..serving.engine.model import SgliteModel
    except Exception:
        logger.warning("sglite: the engine could not be imported; Xinference runs without it", exc_info=True)
        return
    # Chat first: for a chat family the chat class matches; generate-only families fall through to SgliteModel.
    table[ENGINE_NAME] = [SgliteChatModel, SgliteModel]


def set_context_length_key() -> None:
    """Let Xinference's unified ``--context-length`` reach sglite's ``context_length`` launch option."""
    try:
        from xinference.model.llm.context_length import CONTEXT_LENGTH_KEYS
    except ImportError:  # older Xinference: no unified option; ``--context_length`` still works as a kwarg
        return
    CONTEXT_LENGTH_KEYS[ENGINE_NAME] = "context_length"
