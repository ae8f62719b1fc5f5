"""Package exports loaded on first use (PEP 562 module ``__getattr__``), for packages whose names must be importable
from the package but whose modules are heavy (torch, triton, llguidance): importing a light submodule then never
runs the heavy ones through the package's ``__init__``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``package``: ``exports`` maps each public name to the submodule (relative to
    ``package``) that defines it; any other name is an AttributeError, as for a plain module."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{exports[name]}", package), name)

    return __getattr__
