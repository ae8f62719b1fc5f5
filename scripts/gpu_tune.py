"""Launch-shape sweep for the decode-time kernels on the GPU at hand, at Llama-3.1-8B shapes.

    python scripts/gpu_tune.py [--only linear|attention|paths|chain]

1. Skinny linear (``kernels/linear.py``) vs cuBLAS (``F.linear``) for the qkv / o_proj / gate_up / down / LM-head
   weights at M = 1, 4, 8 rows, over a grid of launch shapes. Timed as in a real decode step: 8 distinct copies
   of the weight are multiplied in turn (so the L2 cache never holds the next one), captured in a CUDA graph.
2. Split-KV decode attention (``kernels/decode_attention.py``) over a pool with scattered slots, for batch 1 with
   a 384-token history (benchmark (a)) and batches 32 and 78 with histories uniform in [1, 6000] (benchmark (c)'s
   steady state), over tile size, warps, pipeline stages and split count.

3. Eight whole decode layers (``scripts/layer_chain.py``) in a CUDA graph: linear and attention variants, and
   the chain without each kind of small kernel (``--only chain``; with ``SGLITE_DISABLE_PDL=1`` too for PDL off).

Prints, per case, the baseline, the best launch shape and the achieved GB/s; the whole grid goes to
``$OUT/tune.json`` when OUT is set. Also cuBLAS at M = 78 (the rest of a (c) decode step).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_kernel_check import _kernels_package  # noqa: E402

_kernels_package()
# By module name: the package re-exports functions named like some of its modules.
da = importlib.import_module("xinf_sglang.kernels.decode_attention")
lin = importlib.import_module("xinf_sglang.kernels.linear")
bench = importlib.import_module("xinf_sglang.runtime.bench.offline")

HIDDEN, INTER, HQ, HKV, D, VOCAB = 4096, 14336, 32, 8, 128, 128256
WEIGHTS = {  # name -> (N, K)
    "qkv": (HQ * D + 2 * HKV * D, HIDDEN),
    "o_proj": (HIDDEN, HQ * D),
    "gate_up": (2 * INTER, HIDDEN),
    "down": (HIDDEN, INTER),
    "lm_head": (VOCAB, HIDDEN),
}
DT = torch.bfloat16


def graph_time_ms(fn, inner: int = 2, replays: int = 10) -> float:
    """Mean device time of one ``fn()`` in ms: ``inner`` calls captured in a CUDA graph, replayed ``replays`` times."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    return bench.seconds_per_run(g.replay, torch.device("cuda"), replays, warmup_s=0) * 1e3 / inner


def time_each(configs, time_one) -> list[tuple[float, object]]:
    """``[(us, config)]`` for every config, fastest first; a shape that fails to compile (over the shared-memory
    limit, say) gets inf and a line on stderr instead of ending the sweep."""
    rows = []
    for cfg in configs:
        try:
            t = time_one(cfg)
        except Exception as e:  # noqa: BLE001 - any compile or launch failure only rules that shape out
            t = math.inf
            print(f"   {cfg}: {type(e).__name__}", file=sys.stderr)
        rows.append((t, cfg))
    return sorted(rows, key=lambda r: r[0])


def sweep_linear(results: dict) -> None:
    grid = [
        lin.SkinnyConfig(bn, bk, w, s)
        for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 5))
    ]
    print(f"\n## skinny linear vs cuBLAS (bf16, 8 weight copies in turn; {len(grid)} launch shapes)")
    print(f"{'weight':<9}{'M':>3}{'cuBLAS us':>11}{'GB/s':>7}{'default us':>12}{'GB/s':>7}{'best us':>9}{'GB/s':>7}  best")
    for name, (n, k) in WEIGHTS.items():
        copies = 4 if name == "lm_head" else 8
        ws = [torch.randn(n, k, device="cuda", dtype=DT) * 0.02 for _ in range(copies)]
        gb = n * k * 2 / 1e9
        for m in (1, 4, 8):
            x = torch.randn(m, k, device="cuda", dtype=DT)

            def run(f):
                return graph_time_ms(lambda: [f(x, w) for w in ws]) / copies * 1e3  # us per call

            base = run(F.linear)
            default = run(lin.linear_triton)
            rows = time_each(grid, lambda c: run(lambda a, w: lin.linear_triton(a, w, config=c)))
            best_t, best = rows[0]
            results.setdefault("linear", []).append(
                {"weight": name, "m": m, "cublas_us": base, "default_us": default,
                 "grid": [(t, vars(c)) for t, c in rows]}
            )
            print(f"{name:<9}{m:>3}{base:>11.1f}{gb / base * 1e6:>7.0f}{default:>12.1f}{gb / default * 1e6:>7.0f}"
                  f"{best_t:>9.1f}{gb / best_t * 1e6:>7.0f}  {best}")
            print("           top:", "; ".join(f"{t:.1f} {c.block_n}/{c.block_k}/{c.num_warps}/{c.num_stages}"
                                             for t, c in rows[:4]))
        del ws
        torch.cuda.empty_cache()
    print("\n## cuBLAS at M = 78 (a (c) decode step's GEMMs)")
    total = 0.0
    for name, (n, k) in WEIGHTS.items():
        copies = 4 if name == "lm_head" else 8
        ws = [torch.randn(n, k, device="cuda", dtype=DT) * 0.02 for _ in range(copies)]
        x = torch.randn(78, k, device="cuda", dtype=DT)
        t = graph_time_ms(lambda: [F.linear(x, w) for w in ws]) / copies * 1e3
        total += t * (1 if name == "lm_head" else 32)
        print(f"{name:<9} {t:8.1f} us  {n * k * 2 / 1e9 / t * 1e6:6.0f} GB/s")
        del ws
    print(f"GEMMs of one 32-layer step at M=78: {total / 1e3:.2f} ms")
    results["gemm_m78_ms"] = total / 1e3


@dataclass
class DecodeCase:
    """A decode-attention input at bf16: a pool holding histories of ``lens`` at scattered slots, q, the request
    rows, the step's own token (``NewToken``, its slot at position ``len - 1``) and preallocated buffers."""

    k: torch.Tensor
    v: torch.Tensor
    rtt: torch.Tensor
    q: torch.Tensor
    idx: torch.Tensor
    seq: torch.Tensor
    new: object  # da.NewToken
    mid: tuple[torch.Tensor, torch.Tensor]
    counters: torch.Tensor

    @classmethod
    def build(cls, lens: list[int], hq: int, gen: torch.Generator) -> DecodeCase:
        total, bs = sum(lens) + 1, len(lens)
        slots = torch.randperm(total - 1, generator=gen)[: sum(lens)] + 1  # scattered, slot 0 is the dummy
        rtt = torch.zeros(bs, max(lens), dtype=torch.int32)
        pos = 0
        for i, n in enumerate(lens):
            rtt[i, :n] = slots[pos : pos + n].to(torch.int32)
            pos += n
        rtt = rtt.cuda()
        idx = torch.arange(bs, device="cuda")
        seq = torch.tensor(lens, device="cuda")
        k, v, kn, vn = (torch.randn(n, HKV, D, dtype=DT, device="cuda") for n in (total, total, bs, bs))
        cos, sin = (torch.randn(bs, D, dtype=DT, device="cuda") for _ in range(2))
        return cls(
            k, v, rtt, torch.randn(bs, hq, D, dtype=DT, device="cuda"), idx, seq,
            da.NewToken(kn, vn, cos, sin, rtt[idx, seq - 1].long()),
            da.decode_intermediate_buffers(bs, hq, da.DECODE_MAX_SPLITS, D, torch.device("cuda")),
            da.decode_split_counters(bs, HKV, torch.device("cuda")),
        )

    def default_splits(self) -> int:
        return da.decode_num_splits(len(self.seq), HKV, da.num_sms_of(self.q.device))

    def time_us(self, new_token: bool = False, **kw) -> float:
        """Device time of one launch, us (8 launches per graph replay)."""
        return graph_time_ms(
            lambda: da.decode_attention_triton(
                self.q, self.k, self.v, self.rtt, self.idx, self.seq, 0.088, mid_o=self.mid[0], mid_lse=self.mid[1],
                split_counters=self.counters, new_token=self.new if new_token else None, **kw),
            inner=8,
        ) * 1e3


def compare_decode_paths(results: dict) -> None:
    """Decode attention at bandwidth-bound batches: the new token in the pool, or handed over before rotary
    (``NewToken``) in the same launch (``one_launch=True``; the launcher does that only up to
    ``DECODE_SMALL_BATCH`` rows), with and without the L2 prefetch of the first history tile, at both pipeline
    depths."""
    gen = torch.Generator().manual_seed(1)
    cases = {  # name -> (lengths, query heads)
        "bs137 U[100,2048] Hq16": (torch.randint(100, 2049, (137,), generator=gen).tolist(), 16),
        "bs78 U[1,6000] Hq32": (torch.randint(1, 6001, (78,), generator=gen).tolist(), 32),
        "bs8 ctx384 Hq32": ([384] * 8, 32),
    }
    one = dict(new_token=True, one_launch=True)
    variants = {
        "in pool 4w 3s": dict(num_warps=4, num_stages=3),
        "in pool 4w 2s": dict(num_warps=4, num_stages=2),
        "one launch 4w 3s": dict(one, num_warps=4, num_stages=3),
        "one launch 4w 2s": dict(one, num_warps=4, num_stages=2),
        "one launch 4w 2s early tile": dict(one, num_warps=4, num_stages=2, early_tile=True),
        "one launch 8w 3s": dict(one, num_warps=8, num_stages=3),
        "NewToken, defaults": dict(new_token=True),
    }
    print(f"\n## decode attention paths (bf16, Hkv {HKV}, D {D}; us per launch, 8 launches per graph)")
    print(f"{'case':<24}{'variant':<26}{'us':>8}")
    for name, (lens, hq) in cases.items():
        case = DecodeCase.build(lens, hq, gen)
        splits = case.default_splits()
        row = {vname: case.time_us(num_splits=splits, **kw) for vname, kw in variants.items()}
        results.setdefault("decode_paths", []).append({"case": name, "splits": splits, "us": row})
        for vname, t in row.items():
            print(f"{name:<24}{vname:<26}{t:>8.1f}")
        del case
        torch.cuda.empty_cache()


def sweep_attention(results: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    cases = {
        "bs1 ctx384": ([384], (3, 8, 50)),
        "bs32 U[1,6000]": (torch.randint(1, 6001, (32,), generator=gen).tolist(), (1, 2, 4, 8)),
        "bs78 U[1,6000]": (torch.randint(1, 6001, (78,), generator=gen).tolist(), (1, 2, 4, 8)),
        "bs128 U[1,4000]": (torch.randint(1, 4001, (128,), generator=gen).tolist(), (1, 2, 4)),
    }
    grid = list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4)))
    print(f"\n## decode attention (bf16, Hq {HQ}, Hkv {HKV}, D {D}; {len(grid)} tile shapes x split counts)")
    print(f"{'case':<17}{'default us':>11}{'GB/s':>7}{'best us':>9}{'GB/s':>7}  best (block_n, warps, stages, splits)")
    for name, (lens, split_opts) in cases.items():
        case = DecodeCase.build(lens, HQ, gen)
        gb = sum(lens) * HKV * D * 2 * 2 / 1e9
        default_splits = case.default_splits()
        run = case.time_us

        default = run(num_splits=default_splits)
        eight = run(num_splits=default_splits, num_warps=8, num_stages=3)
        shapes = [(bn, w, s, sp) for (bn, w, s), sp in itertools.product(grid, split_opts)]
        rows = time_each(shapes, lambda c: run(num_splits=c[3], block_n=c[0], num_warps=c[1], num_stages=c[2]))
        best_t, best = rows[0]
        results.setdefault("attention", []).append(
            {"case": name, "default_splits": default_splits, "default_us": default, "8_warps_3_stages_us": eight, "grid": rows}
        )
        print(f"{name:<17}{default:>11.1f}{gb / default * 1e6:>7.0f}{best_t:>9.1f}{gb / best_t * 1e6:>7.0f}  {best}"
              f"  (default splits {default_splits}; 8 warps, 3 stages {eight:.1f} us)")
        print("                  top:", "; ".join(f"{t:.1f} {c}" for t, c in rows[:5]))
        del case
        torch.cuda.empty_cache()


def sweep_chain(results: dict, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
    """Whole decode layers (scripts/layer_chain.py) in a CUDA graph: the default kernels, cuBLAS or other L2
    prefetch depths for the linear layers (what programmatic dependent launch lets a launch fetch while the
    previous kernel runs; PDL itself is on or off for the whole process, see kernels/pdl.py), other attention
    split sizes, and the chain without one kind of step (what that step costs in place)."""
    from dataclasses import replace

    from layer_chain import LayerChain

    pkg = _kernels_package()
    pdl = importlib.import_module(f"{pkg.__name__}.pdl")
    layers = 8
    print(f"\n## {layers} decode layers in a CUDA graph (bf16, ctx 384), PDL "
          f"{'on' if pdl.pdl_supported(torch.device('cuda')) else 'off'}")

    def shaped(overrides: dict[tuple[int, int], dict]):
        # Other launch shapes for some weights of the chain (by N x K), the defaults for the rest.
        def fn(x, w):
            changes = overrides.get(tuple(w.shape), {})
            return lin.linear_triton(x, w, config=replace(lin.skinny_config(*w.shape), **changes))
        return fn

    qkv, o_proj, down = (6144, 4096), (4096, 4096), (4096, 14336)
    variants = {  # name -> LayerChain.run keyword arguments
        "default": {},
        "qkv 16-column strips": dict(linear=shaped({qkv: dict(block_n=16)})),
        "o_proj 16-column strips": dict(linear=shaped({o_proj: dict(block_n=16)})),
        "down 16-column strips": dict(linear=shaped({down: dict(block_n=16)})),
        "qkv, o_proj, down 8 warps": dict(linear=shaped({w: dict(num_warps=8) for w in (qkv, o_proj, down)})),
        "qkv, o_proj 512-wide K steps, 3 stages": dict(
            linear=shaped({w: dict(block_k=512, num_stages=3) for w in (qkv, o_proj)})),
        "attention without the early tile": dict(attention_kwargs=dict(early_tile=False)),
        "without attention": dict(skip=frozenset({"attention"})),
        "default (again)": {},
    }
    print(f"{'variant':<36}{'bs':>4}{'us/layer':>10}{'GB/s':>7}")
    for bs in batch_sizes:
        chain = LayerChain.build(pkg, bs, 384, layers, DT, torch.device("cuda"))
        h = torch.randn(bs, 4096, device="cuda", dtype=DT)
        for name, kw in variants.items():
            try:
                us = graph_time_ms(lambda kw=kw: chain.run(h, **kw), inner=1, replays=20) * 1e3 / layers
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
                print(f"{name:<36}{bs:>4}  failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            gbs = chain.weight_bytes() / layers / us / 1e3
            results.setdefault("chain", []).append({"variant": name, "bs": bs, "us_per_layer": us})
            print(f"{name:<36}{bs:>4}{us:>10.1f}{gbs:>7.0f}")
        del chain
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("linear", "attention", "paths", "chain"))
    ap.add_argument("--chain-bs", default="1,8", help="batch sizes of the chain sweep, comma-separated")
    args = ap.parse_args()
    bw = bench.measure_bandwidth(torch.device("cuda"))
    print(torch.cuda.get_device_name(), f"copy bandwidth {bw.copy / 1e9:.0f} GB/s (read + write), "
          f"read bandwidth {bw.read / 1e9:.0f} GB/s")
    results: dict = {}
    if args.only in (None, "paths"):
        compare_decode_paths(results)
    if args.only in (None, "attention"):
        sweep_attention(results)
    if args.only in (None, "linear"):
        sweep_linear(results)
    if args.only in (None, "chain"):
        sweep_chain(results, tuple(int(b) for b in args.chain_bs.split(",")))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "tune.json").write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
