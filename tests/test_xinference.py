"""sglite inside a real Xinference: registration, launch (CLI and REST), OpenAI API, batching, aborts, errors.

The session's shared ``xinference-local`` subprocess (``tests/xinference_server.py``) serves the module, with
Xinference's default settings (per-model virtual environments on) except auth off; nothing here is mocked. The
engine reaches Xinference only through the installed ``xinf_sglang_autoload.pth`` start-up hook, exactly as after
``pip install``.

Runtime state is read with ``xinf_sglang.serving.metrics.get_runtime_metrics`` (an Xoscar call to the model actor).
Every wait is bounded; the models this module launched are terminated at its end.
"""

from __future__ import annotations

import asyncio
import json
import re
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("xinference")


from .xinference_server import (  # noqa: E402
    BIN,
    LAUNCH_TIMEOUT,
    metrics,
    openai_client as client,
    wait_idle,
    REQUEST_TIMEOUT,
    Server,
    http,
    server_env,
    terminate,
    wait_for,
)


def cli(server: Server, *args: str, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "xinference"), *args, "-e", server.endpoint],
        env=server_env(server.home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch_cli(server: Server, model: str, uid: str, *options: str) -> None:
    """``xinference launch --model-engine sglite`` of ``model`` as ``uid`` with ``options``; fails the test if it
    does not launch."""
    done = cli(server, "launch", "--model-engine", "sglite", "--model-name", model, "--model-uid", uid, *options)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{server.log_tail()}"


@pytest.fixture(scope="module")
def cli_model(server: Server, custom_model: str) -> str:
    """The custom model launched with ``xinference launch --model-engine sglite`` (typed CLI options)."""
    uid = "tiny-cli"
    launch_cli(server, custom_model, uid,
               "--mem_fraction_static", "0.5", "--context-length", "2048", "--max_running_requests", "64")
    yield uid
    terminate(server, uid)


@pytest.fixture(scope="module")
def builtin_model(server: Server, qwen2_dir: Path) -> str:
    """Built-in ``qwen2.5-instruct`` on a local tiny Qwen2 checkpoint, launched through ``POST /v1/models`` with
    the string-typed options the web UI sends."""
    uid = "tiny-builtin"
    status, body = http(
        "POST",
        server.endpoint + "/v1/models",
        {
            "model_name": "qwen2.5-instruct",
            "model_engine": "sglite",
            "model_uid": uid,
            "model_path": str(qwen2_dir),
            "mem_fraction_static": "0.5",
            "context_length": 1024,
            "schedule_policy": "lpm",
            "disable_radix_cache": "false",
            "max_total_tokens": "None",
            "seed": "",
        },
        timeout=LAUNCH_TIMEOUT,
    )
    assert status == 200, f"{body}\n{server.log_tail()}"
    yield uid
    terminate(server, uid)








# ---- registration ----


def test_sglite_listed_for_custom_and_builtin_families(server: Server, custom_model: str) -> None:
    status, engines = http("GET", f"{server.endpoint}/v1/engines/{custom_model}")
    assert status == 200
    assert isinstance(engines["sglite"], list) and engines["sglite"][0]["model_format"] == "pytorch"

    # Built-in families restrict engines through their virtualenv packages (virtualenvs are on): sglite must be
    # offered anyway, and refused with a reason that says why where it cannot serve the model.
    status, engines = http("GET", f"{server.endpoint}/v1/engines/qwen2.5-instruct")
    assert status == 200
    # Qwen2.5-Instruct ships AWQ and GPTQ (Int4 / Int8) checkpoints besides pytorch and GGUF: all served (issue 32).
    assert {p["model_format"] for p in engines["sglite"]} == {"pytorch", "ggufv2", "awq", "gptq"}
    gptq = next(p for p in engines["sglite"] if p["model_format"] == "gptq")
    assert {"Int4", "Int8"} <= set(gptq["quantizations"]), gptq
    gguf = next(p for p in engines["sglite"] if p["model_format"] == "ggufv2")
    assert "q4_k_m" in gguf["quantizations"] and not any(q.startswith("IQ") for q in gguf["quantizations"])
    # The web UI's launch dialog asks with the user's virtualenv choice; sglite is offered either way.
    for flag in ("true", "false"):
        status, engines = http("GET", f"{server.endpoint}/v1/engines/qwen2.5-instruct?enable_virtual_env={flag}")
        assert status == 200 and isinstance(engines["sglite"], list), (flag, engines.get("sglite"))
    status, engines = http("GET", f"{server.endpoint}/v1/engines/qwen2.5-vl-instruct")
    assert status == 200
    assert isinstance(engines["sglite"], str) and "sglite serves" in engines["sglite"]


def test_moe_sizes_of_builtin_families_listed_iff_sglite_builds_them(server: Server) -> None:
    """Matching is per spec: Xinference's ``qwen3`` family declares ``Qwen3ForCausalLM`` but its 30B-A3B and
    235B-A22B sizes are MoE checkpoints; ``Qwen3-Instruct`` declares ``Qwen3MoeForCausalLM`` but its 4B is dense."""
    from xinf_sglang.runtime.models.registry import SUPPORTED_ARCHITECTURES

    moe = "Qwen3MoeForCausalLM" in SUPPORTED_ARCHITECTURES  # the server runs this very checkout
    for family, dense, moe_sizes in (("qwen3", {"0_6", 32}, {30, 235}), ("Qwen3-Instruct", {4}, {30, 235})):
        status, engines = http("GET", f"{server.endpoint}/v1/engines/{family}")
        assert status == 200 and isinstance(engines["sglite"], list), (family, engines.get("sglite"))
        sizes = {p["model_size_in_billions"] for p in engines["sglite"] if p["model_format"] == "pytorch"}
        assert dense <= sizes and (moe_sizes <= sizes if moe else not moe_sizes & sizes), (family, sizes)


# ---- OpenAI API through the CLI-launched custom model ----


def test_chat_and_completions(server: Server, cli_model: str) -> None:
    c = client(server)
    messages = [{"role": "user", "content": "Say something."}]

    r = c.chat.completions.create(model=cli_model, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(
        c.chat.completions.create(
            model=cli_model, messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # greedy: same tokens streamed or not
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == r.usage.completion_tokens
    # The second identical prompt reuses the cached prefix (RadixAttention), reported as OpenAI cached tokens.
    assert usage.prompt_tokens_details.cached_tokens > 0

    done = c.completions.create(model=cli_model, prompt="def main():", max_tokens=10, temperature=0)
    assert done.usage.prompt_tokens > 0 and 0 < done.usage.completion_tokens <= 10
    streamed = list(
        c.completions.create(
            model=cli_model, prompt="def main():", max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(s.choices[0].text for s in streamed if s.choices) == done.choices[0].text
    assert streamed[-1].usage.completion_tokens == done.usage.completion_tokens


def test_32_concurrent_requests_share_the_batch(server: Server, cli_model: str) -> None:
    async def run() -> list[Any]:
        c = openai.AsyncOpenAI(
            base_url=server.endpoint + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT
        )
        try:
            return await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model=cli_model,
                        messages=[{"role": "user", "content": f"request number {i}"}],
                        max_tokens=48,
                        temperature=0.7,
                        seed=i,
                        extra_body={"ignore_eos": True},
                    )
                    for i in range(32)
                )
            )
        finally:
            await c.close()

    results = asyncio.run(asyncio.wait_for(run(), REQUEST_TIMEOUT * 2))
    assert len(results) == 32
    for r in results:
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 48
    m = wait_idle(server, cli_model)
    # Xinference did not serialise the requests (allow_batch): the runtime decoded several in one batch.
    assert m["peak_running_requests"] > 1, m


def test_client_disconnect_aborts_and_frees_kv(server: Server, cli_model: str) -> None:
    before = wait_idle(server, cli_model)
    c = client(server)
    stream = c.chat.completions.create(
        model=cli_model,
        messages=[{"role": "user", "content": "a long answer please"}],
        max_tokens=1900,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 3:
            break
    stream.close()  # drop the HTTP connection mid-stream

    after = wait_idle(server, cli_model)
    assert after["aborted_requests"] == before["aborted_requests"] + 1, after
    assert after["plugin_client_aborts"] == before["plugin_client_aborts"] + 1, after
    # It was cut short, not run to its 1900 tokens.
    assert after["generated_tokens_total"] - before["generated_tokens_total"] < 1900


def test_invalid_requests_are_400(server: Server, cli_model: str) -> None:
    status, body = http(
        "POST", server.endpoint + "/v1/completions",
        {"model": cli_model, "prompt": "hi", "max_tokens": 4, "suffix": "!"},
    )
    assert status == 400 and "suffix (fill-in-the-middle) is not supported" in str(body)
    status, body = http(
        "POST", server.endpoint + "/v1/completions", {"model": cli_model, "prompt": "hi", "max_tokens": 4, "top_p": 0}
    )
    assert status == 400 and "top_p" in str(body)
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(
            model=cli_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, top_logprobs=3
        )  # top_logprobs needs logprobs=true
    # min_p / min_tokens reach the engine over HTTP (Xinference's request models drop them; the compat patch
    # forwards them): out-of-range values are refused by sglite's validation, naming the field.
    for field, value, named in [("min_p", 2.0, "min_p must be"), ("min_tokens", -1, "min_new_tokens must be")]:
        with pytest.raises(openai.BadRequestError) as err:
            client(server).chat.completions.create(
                model=cli_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body={field: value}
            )
        detail = err.value.response.json()["detail"]
        assert named in detail and f"got {value}" in detail, detail
    # A completions stream reports the same error in its error event, without the model actor's address.
    with pytest.raises(openai.APIError) as err:
        for _ in client(server).completions.create(
            model=cli_model, prompt="hi", max_tokens=4, stream=True, extra_body={"min_p": 2.0}
        ):
            pass
    assert "min_p must be" in str(err.value.body) and "address=" not in str(err.value.body), err.value.body


# ---- launch options ----


def test_bad_launch_options_fail_before_loading(server: Server, custom_model: str) -> None:
    done = cli(
        server, "launch", "--model-engine", "sglite", "--model-name", custom_model, "--model-uid", "bad-fraction",
        "--mem_fraction_static", "1.5",
    )
    assert done.returncode != 0
    assert "mem_fraction_static=1.5" in done.stderr and "< 1.0" in done.stderr, done.stderr

    done = cli(
        server, "launch", "--model-engine", "sglite", "--model-name", custom_model, "--model-uid", "bad-key",
        "--no_such_option", "1",
    )
    assert done.returncode != 0
    assert "unknown option 'no_such_option'" in done.stderr and "mem_fraction_static" in done.stderr, done.stderr

    done = cli(
        server, "launch", "--model-engine", "sglite", "--model-name", custom_model, "--model-uid", "bad-alias",
        "--max_modle_len", "512",
    )
    assert done.returncode != 0 and "did you mean 'max_model_len'" in done.stderr, done.stderr
    status, body = http(
        "POST", server.endpoint + "/v1/models",
        {"model_name": custom_model, "model_engine": "sglite", "model_uid": "bad-rest", "max_running_requests": "0"},
    )
    assert status == 400 and "max_running_requests" in str(body), body
    status, models = http("GET", server.endpoint + "/v1/models")
    assert not {"bad-fraction", "bad-key", "bad-alias", "bad-rest"} & {m["id"] for m in models["data"]}


def test_vllm_option_names_launch_with_their_meaning(server: Server, custom_model: str) -> None:
    """vLLM's names, hyphenated as a CLI user types them, become sglite's options with the same meaning."""
    uid = "tiny-vllm-names"
    launch_cli(server, custom_model, uid,
               "--max_model_len", "512", "--gpu-memory-utilization", "0.5", "--enable_prefix_caching", "false")
    try:
        m = metrics(server, uid)
        assert m["context_length"] == 512
        assert m["launch_options"]["mem_fraction_static"] == 0.5 and m["launch_options"]["disable_radix_cache"]
    finally:
        terminate(server, uid)


# ---- built-in family, REST launch, termination ----


def test_builtin_family_via_rest_then_terminate(server: Server, builtin_model: str) -> None:
    m = metrics(server, builtin_model)
    # The web UI's strings arrived typed; "None" / "" kept the defaults.
    opts = m["launch_options"]
    assert opts["mem_fraction_static"] == 0.5 and opts["schedule_policy"] == "lpm"
    assert opts["disable_radix_cache"] is False and opts["max_total_tokens"] is None and opts["seed"] == 0
    assert m["context_length"] == 1024  # --context-length reached the engine (CONTEXT_LENGTH_KEYS)

    c = client(server)
    r = c.chat.completions.create(
        model=builtin_model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0,
    )
    assert r.usage.completion_tokens <= 8 and r.choices[0].message.role == "assistant"
    # qwen2.5-instruct supports tools: the family's template renders them and the Qwen tool parser runs.
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    with_tools = c.chat.completions.create(
        model=builtin_model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
        max_tokens=8, temperature=0,
    )
    assert with_tools.usage.prompt_tokens > r.usage.prompt_tokens  # the tool schema is in the prompt
    # A random model never writes a tool call by itself; a regex constraint makes it write Qwen's exact tool-call
    # text, and the answer must come back parsed into OpenAI tool_calls (engine -> Xinference's Qwen parser -> API).
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    called = c.chat.completions.create(
        model=builtin_model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
        max_tokens=64, temperature=0, extra_body={"guided_regex": re.escape(call_text)},
    )
    [call] = called.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert called.choices[0].finish_reason == "tool_calls"
    _forced_tool_calls(c, builtin_model)

    pid = m["pid"]
    terminate(server, builtin_model)
    wait_for(lambda: not _alive(pid), 60, f"model process {pid} to exit")
    status, models = http("GET", server.endpoint + "/v1/models")
    assert builtin_model not in {x["id"] for x in models["data"]}


def _forced_tool_calls(c: Any, model: str) -> None:
    """tool_choice "required" / a named function: the call's JSON is enforced and comes back as tool_calls,
    streamed in one complete chunk (no partial arguments, no tool-call text in content)."""
    unit = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"],
            "additionalProperties": False}
    tools = [
        {"type": "function", "function": {"name": "get_unit", "description": "Temperature unit", "parameters": unit}},
        {"type": "function", "function": {"name": "get_time", "description": "Time", "parameters": unit}},
    ]
    ask = [{"role": "user", "content": "Which unit?"}]
    for choice, names in [("required", {"get_unit", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})]:
        r = c.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice=choice,
                                      parallel_tool_calls=False, max_tokens=64, temperature=0)
        [call] = r.choices[0].message.tool_calls
        assert call.function.name in names and json.loads(call.function.arguments)["unit"] in ("c", "f")
        assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
        chunks = list(c.chat.completions.create(
            model=model, messages=ask, tools=tools, tool_choice=choice, parallel_tool_calls=False, max_tokens=64,
            temperature=0, stream=True, stream_options={"include_usage": True},
        ))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert not any(d.content for d in deltas), deltas
        [streamed] = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=model, messages=ask, tools=tools, max_tokens=8,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "'nope', which is not among the tools" in err.value.response.json()["detail"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
    return True
