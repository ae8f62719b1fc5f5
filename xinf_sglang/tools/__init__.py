"""The ``sglite`` subcommands that are tools around the runtime (``bench``, ``make-tiny-model``,
``fetch-smollm2``): each module holds one command's ``add_arguments(parser)`` and ``run(args) -> int`` (see
:mod:`xinf_sglang.cli`); what they run lives in the runtime (``xinf_sglang.runtime.bench.offline``, ``.tiny_model``,
``.smollm2``), usable without the command line."""
