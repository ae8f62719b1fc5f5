"""Build-time only (setuptools): ship ``xinf_sglang_autoload.pth`` at the root of site-packages.

The ``.pth`` file imports :mod:`xinf_sglang._autoload` at interpreter start-up, which registers the sglite engine
with Xinference (see there). setuptools has no option for a top-level ``.pth`` file, so ``build_py`` writes it:

- regular wheels (``pip install .``, ``pip wheel .``): into ``build_lib``, whose root becomes the wheel's purelib
  root, i.e. site-packages;
- editable installs (``pip install -e .``, PEP 660): setuptools' ``editable_wheel`` runs ``build_py`` with
  ``editable_mode`` set and a throw-away ``build_lib``; it points the ``install`` command's ``install_lib`` at the
  unpacked editable wheel, whose files all end up in site-packages, so the file is written there.

Referenced from ``[tool.setuptools.cmdclass]`` in pyproject.toml. Imports nothing but setuptools.
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py

PTH_NAME = "xinf_sglang_autoload.pth"
# Sorted after setuptools' "__editable__.*.pth" (which makes xinf_sglang importable in editable installs);
# a .pth line starting with "import" is executed by site.py. find_spec keeps a half-removed install silent.
PTH_CONTENT = (
    'import importlib.util; importlib.util.find_spec("xinf_sglang") is not None '
    'and __import__("xinf_sglang._autoload")\n'
)


class BuildPyWithPth(build_py):
    """``build_py`` that also writes :data:`PTH_NAME` where it will land at the root of site-packages."""

    def run(self) -> None:
        super().run()
        target_dir = self._pth_target_dir()
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, PTH_NAME)
        with open(target, "w", encoding="utf-8") as f:
            f.write(PTH_CONTENT)
        self._pth_outputs = [target]

    def _pth_target_dir(self) -> str:
        if getattr(self, "editable_mode", False):
            install = self.get_finalized_command("install")
            if install.install_lib:
                return install.install_lib
        return self.build_lib

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return list(super().get_outputs(include_bytecode)) + list(getattr(self, "_pth_outputs", []))
