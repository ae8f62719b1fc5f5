"""The vLLM side of ``sglite bench offline --baseline vllm``, run as a script by the interpreter of vLLM's own
virtualenv (vLLM pins its own torch and transformers, so it never shares sglite's): ``python vllm_worker.py IN OUT``.

Reads the job from the JSON file IN (model folder, dtype, token-id prompts, output lengths, a warm-up prompt,
context length), builds ``vllm.LLM`` the way a CPU user of vLLM does (eager, prefix caching on, the KV space set
by ``VLLM_CPU_KVCACHE_SPACE`` in the environment the caller passes), generates greedy completions of exactly the
asked lengths (EOS ignored), all prompts submitted at once, and writes to OUT: the seconds of the timed generate,
the process age when the engine was ready, and per request the prompt length vLLM saw, the generated token ids
and its cached prompt tokens. Standard library and vLLM only: nothing of sglite is importable there.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _process_age() -> float:
    """Seconds since this process started (Linux: /proc/self/stat's start time in clock ticks since boot)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def main(job_path: str, out_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], tokenizer=job["model"], dtype=job["dtype"], enforce_eager=True,
              enable_prefix_caching=True, max_model_len=job["max_model_len"], seed=0,
              max_num_seqs=job["max_num_seqs"], skip_tokenizer_init=True)
    ready_age = _process_age()

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)

    llm.generate([TokensPrompt(prompt_token_ids=job["warmup"])], params(4), use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    start = time.perf_counter()
    outs = llm.generate(prompts, [params(n) for n in job["output_lens"]], use_tqdm=False)
    seconds = time.perf_counter() - start
    rows = [{"prompt_tokens": len(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids),
             "cached_tokens": o.num_cached_tokens or 0} for o in outs]
    with open(out_path, "w") as f:
        json.dump({"seconds": seconds, "ready_age": ready_age, "completions": rows}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
