"""Streaming through a real ``xinference-local`` (issue 29): coalesced chunks and ``stream_interval``.

The tiny Qwen2 checkpoint is served as the built-in ``qwen2.5-instruct`` family (chat, tools, Qwen's tool parser).
Every streamed answer is compared with the same request not streamed (greedy, so the texts must be equal):

* a slow reader: the model actor's stream pulled the way Xinference's REST process pulls it (one xoscar
  ``__xoscar_next__`` per chunk) with a pause after the first chunk, so the engine runs ahead and the backlog must
  come back merged; the OpenAI client cannot force this, as its socket buffers hide a slow reader from the server;
* ``stream_interval`` 1 and 4 (Xinference's request field, sent by the OpenAI client in ``extra_body``): the chunk
  sizes, counted from the streamed logprobs, follow SGLang's rule (the first chunk at once, then >= k tokens each,
  the last whatever is left);
* ``n`` = 2 and a tool call parsed from merged chunks.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("xinference")

from .xinference_server import LAUNCH_TIMEOUT, Server, http, openai_client, terminate  # noqa: E402

UID = "tiny-streaming"
PROMPT = "Streaming is"
ASK = [{"role": "user", "content": "Tell me about streams."}]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def model(server: Server, qwen2_dir: Path) -> str:
    body = {"model_name": "qwen2.5-instruct", "model_engine": "sglite", "model_uid": UID,
            "model_path": str(qwen2_dir), "mem_fraction_static": "0.5", "context_length": 1024,
            "stream_interval": "1"}
    status, reply = http("POST", server.endpoint + "/v1/models", body, timeout=LAUNCH_TIMEOUT)
    assert status == 200, f"{reply}\n{server.log_tail()}"
    yield UID
    terminate(server, UID)


def _plain_completion(c: Any, model: str) -> Any:
    return c.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=0)


async def _slow_pull(server: Server, model: str, pause: float) -> list[dict[str, Any]]:
    """A streamed completion pulled from the model actor as the REST process pulls it, pausing after the first
    chunk; the chunk dicts."""
    import xoscar as xo

    from xinf_sglang.serving.metrics import WORKER_UID, model_replicas

    [row] = await asyncio.to_thread(model_replicas, server.endpoint, model)
    worker = await xo.actor_ref(address=row["worker_address"], uid=WORKER_UID)
    actor = await worker.get_model(row["replica_model_uid"])
    config = {"stream": True, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0,
              "stream_options": {"include_usage": True}}
    chunks = []
    async for sse in await actor.generate(PROMPT, config):
        chunks.extend(json.loads(part) for part in re.findall(rb"data: (.*)\r?\n", sse))
        if len(chunks) == 1:
            await asyncio.sleep(pause)  # the engine keeps generating meanwhile
    return chunks


def test_a_slow_reader_gets_merged_chunks_with_the_same_text(server: Server, model: str) -> None:
    plain = _plain_completion(openai_client(server), model)
    chunks = asyncio.run(_slow_pull(server, model, pause=1.0))
    texts = [ch["choices"][0]["text"] for ch in chunks if ch["choices"]]
    tokens = [len(ch["choices"][0]["logprobs"]["tokens"]) for ch in chunks if ch["choices"]]
    assert "".join(texts) == plain.choices[0].text
    assert sum(tokens) == MAX_TOKENS and max(tokens[1:]) > 1, tokens  # the backlog came merged
    assert chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "length"


@pytest.mark.parametrize("interval", [1, 4])
def test_stream_interval_keeps_the_text_and_sizes_the_chunks(server: Server, model: str, interval: int) -> None:
    c = openai_client(server)
    plain = _plain_completion(c, model)
    chunks = list(c.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"stream_interval": interval}))
    choices = [ch.choices[0] for ch in chunks if ch.choices]
    sizes = [len(ch.logprobs.tokens) for ch in choices]
    assert "".join(ch.text for ch in choices) == plain.choices[0].text
    # The first chunk is never held back for the interval (it may hold several tokens when the engine ran ahead of
    # the first pull); every later one but the last holds at least `interval`.
    assert sum(sizes) == MAX_TOKENS and all(s >= interval for s in sizes[1:-1]), sizes
    assert len(sizes) <= 1 + -(-(MAX_TOKENS - 1) // interval)
    assert [ch.finish_reason for ch in choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS and chunks[-1].usage.prompt_tokens > 0


def test_chat_with_stream_interval_and_n(server: Server, model: str) -> None:
    c = openai_client(server)
    plain = c.chat.completions.create(model=model, messages=ASK, max_tokens=MAX_TOKENS, temperature=0)
    for n in (1, 2):
        chunks = list(c.chat.completions.create(
            model=model, messages=ASK, max_tokens=MAX_TOKENS, temperature=0, n=n, stream=True,
            stream_options={"include_usage": True}, extra_body={"stream_interval": 4}))
        texts: dict[int, str] = {}
        finish: dict[int, str] = {}
        for ch in chunks:
            for choice in ch.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                finish[choice.index] = choice.finish_reason or finish.get(choice.index)
        assert texts == {i: plain.choices[0].message.content for i in range(n)}, n
        assert finish == {i: plain.choices[0].finish_reason for i in range(n)}, n
        assert chunks[-1].usage.completion_tokens == n * plain.usage.completion_tokens


def test_a_tool_call_parsed_from_merged_chunks(server: Server, model: str) -> None:
    c = openai_client(server)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ask = dict(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, max_tokens=64,
               temperature=0)
    chunks = list(c.chat.completions.create(**ask, stream=True, extra_body={
        "guided_regex": re.escape(call_text), "stream_interval": 8}))
    calls: dict[int, list[str]] = {}  # tool call index -> name, argument fragments (OpenAI's streamed deltas)
    for tc in [tc for ch in chunks for choice in ch.choices for tc in choice.delta.tool_calls or []]:
        name_and_args = calls.setdefault(tc.index, ["", ""])
        name_and_args[0] += tc.function.name or ""
        name_and_args[1] += tc.function.arguments or ""
    assert [(name, json.loads(args)) for name, args in calls.values()] == [("get_weather", {"city": "Paris"})]
    assert [choice.finish_reason for ch in chunks for choice in ch.choices][-1] == "tool_calls"
