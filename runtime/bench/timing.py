"""Timing on the device at hand: the copy / read bandwidth probe of the roofline, the mean time of a function over
back-to-back runs, and the device time of a function captured in a CUDA graph (the host clock on the CPU). Shared
by ``sglite bench offline``'s roofline and the kernel and decode benchmarks (`kernel_sweep`, `decode_profile`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Bandwidth:
    """Device memory bandwidth in bytes/s: ``copy`` counts the bytes read and written by a device-to-device copy
    (the issue's roofline), ``read`` the bytes of a read-only stream (a sum), which is what reading weights is."""

    copy: float
    read: float


def measure_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> Bandwidth:
    """Copy and read bandwidth of ``device`` over an ``nbytes`` buffer, each timed over ``repeats`` back-to-back
    runs after a warm-up (``seconds_per_run``). On CUDA the runs are timed with events, not host clocks around
    single runs: timing single copies with a host synchronisation around each, with three warm-up copies, measured
    3.80 TB/s on an H200 whose back-to-back copies ran at 4.28 TB/s (docs/PERFORMANCE.md), which flattered every
    roofline ratio. ``nbytes`` defaults to 2 GiB on a GPU (~40 times its L2) and 256 MiB on the CPU."""
    nbytes = nbytes or (2 * 1024**3 if device.type == "cuda" else 256 * 1024**2)
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_s = seconds_per_run(lambda: dst.copy_(src), device, repeats)
    del dst
    read_s = seconds_per_run(lambda: src.view(torch.float32).sum(), device, repeats)
    del src
    return Bandwidth(copy=2 * nbytes / copy_s, read=nbytes / read_s)


def seconds_per_run(fn, device: torch.device, repeats: int, warmup_s: float = 0.5) -> float:
    """Mean seconds of one ``fn()`` over ``repeats`` back-to-back runs (CUDA events on a GPU, the host clock on
    the CPU), after one untimed run. On CUDA, runs first for ``warmup_s`` of wall time: after the engine has shut
    down the GPU idles at a low SM clock, and a few warm-up copies did not bring it back (the same copy timed at
    3.8 TB/s right after the engine, 4.27 TB/s after HF generate)."""
    fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        for _ in range(8):
            fn()
        torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / repeats



def graph_time_ms(fn: Callable[[], object], device: torch.device, inner: int = 2, replays: int = 10) -> float:
    """Mean device time of one ``fn()`` in ms. On CUDA: ``inner`` calls captured in a CUDA graph (compiled and
    warmed up on a side stream first, as capture requires), the graph replayed ``replays`` times back to back, so
    launch overhead is not counted, as in a decode step's graph. Elsewhere: the host clock over ``inner * replays``
    calls."""
    if device.type != "cuda":
        return seconds_per_run(fn, device, inner * replays) * 1e3
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return seconds_per_run(graph.replay, device, replays, warmup_s=0) * 1e3 / inner


def print_roofline(per_token_ms: float, step_ms: float | None, weights_bytes: int, device: torch.device,
                   total_bytes: int | None = None) -> None:
    """Batch-1 decode reads every weight a token uses once per token: the floor is ``weights_bytes`` (the active
    weights of a mixture of experts, ``total_bytes`` of which are stored) / bandwidth per token, at the copy
    bandwidth (the target's yardstick) and, stricter, at the read bandwidth."""
    bw = measure_bandwidth(device)
    if total_bytes is not None and total_bytes != weights_bytes:
        print(f"\nroofline: a mixture of experts: {weights_bytes / 1e9:.2f} GB of its {total_bytes / 1e9:.2f} GB of "
              "weights are read per token at batch 1 (top-k experts, attention, embeddings, LM head)")
    copy_floor_ms, read_floor_ms = weights_bytes / bw.copy * 1e3, weights_bytes / bw.read * 1e3
    print(f"\nroofline: weights {weights_bytes / 1e9:.2f} GB; copy bandwidth {bw.copy / 1e12:.2f} TB/s (read+write) "
          f"-> floor {copy_floor_ms:.2f} ms/token ({1e3 / copy_floor_ms:.0f} tok/s at batch 1); read bandwidth "
          f"{bw.read / 1e12:.2f} TB/s -> floor {read_floor_ms:.2f} ms/token ({1e3 / read_floor_ms:.0f} tok/s)")
    print(f"roofline: sglite {per_token_ms:.2f} ms/token ({1e3 / per_token_ms:.0f} tok/s per request) = "
          f"{copy_floor_ms / per_token_ms:.1%} of the roofline ({read_floor_ms / per_token_ms:.1%} of the "
          f"read-bandwidth roofline), end to end (the prompt's prefill included)")
    if step_ms:  # what "batch-1 decode vs the roofline" means: the decode steps alone
        print(f"roofline: sglite decode {step_ms:.2f} ms/step ({1e3 / step_ms:.0f} tok/s) = "
              f"{copy_floor_ms / step_ms:.1%} of the roofline ({read_floor_ms / step_ms:.1%} of the read-bandwidth "
              "roofline), decode steps alone")
