"""Launch-shape sweeps of the decode-time Triton kernels at one model's shapes: ``sglite bench kernels``.

- ``linear``: the skinny linear (kernels/linear.py) against ``F.linear`` (cuBLAS on a GPU) for each weight of a
  decode step at M = 1, 4, 8 rows, over a grid of launch shapes. Timed as in a real decode step: distinct copies
  of the weight are multiplied in turn (so the L2 cache never holds the next one), inside a CUDA graph. Then
  ``F.linear`` at M = 78 (the GEMMs of a large decode batch).
- ``attention`` and ``paths``: split-KV decode attention (:mod:`.attention_sweep`).
- ``chain``: whole decode layers (:mod:`.layer_chain`) in a CUDA graph, with linear and attention variants and
  without each kind of small kernel (what it costs in place); ``SGLITE_DISABLE_PDL=1`` for PDL off.

Prints, per case, the baseline, the best launch shape and the achieved GB/s; ``results`` collects every grid.
On the CPU the same code runs under Triton's interpreter (timings mean nothing there: a smoke run of the sweep;
``quick`` shrinks the grids so that it ends in seconds).
"""

from __future__ import annotations

import importlib
import itertools
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from xinf_sglang.kernels import pdl

from .layer_chain import KernelShape, LayerChain
from .timing import graph_time_ms, seconds_per_run

# By module name: the package re-exports a function of the same name.
lin = importlib.import_module("xinf_sglang.kernels.linear")


@dataclass(frozen=True)
class SweepOptions:
    """What every sweep needs: the model's kernel shapes, where and in which dtype to run, the grid size."""

    shape: KernelShape
    device: torch.device
    dtype: torch.dtype = torch.bfloat16
    quick: bool = False
    chain_batch_sizes: tuple[int, ...] = (1, 8)
    config_out: str | None = None  # where the quant sweep writes its tuned config files (none: only printed)
    quant_kinds: tuple[str, ...] = ()  # the quant sweep's kinds to time (empty: all of them)

    def randn(self, *size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, device=self.device) * scale).to(self.dtype)

    def few(self, items: list, keep: int = 2) -> list:
        """All of ``items``, or only the first ``keep`` in a quick run."""
        return items[:keep] if self.quick else items

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def time_ms(self, fn: Callable[[], object], inner: int = 2, replays: int = 10) -> float:
        """ms of one ``fn()``: in a CUDA graph on a GPU (`graph_time_ms`); on the CPU, where the kernels run under
        the interpreter and times mean nothing, one call after a warm-up (the sweep's smoke run)."""
        if self.device.type == "cuda":
            return graph_time_ms(fn, self.device, inner, replays)
        return seconds_per_run(fn, self.device, 1) * 1e3

    def empty_cache(self) -> None:
        """Give the allocator's cached blocks back between cases, so the next case's buffers fit."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def time_each(configs: Iterable, time_one: Callable[[object], float]) -> list[tuple[float, object]]:
    """``[(time, config)]`` for every config, fastest first; a shape that fails to compile (over the shared-memory
    limit, say) gets inf and a line on stderr instead of ending the sweep."""
    rows = []
    for cfg in configs:
        try:
            t = time_one(cfg)
        except Exception as e:  # noqa: BLE001 - any compile or launch failure only rules that shape out
            t = math.inf
            print(f"   {cfg}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        rows.append((t, cfg))
    return sorted(rows, key=lambda r: r[0])


def linear_grid(opts: SweepOptions) -> list[lin.SkinnyConfig]:
    grid = [lin.SkinnyConfig(bn, bk, w, s) for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512),
                                                                                  (4, 8), (3, 5))]
    return opts.few(grid)


def sweep_linear(opts: SweepOptions, results: dict) -> None:
    grid = linear_grid(opts)
    print(f"\n## skinny linear vs F.linear ({opts.dtype_name}, distinct weight copies in turn; "
          f"{len(grid)} launch shapes)")
    print(f"{'weight':<9}{'M':>3}{'F.linear us':>13}{'GB/s':>7}{'default us':>12}{'GB/s':>7}{'best us':>9}"
          f"{'GB/s':>7}  best")
    for name, (n, k) in opts.shape.weights().items():
        copies = 2 if opts.quick else 4 if name == "lm_head" else 8
        ws = [opts.randn(n, k, scale=0.02) for _ in range(copies)]
        gb = n * k * opts.dtype.itemsize / 1e9
        for m in opts.few([1, 4, 8], keep=1):
            x = opts.randn(m, k)

            def run(f: Callable) -> float:  # us per call
                return opts.time_ms(lambda: [f(x, w) for w in ws]) / copies * 1e3

            base, default = run(F.linear), run(lin.linear_triton)
            rows = time_each(grid, lambda c: run(lambda a, w: lin.linear_triton(a, w, config=c)))
            best_t, best = rows[0]
            results.setdefault("linear", []).append({"weight": name, "m": m, "f_linear_us": base, "default_us": default,
                                                     "grid": [(t, vars(c)) for t, c in rows]})
            print(f"{name:<9}{m:>3}{base:>13.1f}{gb / base * 1e6:>7.0f}{default:>12.1f}{gb / default * 1e6:>7.0f}"
                  f"{best_t:>9.1f}{gb / best_t * 1e6:>7.0f}  {best}")
        del ws
        opts.empty_cache()
    _gemms_at_m78(opts, results)


def _gemms_at_m78(opts: SweepOptions, results: dict) -> None:
    """``F.linear`` at 78 rows: the GEMMs of one step of a large decode batch (benchmark (c)'s steady state)."""
    print("\n## F.linear at M = 78 (a large decode step's GEMMs)")
    total, layers = 0.0, 32
    for name, (n, k) in opts.shape.weights().items():
        copies = 2 if opts.quick else 4 if name == "lm_head" else 8
        ws = [opts.randn(n, k, scale=0.02) for _ in range(copies)]
        x = opts.randn(78, k)
        t = opts.time_ms(lambda: [F.linear(x, w) for w in ws]) / copies * 1e3
        total += t * (1 if name == "lm_head" else layers)
        print(f"{name:<9} {t:8.1f} us  {n * k * opts.dtype.itemsize / 1e9 / t * 1e6:6.0f} GB/s")
        del ws
    print(f"GEMMs of one {layers}-layer step at M=78: {total / 1e3:.2f} ms")
    results["gemm_m78_ms"] = total / 1e3


def chain_variants(shape: KernelShape) -> dict[str, dict]:
    """``LayerChain.run`` keyword arguments by variant name: the default kernels, other launch shapes for some
    weights (by N x K), other attention settings, and the chain without attention."""
    def shaped(overrides: dict[tuple[int, int], dict]) -> Callable:
        def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            changes = overrides.get(tuple(w.shape), {})
            return lin.linear_triton(x, w, config=replace(lin.skinny_config(*w.shape), **changes))
        return fn

    weights = shape.weights()
    qkv, o_proj, down = weights["qkv"], weights["o_proj"], weights["down"]
    return {
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


def sweep_chain(opts: SweepOptions, results: dict) -> None:
    """Whole decode layers in a CUDA graph: what programmatic dependent launch lets a launch overlap, and what
    each variant changes in place (PDL itself is on or off for the whole process, see kernels/pdl.py)."""
    layers, ctx = (2, 64) if opts.quick else (8, 384)
    variants = chain_variants(opts.shape)
    if opts.quick:
        variants = {k: variants[k] for k in ("default", "qkv 16-column strips", "without attention")}
    print(f"\n## {layers} decode layers in a CUDA graph ({opts.dtype_name}, ctx {ctx}), PDL "
          f"{'on' if pdl.pdl_supported(opts.device) else 'off'}")
    print(f"{'variant':<40}{'bs':>4}{'us/layer':>10}{'GB/s':>7}")
    for bs in opts.chain_batch_sizes:
        chain = LayerChain.build(opts.shape, bs, ctx, layers, opts.dtype, opts.device)
        h = opts.randn(bs, opts.shape.hidden)
        for name, kw in variants.items():
            try:
                us = opts.time_ms(lambda kw=kw: chain.run(h, **kw), inner=1, replays=20) * 1e3 / layers
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
                print(f"{name:<40}{bs:>4}  failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            results.setdefault("chain", []).append({"variant": name, "bs": bs, "us_per_layer": us})
            print(f"{name:<40}{bs:>4}{us:>10.1f}{chain.weight_bytes() / layers / us / 1e3:>7.0f}")
        del chain
        opts.empty_cache()

