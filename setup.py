"""Package discovery for the three source roots (metadata lives in pyproject.toml).

``runtime/`` and ``kernels/`` sit at the repository root but install as ``xinf_sglang.runtime`` and
``xinf_sglang.kernels``; setuptools' declarative ``packages.find`` cannot rename a root, so the list is computed here:
every folder with an ``__init__.py`` under the three roots, nothing listed by hand.
"""
from setuptools import find_packages, setup

ROOTS = {"xinf_sglang": "xinf_sglang", "xinf_sglang.runtime": "runtime", "xinf_sglang.kernels": "kernels"}


def _packages() -> list[str]:
    found = [p for p in find_packages(include=["xinf_sglang", "xinf_sglang.*"])]
    for name, folder in ROOTS.items():
        if folder != name:
            found += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return sorted(set(found))


setup(packages=_packages())
