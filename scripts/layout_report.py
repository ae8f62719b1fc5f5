"""The shape of the source tree: modules per folder, and the longest files, classes and functions.

    python scripts/layout_report.py            # the table
    python scripts/layout_report.py --over     # only what breaks the limits (files 400, classes 250, functions 50)

Triton kernels (functions decorated with ``@triton.jit``) and C++ sources are outside the limits. Checked by
tests/test_layout.py.
"""
from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = ("xinf_sglang", "runtime", "kernels")
LIMITS = {"file": 400, "class": 250, "function": 50}


@dataclass(frozen=True)
class Span:
    kind: str  # file | class | function
    name: str  # path, or path:Qualified.name
    lines: int


def _is_triton_kernel(node: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


def spans(path: Path) -> list[Span]:
    """The file itself, each class, each function (methods and nested functions included)."""
    rel = str(path.relative_to(ROOT))
    source = path.read_text()
    found = [Span("file", rel, len(source.splitlines()))]

    def walk(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                if not _is_triton_kernel(child):
                    found.append(Span(kind, f"{rel}:{name}", child.end_lineno - child.lineno + 1))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return found


def python_files() -> list[Path]:
    return [p for folder in SOURCE_FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]


def folder_counts() -> dict[str, int]:
    """Modules per package folder (``__init__.py`` not counted)."""
    counts: dict[str, int] = {}
    for path in python_files():
        folder = str(path.parent.relative_to(ROOT))
        counts.setdefault(folder, 0)
        if path.name != "__init__.py":
            counts[folder] += 1
    return counts


def over_limits() -> list[Span]:
    return [s for p in python_files() for s in spans(p) if s.lines > LIMITS[s.kind]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--over", action="store_true", help="list only what breaks the limits")
    args = parser.parse_args()
    if args.over:
        for span in sorted(over_limits(), key=lambda s: (s.kind, -s.lines)):
            print(f"{span.kind:8} {span.lines:5}  {span.name}")
        return
    for folder, count in sorted(folder_counts().items()):
        print(f"{count:3}  {folder}/")
    every = [s for p in python_files() for s in spans(p)]
    for kind in LIMITS:
        longest = sorted((s for s in every if s.kind == kind), key=lambda s: -s.lines)[:3]
        print(f"longest {kind}s: " + ", ".join(f"{s.name} ({s.lines})" for s in longest))
        print(f"  over {LIMITS[kind]} lines: {sum(s.lines > LIMITS[kind] for s in every if s.kind == kind)}")


if __name__ == "__main__":
    main()
