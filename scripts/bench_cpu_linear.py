"""Time SmolLM2-135M's 211 decode linears of one token (30 layers of qkv, o, gate_up, down, plus the LM head),
each a distinct float32 weight streamed from memory, for one input row: MKL (``F.linear``, column- and
row-major weights) against sglite's threaded kernel (``kernels/cpu/linear.py``). Prints min and median of 10
passes, interleaved. Usage: ``.venv/bin/python scripts/bench_cpu_linear.py``."""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F

from xinf_sglang.kernels.cpu import linear as cpu_linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o_proj, gate_up, down


def one_pass(weights: list[torch.Tensor], inputs: dict[int, torch.Tensor], fn) -> float:
    start = time.perf_counter()
    for w in weights:
        fn(inputs[w.shape[1]], w)
    return time.perf_counter() - start


def main() -> None:
    rows = [torch.randn(n, k) for _ in range(30) for n, k in SHAPES] + [torch.randn(49152, 576)]
    cols = [w.t().contiguous().t() for w in rows]
    inputs = {k: torch.randn(1, k) for k in (576, 1536)}
    variants = [("MKL, column-major", cols, F.linear), ("MKL, row-major", rows, F.linear),
                ("cpu_linear", rows, cpu_linear.linear_cpu)]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _ in range(11):
        for name, weights, fn in variants:
            times[name].append(one_pass(weights, inputs, fn))
    print(f"{torch.get_num_threads()} threads, {sum(w.numel() * 4 for w in rows) / 1e6:.0f} MB of weights")
    for name, ts in times.items():
        ts = sorted(ts[1:])  # the first pass warms up
        print(f"{name:18s} min {ts[0] * 1e3:6.1f} ms  median {ts[len(ts) // 2] * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
