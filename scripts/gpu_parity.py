"""GPU parity: on CUDA, the runtime's greedy tokens on the tiny models (float32) equal HF transformers' on CUDA, with
the Triton backend with and without CUDA graphs, with the torch reference backend, with chunked prefill and with
retraction; log probabilities equal HF's log_softmax; n > 1 reproduces. Prints one table; exits 1 on any failure.

Sections (``--sections``, default all):

- ``tokens``: greedy tokens identical to HF ``generate`` (float32) in every regime of ``REGIMES``.
- ``half``: float16 / bfloat16 (where decode runs the fused skinny-linear kernels of kernels/linear.py) against HF
  generate in the same dtype. Bit-identical tokens are not expected (different kernels round differently and a
  random tiny model has near-ties), so the row reports how many leading tokens agree. float16 rows pass when at
  least 90% of all generated tokens lie in the agreeing prefixes (a wrong kernel diverges at once); bfloat16 rows
  are reported only: with an 8-bit mantissa the near-ties of a random model flip often (measured on an H200:
  66-88% agreeing, against 94-100% for float16 with the same kernels).
- ``logprobs``: greedy decode with ``top_logprobs=5`` and ``prompt_logprobs_start=0`` on every other prompt of the
  batch (the others ask for nothing, so the gather of the asking rows runs), CUDA graphs + overlap, float32:
  output and prompt logprobs and the top-5 values against ``log_softmax`` of HF's logits on the same GPU over
  prompt + output. Tolerance ``LOGPROB_TOL`` absolute (the CPU tests' 1e-4): the two sides differ in summation
  order only. Top-5 alternatives are compared by value (HF's k largest) and each id by its HF value, so exact ties
  may come in either order.
- ``n``: ``n=3`` greedy: each of the 3 sequences of each prompt identical to HF's greedy tokens; ``n=3`` seeded
  (temperature 0.8, seed 1234), the same batch twice: the same 3 sequences both times, and the siblings differ.

    python scripts/gpu_parity.py                       # everything, on CUDA
    python scripts/gpu_parity.py --device cpu --quick  # the same checks on CPU, llama only, two regimes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from wave_rows import add_row  # noqa: E402  (scripts/ is this script's sys.path[0])
from xinf_sglang.runtime import Engine, EngineConfig, SamplingParams  # noqa: E402
from xinf_sglang.runtime.bench.offline import make_workload  # noqa: E402
from xinf_sglang.runtime.testing.tiny_model import make_tiny_model  # noqa: E402

NEW_TOKENS = 48
LOGPROB_TOL = 1e-4
TOP = 5
REGIMES = {
    "graphs + overlap": dict(),
    "graphs, no overlap": dict(overlap_schedule="off"),
    "triton, no graphs": dict(disable_cuda_graph=True),
    "torch reference": dict(attention_backend="torch", disable_cuda_graph=True),
    "chunked prefill 16": dict(chunked_prefill_size=16, max_prefill_tokens=32),
    "retraction (pool 260)": dict(max_total_tokens=260),
}
QUICK_REGIMES = ("graphs + overlap", "retraction (pool 260)")
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SECTIONS = ("tokens", "half", "logprobs", "n")


def greedy(new_tokens: int = NEW_TOKENS, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True, **extra)


class Case:
    """One tiny model, its prompts and HF's float32 references on ``device``."""

    def __init__(self, model_dir: str, arch: str, device: str, prompts: list[list[int]]) -> None:
        self.model_dir, self.arch, self.device, self.prompts = model_dir, arch, device, prompts
        self._hf: dict[torch.dtype, torch.nn.Module] = {}
        self.refs = self.hf_generate(torch.float32)

    def hf(self, dtype: torch.dtype) -> torch.nn.Module:
        if dtype not in self._hf:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).to(self.device).eval()
            model.generation_config.eos_token_id = None
            self._hf[dtype] = model
        return self._hf[dtype]

    def hf_generate(self, dtype: torch.dtype) -> list[list[int]]:
        outs = []
        with torch.no_grad():
            for p in self.prompts:
                g = self.hf(dtype).generate(torch.tensor([p], device=self.device), max_new_tokens=NEW_TOKENS,
                                            do_sample=False, pad_token_id=0)
                outs.append(g[0, len(p):].tolist())
        return outs

    def hf_logprobs(self, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), V] float32 log_softmax of HF's logits: row q scores token q + 1."""
        with torch.no_grad():
            logits = self.hf(torch.float32)(torch.tensor([tokens], device=self.device)).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def engine(self, dtype: str = "float32", **extra) -> Engine:
        return Engine(EngineConfig(model_path=self.model_dir, device=self.device, dtype=dtype,
                                   debug_invariants=True, **extra))


def report(case: Case, regime: str, ok: bool, detail: str) -> int:
    add_row(f"parity {case.arch} {regime}", "PASS" if ok else "FAIL", detail)
    return 0 if ok else 1


def check_tokens(case: Case, regimes: Sequence[str]) -> int:
    failures = 0
    for name in regimes:
        with case.engine(**REGIMES[name]) as engine:
            outs = engine.generate(input_ids=case.prompts, sampling_params=greedy())
            m, problems = engine.metrics(), engine.check_invariants()
        same = sum(o.token_ids == r for o, r in zip(outs, case.refs))
        retr = m["retractions"]
        ok = same == len(case.prompts) and not problems and (retr > 0 or "retraction" not in name)
        failures += report(case, name, ok, f"{same}/{len(case.prompts)} identical to HF float32, {retr} "
                                           f"retractions, {m['overlapped_steps']} overlapped steps {problems or ''}")
    return failures


def check_half(case: Case) -> int:
    failures = 0
    for dtype_name, dtype in HALF.items():
        refs = case.hf_generate(dtype)
        with case.engine(dtype_name) as engine:
            outs = engine.generate(input_ids=case.prompts, sampling_params=greedy())
            problems = engine.check_invariants()
        agree = [next((i for i, (a, b) in enumerate(zip(o.token_ids, r)) if a != b), NEW_TOKENS)
                 for o, r in zip(outs, refs)]
        bf16 = dtype is torch.bfloat16
        ok = (sum(agree) >= 0.9 * NEW_TOKENS * len(case.prompts) or bf16) and not problems
        same = sum(a == NEW_TOKENS for a in agree)
        detail = (f"{same}/{len(case.prompts)} identical to HF {dtype_name}, agreeing prefixes "
                  f"{sum(agree)}/{NEW_TOKENS * len(case.prompts)} tokens{' (reported only)' if bf16 else ''} "
                  f"{problems or ''}")
        failures += report(case, f"{dtype_name} vs HF {dtype_name}", ok, detail)
    return failures


def logprob_errors(entries, rows: torch.Tensor, tokens: Sequence[int]) -> tuple[float, int]:
    """(max |runtime - HF| over the entries' logprobs and top values, number of bad entries) for entries scoring
    ``tokens``, entry j against ``rows[j]``."""
    worst, bad = 0.0, 0
    for entry, row, tok in zip(entries, rows, tokens):
        want_top = row.topk(len(entry.top)).values.tolist() if entry.top else []
        errs = [abs(entry.logprob - row[tok].item())]
        errs += [abs(v - w) for (_, v), w in zip(entry.top, want_top)]  # the k largest values, in order
        errs += [abs(v - row[t].item()) for t, v in entry.top]  # each alternative's own value
        bad += entry.token_id != tok or len(entry.top) != len(want_top)
        worst = max(worst, *errs)
    return worst, bad


def check_logprobs(case: Case) -> int:
    asks = greedy(top_logprobs=TOP, prompt_logprobs_start=0)
    params = [asks if i % 2 == 0 else greedy() for i in range(len(case.prompts))]
    with case.engine() as engine:
        outs = engine.generate(input_ids=case.prompts, sampling_params=params)
        problems = engine.check_invariants()
    worst, bad, scored = 0.0, 0, 0
    for i, (prompt, out) in enumerate(zip(case.prompts, outs)):
        if i % 2:
            bad += out.output_logprobs is not None or out.prompt_logprobs is not None
            continue
        ref = case.hf_logprobs(prompt + out.token_ids)
        bad += out.token_ids != case.refs[i] or len(out.output_logprobs) != len(out.token_ids)
        w1, b1 = logprob_errors(out.output_logprobs, ref[len(prompt) - 1:], out.token_ids)
        w2, b2 = logprob_errors(out.prompt_logprobs, ref[:len(prompt) - 1], prompt[1:])
        worst, bad, scored = max(worst, w1, w2), bad + b1 + b2, scored + len(out.token_ids) + len(prompt) - 1
    ok = worst < LOGPROB_TOL and bad == 0 and not problems
    return report(case, "logprobs vs HF log_softmax", ok,
                  f"{scored} positions (output + prompt, top-{TOP}), max abs err {worst:.2e} (tol {LOGPROB_TOL:g}), "
                  f"{bad} mismatched entries {problems or ''}")


def check_n(case: Case) -> int:
    n = 3
    seeded = SamplingParams(n=n, temperature=0.8, seed=1234, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    with case.engine() as engine:
        many = engine.generate(input_ids=case.prompts, sampling_params=greedy(n=n))
        first = engine.generate(input_ids=case.prompts, sampling_params=seeded)
        again = engine.generate(input_ids=case.prompts, sampling_params=seeded)
        problems = engine.check_invariants()
    same = sum(o.token_ids == case.refs[k // n] and o.index == k % n for k, o in enumerate(many))
    failures = report(case, "n=3 greedy vs HF", same == n * len(case.prompts) and not problems,
                      f"{same}/{n * len(case.prompts)} sequences identical to HF greedy {problems or ''}")
    repeat = sum(a.token_ids == b.token_ids and a.index == b.index for a, b in zip(first, again))
    distinct = sum(len({tuple(o.token_ids) for o in first[k:k + n]}) == n for k in range(0, len(first), n))
    ok = repeat == len(first) == n * len(case.prompts) and distinct > 0
    return failures + report(case, "n=3 seeded reproducible", ok,
                             f"{repeat}/{len(first)} sequences equal on the second run; {distinct}/{len(case.prompts)} "
                             f"prompts with 3 distinct samples")


def run_arch(arch: str, tmp: str, args: argparse.Namespace) -> int:
    model_dir = str(make_tiny_model(os.path.join(tmp, arch), arch))
    # lengths spread evenly over 3..150, as in tests/test_parity.py (the retraction regime relies on it)
    pool = make_workload(1024, 1, (2000, 2000), (1, 1), seed=1).prompts[0]
    prompts = [pool[i * 7 : i * 7 + 3 + 147 * i // 11] for i in range(12)]
    case = Case(model_dir, arch, args.device, prompts)
    regimes = QUICK_REGIMES if args.quick else tuple(REGIMES)
    checks = {"tokens": lambda: check_tokens(case, regimes), "half": lambda: check_half(case),
              "logprobs": lambda: check_logprobs(case), "n": lambda: check_n(case)}
    return sum(checks[s]() for s in args.sections)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="llama only, two token regimes (a CPU smoke run)")
    p.add_argument("--sections", type=lambda s: s.split(","), default=list(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; allowed: {','.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device (use --device cpu for the CPU smoke run)")
    if args.device == "cpu" and "half" in args.sections:
        args.sections.remove("half")  # the fused half-precision kernels are CUDA-only
    archs = ("llama",) if args.quick else ("llama", "qwen2", "qwen3")
    with tempfile.TemporaryDirectory() as tmp:
        failures = sum(run_arch(arch, tmp, args) for arch in archs)
    print(f"gpu_parity: {failures} failing row(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
