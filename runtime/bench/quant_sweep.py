"""The ``quant`` sweep of ``sglite bench kernels``: the quantized-linear kernels (kernels/quant/) at a model's decode
shapes, against the bf16 skinny linear, as achieved weight bandwidth and share of the device's copy roofline.

For each weight of a decode step (qkv, o_proj, gate_up, down) and M = 1 and 8: the bf16 skinny linear, FP8
block-scaled W8A8 (activation quantization included), FP8 per-channel, AWQ and GPTQ 4-bit with groups of 128 (these
four through their ``tl.dot`` kernels), their decode GEMVs on CUDA cores at M = 1 and 4 (``*_gemv``: what decode
dispatches to up to 4 rows; FP8 weight-only), and
GGUF Q4_K, Q6_K and Q8_0 blocks (Q4_K_M's two types and the common 8-bit one; GGUF also at the LM head, which a GGUF
keeps in blocks). The bytes counted are what a call must read: the packed weight plus its scales (and zeros). Timed like the linear
sweep: distinct copies of the weight in turn (L2 never holds the next one), inside a CUDA graph. At M = 1 each
quantized kernel also runs over a small grid of launch shapes (the seed of the tuned JSON files that
``get_quant_config`` reads) and the best is printed; with ``--config-out DIR`` those bests are written as the tuned
files (`write_tuned_configs`). GPU only: there is nothing to learn from the interpreter.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import torch
from xinf_sglang.kernels import linear as skinny_linear
from xinf_sglang.kernels import quant as Q
from xinf_sglang.kernels.quant.config import config_file_name, default_config, make_config
from xinf_sglang.kernels.tuned_configs import current_device_name

from .kernel_sweep import SweepOptions, time_each
from .timing import measure_bandwidth

# The decode GEMVs timed beside the tl.dot kernels, and their grids: (BLOCK_SIZE_N, BLOCK_SIZE_K, SPLIT_K, warps).
# AWQ strips of 128-512 columns are 64-256 contiguous bytes per K row, GPTQ strips of 64-256 words 256-1024 bytes
# per packed row (its K steps are capped at the group of 128), FP8 strips are weight rows of 64 or 128 bytes.
# The grids are centred on the bests of the H100 sweeps (2026-12-07: AWQ / GPTQ 64-256 columns split 16 ways with
# 1-2 warps, FP8 16-row strips with 128-512-wide steps split 2-8 ways with 2-4 warps), one step past each edge.
GEMV_GRIDS = {
    "awq_gemv": ((64, 128, 256), (64, 128), (8, 16, 32), (1, 2, 4)),
    "gptq_gemv": ((32, 64, 128), (128,), (8, 16, 32), (1, 2, 4)),
    "fp8_block_gemv": ((8, 16, 32), (128,), (4, 8, 16), (1, 2, 4)),
    "fp8_channel_gemv": ((8, 16, 32), (256, 512, 1024), (1, 2, 4, 8), (2, 4, 8)),
}
# The GGUF kernels timed: Q4_K_M's two types and Q8_0 (each its own kernel kind of kernels/quant/config.py).
GGUF_SWEPT = ("gguf_q4_k", "gguf_q6_k", "gguf_q8_0")
# Every kind the sweep times, in its order (FP8 only from compute capability 8.9).
QUANT_KINDS = ("bf16", "fp8_block", "fp8_block_gemv", "fp8_channel", "fp8_channel_gemv", "awq", "awq_gemv", "gptq",
               "gptq_gemv", *GGUF_SWEPT)
Call = Callable[[torch.Tensor, dict | None], torch.Tensor]  # (x, launch config or None) -> y


def _int4_copy(fmt: str, n: int, k: int, device: torch.device, gemv: bool = False) -> tuple[Call, int]:
    """One random AWQ / GPTQ weight (groups of 128): its call (the GEMV or the ``tl.dot`` kernel) and the bytes it
    reads."""
    shape = (k, n // 8) if fmt == "awq" else (k // 8, n)
    qweight = torch.randint(-(2**31), 2**31, shape, dtype=torch.int32, device=device)
    qzeros = torch.randint(-(2**31), 2**31, (k // 128, n // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(k // 128, n, device=device) * 1e-3).half()
    nbytes = qweight.nbytes + qzeros.nbytes + scales.nbytes
    return (lambda x, cfg: Q.int4_linear_triton(x, qweight, scales, qzeros, None, fmt, 128, config=cfg,
                                                gemv=gemv)), nbytes


def _fp8_copy(kind: str, n: int, k: int, device: torch.device, gemv: bool = False) -> tuple[Call, int]:
    """One random FP8 weight, block-scaled (128 x 128) or per channel: its call (weight-only GEMV or W8A8) and the
    bytes it reads."""
    weight = torch.randn(n, k, device=device).to(torch.float8_e4m3fn)
    if kind == "fp8_block":
        scale = torch.rand(-(-n // 128), -(-k // 128), device=device) * 1e-2
        return ((lambda x, cfg: Q.fp8_block_linear_triton(x, weight, scale, config=cfg, gemv=gemv)),
                weight.nbytes + scale.nbytes)
    scale = torch.rand(n, device=device) * 1e-2
    return (lambda x, cfg: Q.fp8_channel_linear_triton(x, weight, scale, config=cfg, gemv=gemv,
                                                       use_scaled_mm=None if cfg is None else False)), weight.nbytes


def _gguf_copy(kind: str, n: int, k: int, device: torch.device) -> tuple[Call, int]:
    """One weight of random GGUF blocks (``kind`` ``gguf_q4_k``...): its call and the bytes it reads."""
    qtype = kind.removeprefix("gguf_").upper()
    blocks = Q.random_gguf_blocks(n, k, qtype, torch.Generator(device=device).manual_seed(n + k), scale=1e-3)
    return (lambda x, cfg: Q.gguf_linear_triton(x, blocks, qtype, config=cfg)), blocks.nbytes


def _bf16_copy(n: int, k: int, device: torch.device) -> tuple[Call, int]:
    weight = (torch.randn(n, k, device=device) * 0.02).bfloat16()
    return (lambda x, cfg: skinny_linear(x, weight)), weight.nbytes


def _one_copy(kind: str, n: int, k: int, device: torch.device) -> tuple[Call, int]:
    if kind == "bf16":
        return _bf16_copy(n, k, device)
    if kind.startswith("gguf_"):
        return _gguf_copy(kind, n, k, device)
    base = kind.removesuffix("_gemv")
    if base in ("awq", "gptq"):
        return _int4_copy(base, n, k, device, gemv=kind != base)
    return _fp8_copy(base, n, k, device, gemv=kind != base)


def make_copies(kind: str, n: int, k: int, copies: int, device: torch.device) -> tuple[list[Call], int]:
    """``copies`` distinct weights of one kind and the bytes one call reads."""
    made = [_one_copy(kind, n, k, device) for _ in range(copies)]
    return [call for call, _ in made], made[0][1]


def launch_grid(kind: str, quick: bool) -> list[dict]:
    """Launch shapes tried at M = 1: column strip, K step / split, pipeline depth."""
    if kind in ("awq", "gptq"):
        grid = [make_config(16, bn, bk, 1, split, 4, stages) for bn, bk, split, stages in
                itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8), (3, 4))]
    elif kind in GEMV_GRIDS:  # the CUDA-core GEMVs: strip, K step (capped by the group / K block), split, warps
        strips, steps, splits, warps = GEMV_GRIDS[kind]
        grid = [make_config(1, bn, bk, 1, split, w, 3) for bn, bk, split, w in
                itertools.product(strips, steps, splits, warps)]
    elif kind in GGUF_SWEPT:  # the GEMV (BLOCK_SIZE_M 1): strip, K step, split, warps
        grid = [make_config(1, bn, bk, 1, split, warps, 3) for bn, bk, split, warps in
                itertools.product((16, 32, 64), (64, 128, 256), (1, 2, 4, 8), (2, 4))]
    else:
        grid = [make_config(16, bn, 128, 1, 1, warps, stages) for bn, warps, stages in
                itertools.product((16, 32, 64, 128), (4, 8), (4, 6, 8))]
    return grid[:2] if quick else grid


def sweep_quant(opts: SweepOptions, results: dict) -> None:
    """Print, per weight, kind and M: us per call, GB/s and % of the copy roofline; at M = 1 the best launch shape
    of the grid too. Refuses (a message, nothing timed) off CUDA."""
    if opts.device.type != "cuda":
        print("\n## quant: skipped: the quantized kernels are timed on a CUDA GPU only (run with --device cuda)")
        return
    kinds = [k for k in QUANT_KINDS if not opts.quant_kinds or k in opts.quant_kinds]
    if torch.cuda.get_device_capability(opts.device) < (8, 9):
        kinds = [k for k in kinds if not k.startswith("fp8")]
    copy_bw = measure_bandwidth(opts.device).copy
    print(f"\n## quantized linears at decode (bf16 activations; copy roofline {copy_bw / 1e9:.0f} GB/s)")
    print(f"{'weight':<9}{'kind':<12}{'M':>3}{'us':>9}{'GB/s':>7}{'%copy':>7}"
          f"{'best us':>9}{'GB/s':>7}{'%copy':>7}  best")
    for name, (n, k) in opts.shape.weights().items():
        for kind in kinds:
            if name == "lm_head" and kind not in GGUF_SWEPT:
                continue  # stays in bf16 in the other quantized checkpoints
            for row in _time_kind(opts, kind, n, k, copy_bw):
                results.setdefault("quant", []).append(dict(row, weight=name))
                print(f"{name:<9}{row['text']}")
            opts.empty_cache()
        if opts.config_out:  # after each weight, so that a run cut short keeps what it timed
            for path in write_tuned_configs(results.get("quant", []), opts.shape.weights(), Path(opts.config_out),
                                            current_device_name(opts.device), opts.dtype_name):
                print(f"wrote {path}")


def _time_kind(opts: SweepOptions, kind: str, n: int, k: int, copy_bw: float) -> list[dict]:
    """The rows of one kind of weight: default launch at M = 1 and 8, and the grid's best at M = 1."""
    copies = 2 if opts.quick else 8
    calls, nbytes = make_copies(kind, n, k, copies, opts.device)

    def share(us: float) -> str:
        return f"{nbytes / us / 1e3:>7.0f}{100 * nbytes / us * 1e6 / copy_bw:>6.0f}%"

    rows = []
    for m in opts.few([1, 4] if kind in GEMV_GRIDS else [1, 8], keep=1):
        x = opts.randn(m, k).bfloat16()

        def run(cfg: dict | None, x: torch.Tensor = x) -> float:  # us per call
            return opts.time_ms(lambda: [c(x, cfg) for c in calls]) / copies * 1e3

        t = run(None)
        row = {"kind": kind, "m": m, "us": t, "gb_s": nbytes / t / 1e3, "text": f"{kind:<12}{m:>3}{t:>9.1f}{share(t)}"}
        if m == 1 and kind != "bf16":
            grid = time_each(launch_grid(kind, opts.quick), run)
            row["grid"] = grid
            row["text"] += f"{grid[0][0]:>9.1f}{share(grid[0][0])}  {grid[0][1]}"
        rows.append(row)
    return rows


# Row counts past the GEMV (M <= 8) written with their default configs, so that the nearest-M lookup of a larger
# batch lands on a prefill-shaped entry and not on the M = 1 GEMV tuned here.
DEFAULT_ROWS = (16, 32, 64, 128, 256, 1024, 4096)
# The sweep's weight kinds per kernel of kernels/quant/config.py: AWQ and GPTQ share the int4 kernel.
KERNEL_OF = {"fp8_block": "fp8_block", "fp8_channel": "fp8_channel", "awq": "int4", "gptq": "int4",
             **{k: k for k in (*GEMV_GRIDS, *GGUF_SWEPT)}}


def write_tuned_configs(rows: list[dict], weights: dict[str, tuple[int, int]], out_dir: Path, device_name: str,
                        dtype: str) -> list[Path]:
    """One config file per (kernel, weight shape) from the sweep's M = 1 grids: the config fastest over the sweep's
    kinds of that kernel (AWQ + GPTQ summed for int4) at M = 1, the defaults at `DEFAULT_ROWS`. Returns the paths."""
    totals: dict[tuple[str, int, int], dict[str, list]] = {}
    for row in rows:
        kernel = KERNEL_OF.get(row["kind"])
        if kernel is None or row["m"] != 1 or "grid" not in row:
            continue
        n, k = weights[row["weight"]]
        sums = totals.setdefault((kernel, n, k), {})
        for t, cfg in row["grid"]:
            key = json.dumps(cfg, sort_keys=True)
            sums.setdefault(key, [0.0, cfg])[0] += t
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (kernel, n, k), sums in totals.items():
        best = min(sums.values(), key=lambda entry: entry[0])
        if best[0] == float("inf"):
            continue  # nothing compiled: the defaults stay
        table = {"1": best[1]} | {str(m): default_config(kernel, n, k, m) for m in DEFAULT_ROWS}
        path = out_dir / config_file_name(kernel, n, k, device_name, dtype)
        path.write_text(json.dumps(table, indent=4) + "\n")
        paths.append(path)
    return paths
