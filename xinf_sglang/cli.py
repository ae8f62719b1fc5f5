"""The ``sglite`` command: one subcommand per module, each module owning its arguments and its run function.

Every subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Only the module of the
subcommand being run is imported, so ``sglite make-tiny-model`` never imports xinference.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("xinf_sglang.tools.demo", "serve SmolLM2-135M-Instruct (--tiny: a random-weight model) through a real "
             "Xinference with the sglite engine and check its answers"),
    "bench": ("xinf_sglang.tools.bench", "benchmark sglite: offline (vs HF / llama.cpp), serve (over HTTP), kernels "
              "(launch-shape sweeps), decode (step time, profile), ab (two installed copies)"),
    "make-tiny-model": ("xinf_sglang.tools.make_tiny_model", "write a deterministic random-weight checkpoint"),
    "fetch-smollm2": ("xinf_sglang.tools.fetch_smollm2", "download SmolLM2-135M-Instruct (GGUF + a float32 HF folder)"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The full parser, with arguments loaded for ``command`` only (the others list just their help line)."""
    parser = argparse.ArgumentParser(prog="sglite", description="sglite: an SGLang-style engine for Xinference")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return importlib.import_module(args._module).run(args)


if __name__ == "__main__":
    sys.exit(main())
