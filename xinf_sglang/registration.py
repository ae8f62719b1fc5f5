"""How sglite plugs into Xinference's engine tables (xinference 4.1).

Facts this module relies on (read from the xinference 4.1.0 source):

- ``xinference.model.llm._install`` fills ``SUPPORTED_ENGINES`` with the built-in engines, then runs the
  callbacks registered through ``xinference.engine_hooks.register_engine_registration_hook("LLM", hook)``
  (on a copy of the table), then loads the model families and builds the per-model ``LLM_ENGINES`` table by
  calling every engine class's ``match``. It runs once per process, the first time ``xinference.model`` is
  imported; :mod:`xinf_sglang._autoload` registers :func:`register_llm_engine` just before that.
- ``--context-length`` is mapped to an engine-native key through
  ``xinference.model.llm.context_length.CONTEXT_LENGTH_KEYS``; an engine missing there rejects the option.
- With per-model virtual environments on (the default in 4.x), a family whose ``virtualenv.packages`` carry
  engine markers (``'#vllm_dependencies# ; #engine# == "vllm"'``; every built-in family does) only offers the
  engines named by those markers: other engines are listed as "not listed in model virtualenv packages" and
  refused at launch. :func:`declare_in_virtualenv` adds sglite's marker. It installs nothing: the placeholder
  ``#sglite_dependencies#`` expands to no package (Xinference drops unknown ``*_dependencies`` placeholders),
  and the model's virtual environment sees this environment's site-packages, sglite included.

Nothing here imports ``xinference`` at module level: this module is imported while ``xinference.model`` is
being imported.
"""

from __future__ import annotations

import logging
from typing import Any, MutableMapping

logger = logging.getLogger(__name__)

ENGINE_NAME = "sglite"
# The marker Xinference's virtualenv logic parses (regex ``#engine# == "<name>"``); the placeholder before the
# ``;`` expands to ENGINE_VIRTUALENV_PACKAGES.get("sglite", []) == [] when this engine is launched.
VIRTUALENV_MARKER = f'#{ENGINE_NAME}_dependencies# ; #engine# == "{ENGINE_NAME}"'


def register_llm_engine(table: MutableMapping[str, list[type]]) -> None:
    """Xinference LLM engine-registration hook: add ``sglite`` to ``table`` (the ``SUPPORTED_ENGINES`` copy).

    Idempotent (replaces its own entry). Never raises: if the engine cannot be imported, Xinference keeps
    running without it and a warning says why.
    """
    try:
        from .engine import SgliteChatModel, SgliteModel
    except Exception:
        logger.warning("sglite: the engine could not be imported; Xinference runs without it", exc_info=True)
        return
    # Chat first: for a chat family the chat class matches; generate-only families fall through to SgliteModel.
    table[ENGINE_NAME] = [SgliteChatModel, SgliteModel]
    set_context_length_key()


def set_context_length_key() -> None:
    """Let Xinference's unified ``--context-length`` reach sglite's ``context_length`` launch option."""
    try:
        from xinference.model.llm.context_length import CONTEXT_LENGTH_KEYS
    except ImportError:  # older Xinference: no unified option; ``--context_length`` still works as a kwarg
        return
    CONTEXT_LENGTH_KEYS[ENGINE_NAME] = "context_length"


def declare_in_virtualenv(family: Any) -> None:
    """Add sglite's marker to ``family.virtualenv.packages`` when the family restricts engines by markers.

    Families without virtualenv packages, or whose packages name no engine, accept every engine already and
    are left alone. Idempotent; mutates the family object Xinference keeps in its registry (which is where
    both the engine listing and the launch check read the markers from).
    """
    venv = getattr(family, "virtualenv", None)
    packages = getattr(venv, "packages", None)
    if not packages or VIRTUALENV_MARKER in packages:
        return
    if not any("#engine#" in p or "#model_engine#" in p for p in packages):
        return
    packages.append(VIRTUALENV_MARKER)
