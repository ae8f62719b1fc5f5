"""The plugin through a real ``xinference-local`` on the GPU: the tiny custom model launched with ``--model-engine
sglite`` on CUDA (CUDA graphs, overlap), a chat streamed and not (the same text at temperature 0), a JSON-schema
chat that parses and satisfies its schema, and the runtime metrics read through the model actor. The session's
shared server serves it (tests/xinference_server.py); the CPU tier covers the same paths on the CPU
(tests/test_xinference*.py). On a machine without network access, scripts/prepare_offline_wheels.py --xinference
--extras test brings Xinference and the OpenAI client."""

from __future__ import annotations

import json

import pytest

from . import require_gpus

require_gpus()
pytestmark = pytest.mark.cuda
pytest.importorskip("openai")
pytest.importorskip("xinference")

from xinf_sglang.serving.metrics import get_runtime_metrics  # noqa: E402

from ..xinference_server import LAUNCH_TIMEOUT, Server, http, openai_client  # noqa: E402

UID = "tiny-on-gpu"
DEVICE = "cuda"
PERSON = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0,
                                                                               "maximum": 150}}}


@pytest.fixture(scope="module")
def launched(server: Server, custom_model: str) -> str:
    status, body = http("POST", server.endpoint + "/v1/models", {
        "model_name": custom_model, "model_engine": "sglite", "model_uid": UID, "device": DEVICE,
        "mem_fraction_static": "0.5",
    }, timeout=LAUNCH_TIMEOUT)
    assert status == 200, f"{body}\n{server.log_tail()}"
    yield UID
    http("DELETE", f"{server.endpoint}/v1/models/{UID}", timeout=LAUNCH_TIMEOUT)


def test_streamed_chat_equals_plain_chat(server: Server, launched: str) -> None:
    client = openai_client(server)
    messages = [{"role": "user", "content": "Say something about GPUs."}]
    plain = client.chat.completions.create(model=launched, messages=messages, max_tokens=32, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=launched, messages=messages, max_tokens=32, temperature=0, stream=True) if c.choices)
    assert plain.usage.completion_tokens > 0
    assert plain.choices[0].message.content == streamed


def test_json_schema_chat(server: Server, launched: str) -> None:
    reply = openai_client(server).chat.completions.create(
        model=launched, messages=[{"role": "user", "content": "A person as JSON."}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    person = json.loads(reply.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and 0 <= person["age"] <= 150


def test_runtime_metrics_say_cuda(server: Server, launched: str) -> None:
    openai_client(server).chat.completions.create(model=launched, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=8, temperature=0)
    metrics = get_runtime_metrics(server.endpoint, launched, timeout=60)
    assert metrics["launch_options"]["device"] == DEVICE
    assert metrics["generated_tokens_total"] > 0 and metrics["decode_steps"] > 0
