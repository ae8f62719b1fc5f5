"""The shape of the tree, held: no import cycles, the size limits, the import direction, and the serving path free of
test fixtures and benchmarks (scripts/import_cycles.py and scripts/layout_report.py print the same facts)."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


cycles_tool = _load("import_cycles")
layout_tool = _load("layout_report")


@pytest.mark.parametrize("nested, type_only", [(False, False), (True, False), (True, True)],
                         ids=["module-level", "function-level", "type-checking"])
def test_no_import_cycles(nested, type_only):
    assert cycles_tool.cycles(cycles_tool.import_graph(nested, type_only)) == []


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    """The tool itself: a.x imports b.y, and b/__init__ re-exports b.z, which imports a.x."""
    graph = {"p.a.x": {"p.b.y", "p.b"}, "p.b": {"p.b.z"}, "p.b.y": set(), "p.b.z": {"p.a.x", "p.a"}, "p.a": set()}
    assert cycles_tool.cycles(graph) == [["p.a.x", "p.b", "p.b.z"]]


def test_files_classes_and_functions_within_the_limits():
    over = [f"{s.kind} {s.name}: {s.lines} lines (limit {layout_tool.LIMITS[s.kind]})"
            for s in layout_tool.over_limits()]
    assert over == []


def test_no_folder_holds_more_than_thirteen_modules():
    assert {f: n for f, n in layout_tool.folder_counts().items() if n > 13} == {}


def _imported_modules(path: Path) -> set[str]:
    """Absolute names this file imports (relative imports resolved against its package)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = ["xinf_sglang", *rel.parts[:-1]] if rel.parts[0] in ("runtime", "kernels") else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module == "xinf_sglang":  # ``from xinf_sglang import kernels``: judge the names, not the package
                found.update(f"{module}.{alias.name}" for alias in node.names)
            else:
                found.add(module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_imports_point_down():
    """kernels/ imports nothing of sglite; runtime/ nothing of the plugin; the serving path neither test fixtures
    (runtime/testing) nor benchmarks (runtime/bench), which only tools and tests use."""
    bad = []
    for path in layout_tool.python_files():
        top = path.relative_to(ROOT).parts[0]
        for name in _imported_modules(path):
            if top == "kernels" and name.startswith(("xinf_sglang.runtime", "xinf_sglang.serving")):
                bad.append(f"{path}: {name}")
            if top == "runtime" and name.startswith("xinf_sglang") and not name.startswith(
                    ("xinf_sglang.runtime", "xinf_sglang.kernels")):
                bad.append(f"{path}: {name}")
            serving = top != "runtime" or path.relative_to(ROOT).parts[1] not in ("testing", "bench")
            serving = serving and "tools" not in path.relative_to(ROOT).parts
            if serving and name.startswith(("xinf_sglang.runtime.testing", "xinf_sglang.runtime.bench")):
                bad.append(f"{path}: {name}")
    assert bad == []
