"""Time SmolLM2-135M's 211 decode linears of one token (30 layers of qkv, o, gate_up, down, plus the LM head),
each a distinct weight streamed from memory, for 1 (or ``--rows``) input rows. float32 (default): MKL
(``F.linear``, column- and row-major weights) against sglite's threaded kernel (``kernels/cpu/linear.py``).
``--dtype bfloat16`` / ``float16``: torch's ``F.linear`` in that dtype (oneDNN) against the 16-bit kernel
(``kernels/cpu/linear16.py``), and the float32 kernel on the same values in float32. Prints min and median of 10
passes, interleaved. In one process the variants disturb each other (after ``F.linear`` torch's OpenMP threads
spin on the cores the kernels' pools want): ``--only NAME`` times the variants whose name starts with NAME alone.
Usage: ``.venv/bin/python scripts/bench_cpu_linear.py [--dtype bfloat16] [--rows 1,4,16] [--only cpu_linear16]``."""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

from xinf_sglang.kernels.cpu import linear as cpu_linear
from xinf_sglang.kernels.cpu import linear16 as cpu_linear16

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o_proj, gate_up, down


def one_pass(weights: list[torch.Tensor], inputs: dict[int, torch.Tensor], fn) -> float:
    start = time.perf_counter()
    for w in weights:
        fn(inputs[w.shape[1]], w)
    return time.perf_counter() - start


def variants(dtype: torch.dtype, rows: list[torch.Tensor]) -> list[tuple[str, list[torch.Tensor], object, torch.dtype]]:
    """(name, weights, fn, input dtype) for each variant; ``rows`` are the float32 row-major weights."""
    if dtype == torch.float32:
        cols = [w.t().contiguous().t() for w in rows]
        return [("MKL, column-major", cols, F.linear, dtype), ("MKL, row-major", rows, F.linear, dtype),
                ("cpu_linear", rows, cpu_linear.linear_cpu, dtype)]
    half = [w.to(dtype) for w in rows]
    name = str(dtype).removeprefix("torch.")
    return [(f"F.linear {name}", half, F.linear, dtype), (f"cpu_linear16 {name}", half, cpu_linear16.linear16_cpu, dtype),
            ("cpu_linear float32", rows, cpu_linear.linear_cpu, torch.float32)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rows", default="1")
    parser.add_argument("--only", default="", help="time only the variants whose name starts with this")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = [torch.randn(n, k) for _ in range(30) for n, k in SHAPES] + [torch.randn(49152, 576)]
    chosen = [v for v in variants(dtype, rows) if v[0].startswith(args.only)]
    print(f"{torch.get_num_threads()} threads, {sum(w.numel() * dtype.itemsize for w in rows) / 1e6:.0f} MB of "
          f"{args.dtype} weights")
    for m in (int(r) for r in args.rows.split(",")):
        inputs = {d: {k: torch.randn(m, k).to(d) for k in (576, 1536)} for d in {v[3] for v in chosen}}
        times: dict[str, list[float]] = {name: [] for name, *_ in chosen}
        for _ in range(11):
            for name, weights, fn, d in chosen:
                fn = fn if m <= 16 or fn is F.linear else F.linear  # the kernels take at most 16 rows
                times[name].append(one_pass(weights, inputs[d], fn))
        for name, ts in times.items():
            ts = sorted(ts[1:])  # the first pass warms up
            print(f"rows {m:3d}  {name:24s} min {ts[0] * 1e3:6.1f} ms  median {ts[len(ts) // 2] * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
