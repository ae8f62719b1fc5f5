"""List the import cycles among sglite's modules, three times: module-level imports only; with the imports hidden
inside functions; and with the type-only imports under ``if TYPE_CHECKING:`` too (a cycle there still means two
modules that each need the other to be understood).

    python scripts/import_cycles.py        # exits 1 when either list is non-empty

Checked by tests/test_layout.py, so a new cycle fails the quick tier.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = {"xinf_sglang": "xinf_sglang", "runtime": "xinf_sglang.runtime", "kernels": "xinf_sglang.kernels"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three source roots."""
    found = {}
    for folder, name in SOURCE_ROOTS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, modules: set[str], type_only: bool):
    """Yield (target module, nested-in-function) for each import statement (type-only ones if asked)."""
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, nested: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not type_only:
                continue
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name in modules:
                        yield alias.name, nested
            elif isinstance(child, ast.ImportFrom):
                yield from _from_targets(child, package, modules, nested)
            yield from visit(child, inner)

    yield from visit(tree, False)


def _from_targets(node: ast.ImportFrom, package: str, modules: set[str], nested: bool):
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if sub in modules:
            yield sub, nested
        elif target in modules:
            yield target, nested


def import_graph(include_nested: bool, type_only: bool = False) -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    graph: dict[str, set[str]] = {m: set() for m in names}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        own_packages = _ancestors(module) | ({module} if path.name == "__init__.py" else set())
        for target, nested in _imports(tree, module, path.name == "__init__.py", names, type_only):
            if target == module or (nested and not include_nested):
                continue
            graph[module].add(target)
            # Importing a.b.c runs a/__init__ and a/b/__init__ first, unless they are this module's own packages
            # (being initialised already): a package that re-exports its modules closes cycles this way.
            graph[module].update(p for p in _ancestors(target) if p in names and p not in own_packages)
    return graph


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def main() -> int:
    bad = 0
    tiers = (("module-level imports", False, False), ("with function-level imports", True, False),
             ("with TYPE_CHECKING imports too", True, True))
    for label, nested, type_only in tiers:
        found = cycles(import_graph(nested, type_only))
        print(f"{label}: {len(found)} cycle(s)")
        for component in found:
            print("  " + " <-> ".join(component))
        bad += len(found)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
