"""Benchmark of the frontend language (issue 19's acceptance): ``run_batch`` of a fork-heavy program on the
embedded engine (A) against the same program's requests sent one by one (B).

The program: a 512-token document of its own per input, then ``fork(4)``: four questions about the document,
each branch a ``gen`` of ``--output-len`` tokens (``ignore_eos``). A runs ``run_batch`` over the inputs (every
program and branch at once: the engine batches them and the branches share the document through the radix
cache). B sends the very requests A sent (recorded: program text + sampling) to the same engine, one at a time.
The cache is flushed before every run; A and B alternate ``--repeats`` times (the machine is shared: min and
median are reported). Usage::

    .venv/bin/python scripts/bench_lang.py --model tiny        # a tiny random qwen2 built on the fly
    .venv/bin/python scripts/bench_lang.py --model /path/to/checkpoint --inputs 64 --branches 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import xinf_sglang.lang as sgl
from xinf_sglang.lang.backends.base import Backend, GenResult
from xinf_sglang.lang.ir import GenParams

QUESTIONS = ["Summarise it.", "Who wrote it?", "What is its tone?", "Give a title.", "List a key word.",
             "Is it true?", "Where is it set?", "When was it written?"]


class Recording(Backend):
    """The embedded backend, recording every generate request (text, params) it forwards."""

    def __init__(self, inner: sgl.Runtime) -> None:
        self.inner, self.chat_template = inner, inner.chat_template
        self.requests: list[tuple[str, GenParams]] = []
        self._lock = threading.Lock()

    def generate(self, text: str, params: GenParams) -> GenResult:
        with self._lock:
            self.requests.append((text, params))
        return self.inner.generate(text, params)

    def generate_stream(self, text: str, params: GenParams) -> Iterator[GenResult]:
        raise NotImplementedError

    def score(self, text, continuations):
        raise NotImplementedError


@sgl.function
def fork_heavy(s, document, branches, output_len):
    s += "Document:\n" + document + "\n"
    forks = s.fork(branches)
    forks += lambda i: f"Question: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:"
    forks += sgl.gen("answer", max_tokens=output_len, ignore_eos=True)
    forks.join()


def documents(rt: sgl.Runtime, n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` distinct texts of about ``tokens`` tokens (random token ids decoded: lengths re-encode closely)."""
    rng = np.random.default_rng(seed)
    vocab = len(rt.tokenizer) - len(rt.tokenizer.all_special_ids) - 1
    texts = []
    for _ in range(n):
        ids = rng.integers(100, vocab, tokens * 2).tolist()
        text = rt.tokenizer.decode(ids, skip_special_tokens=True)
        texts.append(rt.tokenizer.decode(rt.encode(text)[:tokens], skip_special_tokens=True))
    return texts


def counters(rt: sgl.Runtime) -> tuple[int, int, int]:
    m = rt.engine.metrics()
    return m["prompt_tokens_total"], m["cached_prompt_tokens_total"], m["generated_tokens_total"]


def measured(rt: sgl.Runtime, fn) -> dict[str, float]:
    rt.engine.flush_cache()
    before = counters(rt)
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    prompt, cached, generated = (a - b for a, b in zip(counters(rt), before))
    return {"seconds": seconds, "prompt": prompt, "cached": cached, "generated": generated,
            "out_tok_s": generated / seconds, "hit_rate": cached / prompt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="checkpoint path, or 'tiny' (a random qwen2)")
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = args.model
    if path == "tiny":
        from xinf_sglang.runtime.testing.tiny_model import make_tiny_model

        path = str(make_tiny_model(Path(tempfile.mkdtemp()), "qwen2", 0))
    rt = sgl.Runtime(model_path=path, device="cpu", max_total_tokens=65536)
    recorder = Recording(rt)
    docs = documents(rt, args.inputs, args.prefix_len)
    inputs = [{"document": d, "branches": args.branches, "output_len": args.output_len} for d in docs]
    print(f"model {args.model}: {args.inputs} inputs x {args.branches} branches, document "
          f"{statistics.mean(len(rt.encode(d)) for d in docs):.0f} tokens, {args.output_len} output tokens per branch", flush=True)
    fork_heavy.run_batch(inputs[:2], backend=recorder, temperature=0)  # warm-up (also fills recorder once)
    recorder.requests.clear()
    fork_heavy.run_batch(inputs, backend=recorder, temperature=0)
    print(f"recorded the program's requests ({len(recorder.requests)}); timing A and B now", flush=True)
    requests = list(recorder.requests)
    runs: dict[str, list[dict[str, float]]] = {"A run_batch": [], "B one by one": []}
    for repeat in range(args.repeats):
        for name, fn in (("A run_batch", lambda: fork_heavy.run_batch(inputs, backend=rt, temperature=0)),
                         ("B one by one", lambda: [rt.generate(t, p) for t, p in requests])):
            runs[name].append(measured(rt, fn))
            print(f"  round {repeat + 1}/{args.repeats} {name}: {runs[name][-1]['seconds']:.1f} s", flush=True)
    print(f"{len(requests)} requests per run; {args.repeats} runs each, A and B interleaved")
    for name, results in runs.items():
        tok_s = [r["out_tok_s"] for r in results]
        progs = [args.inputs / r["seconds"] for r in results]
        print(f"{name:13s} output tok/s min {min(tok_s):7.1f} median {statistics.median(tok_s):7.1f} | programs/s "
              f"min {min(progs):6.2f} median {statistics.median(progs):6.2f} | cache hit rate "
              f"{statistics.median(r['hit_rate'] for r in results):.1%} ({results[0]['cached']}/{results[0]['prompt']})")
    rt.shutdown()


if __name__ == "__main__":
    main()
