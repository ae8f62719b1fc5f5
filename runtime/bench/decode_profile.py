"""Decode step time at small batches, and where it goes: ``sglite bench decode``.

`decode_step_ms` times decode steps after a prompt of a given length from the engine's own step accounting
(prefill steps excluded), after a warm-up request of the same shape. `profile_decode` runs the torch profiler over
decode steps and groups what it saw: host calls that synchronise or copy (a device sync outside the step's resolve
shows here) and device kernels, each per step, next to the decode CUDA graph's own device time (replayed back to
back: what a step costs without the host work around the graph).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from ..engine.engine import Engine
from ..sampling.sampling_params import SamplingParams
from .offline import make_workload
from .timing import seconds_per_run

# Host events worth listing: CUDA runtime calls, device->host reads, copies.
HOST_PREFIXES = ("cuda", "aten::item", "aten::_local", "aten::copy_", "aten::to")


def _prompts(engine: Engine, prompt_len: int, batch: int) -> list[list[int]]:
    """``batch`` random prompts of ``prompt_len`` token ids of the engine's vocabulary."""
    return make_workload(engine.model_config.vocab_size, batch, (prompt_len, prompt_len), (1, 1), seed=0).prompts


def _greedy(steps: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=steps, ignore_eos=True)


def decode_step_ms(engine: Engine, prompt_len: int, steps: int, batch: int = 1) -> tuple[float, float]:
    """(ms per decode step from the engine's step accounting, wall ms per generated token per request) for
    ``batch`` requests of ``prompt_len`` prompt tokens and ``steps`` output tokens each, after one warm-up."""
    engine.generate(input_ids=_prompts(engine, prompt_len, batch), sampling_params=_greedy(steps))
    engine.flush_cache()  # the timed run prefills from scratch, as the warm-up did
    before = engine.metrics()
    start = time.perf_counter()
    engine.generate(input_ids=_prompts(engine, prompt_len, batch), sampling_params=_greedy(steps))
    wall = time.perf_counter() - start
    after = engine.metrics()
    seconds = after["decode_seconds_total"] - before["decode_seconds_total"]
    return seconds / max(1, after["decode_steps"] - before["decode_steps"]) * 1e3, wall / steps * 1e3


@dataclass(frozen=True)
class DecodeProfile:
    """Per-step tables of one profiled run: ``{name: (us per step, calls per step)}`` for host calls and device
    kernels (on the CPU: the operators), and the decode graph's own ms (None without CUDA graphs)."""

    steps: int
    host: dict[str, tuple[float, float]]
    kernels: dict[str, tuple[float, float]]
    graph_ms: float | None


def profile_decode(engine: Engine, prompt_len: int, steps: int, batch: int = 1) -> DecodeProfile:
    """Profile ``steps`` decode steps of ``batch`` requests (warmed up by the caller's `decode_step_ms`)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    prof = profile(activities=activities)
    # Started and stopped on the scheduler thread: the profiler records the operators of the thread that starts it
    # (device kernels are recorded process-wide either way).
    engine.run_on_scheduler(lambda _: prof.start())
    try:
        engine.generate(input_ids=_prompts(engine, prompt_len, batch), sampling_params=_greedy(steps))
    finally:
        engine.run_on_scheduler(lambda _: prof.stop())
    host: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    on_device = engine.device.type == "cuda"
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:90]][0] += e.device_time_total
            kernels[e.name[:90]][1] += 1
        elif e.name.startswith(HOST_PREFIXES):
            host[e.name[:60]][0] += e.self_cpu_time_total
            host[e.name[:60]][1] += 1
        elif not on_device and e.name.startswith("aten::"):  # the CPU's "kernels" are its operators
            kernels[e.name[:90]][0] += e.self_cpu_time_total
            kernels[e.name[:90]][1] += 1
    per_step = {name: {k: (t / steps, n / steps) for k, (t, n) in table.items()}
                for name, table in (("host", host), ("kernels", kernels))}
    return DecodeProfile(steps, per_step["host"], per_step["kernels"], _graph_ms(engine, batch))


def _graph_ms(engine: Engine, batch: int) -> float | None:
    """Device ms of one replay of the decode graph that serves ``batch`` rows, replayed back to back on the
    scheduler thread between two steps; None without CUDA graphs."""
    def replay_time(scheduler) -> float | None:
        graphs = scheduler.runner.graphs
        captured = getattr(graphs, "graphs", None)
        if not captured:
            return None
        size = min((bs for bs in captured if bs >= batch), default=None)
        if size is None:
            return None
        return seconds_per_run(captured[size].replay, engine.device, 32, warmup_s=0) * 1e3

    return engine.run_on_scheduler(replay_time)


def print_profile(p: DecodeProfile, wall_ms: float, top: int = 25) -> None:
    """The host-call table, the step's device time against its wall time, and the kernel table with shares."""
    print(f"\n{'host call':<62}{'us/step':>10}{'calls/step':>12}")
    for name, (t, n) in sorted(p.host.items(), key=lambda kv: -kv[1][0])[:10]:
        print(f"{name:<62}{t:>10.1f}{n:>12.1f}")
    total = sum(t for t, _ in p.kernels.values())
    graph = f"{p.graph_ms:.3f} ms (the rest of a step: {wall_ms - p.graph_ms:.3f} ms)" if p.graph_ms else "no graphs"
    print(f"\nwall per decode step: {wall_ms:.3f} ms; kernel time per step (profiled): {total / 1e3:.3f} ms; the "
          f"decode graph alone, replayed back to back: {graph}")
    print(f"{'kernel':<92}{'us/step':>10}{'calls/step':>12}{'share':>8}")
    for name, (t, n) in sorted(p.kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{name:<92}{t:>10.1f}{n:>12.1f}{t / max(total, 1e-9):>8.1%}")
