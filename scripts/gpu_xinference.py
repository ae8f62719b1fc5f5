"""Issue 20 points 4-5: the plugin through a real ``xinference-local`` on the GPU.

A random-weight Llama (tiny_model with a ~100M-parameter config, its ChatML tokenizer) is registered and launched
with ``--model-engine sglite``; then a chat (plain and streamed), a JSON-schema chat (parsed and checked), the
runtime metrics, and ``sglite bench serve``'s sweep over the REST API; then the model is deleted and the very same
workloads run on an Engine in this process (engine-direct: what REST adds to TTFT and ITL), plots of both.
Rows go to $WAVE_ROWS (scripts/wave_rows.py). Usage (on the device, after ``gpu_wave.sh`` installed /tmp/site)::

    python3 scripts/gpu_xinference.py --out $OUT --sweep 1,16,64,256
    .venv/bin/python scripts/gpu_xinference.py --device cpu --small --sweep 1,4 --num-prompts 8 --input-len 32 \
        --output-len 8 --out /tmp/gx     # CPU smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wave_rows import add_row  # noqa: E402

from xinf_sglang.registration.custom_model import custom_llm_family  # noqa: E402
from xinf_sglang.serving.metrics import get_runtime_metrics  # noqa: E402
from xinf_sglang.runtime.testing.tiny_model import make_tiny_model  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: the installed xinf_sglang stays first
from tests.xinference_server import http, running_server  # noqa: E402

UID = "gpu-llama"
MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
             intermediate_size=2048)
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


def launch(endpoint: str, model_dir: Path) -> None:
    family = custom_llm_family(model_dir, "gpu-llama-family", chat_template=True)
    status, body = http("POST", endpoint + "/v1/model_registrations/LLM", {"model": json.dumps(family), "persist": True})
    assert status == 200, body
    started = time.monotonic()
    status, body = http("POST", endpoint + "/v1/models", {
        "model_name": "gpu-llama-family", "model_engine": "sglite", "model_uid": UID, "mem_fraction_static": "0.5",
    }, timeout=600)
    add_row("xinference launch --model-engine sglite", "PASS" if status == 200 else "FAIL",
            f"{time.monotonic() - started:.0f} s" if status == 200 else str(body)[:300])
    assert status == 200, body


def chats(endpoint: str) -> None:
    import openai

    client = openai.OpenAI(base_url=endpoint + "/v1", api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Say something about GPUs."}]
    plain = client.chat.completions.create(model=UID, messages=messages, max_tokens=32, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=UID, messages=messages, max_tokens=32, temperature=0, stream=True) if c.choices)
    same = plain.choices[0].message.content == streamed
    add_row("xinference chat: streamed == plain at T=0", "PASS" if same else "FAIL",
            f"{plain.usage.completion_tokens} tokens, finish {plain.choices[0].finish_reason}")
    reply = client.chat.completions.create(model=UID, messages=[{"role": "user", "content": "A person as JSON."}],
                                           max_tokens=64, temperature=0, response_format={
                                               "type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    text = reply.choices[0].message.content
    try:
        person = json.loads(text)
        ok = set(person) == {"name", "age"} and isinstance(person["age"], int)
    except ValueError:
        ok = False
    add_row("xinference JSON-schema chat", "PASS" if ok else "FAIL", repr(text)[:120])
    m = get_runtime_metrics(endpoint, UID, timeout=60)
    keys = ("device", "cuda_graphs", "kv_total_tokens", "generated_tokens_total", "decode_steps_total")
    add_row("xinference runtime metrics", "PASS" if m.get("generated_tokens_total", 0) > 0 else "FAIL",
            ", ".join(f"{k}={m.get(k)}" for k in keys))


def serve_options(endpoint: str, model_dir: Path, out: Path, args: argparse.Namespace):
    """The ``sglite bench serve`` options of the sweep (the same parser as the command's)."""
    from xinf_sglang.tools.bench_serve.options import add_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--base-url", endpoint, "--model", UID, "--tokenizer", str(model_dir), "--sweep", args.sweep,
            "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len), "--output-len",
            str(args.output_len), "--output-file", str(out / "serve.jsonl"), "--plot-dir", str(out / "plots")]
    print("bench serve", " ".join(argv), flush=True)
    return options_from_args(parser.parse_args(argv), None)


def rest_sweep(options) -> list:
    """``sglite bench serve``'s own sweep (warm-up, one workload per level) against the served model."""
    from xinf_sglang.tools.bench_serve.command import bench
    from xinf_sglang.tools.bench_serve.text import RandomText, load_tokenizer

    return asyncio.run(bench(options, RandomText(load_tokenizer(options.tokenizer))))


def direct_sweep(options, model_dir: Path, device: str) -> list:
    """The very workloads of :func:`rest_sweep` (same seeds per level) on an Engine in this process, timed by
    ``bench_serve.direct.send_direct`` as the HTTP client times the server; warmed up the same way."""
    from xinf_sglang.runtime import Engine, EngineConfig
    from xinf_sglang.tools.bench_serve.datasets import make_workload, warmup_workload
    from xinf_sglang.tools.bench_serve.direct import send_direct
    from xinf_sglang.tools.bench_serve.runner import RunSpec, run_workload
    from xinf_sglang.tools.bench_serve.stats import summarize
    from xinf_sglang.tools.bench_serve.text import RandomText, load_tokenizer

    text = RandomText(load_tokenizer(options.tokenizer))
    engine = Engine(EngineConfig(model_path=str(model_dir), device=device, mem_fraction_static=0.5))
    try:
        warm = warmup_workload(text, options.warmup_requests, options.seed, "completions")
        asyncio.run(run_workload(engine, warm, RunSpec("direct", 1, math.inf, 0), sender=send_direct))
        results = []
        for index, level in enumerate(options.concurrency_levels):
            workload = make_workload(options.dataset, text, options.seed + index)
            spec = RunSpec("engine-direct", level, options.request_rate, options.seed + index)
            run = asyncio.run(run_workload(engine, workload, spec, sender=send_direct))
            results.append(summarize(run, "engine-direct", "baseline", workload.dataset, options.request_rate, level))
            print(f"engine-direct c={level}: {results[-1].completed} done", flush=True)
        return results
    finally:
        engine.shutdown()


def compare(rest: list, direct: list, options) -> None:
    """One row per level: REST / engine-direct for TTFT and ITL medians (goal: <= 1.2x at 64 streams)."""
    from xinf_sglang.tools.bench_serve.plots import write_plots

    for r, d in zip(rest, direct):
        ttft, itl = r.ttft.median / max(d.ttft.median, 1e-9), r.itl.median / max(d.itl.median, 1e-9)
        ok = r.failed == 0 and d.failed == 0 and (r.max_concurrency != 64 or max(ttft, itl) <= 1.2)
        add_row(f"REST vs engine-direct c={r.max_concurrency}", "PASS" if ok else "FAIL",
                f"out tok/s {r.total_output_tokens / r.duration:.0f} vs {d.total_output_tokens / d.duration:.0f}; "
                f"TTFT median {r.ttft.median:.1f} vs {d.ttft.median:.1f} ms ({ttft:.2f}x); ITL median "
                f"{r.itl.median:.2f} vs {d.itl.median:.2f} ms ({itl:.2f}x); failed {r.failed}/{d.failed}")
    for path in write_plots([*rest, *direct], options.plot_dir):
        print("wrote", path, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/sglite-wave"))
    p.add_argument("--sweep", default="1,16,64,256")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--device", default="cuda", help="cuda; cpu for a smoke run of this script")
    p.add_argument("--small", action="store_true", help="tiny_model's default config (a CPU smoke run)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-xinf-"))
    model_dir = make_tiny_model(work / "model", "llama", 0, **({} if args.small else MODEL))
    (work / "home").mkdir()
    with running_server(work / "home") as server:
        try:
            launch(server.endpoint, model_dir)
            chats(server.endpoint)
            options = serve_options(server.endpoint, model_dir, args.out, args)
            rest = rest_sweep(options)
            http("DELETE", f"{server.endpoint}/v1/models/{UID}", timeout=300)  # its GPU memory, for the engine
            compare(rest, direct_sweep(options, model_dir, args.device), options)
        finally:
            shutil.copy(server.log, args.out / "xinference.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
