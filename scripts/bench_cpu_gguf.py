"""Time SmolLM2-135M's 120 decode linears of one step (30 layers of qkv, o, gate_up, down; random blocks of a GGUF
type at the real shapes, each a distinct weight streamed from memory) for 1 to 64 input rows: the float32 kernel on
the dequantized weights (``kernels/cpu/linear.py``; MKL above its 16 rows) against the GGUF kernel
(``kernels/cpu/gguf.py``) reading the blocks with int16, int8 and float32 activations, and against dequantize + MKL
(its prefill path). Prints the median of 10 passes, the variants interleaved.
Usage: ``.venv/bin/python scripts/bench_cpu_gguf.py [--type Q4_1] [--rows 1,8,16,32,64]``."""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

from xinf_sglang.kernels.cpu import gguf as cpu_gguf
from xinf_sglang.kernels.cpu import linear as cpu_linear
from xinf_sglang.kernels.cpu.gguf_kernel_source import ACTIVATIONS
from xinf_sglang.kernels.quant import GGUF_BLOCKS, dequantize_gguf, random_gguf_blocks

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o_proj, gate_up, down


def variants(qtype: str) -> dict:
    """name -> fn(x, blocks, dense weight): the block path forced whatever the rows (the pool, not the dispatch)."""
    pool, ggml = cpu_gguf._pool(torch.get_num_threads()), GGUF_BLOCKS[qtype].ggml_type

    def dense(x, q, w):
        return cpu_linear.linear_cpu(x, w) if x.shape[0] <= cpu_linear.CPU_SKINNY_MAX_M else F.linear(x, w)

    out = {"float32 weights": dense}
    for act in ACTIVATIONS:
        out[f"blocks, {act}"] = lambda x, q, w, a=ACTIVATIONS.index(act): pool.gemv(x, q, ggml, None, a)
    out["dequantize + MKL"] = lambda x, q, w: F.linear(x, pool.dequantize(q, ggml, x.shape[1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--type", default="Q4_1", choices=list(GGUF_BLOCKS))
    parser.add_argument("--rows", default="1,8,16,32,64")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    blocks = [random_gguf_blocks(n, k, args.type, gen) for _ in range(30) for n, k in SHAPES]
    dense = [dequantize_gguf(q, args.type) for q in blocks]
    fns = variants(args.type)
    print(f"{torch.get_num_threads()} threads, {args.type}: {sum(q.numel() for q in blocks) / 1e6:.0f} MB of blocks, "
          f"{sum(w.numel() * 4 for w in dense) / 1e6:.0f} MB float32; median ms of 10 passes")
    print("rows  " + "  ".join(f"{name:>17s}" for name in fns))
    for m in (int(r) for r in args.rows.split(",")):
        inputs = {k: torch.randn(m, k, generator=gen) for k in (576, 1536)}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(11):
            for name, fn in fns.items():
                start = time.perf_counter()
                for q, w in zip(blocks, dense):
                    fn(inputs[w.shape[1]], q, w)
                times[name].append(time.perf_counter() - start)
        medians = [sorted(ts[1:])[len(ts) // 2] * 1e3 for ts in times.values()]  # the first pass warms up
        print(f"{m:4d}  " + "  ".join(f"{t:17.2f}" for t in medians))


if __name__ == "__main__":
    main()
