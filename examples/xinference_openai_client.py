"""Talk to an sglite model served by Xinference with the OpenAI client: chat, streaming, completions, metrics.

Start a server and a model first, e.g. ``sglite demo --keep-serving`` (tiny offline model ``sglite-demo``), or:

    xinference-local --host 127.0.0.1 --port 9997
    xinference launch --model-engine sglite --model-name qwen2.5-instruct --model-path /path/to/Qwen2.5-0.5B-Instruct \
        --mem_fraction_static 0.8 --context-length 8192 -e http://127.0.0.1:9997

Then: ``python examples/xinference_openai_client.py --model sglite-demo``.
"""

from __future__ import annotations

import argparse

from openai import OpenAI

from xinf_sglang.serving.metrics import get_runtime_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="http://127.0.0.1:9997")
    parser.add_argument("--model", default="sglite-demo", help="the model uid")
    args = parser.parse_args()

    client = OpenAI(base_url=args.endpoint + "/v1", api_key="not-needed")
    messages = [{"role": "user", "content": "Write one sentence about caching."}]

    reply = client.chat.completions.create(model=args.model, messages=messages, max_tokens=48, temperature=0.7)
    print("chat:", reply.choices[0].message.content)
    print("usage:", reply.usage)

    print("stream: ", end="")
    for chunk in client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=48, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:  # the last chunk: usage, with the prompt tokens served from the prefix cache
            print(f"\n  cached prompt tokens: {chunk.usage.prompt_tokens_details.cached_tokens}")

    completion = client.completions.create(model=args.model, prompt="def fibonacci(n):", max_tokens=32)
    print("completion:", completion.choices[0].text)

    m = get_runtime_metrics(args.endpoint, args.model)
    print(
        f"runtime: {m['running_requests']} running, KV {m['kv_free_tokens']}/{m['kv_total_tokens']} free, "
        f"prefix cache hit rate {m['cache_hit_rate']:.0%}"
    )


if __name__ == "__main__":
    main()
