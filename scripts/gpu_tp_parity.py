"""GPU tensor-parallel parity: over 2 GPUs (NCCL), the runtime's greedy tokens on the tiny models (float32) equal HF
transformers' on one GPU, with CUDA graphs asked for and switched off, also cached, chunked and retracted. Prints
one table, with whether decode really ran as graph replays; exits 1 on any mismatch, 2 without 2 GPUs.

    python scripts/gpu_tp_parity.py            (scripts/gpu_run.sh tp-parity)

Decode under tp_size > 1 runs as CUDA-graph replays on every rank (the "graphs" rows must say ``graphs=on``):

- every rank captures the same sizes (`cuda_graph.capture_sizes` of the same ``max_bs``: the memory plan, hence
  ``max_running_requests``, is agreed over the ranks) in the same order, largest first, at the same point of
  startup (`startup.decode_graphs`: rank 0 in `build_runtime`, ranks 1.. right after `build_shard` in
  `tp/worker.py`), so the NCCL all-reduces and the logits gather inside the warm-ups and captures pair up across
  ranks. Rank 0 captures its shard (``LeaderModel.model``), not the `LeaderModel`: its broadcast cannot be in a
  graph.
- each replay on rank 0 (`tp.LeaderGraphs`): fill the static inputs (`CudaGraphRunner.prepare`), then, outside
  the graph, broadcast a graph-step header (padded size, real size, table entries) and the filled
  ``static[:, :padded]`` plus the `TableMirror` differences (computed after the fill, so the new slots are
  included); then replay (`CudaGraphRunner.launch`). A follower copies the payload into its own static tensor,
  writes the entries into its request->token table and launches its graph of the same padded size.
- on a failed replay the group fails as for an eager step (`TPLauncher.fail`).
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from gpu_parity import NEW_TOKENS, hf_reference  # noqa: E402  (scripts/ is sys.path[0] when run as a script)

from xinf_sglang.runtime import Engine, EngineConfig, SamplingParams  # noqa: E402
from xinf_sglang.runtime.bench.offline import make_workload  # noqa: E402
from xinf_sglang.runtime.testing.tiny_model import make_tiny_model  # noqa: E402

TP_SIZE = 2
REGIMES = {
    "tp2 graphs asked for": dict(),
    "tp2 no graphs": dict(disable_cuda_graph=True),
    "tp2 graphs, no overlap": dict(overlap_schedule="off"),
    "tp2 chunked prefill 16": dict(chunked_prefill_size=16, max_prefill_tokens=32),
    "tp2 retraction (pool 260)": dict(max_total_tokens=260),
}


def run_regime(model_dir: str, prompts: list[list[int]], refs: list[list[int]], name: str, extra: dict) -> bool:
    """One row of the table: tp_size=2 on cuda:0 and cuda:1 against HF's tokens; True when it passes."""
    cfg = EngineConfig(model_path=model_dir, device="cuda", dtype="float32", tp_size=TP_SIZE,
                       debug_invariants=True, **extra)
    with Engine(cfg) as engine:
        graphs = engine.runner.graphs is not None
        outs = engine.generate(input_ids=prompts, sampling_params=SamplingParams(
            temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True))
        same = sum(o.token_ids == r for o, r in zip(outs, refs))
        errors = [o.error for o in outs if o.error]
        retractions = engine.metrics()["retractions"]
        problems = engine.check_invariants()
    graphs_expected = "no graphs" not in name  # every other regime must decode as graph replays on every rank
    ok = (same == len(prompts) and not problems and not errors and graphs == graphs_expected
          and (retractions > 0 or "retraction" not in name))
    print(f"{name:<28}{same:>6}/{len(prompts):<3}{retractions:>13}  graphs={'on' if graphs else 'off':<4}"
          f"{'PASS' if ok else 'FAIL'} {problems or ''} {errors[:1] or ''}", flush=True)
    return ok


def main() -> int:
    if torch.cuda.device_count() < TP_SIZE:
        print(f"needs {TP_SIZE} GPUs, this machine has {torch.cuda.device_count()}")
        return 2
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("llama", "qwen2", "qwen3"):
            model_dir = str(make_tiny_model(os.path.join(tmp, arch), arch))
            pool = make_workload(1024, 1, (2000, 2000), (1, 1), seed=1).prompts[0]
            prompts = [pool[i * 7 : i * 7 + 3 + 147 * i // 11] for i in range(12)]  # as scripts/gpu_parity.py
            refs = hf_reference(model_dir, prompts)
            print(f"--- {arch}: {'regime':<22}{'match':>10}{'retractions':>13}")
            failures += sum(not run_regime(model_dir, prompts, refs, n, e) for n, e in REGIMES.items())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
