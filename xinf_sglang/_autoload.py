"""Start-up hook that registers the ``sglite`` engine with Xinference, with no manual step.

The installed ``xinf_sglang_autoload.pth`` file imports this module in every Python process of the environment
(supervisor, worker, model subprocesses, including the per-model virtual environments Xinference creates, which
add the parent site-packages and its ``.pth`` files). Xinference offers no entry-point discovery for engines; its
``xinference.engine_hooks.register_engine_registration_hook`` must be called *before* ``xinference.model``
bootstraps, in every process that builds the engine tables. So this module only puts a meta-path finder on
``sys.meta_path`` that never finds anything: it notices the first import of ``xinference.model``, registers the
hook at that moment (``xinference`` itself is already imported then) and removes itself.

Cheap by design: importing it (with the empty ``xinf_sglang`` package) takes about a millisecond and
imports nothing but ``os``/``sys`` (already loaded at start-up). It must never break Python start-up or
Xinference: every failure is a warning. Set ``SGLITE_XINFERENCE_AUTOLOAD=0`` to switch it off.
"""

from __future__ import annotations

import os
import sys

_TRIGGER = "xinference.model"
_DISABLE_ENV = "SGLITE_XINFERENCE_AUTOLOAD"


def _warn(msg: str, *args: object) -> None:
    # logging is imported only when there is something to say: it is not loaded at interpreter start-up.
    import logging

    logging.getLogger("xinf_sglang").warning(msg, *args)


class _XinferenceBootstrapWatcher:
    """A ``sys.meta_path`` finder that finds nothing; on the first ``import xinference.model`` it registers sglite.

    Returning ``None`` from ``find_spec`` lets the regular finders import the module as usual.
    """

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname == _TRIGGER:
            uninstall()
            register_with_xinference()
        return None

    def __repr__(self) -> str:  # shows up in sys.meta_path listings
        return "<sglite: registers the Xinference engine on the first import of xinference.model>"


_WATCHER = _XinferenceBootstrapWatcher()


def register_with_xinference() -> bool:
    """Register sglite's engine hook with Xinference now. Returns whether the hook is registered.

    Safe to call more than once. Fails softly (a warning) when Xinference is missing, too old to have
    ``engine_hooks`` (< 3.4), or has already bootstrapped its models in this process.
    """
    try:
        from xinference.engine_hooks import register_engine_registration_hook

        from xinf_sglang.registration import register_llm_engine

        register_engine_registration_hook("LLM", register_llm_engine)
        return True
    except ImportError as e:
        _warn("sglite: not registered with Xinference (%s); Xinference >= 3.4 is required", e)
    except Exception as e:  # never break Xinference because of this plugin
        _warn("sglite: could not register the Xinference engine: %s", e)
    return False


def install() -> None:
    """Put the watcher on ``sys.meta_path`` (idempotent); register at once if ``xinference.model`` is loaded."""
    if os.environ.get(_DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if _TRIGGER in sys.modules:
        # Too late for the hook in this process (someone imported this module by hand, late).
        _warn("sglite: xinference.model was imported before the sglite start-up hook; engine not registered")
        return
    if not any(f is _WATCHER for f in sys.meta_path):
        sys.meta_path.insert(0, _WATCHER)


def uninstall() -> None:
    """Remove the watcher from ``sys.meta_path``."""
    sys.meta_path[:] = [f for f in sys.meta_path if f is not _WATCHER]


try:
    install()
except Exception as _e:  # pragma: no cover - defensive: a .pth import must never raise
    _warn("sglite: start-up hook not installed: %s", _e)
