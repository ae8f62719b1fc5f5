"""Micro-benchmark of the grammar backend: compile time and per-step mask-fill latency (not a test).

Usage::

    python scripts/bench_grammar.py [--tokenizer PATH] [--walks 20] [--batch 32]

``--tokenizer`` is a HF tokenizer folder or a ``tokenizer.json``. Without it, the large-vocabulary tokenizer that
ships inside the xinference package (DeepSeek's, ~129k tokens) is used when present, else the tiny test tokenizer.
Decoding is simulated by random walks (no model): each step fills the mask, then a random allowed token is
accepted. Reported: backend construction, cold compile, cached compile, matcher creation, fill latency median/p99
at batch 1 (one row per step) and at the given batch (32 requests at different points of the schema, per step:
a loop of ``fill_bitmask`` and the backend's parallel ``fill_bitmasks``), and ``apply_bitmask_`` on CPU logits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "geo": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                    "additionalProperties": False,
                },
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    "status": {"enum": ["new", "paid", "shipped"]},
                    "note": {"type": ["string", "null"]},
                },
                "required": ["sku", "qty", "status"],
                "additionalProperties": False,
            },
            "maxItems": 4,
        },
        "active": {"type": "boolean"},
    },
    "required": ["id", "name", "address", "orders", "active"],
    "additionalProperties": False,
}


def load_tokenizer(path: str | None) -> tuple[Any, str]:
    """The tokenizer to benchmark with and a description of where it came from."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path:
        p = Path(path)
        tok = PreTrainedTokenizerFast(tokenizer_file=str(p)) if p.is_file() else AutoTokenizer.from_pretrained(p)
        return tok, str(p)
    try:
        import xinference

        shipped = Path(xinference.__file__).parent / "router/tokenizer_assets/deepseek_v4_flash_0731/tokenizer.json"
        if shipped.is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=str(shipped), eos_token="<｜end▁of▁sentence｜>")
            return tok, "DeepSeek tokenizer shipped with xinference"
    except ImportError:
        pass
    from xinf_sglang.runtime.testing.tiny_model import make_tiny_model

    folder = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "qwen2")
    return AutoTokenizer.from_pretrained(folder), "tiny test tokenizer"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def us(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f} µs"


class Walk:
    """One simulated request: a matcher plus its RNG; `step` accepts a random allowed token."""

    def __init__(self, backend: Any, compiled: Any, seed: int) -> None:
        self.backend = backend
        self.compiled = compiled
        self.rng = np.random.default_rng(seed)
        self.matcher = backend.new_matcher(compiled)
        self.steps = 0
        self.eos_ids = np.array(sorted(backend.policy.eos_ids))

    def step(self, bitmask: torch.Tensor, row: int) -> None:
        """Accept a random token allowed by ``bitmask[row]`` (filled by the caller); restart when finished."""
        vocab = self.backend.vocab_size
        bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), bitorder="little")[:vocab]
        ids = np.nonzero(bits)[0]
        is_eos = np.isin(ids, self.eos_ids)
        if is_eos.any() and (self.rng.random() < 0.3 or is_eos.all()):
            token = int(ids[is_eos][0])
        else:
            token = int(self.rng.choice(ids[~is_eos]))
        if not self.matcher.accept_token(token):
            raise RuntimeError(self.matcher.error())
        self.steps += 1
        if self.matcher.is_terminated() or self.steps > 300:
            self.matcher = self.backend.new_matcher(self.compiled)
            self.steps = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="HF tokenizer folder or tokenizer.json")
    parser.add_argument("--walks", type=int, default=20, help="batch-1 walks (steps measured: all of them)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-steps", type=int, default=300)
    args = parser.parse_args()

    from xinf_sglang.runtime.constrained import GrammarSpec, LLGuidanceBackend, allocate_bitmask, apply_bitmask_

    tokenizer, source = load_tokenizer(args.tokenizer)
    vocab = -(-len(tokenizer) // 128) * 128  # padded like real checkpoints
    print(f"tokenizer: {source}: {len(tokenizer)} tokens, logits width {vocab}, torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    backend = LLGuidanceBackend(tokenizer, vocab)
    print(f"backend construction       {(time.perf_counter() - t0) * 1e3:9.1f} ms (once per engine)")

    spec = GrammarSpec.from_fields(json_schema=NESTED_SCHEMA)
    t0 = time.perf_counter()
    compiled = backend.compile(spec)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend.compile(spec)
    warm = time.perf_counter() - t0
    print(f"compile (cold, call)       {cold * 1e3:9.2f} ms   (inside worker: {compiled.compile_time_s * 1e3:.2f} ms)")
    print(f"compile (cached)           {us(warm)}")
    other = GrammarSpec.from_fields(json_schema={**NESTED_SCHEMA, "required": ["id"]})
    t0 = time.perf_counter()
    compiled_other = backend.compile(other)
    print(
        f"compile (cold, 2nd schema) {(time.perf_counter() - t0) * 1e3:9.2f} ms   "
        f"(inside worker: {compiled_other.compile_time_s * 1e3:.2f} ms)"
    )
    t0 = time.perf_counter()
    for _ in range(100):
        backend.new_matcher(compiled)
    print(f"new_matcher                {us((time.perf_counter() - t0) / 100)}")

    # Batch 1: every step of a series of walks.
    bitmask = allocate_bitmask(1, vocab)
    times: list[float] = []
    for seed in range(args.walks):
        walk = Walk(backend, compiled, seed)
        while True:
            t0 = time.perf_counter()
            walk.matcher.fill_bitmask(bitmask, 0)
            times.append(time.perf_counter() - t0)
            restarted_from = walk.matcher
            walk.step(bitmask, 0)
            if walk.matcher is not restarted_from and walk.steps == 0:
                break
    print(
        f"fill batch 1               median {us(statistics.median(times))}  p99 {us(pct(times, 99))}  "
        f"max {us(max(times))}  ({len(times)} steps)"
    )

    # Batch N: requests at different points of the schema, all rows filled each step.
    walks = [Walk(backend, compiled, 1000 + i) for i in range(args.batch)]
    bitmask = allocate_bitmask(args.batch, vocab)
    for i, walk in enumerate(walks):  # stagger them
        for _ in range(i * 3):
            walk.matcher.fill_bitmask(bitmask, i)
            walk.step(bitmask, i)
    loop_times: list[float] = []
    par_times: list[float] = []
    for step in range(args.batch_steps):
        t0 = time.perf_counter()
        if step % 2:
            backend.fill_bitmasks([(w.matcher, i) for i, w in enumerate(walks)], bitmask)
            par_times.append(time.perf_counter() - t0)
        else:
            for i, w in enumerate(walks):
                w.matcher.fill_bitmask(bitmask, i)
            loop_times.append(time.perf_counter() - t0)
        for i, w in enumerate(walks):
            w.step(bitmask, i)
    for name, ts in (("loop", loop_times), ("fill_bitmasks", par_times)):
        print(
            f"fill batch {args.batch} {name:<15} median {us(statistics.median(ts))}  p99 {us(pct(ts, 99))}  "
            f"max {us(max(ts))}  per step"
        )

    logits = torch.randn(args.batch, vocab)
    ts = []
    for _ in range(50):
        t0 = time.perf_counter()
        apply_bitmask_(logits, bitmask)
        ts.append(time.perf_counter() - t0)
    print(f"apply_bitmask_ CPU [{args.batch}, {vocab}] median {us(statistics.median(ts))}")
    backend.close()


if __name__ == "__main__":
    main()
