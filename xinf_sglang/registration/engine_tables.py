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
import sys
from typing import Any, MutableMapping

logger = logging.getLogger(__name__)

ENGINE_NAME = "sglite"
# The marker Xinference's virtualenv logic parses (regex ``#engine# == "<name>"``); the placeholder before the
# ``;`` expands to ENGINE_VIRTUALENV_PACKAGES.get("sglite", []) == [] when this engine is launched.
VIRTUALENV_MARKER = f'#{ENGINE_NAME}_dependencies# ; #engine# == "{ENGINE_NAME}"'


_ENGINE_MODULE = "xinf_sglang.serving.engine"
_GGUF_MARK = "__sglite_ggufv2__"
_late_registration_pending = False


def register_llm_engine(table: MutableMapping[str, list[type]]) -> None:
    """Xinference LLM engine-registration hook: add ``sglite`` to ``table`` (the ``SUPPORTED_ENGINES`` copy).

    Idempotent (replaces its own entry). Never raises: if the engine cannot be imported, Xinference keeps
    running without it and a warning says why.
    """
    global _late_registration_pending
    set_context_length_key()
    allow_gguf_format()
    partial = sys.modules.get(_ENGINE_MODULE)
    if partial is not None and not hasattr(partial, "SgliteChatModel"):
        # This bootstrap was triggered *by* the import of xinf_sglang.serving.engine (its first xinference import):
        # that is how a model subprocess starts, unpickling its engine object. The classes do not exist yet;
        # xinf_sglang.serving.engine calls complete_late_registration() once they do.
        _late_registration_pending = True
        return
    try:
        from ..serving.engine import SgliteChatModel, SgliteModel
    except Exception:
        logger.warning("sglite: the engine could not be imported; Xinference runs without it", exc_info=True)
        return
    # Chat first: for a chat family the chat class matches; generate-only families fall through to SgliteModel.
    table[ENGINE_NAME] = [SgliteChatModel, SgliteModel]


def complete_late_registration(classes: list[type]) -> None:
    """Finish a registration :func:`register_llm_engine` had to defer (see there); a no-op otherwise.

    Adds sglite to the live ``SUPPORTED_ENGINES`` and sglite's entries to ``LLM_ENGINES`` for the families
    it serves, as Xinference's bootstrap would have done.
    """
    global _late_registration_pending
    if not _late_registration_pending:
        return
    _late_registration_pending = False
    try:
        from xinference.model.llm.custom import get_user_defined_llm_families
        from xinference.model.llm.llm_family import BUILTIN_LLM_FAMILIES, LLM_ENGINES, SUPPORTED_ENGINES

        SUPPORTED_ENGINES[ENGINE_NAME] = list(classes)
        for family in [*BUILTIN_LLM_FAMILIES, *get_user_defined_llm_families()]:
            params = _engine_params(family, classes)
            if params:
                LLM_ENGINES.setdefault(family.model_name, {})[ENGINE_NAME] = params
    except Exception:
        logger.warning("sglite: late registration with Xinference failed", exc_info=True)


def _engine_params(family: Any, classes: list[type]) -> list[dict[str, Any]]:
    """sglite's ``LLM_ENGINES[model_name]["sglite"]`` entry, in the shape Xinference's bootstrap builds it."""
    params: list[dict[str, Any]] = []
    for spec in family.model_specs:
        quantization = spec.quantization
        cls = next((c for c in classes if c.match(family, spec, quantization)), None)
        if cls is None:
            continue
        same = next(
            (
                p
                for p in params
                if p["model_format"] == spec.model_format
                and p["model_size_in_billions"] == spec.model_size_in_billions
            ),
            None,
        )
        if same is None:
            params.append(
                {
                    "model_name": family.model_name,
                    "model_format": spec.model_format,
                    "model_size_in_billions": spec.model_size_in_billions,
                    "quantizations": [quantization],
                    "llm_class": cls,
                }
            )
        elif quantization not in same["quantizations"]:
            same["quantizations"].append(quantization)
    return params


def allow_gguf_format() -> None:
    """Let sglite match ``ggufv2`` specs: Xinference 4.1's ``check_format_with_engine`` (in
    ``xinference.model.llm``, consulted before any engine's ``match`` while the per-model engine table is built)
    hard-codes ``ggufv2`` to the llama.cpp and vLLM engines. The wrapper answers True for (``ggufv2``, sglite) and
    defers to the original for everything else; idempotent. Without it sglite's GGUF support is invisible to
    Xinference (launch fails with "cannot be run on engine sglite"), so a missing function is logged."""
    module = sys.modules.get("xinference.model.llm")
    original = getattr(module, "check_format_with_engine", None)
    if original is None:
        logger.warning("sglite: xinference.model.llm.check_format_with_engine not found; ggufv2 models will not "
                       "list sglite")
        return
    if getattr(original, _GGUF_MARK, False):
        return

    def check_format_with_engine(model_format: Any, engine: Any) -> bool:
        if model_format == "ggufv2" and engine == ENGINE_NAME:
            return True
        return original(model_format, engine)

    setattr(check_format_with_engine, _GGUF_MARK, True)
    module.check_format_with_engine = check_format_with_engine


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
