"""Where the time of one batch-1 decode step goes, per kernel, next to its byte floor.

    python scripts/gpu_profile_decode.py [--config configs/llama-3.1-8b.json] [--steps 64]

Runs a dummy-weight engine (CUDA graphs on), decodes one request, and profiles `--steps` decode steps with the
torch profiler. Prints the wall time per step, the device time per step, the batch-1 graph's own device time
(replayed back to back: what a step costs without the work around the graph), and the kernels grouped by name
with their share.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from xinf_sglang.runtime import Engine, EngineConfig, SamplingParams
from xinf_sglang.runtime.bench.offline import seconds_per_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).parent.parent / "configs" / "llama-3.1-8b.json"))
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--engine-arg", action="append", default=[])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    shutil.copy(args.config, tmp / "config.json")
    extra = dict(a.split("=", 1) for a in args.engine_arg)
    engine = Engine(EngineConfig(model_path=str(tmp), load_format="dummy", skip_tokenizer_init=True,
                                 context_length=4096, **extra))
    prompt = [[1000 + i for i in range(128)]]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.steps, ignore_eos=True)
    engine.generate(input_ids=prompt, sampling_params=params)  # warm-up
    start = time.perf_counter()
    engine.generate(input_ids=prompt, sampling_params=params)
    wall = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        engine.generate(input_ids=prompt, sampling_params=params)
    graph_ms = float("nan")
    if engine.runner.graphs is not None:  # the step's forward alone, without the host-side work around it
        graph_ms = seconds_per_run(engine.runner.graphs.graphs[1].replay, engine.device, 32, warmup_s=0) * 1e3
    engine.shutdown()
    # Host side: where the scheduler thread's time goes (a device sync outside resolve would show up here).
    host = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(("cuda", "aten::item", "aten::_local")):
            host[e.name[:60]][0] += e.self_cpu_time_total
            host[e.name[:60]][1] += 1
    print(f"{'host call':<62}{'us/step':>10}{'calls/step':>12}")
    for name, (t, n) in sorted(host.items(), key=lambda kv: -kv[1][0])[:10]:
        print(f"{name:<62}{t / args.steps:>10.1f}{n / args.steps:>12.1f}")
    kernels = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:90]][0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            kernels[e.name[:90]][1] += 1
    total = sum(v[0] for v in kernels.values())
    print(f"wall per decode step: {wall * 1e3:.3f} ms; device time per step (profiled): {total / args.steps / 1e3:.3f} ms; "
          f"the batch-1 decode graph alone, replayed back to back: {graph_ms:.3f} ms (the rest of a step: "
          f"{wall * 1e3 - graph_ms:.3f} ms)")
    print(f"{'kernel':<92}{'us/step':>10}{'calls/step':>12}{'share':>8}")
    for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{name:<92}{t / args.steps:>10.1f}{n / args.steps:>12.1f}{t / total:>8.1%}")


if __name__ == "__main__":
    main()
