"""The wheel ships every package: each folder with an ``__init__.py`` under the three package roots is one of the
packages setuptools finds from pyproject.toml (an editable install finds missing ones anyway, a built wheel silently
lacks them)."""

from __future__ import annotations

import os
import tomllib
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _packages_setuptools_finds() -> set[str]:
    """The packages a build of pyproject.toml ships, from setuptools' own configuration reading and discovery."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    cwd = os.getcwd()
    os.chdir(ROOT)  # discovery reads paths relative to the project
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # setuptools' notes on its beta pyproject features
            dist = Distribution()
            apply_configuration(dist, ROOT / "pyproject.toml")
            dist.set_defaults()
        return set(dist.packages or [])
    finally:
        os.chdir(cwd)


def test_every_package_folder_is_shipped() -> None:
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    missing = sorted(found - _packages_setuptools_finds())
    assert not missing, f"package folders a built wheel would lack (see pyproject.toml [tool.setuptools]): {missing}"


def test_tuned_moe_configs_are_package_data() -> None:
    """The fused-MoE launch configs are JSON beside the kernel: a wheel ships them only through package-data."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data["xinf_sglang.kernels.moe"]
    shipped = {p for g in globs for p in (ROOT / "kernels" / "moe").glob(g)}
    assert set((ROOT / "kernels" / "moe" / "configs").glob("*.json")) <= shipped
    assert "configs/*.json" in globs
