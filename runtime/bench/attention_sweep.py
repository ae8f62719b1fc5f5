"""Split-KV decode attention sweeps (kernels/attention/decode_attention.py), part of ``sglite bench kernels``:

- ``paths``: at bandwidth-bound batches, the new token already in the pool or handed over before rotary
  (``NewToken``) in the same launch (``one_launch=True``; the launcher does that only up to
  ``DECODE_SMALL_BATCH`` rows), with and without the early first tile, at both pipeline depths;
- ``attention``: the plain kernel over tile size, warps, pipeline stages and split count, for batch 1 with a short
  history (benchmark (a)) and large batches with histories of up to 6000 tokens (benchmark (c)'s steady state).

Each case is a pool with scattered slots; times are per launch, several launches per CUDA graph.
"""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass

import torch

# By module name: the package re-exports a function of the same name.
da = importlib.import_module("xinf_sglang.kernels.attention.decode_attention")

from .kernel_sweep import SweepOptions, time_each


@dataclass
class DecodeCase:
    """A decode-attention input: a pool holding histories of ``lens`` at scattered slots, q, the request rows, the
    step's own token (``NewToken``, its slot at position ``len - 1``) and preallocated buffers."""

    opts: SweepOptions
    k: torch.Tensor
    v: torch.Tensor
    rtt: torch.Tensor
    q: torch.Tensor
    idx: torch.Tensor
    seq: torch.Tensor
    new: da.NewToken
    mid: tuple[torch.Tensor, torch.Tensor]
    counters: torch.Tensor

    @classmethod
    def build(cls, opts: SweepOptions, lens: list[int], heads: int, gen: torch.Generator) -> DecodeCase:
        dev, hkv, d = opts.device, opts.shape.kv_heads, opts.shape.head_dim
        total, bs = sum(lens) + 1, len(lens)
        slots = torch.randperm(total - 1, generator=gen)[: sum(lens)] + 1  # scattered, slot 0 is the dummy
        rtt = torch.zeros(bs, max(lens), dtype=torch.int32)
        pos = 0
        for i, n in enumerate(lens):
            rtt[i, :n] = slots[pos : pos + n].to(torch.int32)
            pos += n
        rtt, idx, seq = rtt.to(dev), torch.arange(bs, device=dev), torch.tensor(lens, device=dev)
        k, v, kn, vn = (opts.randn(n, hkv, d) for n in (total, total, bs, bs))
        cos, sin = (opts.randn(bs, d) for _ in range(2))
        return cls(opts, k, v, rtt, opts.randn(bs, heads, d), idx, seq,
                   da.NewToken(kn, vn, cos, sin, rtt[idx, seq - 1].long()),
                   da.decode_intermediate_buffers(bs, heads, da.DECODE_MAX_SPLITS, d, dev),
                   da.decode_split_counters(bs, hkv, dev))

    def default_splits(self) -> int:
        return da.decode_num_splits(len(self.seq), self.opts.shape.kv_heads, da.num_sms_of(self.q.device))

    def time_us(self, new_token: bool = False, **kw) -> float:
        """Device time of one launch, us (8 launches per graph replay)."""
        scale = self.opts.shape.head_dim**-0.5
        return self.opts.time_ms(
            lambda: da.decode_attention_triton(
                self.q, self.k, self.v, self.rtt, self.idx, self.seq, scale, mid_o=self.mid[0], mid_lse=self.mid[1],
                split_counters=self.counters, new_token=self.new if new_token else None, **kw),
            inner=8,
        ) * 1e3

    def gigabytes(self) -> float:
        """K and V bytes the launch must read."""
        return int(self.seq.sum()) * self.k.shape[1] * self.k.shape[2] * 2 * self.k.element_size() / 1e9


def _lengths(gen: torch.Generator, bs: int, lo: int, hi: int) -> list[int]:
    return torch.randint(lo, hi + 1, (bs,), generator=gen).tolist()


def compare_decode_paths(opts: SweepOptions, results: dict) -> None:
    """The new token in the pool vs handed over before rotary in the same launch, at bandwidth-bound batches."""
    gen = torch.Generator().manual_seed(1)
    heads = opts.shape.heads
    cases = {  # name -> (lengths, query heads)
        f"bs137 U[100,2048] Hq{heads // 2}": (_lengths(gen, 137, 100, 2048), heads // 2),
        f"bs78 U[1,6000] Hq{heads}": (_lengths(gen, 78, 1, 6000), heads),
        f"bs8 ctx384 Hq{heads}": ([384] * 8, heads),
    }
    if opts.quick:
        cases = {f"bs2 ctx64 Hq{heads}": ([64] * 2, heads)}
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
    print(f"\n## decode attention paths ({opts.dtype_name}, Hkv {opts.shape.kv_heads}, D "
          f"{opts.shape.head_dim}; us per launch, 8 launches per graph)")
    print(f"{'case':<24}{'variant':<30}{'us':>8}")
    for name, (lens, hq) in cases.items():
        case = DecodeCase.build(opts, lens, hq, gen)
        splits = case.default_splits()
        row = {vname: case.time_us(num_splits=splits, **kw) for vname, kw in opts.few(list(variants.items()), 3)}
        results.setdefault("decode_paths", []).append({"case": name, "splits": splits, "us": row})
        for vname, t in row.items():
            print(f"{name:<24}{vname:<30}{t:>8.1f}")
        del case
        opts.empty_cache()


def sweep_attention(opts: SweepOptions, results: dict) -> None:
    """The plain kernel over tile size, warps, stages and split count, per case; the default launch first."""
    gen = torch.Generator().manual_seed(0)
    cases = {
        "bs1 ctx384": ([384], (3, 8, 50)),
        "bs32 U[1,6000]": (_lengths(gen, 32, 1, 6000), (1, 2, 4, 8)),
        "bs78 U[1,6000]": (_lengths(gen, 78, 1, 6000), (1, 2, 4, 8)),
        "bs128 U[1,4000]": (_lengths(gen, 128, 1, 4000), (1, 2, 4)),
    }
    if opts.quick:
        cases = {"bs1 ctx64": ([64], (1, 2)), "bs4 U[1,64]": (_lengths(gen, 4, 1, 64), (1,))}
    grid = opts.few(list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4))), keep=1)
    print(f"\n## decode attention ({opts.dtype_name}, Hq {opts.shape.heads}, Hkv {opts.shape.kv_heads}, D "
          f"{opts.shape.head_dim}; {len(grid)} tile shapes x split counts)")
    print(f"{'case':<17}{'default us':>11}{'GB/s':>7}{'best us':>9}{'GB/s':>7}  best (block_n, warps, stages, splits)")
    for name, (lens, split_opts) in cases.items():
        case = DecodeCase.build(opts, lens, opts.shape.heads, gen)
        gb, default_splits = case.gigabytes(), case.default_splits()
        default = case.time_us(num_splits=default_splits)
        shapes = [(bn, w, s, sp) for (bn, w, s), sp in itertools.product(grid, split_opts)]
        rows = time_each(shapes, lambda c: case.time_us(num_splits=c[3], block_n=c[0], num_warps=c[1],
                                                        num_stages=c[2]))
        best_t, best = rows[0]
        results.setdefault("attention", []).append(
            {"case": name, "default_splits": default_splits, "default_us": default, "grid": rows})
        print(f"{name:<17}{default:>11.1f}{gb / default * 1e6:>7.0f}{best_t:>9.1f}{gb / best_t * 1e6:>7.0f}  {best}"
              f"  (default splits {default_splits})")
        print("                  top:", "; ".join(f"{t:.1f} {c}" for t, c in rows[:5]))
        del case
        opts.empty_cache()
