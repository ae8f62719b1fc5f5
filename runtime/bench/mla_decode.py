"""MLA decode attention (kernels/attention/mla.py) against the bytes-read roofline, on a GPU only:

    python -m xinf_sglang.runtime.bench.mla_decode                 # defaults, B 1 / 8 / 64, context 4096
    python -m xinf_sglang.runtime.bench.mla_decode --sweep --json mla.json

For DeepSeek-V2-Lite's 16 and V3's 128 heads (latent 512 + rope 64, bf16), each batch of ``B`` requests of
``--context`` positions at scattered slots: the device time of one launch (in a CUDA graph, as decode runs), the
cache bytes it must read (``B x context x 576 x 2``) and the time those take at the measured read bandwidth. The
partials of the splits (written, then read by the merge) are not in the roofline: they are the split policy's
overhead, which ``--sweep`` trades against parallelism (programs per SM, heads per program, tile rows, warps,
pipeline stages).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
from dataclasses import dataclass, replace

import torch

from .kernel_sweep import time_each
from .timing import graph_time_ms, measure_bandwidth

# By module name: the package re-exports functions of the same names.
mla = importlib.import_module("xinf_sglang.kernels.attention.mla")
mla_split = importlib.import_module("xinf_sglang.kernels.attention.mla_split")

DV, DPE = 512, 64


@dataclass(frozen=True)
class Config:
    """One launch choice: programs per SM (sets the split count), heads per program, tile rows, warps, stages."""

    programs_per_sm: int = mla_split.MLA_PROGRAMS_PER_SM
    block_h: int = mla_split.MLA_BLOCK_H
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2


class Case:
    """A decode input: a cache holding ``bs`` histories of ``context`` positions at scattered slots, q, and
    partial buffers big enough for any split count."""

    def __init__(self, bs: int, heads: int, context: int, device: torch.device, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(bs * heads)
        total = bs * context
        self.kv = torch.randn(total + 1, 1, DV + DPE, device=device).to(dtype)
        slots = (torch.randperm(total, generator=gen) + 1).to(torch.int32).view(bs, context)
        self.table, self.rows = slots.to(device), torch.arange(bs, device=device)
        self.lens = torch.full((bs,), context, device=device)
        self.q = torch.randn(bs, heads, DV + DPE, device=device).to(dtype)
        self.bs, self.heads, self.device = bs, heads, device
        self.mid = mla.mla_intermediate_buffers(bs, heads, 64, DV, device)
        self.counters = torch.zeros(bs * heads, dtype=torch.int32, device=device)  # enough for block_h >= 1

    def bytes_read(self) -> int:
        """The cache rows every launch must read (q and the output are ~1% of it)."""
        return self.kv[1:].numel() * self.kv.element_size()

    def time_us(self, cfg: Config) -> float:
        """Device time of one launch with ``cfg``, in a CUDA graph."""
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        splits = mla_split.mla_num_splits(self.bs, self.heads, sms, block_h=cfg.block_h,
                                          programs_per_sm=cfg.programs_per_sm)
        launch = mla.MLADecodeLaunch.choose(self.q.dtype, cfg.block_h, cfg.block_n, cfg.num_warps, cfg.num_stages)
        out = torch.empty(self.bs, self.heads, DV, dtype=self.q.dtype, device=self.device)

        def run() -> None:
            mla.mla_decode_triton(self.q, self.kv, self.table, self.rows, self.lens, 1.0 / 192**0.5, DV,
                                  num_splits=splits, mid_o=self.mid[0], mid_lse=self.mid[1],
                                  split_counters=self.counters, out=out, launch=launch)

        return graph_time_ms(run, self.device) * 1e3


def sweep(case: Case) -> list[tuple[float, Config]]:
    """``[(us, config)]`` fastest first: the launch shapes at the default split policy (36 compiles, shared by the
    cases), then programs per SM with the fastest shape (the split count is a runtime argument: few compiles)."""
    shapes = [Config(block_h=h, block_n=n, num_warps=w, num_stages=s)
              for h, n, w, s in itertools.product((16, 32), (16, 32, 64), (4, 8), (1, 2, 3))]
    timed = time_each(shapes, case.time_us)
    best = timed[0][1]
    more = [replace(best, programs_per_sm=p) for p in (1, 2, 4, 8, 16) if p != best.programs_per_sm]
    return sorted(timed + time_each(more, case.time_us), key=lambda r: r[0])


def bench(args: argparse.Namespace) -> list[dict]:
    """One row per (heads, batch): the default config's time, the fastest of the sweep's, and the roofline."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    read_bw = measure_bandwidth(device).read
    rows = []
    for heads, bs in itertools.product(args.heads, args.batch):
        case = Case(bs, heads, args.context, device, dtype)
        roofline_us = case.bytes_read() / read_bw * 1e6
        timed = sweep(case) if args.sweep else time_each([Config()], case.time_us)
        default_us = next(t for t, c in timed if c == Config())
        best_us, best = timed[0]
        rows.append(dict(heads=heads, batch=bs, context=args.context, bytes=case.bytes_read(),
                         roofline_us=roofline_us, default_us=default_us, best_us=best_us, best=best.__dict__))
        print(f"H={heads:4} B={bs:3} ctx={args.context}: default {default_us:8.1f} us "
              f"({roofline_us / default_us:5.1%} of roofline {roofline_us:.1f} us)"
              + (f", best {best_us:8.1f} us {best}" if args.sweep else ""), flush=True)
        del case
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--sweep", action="store_true", help="also time other launch shapes and split policies (sweep)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("mla_decode benchmarks the Triton kernel on a GPU; this machine has none (torch.cuda)")
    rows = bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
