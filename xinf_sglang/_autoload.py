"""Start-up hook that registers the ``sglite`` engine with Xinference, with no manual step.

The installed ``xinf_sglang_autoload.pth`` file imports this module in every Python process of the environment
(supervisor, worker, model subprocesses, including the per-model virtual environments Xinference creates, which
add the parent site-packages and its ``.pth`` files). Xinference offers no entry-point discovery for engines; its
``xinference.engine_hooks.register_engine_registration_hook`` must be called *before* ``xinference.model``
bootstraps, in every process that builds the engine tables. So this module only puts a meta-path finder on
``sys.meta_path`` that notices the first import of ``xinference.model`` and registers the hook at that moment
(``xinference`` itself is already imported then). It also notices the first import of
``xinference.api.restful_api`` (only the process serving the REST API imports it) and applies
:mod:`xinf_sglang.compat.patches`'s patches right after that module has run. It removes itself once both
have happened.

Cheap by design: importing it (with the empty ``xinf_sglang`` package) takes about a millisecond and
imports nothing but ``os``/``sys`` (already loaded at start-up). It must never break Python start-up or
Xinference: every failure is a warning. Set ``SGLITE_XINFERENCE_AUTOLOAD=0`` to switch it off (registration and
patches), ``SGLITE_XINFERENCE_COMPAT=0`` to keep the registration but not the REST-layer patches.
"""

from __future__ import annotations

import os
import sys

_TRIGGER = "xinference.model"
_REST_TRIGGER = "xinference.api.restful_api"
_DISABLE_ENV = "SGLITE_XINFERENCE_AUTOLOAD"
_COMPAT_ENV = "SGLITE_XINFERENCE_COMPAT"


def _switched_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def _warn(msg: str, *args: object) -> None:
    # logging is imported only when there is something to say: it is not loaded at interpreter start-up.
    import logging

    logging.getLogger("xinf_sglang").warning(msg, *args)


class _XinferenceBootstrapWatcher:
    """A ``sys.meta_path`` finder; on the first ``import xinference.model`` it registers sglite, and on the first
    ``import xinference.api.restful_api`` it arranges for the REST-layer compatibility patches.

    For ``xinference.model`` it returns ``None``: the regular finders import the module as usual. For the REST
    module it returns the regular finders' own spec, whose loader runs the patches after the module's code.
    """

    def __init__(self, pending: set[str]) -> None:
        self.pending = pending  # the trigger modules not imported yet; the finder leaves sys.meta_path after both

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending:
            uninstall()
        if fullname == _TRIGGER:
            register_with_xinference()
            return None
        return _spec_with_compat_patches(self, fullname, path, target)

    def __repr__(self) -> str:  # shows up in sys.meta_path listings
        return (
            "<sglite: registers the Xinference engine on the first import of xinference.model; "
            "applies xinf_sglang.compat.patches after xinference.api.restful_api>"
        )


def _spec_with_compat_patches(watcher: object, fullname: str, path: object, target: object) -> object:
    """The spec the other finders give for ``fullname``, its loader set to apply the patches after running it.

    ``None`` (import as usual, unpatched) when the patches are switched off or the spec cannot be wrapped.
    """
    if _switched_off(_COMPAT_ENV):
        return None
    try:
        spec = None
        for finder in list(sys.meta_path):
            if finder is watcher or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return None

        def exec_then_patch(module: object) -> None:
            exec_module(module)
            try:
                from xinf_sglang.compat.patches import install as install_compat

                install_compat()
            except Exception as e:  # never break Xinference because of this plugin
                _warn("sglite: Xinference compatibility patches not applied: %s", e)

        # On this spec's own loader instance only (path finders make one per module): module.__loader__ stays the
        # regular loader object.
        loader.exec_module = exec_then_patch  # type: ignore[union-attr]
        return spec
    except Exception as e:  # never break the import
        _warn("sglite: Xinference compatibility patches not applied: %s", e)
        return None


def register_with_xinference() -> bool:
    """Register sglite's engine hook with Xinference now. Returns whether the hook is registered.

    Safe to call more than once. Fails softly (a warning) when Xinference is missing, too old to have
    ``engine_hooks`` (< 3.4), or has already bootstrapped its models in this process.
    """
    try:
        from xinference.engine_hooks import register_engine_registration_hook

        from xinf_sglang.registration.engine_tables import register_llm_engine

        register_engine_registration_hook("LLM", register_llm_engine)
        return True
    except ImportError as e:
        _warn("sglite: not registered with Xinference (%s); Xinference >= 3.4 is required", e)
    except Exception as e:  # never break Xinference because of this plugin
        _warn("sglite: could not register the Xinference engine: %s", e)
    return False


def install() -> None:
    """Put a watcher on ``sys.meta_path`` unless one is there already (the watcher lives there, nowhere else)."""
    if _switched_off(_DISABLE_ENV):
        return
    if _TRIGGER in sys.modules:
        # Too late for the hook in this process (someone imported this module by hand, late).
        _warn("sglite: xinference.model was imported before the sglite start-up hook; engine not registered")
        return
    if any(isinstance(f, _XinferenceBootstrapWatcher) for f in sys.meta_path):
        return
    # REST module already imported: nothing to wrap (xinf_sglang.compat.patches.install() still works by hand).
    pending = {_TRIGGER} if _REST_TRIGGER in sys.modules else {_TRIGGER, _REST_TRIGGER}
    sys.meta_path.insert(0, _XinferenceBootstrapWatcher(pending))


def uninstall() -> None:
    """Remove sglite's watcher from ``sys.meta_path``."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _XinferenceBootstrapWatcher)]


try:
    install()
except Exception as _e:  # pragma: no cover - defensive: a .pth import must never raise
    _warn("sglite: start-up hook not installed: %s", _e)
