"""Tuning the fused-MoE launch configs (``sglite bench moe-tune``): for each batch size M, every config of a grid is
timed on the GPU and the fastest one whose output matches the torch reference is written to the JSON file that
``kernels.moe.get_moe_config`` reads (``kernels/moe/configs/README.md`` has the format).

A config is timed on the whole ``fused_experts_triton`` call (sorting, both GEMMs, SiLU-and-mul, the top-k sum)
captured in a CUDA graph, as decode runs it, so host launch overhead is not what gets tuned: the time is the
minimum over a few replays, each timed with CUDA events. Compiling is most of the cost (hundreds of kernel
variants), so the grid's configs are compiled first by a pool of worker processes into Triton's on-disk cache, on
one-expert stand-ins of the weights (the kernel's specialisation does not depend on the expert count or the batch).
The JSON is rewritten after every M; a rerun keeps the entries already there and tunes only the missing M
(``overwrite`` redoes them), so a run that is cut off resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from xinf_sglang.kernels.moe import fused_experts_ref, fused_experts_triton
from xinf_sglang.kernels.moe.config import (
    CONFIG_DIR,
    config_file_name,
    default_config,
    make_config,
)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
SMEM_BYTES = 200 * 1024  # below the 227 KiB a block may use on an H100 / H200, with room for the epilogue
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class MoeShape:
    """The per-GPU shape of one MoE layer: experts, expert intermediate size N (per rank under TP), hidden size,
    experts per token, dtype."""

    experts: int
    intermediate: int
    hidden: int
    topk: int
    dtype: torch.dtype

    def weights(self, device: torch.device, experts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random ``w13 [E, 2N, H]`` and ``w2 [E, H, N]`` scaled like trained layers (unit-variance outputs)."""
        e, n, h = experts or self.experts, self.intermediate, self.hidden
        w13 = torch.randn(e, 2 * n, h, device=device, dtype=self.dtype) * h**-0.5
        return w13, torch.randn(e, h, n, device=device, dtype=self.dtype) * n**-0.5

    def routing(self, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax top-k of random router logits for ``m`` tokens: weights float32, ids int32."""
        logits = torch.randn(m, self.experts, device=device, dtype=torch.float32)
        weights, ids = torch.softmax(logits, dim=-1).topk(self.topk, dim=-1)
        return weights, ids.to(torch.int32)


def require_cuda() -> torch.device:
    """The CUDA device to tune on; raises SystemExit with the reason when there is none."""
    if not torch.cuda.is_available():
        raise SystemExit("sglite bench moe-tune needs an NVIDIA GPU (torch.cuda.is_available() is False here): it "
                         "times the Triton kernels on the card whose configs it writes; on the CPU the MoE layer "
                         "runs the reference path, which has nothing to tune")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("sglite bench moe-tune cannot run with TRITON_INTERPRET=1 (the interpreter times nothing)")
    return torch.device("cuda", torch.cuda.current_device())


def candidate_configs(shape: MoeShape, m: int, quick: bool = False) -> list[dict[str, int]]:
    """The grid for ``m`` tokens. Row blocks follow the rows each expert gets (``m * topk / experts``): 16 for
    decode, up to 128 for prefill; shared-memory use (operand tiles times pipeline stages) and the float32
    accumulator per thread are capped, which removes the tiles that cannot compile or must spill. ``quick`` keeps
    a small grid (a smoke run, or a first pass)."""
    rows = m * shape.topk / shape.experts
    block_m = (16,) if rows <= 16 else (16, 32, 64) if rows <= 64 else (32, 64, 128) if rows <= 256 else (64, 128)
    grid = {"bn": (32, 64, 128, 256), "bk": (64, 128, 256), "group": (1, 16), "warps": (4, 8), "stages": (2, 3, 4, 5)}
    if quick:
        grid = {"bn": (64, 128), "bk": (64, 128), "group": (1, 16), "warps": (4,), "stages": (3, 4)}
    if rows <= 16:
        grid["group"] = (1,)  # a handful of row blocks: the launch order changes nothing
    size = shape.dtype.itemsize
    found = []
    for bm, bn, bk, group, warps, stages in itertools.product(block_m, *grid.values()):
        if (bm * bk + bk * bn) * size * stages > SMEM_BYTES or bm * bn > 128 * 32 * warps:
            continue
        found.append(make_config(bm, bn, bk, group, warps, stages))
    return found


def _compile_worker(shape: MoeShape, configs: list[dict[str, int]]) -> int:
    """In a worker process: run each config once on one-expert stand-ins of the weights (same strides and
    divisibility as the real ones), which leaves its kernels in Triton's on-disk cache. Returns how many failed."""
    device = torch.device("cuda")
    w13, w2 = shape.weights(device, experts=1)
    x = torch.randn(1, shape.hidden, device=device, dtype=shape.dtype)
    weights = torch.ones(1, shape.topk, device=device)
    ids = torch.zeros(1, shape.topk, device=device, dtype=torch.int32)
    failed = 0
    for config in configs:
        try:
            fused_experts_triton(x, w13, w2, weights, ids, config=config)
        except Exception:  # noqa: BLE001 - out of resources and the like: the timing pass skips it too
            failed += 1
    torch.cuda.synchronize()
    return failed


def precompile(shape: MoeShape, configs: list[dict[str, int]], workers: int) -> None:
    """Compile ``configs`` into Triton's cache with ``workers`` processes (each with its own CUDA context)."""
    if workers <= 1 or len(configs) < 2:
        return
    start = time.monotonic()
    chunks = [configs[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        failed = sum(pool.map(_compile_worker, [shape] * workers, chunks))
    print(f"  compiled {len(configs)} configs with {workers} processes in {time.monotonic() - start:.0f} s"
          f"{f' ({failed} failed to compile)' if failed else ''}", flush=True)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 5, inner: int = 4) -> float:
    """Minimum over ``reps`` CUDA-graph replays of ``inner`` captured ``fn()`` calls, per call, in ms (events).
    Where capture fails, ``inner`` plain calls per rep instead (then host launch time counts too)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()  # compile / load and allocate outside the capture
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        run = graph.replay
    except RuntimeError as exc:
        print(f"  (CUDA graph capture failed, timing plain launches: {exc})", flush=True)
        graph = None

        def run() -> None:
            for _ in range(inner):
                fn()
    run()
    best = float("inf")
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        end.synchronize()
        best = min(best, begin.elapsed_time(end) / inner)
    return best


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def tune_batch(shape: MoeShape, m: int, weights: tuple[torch.Tensor, torch.Tensor], configs: list[dict[str, int]],
               device: torch.device, reps: int) -> tuple[dict[str, int], float, float] | None:
    """The fastest config for ``m`` tokens among ``configs`` that matches ``fused_experts_ref``: (config, its ms,
    the untuned default's ms), or None when none matched."""
    w13, w2 = weights
    x = torch.randn(m, shape.hidden, device=device, dtype=shape.dtype)
    topk_weights, topk_ids = shape.routing(m, device)
    ref = fused_experts_ref(x, w13, w2, topk_weights, topk_ids)
    inner = 16 if m <= 64 else 4 if m <= 512 else 1

    def timed(config: dict[str, int]) -> float:
        out = fused_experts_triton(x, w13, w2, topk_weights, topk_ids, config=config)
        if not _rel_err(out, ref) < TOLERANCE[shape.dtype]:
            return float("inf")  # a wrong result is never the fastest
        return time_ms(lambda: fused_experts_triton(x, w13, w2, topk_weights, topk_ids, config=config), device,
                       reps, inner)

    default = default_config(shape.experts, m)
    # The default is a candidate too: a grid that misses it (the quick one) must never ship a slower config.
    best, best_ms = None, float("inf")
    for config in [default] + [c for c in configs if c != default]:
        try:
            ms = timed(config)
        except Exception:  # noqa: BLE001 - a config that does not compile or launch (out of resources) is skipped
            torch.cuda.synchronize(device)
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        return None
    default_ms = best_ms if best == default else timed(default)
    return best, best_ms, default_ms


def _read_existing(path: Path) -> dict[str, dict[str, int]]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, table: dict[str, dict[str, int]]) -> None:
    ordered = {str(m): table[str(m)] for m in sorted(map(int, table))}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ordered, indent=4) + "\n")
    tmp.replace(path)  # atomic: a run cut off mid-write leaves the previous file


def tune(shape: MoeShape, batch_sizes: Iterable[int], out_dir: Path | None = None, *, quick: bool = False,
         reps: int = 5, workers: int | None = None, overwrite: bool = False) -> Path:
    """Tune every batch size of ``batch_sizes`` on the current CUDA device and write the config file into
    ``out_dir`` (default: the package's ``kernels/moe/configs``). Prints progress; returns the file's path."""
    device = require_cuda()
    device_name = torch.cuda.get_device_name(device)
    out_dir = Path(out_dir or CONFIG_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / config_file_name(shape.experts, shape.intermediate, device_name, shape.dtype)
    table = {} if overwrite else _read_existing(path)
    todo = [m for m in batch_sizes if str(m) not in table]
    print(f"{device_name}: E={shape.experts} N={shape.intermediate} H={shape.hidden} top-{shape.topk} "
          f"{shape.dtype}; tuning M={','.join(map(str, todo)) or '(none left)'} -> {path}", flush=True)
    if not todo:
        return path
    grids = {m: candidate_configs(shape, m, quick) for m in todo}
    unique = list({tuple(c.values()): c for g in grids.values() for c in g}.values())
    precompile(shape, unique, workers if workers is not None else min(16, os.cpu_count() or 1))
    torch.manual_seed(0)
    weights = shape.weights(device)
    for m in todo:
        start = time.monotonic()
        found = tune_batch(shape, m, weights, grids[m], device, reps)
        if found is None:
            print(f"  M={m}: no config matched the reference; left out", flush=True)
            continue
        best, best_ms, default_ms = found
        table[str(m)] = best
        _write(path, table)
        print(f"  M={m}: {best_ms * 1e3:.1f} us (default {default_ms * 1e3:.1f} us) with {best}; "
              f"{len(grids[m])} configs in {time.monotonic() - start:.0f} s", flush=True)
    return path
