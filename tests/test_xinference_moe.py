"""Mixture-of-experts models through a real Xinference: a tiny Qwen3-MoE and a tiny DeepSeek-V3-like checkpoint
(MLA, grouped routing) registered as custom models and launched with the sglite engine serve a chat whose greedy
answer is HF transformers' (streamed and not), and a JSON-schema request whose answer validates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from .engine_helpers import hf_greedy
from .xinference_server import LAUNCH_TIMEOUT, Server, http, openai_client, registered_model, terminate

ARCHS = ["qwen3_moe", "deepseek_v3"]
MESSAGES = [{"role": "user", "content": "Name three prime numbers."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=ARCHS)
def moe(request, server: Server, tiny_model) -> Iterator[tuple[str, Path]]:
    """(model uid, checkpoint) of a tiny model launched through ``POST /v1/models`` as the web UI does."""
    model_dir, name, uid = tiny_model(request.param), f"sglite-tiny-{request.param}", f"tiny-{request.param}"
    with registered_model(server, model_dir, name=name):
        status, engines = http("GET", f"{server.endpoint}/v1/engines/{name}")
        assert status == 200 and "sglite" in engines, engines  # offered: its architecture is one sglite builds
        body = {"model_name": name, "model_engine": "sglite", "model_uid": uid, "model_format": "pytorch",
                "model_size_in_billions": "0_001", "mem_fraction_static": "0.3", "context_length": 1024}
        status, reply = http("POST", server.endpoint + "/v1/models", body, timeout=LAUNCH_TIMEOUT)
        assert status == 200, f"{reply}\n{server.log_tail()}"
        try:
            yield uid, model_dir
        finally:
            terminate(server, uid)


def test_greedy_chat_is_hf_transformers_answer(server: Server, moe: tuple[str, Path]) -> None:
    uid, model_dir = moe
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    ref = hf_greedy(model_dir, list(prompt["input_ids"]), 24)
    stops = {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
    expected = tok.decode(ref[:cut], skip_special_tokens=True)
    client = openai_client(server)
    reply = client.chat.completions.create(model=uid, messages=MESSAGES, max_tokens=24, temperature=0.0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == ("stop" if cut < len(ref) else "length")
    assert reply.usage.completion_tokens == min(cut + 1, 24)
    stream = client.chat.completions.create(model=uid, messages=MESSAGES, max_tokens=24, temperature=0.0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_json_schema_chat_validates(server: Server, moe: tuple[str, Path]) -> None:
    uid, _ = moe
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = openai_client(server).chat.completions.create(
        model=uid, messages=[{"role": "user", "content": "A person, as JSON."}], max_tokens=200, temperature=0.7,
        seed=1, response_format=response_format)
    assert reply.choices[0].finish_reason == "stop"
    person = json.loads(reply.choices[0].message.content)
    assert set(person) == {"name", "age"} and 1 <= len(person["name"]) <= 12 and 0 <= person["age"] <= 120
