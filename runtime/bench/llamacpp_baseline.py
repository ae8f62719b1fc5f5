"""The llama.cpp baseline of ``sglite bench offline --baseline llamacpp``: xllamacpp, the binding Xinference's
llama.cpp engine uses, fed an F32 GGUF of the very checkpoint folder sglite runs (`gguf_writer.cached_gguf`).

Driven the way Xinference 4.1 drives it (``xinference/model/llm/llama_cpp/core.py``): ``CommonParams`` ->
``Server``, then ``Server.handle_completions(request, callback)`` from a pool of Python threads (the call blocks
its thread until the completion is done and releases the GIL, so requests run concurrently). The server gets one
slot per concurrent request (``n_parallel``), continuous batching, ``n_ctx = n_parallel * per-slot context`` (the
longest prompt plus its output), the prompt cache on, and as many threads as sglite's torch uses. Requests carry
token ids (llama.cpp evaluates them as given, no BOS added: checked on each reply's ``prompt_tokens``), greedy
(``temperature 0``), ``n_predict`` = the output length with ``ignore_eos``, so both engines see the same prompts
and produce the same number of tokens. `generated_ids` reads the token ids of a completion (untimed checks: the
F32 GGUF's greedy output equals HF's).
"""

from __future__ import annotations

import gc
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GPU_ALL_LAYERS = 0x7FFFFFFF  # llama.cpp caps it at the model's layer count


@dataclass(frozen=True)
class LlamaCppOptions:
    """How the server is sized: ``parallel`` slots (0 = one per prompt), ``threads`` CPU threads, GPU offload."""

    parallel: int
    threads: int
    gpu: bool = False


@dataclass(frozen=True)
class Completion:
    """What one request produced, in llama.cpp's token accounting."""

    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int


def start_server(gguf: Path, n_parallel: int, slot_ctx: int, options: LlamaCppOptions) -> Any:
    """An in-process llama.cpp server on ``gguf`` with ``n_parallel`` slots of ``slot_ctx`` tokens each."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_parallel = n_parallel
    params.n_ctx = n_parallel * slot_ctx
    params.cont_batching = True
    params.cache_prompt = True
    params.warmup = False  # the benchmark warms up on its own request
    params.cpuparams.n_threads = options.threads
    params.cpuparams_batch.n_threads = options.threads
    params.n_gpu_layers = GPU_ALL_LAYERS if options.gpu else 0
    params.verbosity = -1
    return xllamacpp.Server(params)


def _request(prompt: list[int], max_tokens: int) -> dict:
    return {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "ignore_eos": True, "cache_prompt": True}


def complete(server: Any, prompt: list[int], max_tokens: int) -> Completion:
    """One greedy completion of the token ids ``prompt``, exactly ``max_tokens`` long (EOS ignored), through
    ``Server.handle_completions`` (the OpenAI-style reply: text and usage, no token ids).

    Raises:
        RuntimeError: llama.cpp answered with an error.
    """
    replies: list[Any] = []
    server.handle_completions({**_request(prompt, max_tokens), "stream": False}, replies.append)
    reply = replies[0] if replies else {"error": "no reply"}
    if isinstance(reply, list):
        reply = reply[0]
    if "error" in reply:
        raise RuntimeError(f"llama.cpp: {reply['error']}")
    usage = reply["usage"]
    return Completion(usage["completion_tokens"], usage["prompt_tokens"],
                      (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))


def generated_ids(server: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """The token ids of one greedy completion, for checks (not timed): llama.cpp's native ``/completion`` over the
    server's local HTTP port with ``return_tokens`` (the OpenAI-style reply has only text, and its logprobs are
    null when the text is not valid UTF-8)."""
    body = json.dumps({**_request(prompt, max_tokens), "return_tokens": True}).encode()
    request = urllib.request.Request(f"{server.listening_address}/completion", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.loads(reply.read())["tokens"]


def run_all(server: Any, prompts: list[list[int]], output_lens: list[int], workers: int) -> list[Completion]:
    """Every prompt submitted at once from ``workers`` threads; the completions in prompt order."""
    results: list[Completion | None] = [None] * len(prompts)
    last = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(complete, server, p, n): i for i, (p, n) in enumerate(zip(prompts, output_lens))}
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if time.perf_counter() - last > 5.0:
                last = time.perf_counter()
                print(f"[bench] llama.cpp: {done}/{len(prompts)} requests done", flush=True)
    return results  # type: ignore[return-value]


def timed_run(gguf: Path, n_parallel: int, slot_ctx: int, options: LlamaCppOptions, prompts: list[list[int]],
              output_lens: list[int], warmup: list[int]) -> tuple[tuple[float, list[Completion]], float]:
    """Start a server, warm it up on ``warmup``, time every prompt at once: ``((seconds, completions), the
    process's age when the server was ready)``. Plain arguments and no torch, so that `isolated.run_isolated`
    can run it in a process that holds only llama.cpp."""
    from .isolated import process_age

    server = start_server(gguf, n_parallel, slot_ctx, options)
    ready_age = process_age()
    try:
        complete(server, warmup, 4)
        start = time.perf_counter()
        outs = run_all(server, prompts, output_lens, workers=n_parallel)
        seconds = time.perf_counter() - start
    finally:
        del server
        gc.collect()
    return (seconds, outs), ready_age


def check_completions(completions: list[Completion], prompts: list[list[int]], output_lens: list[int]) -> None:
    """llama.cpp evaluated each prompt as given (no BOS added, no truncation) and produced each output length."""
    for i, (c, p, n) in enumerate(zip(completions, prompts, output_lens)):
        if c.prompt_tokens != len(p) or c.completion_tokens != n:
            raise RuntimeError(f"llama.cpp request {i}: {c.prompt_tokens} prompt tokens for {len(p)} given, "
                               f"{c.completion_tokens} generated for {n} asked")
