"""Issue 20 points 4-5: the plugin through a real ``xinference-local`` on the GPU.

A random-weight Llama (tiny_model with a ~100M-parameter config, its ChatML tokenizer) is registered and launched
with ``--model-engine sglite``; then a chat (plain and streamed), a JSON-schema chat (parsed and checked), the
runtime metrics (a CUDA device, graphs on), and ``sglite bench serve --sweep`` over the REST API with its plots.
Rows go to $WAVE_ROWS (scripts/wave_rows.py). Usage (on the device, after ``gpu_wave.sh`` installed /tmp/site)::

    python3 scripts/gpu_xinference.py --out $OUT --sweep 1,16,64,256
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wave_rows import add_row  # noqa: E402

from xinf_sglang.custom_model import custom_llm_family  # noqa: E402
from xinf_sglang.metrics import get_runtime_metrics  # noqa: E402
from xinf_sglang.runtime.tiny_model import make_tiny_model  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: the installed xinf_sglang stays first
from tests.xinference_server import http, running_server  # noqa: E402

UID = "gpu-llama"
MODEL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
             intermediate_size=2048)
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def launch(endpoint: str, model_dir: Path) -> None:
    family = custom_llm_family(model_dir, "gpu-llama-family", chat_template=True)
    status, body = http("POST", endpoint + "/v1/model_registrations/LLM", {"model": json.dumps(family), "persist": True})
    assert status == 200, body
    started = time.monotonic()
    status, body = http("POST", endpoint + "/v1/models", {
        "model_name": "gpu-llama-family", "model_engine": "sglite", "model_uid": UID, "mem_fraction_static": "0.5",
    }, timeout=600)
    add_row("xinference launch --model-engine sglite (GPU)", "PASS" if status == 200 else "FAIL",
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
    add_row("xinference chat (GPU): streamed == plain at T=0", "PASS" if same else "FAIL",
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
    add_row("xinference JSON-schema chat (GPU)", "PASS" if ok else "FAIL", repr(text)[:120])
    m = get_runtime_metrics(endpoint, UID, timeout=60)
    keys = ("device", "cuda_graphs", "kv_total_tokens", "generated_tokens_total", "decode_steps_total")
    add_row("xinference runtime metrics (GPU)", "PASS" if m.get("generated_tokens_total", 0) > 0 else "FAIL",
            ", ".join(f"{k}={m.get(k)}" for k in keys))


def serve_sweep(endpoint: str, model_dir: Path, out: Path, sweep: str, prompts: int, output_len: int) -> None:
    results = out / "serve.jsonl"
    cmd = [shutil.which("sglite") or "sglite", "bench", "serve", "--base-url", endpoint, "--model", UID,
           "--tokenizer", str(model_dir), "--sweep", sweep, "--num-prompts", str(prompts), "--input-len", "512",
           "--output-len", str(output_len), "--output-file", str(results), "--plot-dir", str(out / "plots")]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0 or not results.exists():
        add_row("sglite bench serve through Xinference (GPU)", "FAIL", f"exit {rc}")
        return
    for line in results.read_text().splitlines():
        r = json.loads(line)
        add_row(f"bench serve via Xinference c={r.get('max_concurrency')}", "PASS" if not r.get("failed") else "FAIL",
                f"{r.get('output_throughput', 0):.0f} out tok/s, TTFT median {r.get('median_ttft_ms', 0):.1f} ms, "
                f"ITL median {r.get('median_itl_ms', 0):.2f} ms, {r.get('completed')} done, {r.get('failed')} failed")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/sglite-wave"))
    p.add_argument("--sweep", default="1,16,64,256")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-xinf-"))
    model_dir = make_tiny_model(work / "model", "llama", 0, **MODEL)
    (work / "home").mkdir()
    with running_server(work / "home") as server:
        try:
            launch(server.endpoint, model_dir)
            chats(server.endpoint)
            serve_sweep(server.endpoint, model_dir, args.out, args.sweep, args.num_prompts, args.output_len)
        finally:
            shutil.copy(server.log, args.out / "xinference.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
