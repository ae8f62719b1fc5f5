"""Offline throughput of the runtime on a random workload, next to baselines on the same prompts in the same
run: HF ``generate`` (`bench_hf`, one prompt at a time) and llama.cpp (`bench_llamacpp`: xllamacpp on an F32 GGUF
of the same weights, all prompts batched; see `llamacpp_baseline`); the report (table, prefix-cache share,
grammar-mask time, and `timing.print_roofline`). The command line is ``sglite bench offline``
(:mod:`xinf_sglang.tools.bench`).

Prompts are random token ids with uniformly drawn input and output lengths; EOS is ignored so every request
produces exactly its output length. A shared prefix (`make_workload`'s ``shared_prefix``) starts every prompt with
the same N random tokens (one of ``prefix_groups`` prefixes), then its own random tokens; the report compares the
prompt tokens served from a prefix cache with the most a cache could serve (`Workload.max_cached_tokens`).
"""

from __future__ import annotations

import gc
import platform
import random
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from ..config import EngineConfig
from ..engine.engine import Engine
from ..sampling.sampling_params import SamplingParams
from ..layers.moe.sparse_block import parameter_counts
from .isolated import process_age, run_isolated
from .timing import measure_bandwidth, print_roofline


BASELINES = ("hf", "llamacpp", "vllm")


@dataclass(frozen=True)
class Workload:
    """Prompts (token ids) and output lengths; prompt ``i`` starts with prefix ``i % prefix_groups`` of
    ``prefix_len`` tokens (``prefix_len`` 0: no shared prefix)."""

    prompts: list[list[int]]
    output_lens: list[int]
    prefix_len: int = 0
    prefix_groups: int = 1

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @cached_property
    def max_cached_tokens(self) -> int:
        """Prompt tokens a prefix cache could serve at most, prompts taken in order: each prompt's longest common
        prefix with an earlier one, short of its last token (computed to sample from). A token trie, one pass."""
        trie: dict = {}
        total = 0
        for prompt in self.prompts:
            node, matched = trie, 0
            for token in prompt:  # once off the stored paths, every later node is new (empty)
                matched += token in node
                node = node.setdefault(token, {})
            total += min(matched, len(prompt) - 1)
        return total

    @property
    def longest_prompt(self) -> int:
        return max((len(p) for p in self.prompts), default=1)

    def warmup_prompts(self, n: int = 2, length: int = 8) -> list[list[int]]:
        """``n`` prompts of one repeated token that starts no workload prompt (a warm-up leaves nothing in a prefix
        cache that the workload could hit)."""
        firsts = {p[0] for p in self.prompts if p}
        token = min(set(range(len(firsts) + 1)) - firsts)
        return [[token] * length for _ in range(n)]

    def head(self, n: int) -> "Workload":
        return Workload(self.prompts[:n], self.output_lens[:n], self.prefix_len, self.prefix_groups)


@dataclass(frozen=True)
class Result:
    name: str
    workload: Workload
    seconds: float
    cache_hit_rate: float | None = None
    output_tokens: int | None = None  # when it differs from the workload's (constrained requests end early)
    mask_ms_per_step: float | None = None
    startup_s: float | None = None  # --isolate: its process's creation to the engine being ready
    decode_ms_per_step: float | None = None  # sglite: the scheduler's decode steps alone (prefill left out)
    peak_rss_bytes: int | None = None  # --isolate: peak RSS of its process tree

    @property
    def generated(self) -> int:
        return self.workload.output_tokens if self.output_tokens is None else self.output_tokens

    @property
    def output_tok_s(self) -> float:
        return self.generated / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.workload.input_tokens + self.generated) / self.seconds

    def as_dict(self) -> dict:
        """One row of the JSON report."""
        w = self.workload
        return {"engine": self.name, "prompts": len(w.prompts), "input_tokens": w.input_tokens,
                "output_tokens": self.generated, "seconds": self.seconds, "output_tok_s": self.output_tok_s,
                "total_tok_s": self.total_tok_s, "cache_hit_rate": self.cache_hit_rate,
                "max_cache_hit_rate": w.max_cached_tokens / w.input_tokens, "mask_ms_per_step": self.mask_ms_per_step,
                "decode_ms_per_step": self.decode_ms_per_step, "startup_s": self.startup_s, "peak_rss_bytes": self.peak_rss_bytes}


def parse_baselines(values: list[str] | None) -> list[str]:
    """``--baseline`` values (comma-separated and/or repeated) as a list of names; ``none`` alone means none."""
    names = [n.strip() for v in (values or ["hf"]) for n in v.split(",") if n.strip()]
    unknown = sorted(set(names) - {*BASELINES, "none"})
    if unknown:
        raise SystemExit(f"--baseline: unknown {', '.join(unknown)} (choose from {', '.join(BASELINES)}, none)")
    if "none" in names and len(set(names)) > 1:
        raise SystemExit("--baseline none cannot be combined with other baselines")
    return [n for i, n in enumerate(names) if n != "none" and n not in names[:i]]


def make_workload(vocab_size: int, num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                  seed: int, reserved_ids: int = 16, shared_prefix: int = 0, prefix_groups: int = 1) -> Workload:
    """Random prompts avoiding the lowest ``reserved_ids`` ids (where tokenizers keep their special tokens).

    With ``shared_prefix`` N, prompt ``i`` is prefix ``i % prefix_groups`` (N random tokens) followed by its own
    random ``input_len`` tokens (SGLang's generated-shared-prefix workload)."""
    if shared_prefix < 0 or prefix_groups < 1:
        raise SystemExit("--shared-prefix must be >= 0 and --prefix-groups >= 1")
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(reserved_ids, vocab_size) for _ in range(n)]

    prefixes = [tokens(shared_prefix) for _ in range(prefix_groups)] if shared_prefix else [[]]
    prompts = [prefixes[i % len(prefixes)] + tokens(rng.randint(*input_len)) for i in range(num_prompts)]
    return Workload(prompts, [rng.randint(*output_len) for _ in range(num_prompts)], shared_prefix,
                    prefix_groups if shared_prefix else 1)


@dataclass(frozen=True)
class SgliteRun:
    """What the sglite part of a run hands the baselines and the report."""

    workload: Workload
    results: list[Result]
    device: torch.device
    dtype: torch.dtype
    weights_bytes: int
    active_weights_bytes: int  # what one token reads: a mixture of experts reads top_k of its routed experts
    ready_age: float  # seconds from this process's creation to the engine being ready (`isolated.process_age`)


def bench_sglite(config: EngineConfig, workload_for: Callable[[int], Workload],
                 json_schema: dict | None = None) -> SgliteRun:
    """Build the engine, make the workload from its vocabulary size (``workload_for``), time it (and, with
    ``json_schema``, the same prompts constrained to it, from a cold cache), shut the engine down."""
    engine = Engine(config)
    ready_age = process_age()
    try:
        workload = workload_for(engine.model_config.vocab_size)
        print(f"[bench] {len(workload.prompts)} prompts, {workload.input_tokens} input tokens "
              f"({workload.prefix_len}-token shared prefix, {workload.prefix_groups} group(s)), "
              f"{workload.output_tokens} output tokens", flush=True)
        tp_before = _tp_counters(engine)
        results = [bench_engine(engine, workload)]
        if engine.tp is not None:
            _print_tp_report(engine, tp_before)
        if json_schema is not None:
            engine.flush_cache()  # same prompts, cold cache: the two runs prefill the same work
            results.append(bench_engine(engine, workload, json_schema=json_schema))
        total, active = engine.run_on_scheduler(lambda s: parameter_counts(s.runner.model))
        weights = engine.memory_plan.weights_bytes
        return SgliteRun(workload, results, engine.device, engine.dtype, weights, weights * active // total,
                         ready_age)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def bench_engine(engine: Engine, workload: Workload, json_schema: dict | None = None) -> Result:
    """Submit every prompt at once; time until the last one finishes. A short warm-up runs first.

    With ``json_schema`` every request is constrained to it; requests then end when their JSON is complete (or
    at their output length), so the throughput counts the tokens actually generated."""
    warm = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    # Warm up on prompts outside the workload, so the radix cache holds nothing the workload could hit, as long as
    # its longest prompt: a prefill of that length compiles its kernels (Triton's per-shape specializations, the
    # quantized and MoE GEMMs' prefill tiles) here and not inside the timed run (1.5 s of DeepSeek-V2-Lite's
    # batch-1 run on an H100 before, 2026-12-07).
    engine.generate(input_ids=workload.warmup_prompts(length=workload.longest_prompt), sampling_params=warm)
    before = engine.metrics()
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True, json_schema=json_schema)
              for n in workload.output_lens]
    done = threading.Event()
    progress = threading.Thread(target=_report_progress, args=(engine, before, workload, done), daemon=True)
    start = time.perf_counter()
    progress.start()
    outs = engine.generate(input_ids=workload.prompts, sampling_params=params)
    seconds = time.perf_counter() - start
    done.set()
    generated = sum(len(o.token_ids) for o in outs)
    split = _print_time_split(before, engine.metrics())
    decode_ms = split["decode_seconds_total"] / split["decode_steps"] * 1e3 if split["decode_steps"] else None
    if json_schema is None:
        assert generated == workload.output_tokens, "a request stopped early"
    after = engine.metrics()
    prompt = after["prompt_tokens_total"] - before["prompt_tokens_total"]
    cached = after["cached_prompt_tokens_total"] - before["cached_prompt_tokens_total"]
    if json_schema is None:
        return Result("sglite", workload, seconds, cached / prompt if prompt else 0.0, decode_ms_per_step=decode_ms)
    steps = after["grammar_mask_steps"] - before["grammar_mask_steps"]
    mask_ms = (after["grammar_mask_ms_per_step"] * after["grammar_mask_steps"]
               - before["grammar_mask_ms_per_step"] * before["grammar_mask_steps"]) / max(1, steps)
    return Result("sglite + JSON schema", workload, seconds, cached / prompt if prompt else 0.0, generated, mask_ms)


def _print_time_split(before: dict, after: dict) -> dict:
    """Where the engine's time went: prefill steps vs decode steps (wall time of the scheduler's steps); returns
    the differences printed."""
    d = {k: after[k] - before[k] for k in ("prefill_seconds_total", "decode_seconds_total", "prefill_tokens_total",
                                           "generated_tokens_total", "decode_steps")}
    print(f"[bench] sglite time split: prefill {d['prefill_seconds_total']:.2f} s "
          f"({d['prefill_tokens_total'] / max(d['prefill_seconds_total'], 1e-9):.0f} prefill tok/s), decode "
          f"{d['decode_seconds_total']:.2f} s ({d['decode_steps']} steps, "
          f"{d['generated_tokens_total'] / max(d['decode_steps'], 1):.1f} tokens per step)", flush=True)
    return d


def _tp_counters(engine: Engine) -> tuple[float, int, int]:
    """(all-reduce seconds, all-reduces, forward steps) so far; zeros without tensor parallelism."""
    if engine.tp is None:
        return 0.0, 0, 0
    m, stats = engine.metrics(), engine.tp.group.stats
    return stats.all_reduce_seconds, stats.all_reduces, m["prefill_steps"] + m["decode_steps"]


def _print_tp_report(engine: Engine, before: tuple[float, int, int]) -> None:
    """Per-rank memory and rank 0's all-reduce time per forward step (warm-up included; on CUDA the host time
    of enqueueing NCCL calls, not their device time)."""
    for rank in engine.rank_memory:
        print(f"[bench] tp {rank.describe()}", flush=True)
    seconds, calls, steps = (now - then for now, then in zip(_tp_counters(engine), before))
    print(f"[bench] tp all-reduce: {1e3 * seconds / max(steps, 1):.2f} ms per step ({calls / max(steps, 1):.0f} "
          f"all-reduces per step, {1e6 * seconds / max(calls, 1):.0f} us each, {steps} steps)", flush=True)


def _report_progress(engine: Engine, before: dict, workload: Workload, done: threading.Event) -> None:
    while not done.wait(5.0):
        m = engine.metrics()
        print(f"[bench] sglite: {m['finished_requests'] - before['finished_requests']}/{len(workload.prompts)} "
              f"requests done, {m['running_requests']} running", flush=True)


def bench_hf(model_dir: Path, workload: Workload, device: torch.device, dtype: torch.dtype, dummy: bool,
             seed: int) -> Result:
    """HF ``generate``, greedy, one prompt at a time (no padding), exactly ``output_len`` tokens each."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dummy:
        torch.manual_seed(seed)
        with torch.device(device):  # random init where the model runs: minutes faster than on CPU at 8B
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, like the runtime's ignore_eos
    model.generation_config.pad_token_id = 0

    def one(prompt: list[int], n: int) -> None:
        with torch.no_grad():
            model.generate(torch.tensor([prompt], device=device), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    one(workload.prompts[0], 4)  # warm-up
    _sync(device)
    start = time.perf_counter()
    last = start
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens)):
        one(prompt, n)
        if time.perf_counter() - last > 5.0:
            last = time.perf_counter()
            print(f"[bench] HF generate: {i + 1}/{len(workload.prompts)} prompts", flush=True)
    _sync(device)
    return Result("HF generate (batch 1)", workload, time.perf_counter() - start)


def bench_llamacpp(model_dir: Path, workload: Workload, options, isolate: bool = False) -> Result:
    """llama.cpp (xllamacpp) on an F32 GGUF of ``model_dir`` (a ``.gguf`` file: that very file), every prompt
    submitted at once, greedy, exactly ``output_len`` tokens each; a short warm-up request first (see
    `llamacpp_baseline`). ``isolate``: in a fresh process without torch (`isolated`), its startup and peak RSS
    reported."""
    from . import llamacpp_baseline as llamacpp
    from ..testing.gguf_writer import cached_gguf

    gguf = model_dir if model_dir.suffix == ".gguf" else cached_gguf(model_dir, "F32")
    parallel = options.parallel or len(workload.prompts)
    slot_ctx = max(len(p) + n for p, n in zip(workload.prompts, workload.output_lens)) + 8
    print(f"[bench] llama.cpp: {gguf.name}, {parallel} slots x {slot_ctx} tokens, {options.threads} threads",
          flush=True)
    args = (gguf, parallel, slot_ctx, options, workload.prompts, workload.output_lens, workload.warmup_prompts(1)[0])
    cost = None
    if isolate:
        (seconds, outs), cost = run_isolated(llamacpp.timed_run, *args)
    else:
        (seconds, outs), _ = llamacpp.timed_run(*args)
    llamacpp.check_completions(outs, workload.prompts, workload.output_lens)
    hit = sum(c.cached_tokens for c in outs) / max(1, workload.input_tokens)
    return Result(f"llama.cpp ({parallel} slots)", workload, seconds, hit, startup_s=cost and cost.startup_s,
                  peak_rss_bytes=cost and cost.peak_rss_bytes)


def print_report(results: list[Result], sg: SgliteRun, roofline: bool) -> None:
    """The table, the prefix-cache report, grammar-mask times and (``roofline``) the roofline of sglite's run."""
    print_table(results, sg.device, sg.dtype)
    print_process_costs(results)
    print_cache_report(results)
    print_mask_times(results)
    if roofline:
        r = results[0]
        per_token_ms = r.seconds / max(1, r.workload.output_tokens / len(r.workload.prompts)) * 1e3
        print_roofline(per_token_ms, r.decode_ms_per_step, sg.active_weights_bytes, sg.device, sg.weights_bytes)


def print_table(results: list[Result], device: torch.device, dtype: torch.dtype) -> None:
    """One row per engine: tokens, seconds, output and total (input + output) tokens/s, prefix-cache hits."""
    base = results[0]
    print()
    print(f"device: {_device_name(device)}, dtype: {str(dtype).removeprefix('torch.')}, torch {torch.__version__}")
    header = (f"{'engine':<24}{'prompts':>8}{'in tok':>9}{'out tok':>9}{'seconds':>10}{'out tok/s':>11}"
              f"{'total tok/s':>13}{'sglite x':>10}{'cache hit':>11}")
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = base.output_tok_s / r.output_tok_s
        hit = f"{r.cache_hit_rate:.1%}" if r.cache_hit_rate is not None else "-"
        print(f"{r.name:<24}{len(r.workload.prompts):>8}{r.workload.input_tokens:>9}{r.generated:>9}"
              f"{r.seconds:>10.2f}{r.output_tok_s:>11.1f}{r.total_tok_s:>13.1f}{ratio:>10.2f}{hit:>11}")


def print_process_costs(results: list[Result]) -> None:
    """With --isolate: each engine's startup and the peak RSS of its process tree."""
    for r in results:
        if r.peak_rss_bytes is not None:
            print(f"{r.name}: startup {r.startup_s:.1f} s (process start to ready), peak RSS of its process tree "
                  f"{r.peak_rss_bytes / 2**20:.0f} MiB")


def print_cache_report(results: list[Result]) -> None:
    """With a shared prefix: each engine's cached prompt tokens against the most a prefix cache could serve."""
    w = results[0].workload
    if not w.prefix_len:
        return
    best = w.max_cached_tokens / w.input_tokens
    print(f"\nshared prefix: {w.prefix_len} tokens x {w.prefix_groups} group(s); theoretical maximum cached "
          f"{w.max_cached_tokens} of {w.input_tokens} prompt tokens ({best:.1%})")
    for r in results:
        if r.cache_hit_rate is not None:
            share = r.cache_hit_rate / best if best else 0.0
            print(f"{r.name}: cached {r.cache_hit_rate:.1%} of prompt tokens = {share:.1%} of the maximum")


def print_mask_times(results: list[Result]) -> None:
    for r in results:
        if r.mask_ms_per_step is not None:
            print(f"{r.name}: grammar mask (fill + apply) {r.mask_ms_per_step:.3f} ms per decode step "
                  f"for {len(r.workload.prompts)} constrained rows")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
