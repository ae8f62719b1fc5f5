"""The ``sglite`` command: one subcommand per module, each module owning its arguments and its run function.

Every subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only
when their subcommand runs, so ``sglite make-tiny-model`` never imports xinference.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-model": ("xinf_sglang.runtime.tiny_model", "write a deterministic random-weight checkpoint"),
    "bench": ("xinf_sglang.runtime.bench", "benchmark the runtime (offline throughput, baseline HF generate)"),
    "demo": ("xinf_sglang.demo", "serve a tiny model through a real Xinference with the sglite engine"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sglite", description="sglite: an SGLang-style engine for Xinference")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        sub_parser.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args._module).run(args)


if __name__ == "__main__":
    sys.exit(main())
