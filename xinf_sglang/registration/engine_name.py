"""sglite's name in Xinference, and its declaration in the families that restrict engines by virtualenv markers.

With per-model virtual environments on (the default in 4.x), a family whose ``virtualenv.packages`` carry engine
markers (``'#vllm_dependencies# ; #engine# == "vllm"'``; every built-in family does) only offers the engines named
by those markers: other engines are listed as "not listed in model virtualenv packages" and refused at launch.
:func:`declare_in_virtualenv` adds sglite's marker. It installs nothing: the placeholder ``#sglite_dependencies#``
expands to no package (Xinference drops unknown ``*_dependencies`` placeholders), and the model's virtual
environment sees this environment's site-packages, sglite included.

Imported by the engine classes (their ``match``), the registration hook and the REST-layer patches alike, so it
imports nothing.
"""

from __future__ import annotations

from typing import Any

ENGINE_NAME = "sglite"
# The marker Xinference's virtualenv logic parses (regex ``#engine# == "<name>"``); the placeholder before the
# ``;`` expands to ENGINE_VIRTUALENV_PACKAGES.get("sglite", []) == [] when this engine is launched.
VIRTUALENV_MARKER = f'#{ENGINE_NAME}_dependencies# ; #engine# == "{ENGINE_NAME}"'


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
