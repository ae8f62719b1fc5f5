"""Quantized checkpoints through a real Xinference (issue 32): a tiny AWQ and a tiny FP8 (block-scaled) model,
written in their Hub layouts, registered as custom models with their format (``awq`` / ``Int4``, ``fp8`` /
``FP8``), offered and launched with the sglite engine, answer a greedy chat with HF transformers' answer on the
same weights dequantized by the references."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from xinf_sglang.runtime.testing.quant_writer import QuantSpec, write_dequantized, write_quantized

from .engine_helpers import hf_greedy
from .xinference_server import LAUNCH_TIMEOUT, Server, http, openai_client, registered_model, terminate

MESSAGES = [{"role": "user", "content": "Name three prime numbers."}]
FORMATS = {  # id -> (what to write, Xinference's model_format and quantization)
    "awq": (QuantSpec("awq", group_size=32, sym=False), "awq", "Int4"),
    "fp8": (QuantSpec("fp8_block", block=(32, 32)), "fp8", "FP8"),
}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def quantized(request, server: Server, tiny_model, tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    """(registered name, model uid, dequantized reference folder) of one format, launched as the web UI does."""
    spec, fmt, quantization = FORMATS[request.param]
    model_dir = write_quantized(tiny_model("qwen2"), tmp_path_factory.mktemp(f"xq-{fmt}"), spec)
    reference = write_dequantized(model_dir, tmp_path_factory.mktemp(f"xdq-{fmt}"))
    name, uid = f"sglite-tiny-{fmt}", f"tiny-{fmt}"
    with registered_model(server, model_dir, name=name):
        body = {"model_name": name, "model_engine": "sglite", "model_uid": uid, "model_format": fmt,
                "quantization": quantization, "model_size_in_billions": "0_001", "mem_fraction_static": "0.3",
                "context_length": 1024}
        status, reply = http("POST", server.endpoint + "/v1/models", body, timeout=LAUNCH_TIMEOUT)
        assert status == 200, f"{reply}\n{server.log_tail()}"
        try:
            yield name, uid, reference
        finally:
            terminate(server, uid)


def test_sglite_is_offered_for_the_quantized_spec(server: Server, quantized) -> None:
    name, _, _ = quantized
    status, engines = http("GET", f"{server.endpoint}/v1/engines/{name}")
    assert status == 200 and "sglite" in engines, engines


def test_greedy_chat_is_hf_on_the_dequantized_weights(server: Server, quantized) -> None:
    _, uid, reference = quantized
    tok = AutoTokenizer.from_pretrained(reference)
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    ref = hf_greedy(reference, list(prompt["input_ids"]), 24)
    stops = {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
    reply = openai_client(server).chat.completions.create(model=uid, messages=MESSAGES, max_tokens=24,
                                                          temperature=0.0)
    assert reply.choices[0].message.content == tok.decode(ref[:cut], skip_special_tokens=True)
    assert reply.usage.completion_tokens == min(cut + 1, 24)
