"""``sglite bench kernels``: launch-shape sweeps of the decode-time Triton kernels at a model's shapes (random
weights, no checkpoint): the skinny linear against ``F.linear``, split-KV decode attention, and whole decode layers
in a CUDA graph. What each sweep times is in :mod:`xinf_sglang.runtime.bench.kernel_sweep`; this module is the
command line. On a GPU::

    sglite bench kernels --model-config configs/llama-3.1-8b.json [--sweep linear,chain] [--json tune.json]
    SGLITE_DISABLE_PDL=1 sglite bench kernels --model-config ... --sweep chain     # programmatic launch off
    sglite bench kernels --model-config configs/llama-3.1-8b.json --sweep quant     # FP8 / AWQ / GPTQ linears
    sglite bench kernels --model-config ... --sweep quant --config-out kernels/quant/configs   # and write the bests

The ``quant`` sweep (:mod:`xinf_sglang.runtime.bench.quant_sweep`, GPU only) is not in the default set: its launch
grids take a few minutes.

``--device cpu --quick`` runs the same code under Triton's interpreter on a few launch shapes (a smoke run: the
times mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .arg_types import int_list

SWEEPS = ("paths", "attention", "linear", "chain", "quant")  # the order they run in
DEFAULT_SWEEPS = SWEEPS[:4]


def _names(what: str, allowed: Callable[[], tuple[str, ...]]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list of names, each one of ``allowed()`` (called when the option is
    given, so that its module is imported only then)."""

    def parse(text: str) -> tuple[str, ...]:
        names, known = tuple(n.strip() for n in text.split(",") if n.strip()), allowed()
        unknown = sorted(set(names) - set(known))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or text!r}; "
                                             f"choose from {','.join(known)}")
        return names

    return parse


def _quant_kinds() -> tuple[str, ...]:
    from ..runtime.bench.quant_sweep import QUANT_KINDS

    return QUANT_KINDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-config", required=True,
                   help="config.json whose shapes to use, e.g. configs/llama-3.1-8b.json")
    p.add_argument("--sweep", type=_names("sweep", lambda: SWEEPS), default=DEFAULT_SWEEPS, metavar="NAME[,NAME]",
                   help=f"which sweeps, comma-separated, of {','.join(SWEEPS)} (default all but quant)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="auto: bfloat16 on a GPU, float32 on the CPU (the interpreter's bf16 is not exact)")
    p.add_argument("--chain-bs", type=int_list, default=(1, 8), metavar="B[,B]",
                   help="batch sizes of the chain sweep (default 1,8)")
    p.add_argument("--quick", action="store_true",
                   help="a few launch shapes, batch sizes and small cases per sweep (a smoke run)")
    p.add_argument("--json", dest="json_out", help="also write every grid as JSON here")
    p.add_argument("--config-out", metavar="DIR",
                   help="the quant sweep writes its best M = 1 launch configs here as tuned config files (ship them "
                        "in kernels/quant/configs)")
    p.add_argument("--quant-kinds", type=_names("quant kind", _quant_kinds), default=(), metavar="KIND[,KIND]",
                   help="time only these kinds in the quant sweep, e.g. awq_gemv,fp8_block_gemv (default all)")


def run(args: argparse.Namespace) -> int:
    device_name = _device_name(args.device)
    if device_name == "cpu":
        # Triton picks its interpreter when kernels are defined, i.e. before any of them is imported: without it
        # the launchers cannot take CPU tensors.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise SystemExit("--device cpu needs TRITON_INTERPRET=1 before triton is imported")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from ..runtime.bench import attention_sweep, kernel_sweep, quant_sweep
    from ..runtime.bench.layer_chain import KernelShape
    from ..runtime.bench.timing import measure_bandwidth

    device = torch.device(device_name)
    dtype_name = args.dtype if args.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    opts = kernel_sweep.SweepOptions(KernelShape.from_config(args.model_config), device, getattr(torch, dtype_name),
                                     args.quick, tuple(args.chain_bs), args.config_out, tuple(args.quant_kinds))
    torch.manual_seed(0)
    bw = measure_bandwidth(device, nbytes=(16 * 1024**2 if args.quick else None))
    print(f"{_describe(device)}; copy bandwidth {bw.copy / 1e9:.0f} GB/s (read + write), read bandwidth "
          f"{bw.read / 1e9:.0f} GB/s; shapes of {args.model_config}")
    sweeps = {"paths": attention_sweep.compare_decode_paths, "attention": attention_sweep.sweep_attention,
              "linear": kernel_sweep.sweep_linear, "chain": kernel_sweep.sweep_chain, "quant": quant_sweep.sweep_quant}
    results: dict = {}
    start = time.monotonic()
    for name in SWEEPS:
        if name in args.sweep:
            sweeps[name](opts, results)
    print(f"\n{len(args.sweep)} sweep(s) in {time.monotonic() - start:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, default=str))
    return 0


def _device_name(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _describe(device) -> str:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}"
    return f"cpu (Triton interpreter), torch {torch.__version__}"
