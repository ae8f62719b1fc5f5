"""sglite inside a real Xinference: registration, launch (CLI and REST), OpenAI API, batching, aborts, errors.

One ``xinference-local`` subprocess serves the whole module, with Xinference's default settings (per-model
virtual environments on) except auth off; nothing here is mocked. The engine reaches Xinference only through the
installed ``xinf_sglang_autoload.pth`` start-up hook, exactly as after ``pip install``.

Runtime state is read with ``xinf_sglang.metrics.get_runtime_metrics`` (an Xoscar call to the model actor).
Every wait is bounded; the server's process group is killed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("xinference")

from xinf_sglang.metrics import get_runtime_metrics  # noqa: E402

BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT = 300  # 2 slow cores: Xinference imports its whole model catalog at start-up
LAUNCH_TIMEOUT = 300
REQUEST_TIMEOUT = 120
CUSTOM_NAME = "sglite-tiny-qwen2"


@dataclass
class Server:
    endpoint: str
    home: Path
    proc: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Any = None, timeout: float = REQUEST_TIMEOUT) -> tuple[int, Any]:
    """(status, decoded JSON or text) of one request; never raises for HTTP error statuses."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XINFERENCE_HOME=str(home),
        XINFERENCE_AUTH_ADVANCED="0",  # 4.x turns auth on by default
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        XINFERENCE_MODEL_SRC="huggingface",
        PYTHONUNBUFFERED="1",
    )
    env.pop("XINFERENCE_ENABLE_VIRTUAL_ENV", None)  # Xinference's default (on) is what users get
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    home = tmp_path_factory.mktemp("xinference-home")
    port = _free_port()
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "xinference-local"), "--host", "127.0.0.1", "--port", str(port)],
            env=_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown kills model subprocesses too
        )
    srv = Server(f"http://127.0.0.1:{port}", home, proc, log)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"xinference-local exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                return http("GET", srv.endpoint + "/v1/models", timeout=5)[0] == 200
            except OSError:
                return False

        wait_for(ready, SERVER_START_TIMEOUT, "xinference-local to serve /v1/models", interval=1.0)
        yield srv
    finally:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Model subprocesses that outlived the server in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def qwen2_dir(tiny_model) -> Path:
    return tiny_model(arch="qwen2", seed=0)


@pytest.fixture(scope="module")
def custom_model(server: Server, qwen2_dir: Path) -> str:
    """The tiny checkpoint registered as a custom LLM family (no chat_template: the checkpoint's own is used)."""
    family = {
        "version": 2,
        "model_name": CUSTOM_NAME,
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"],
        "model_family": CUSTOM_NAME,
        "architectures": ["Qwen2ForCausalLM"],
        "context_length": 2048,
        "model_specs": [
            {
                "model_format": "pytorch",
                "model_size_in_billions": "0_001",
                "quantization": "none",
                "model_uri": str(qwen2_dir),
            }
        ],
    }
    status, body = http(
        "POST", server.endpoint + "/v1/model_registrations/LLM", {"model": json.dumps(family), "persist": True}
    )
    assert status == 200, body
    yield CUSTOM_NAME
    http("DELETE", f"{server.endpoint}/v1/model_registrations/LLM/{CUSTOM_NAME}")


def cli(server: Server, *args: str, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "xinference"), *args, "-e", server.endpoint],
        env=_env(server.home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def terminate(server: Server, uid: str) -> None:
    http("DELETE", f"{server.endpoint}/v1/models/{uid}", timeout=LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def cli_model(server: Server, custom_model: str) -> str:
    """The custom model launched with ``xinference launch --model-engine sglite`` (typed CLI options)."""
    uid = "tiny-cli"
    done = cli(
        server, "launch", "--model-engine", "sglite", "--model-name", custom_model, "--model-uid", uid,
        "--mem_fraction_static", "0.5", "--context-length", "2048", "--max_running_requests", "64",
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{server.log_tail()}"
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


def client(server: Server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.endpoint + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT)


def metrics(server: Server, uid: str) -> dict[str, Any]:
    return get_runtime_metrics(server.endpoint, uid, timeout=60)


def wait_idle(server: Server, uid: str, timeout: float = 60) -> dict[str, Any]:
    """Metrics once nothing runs or waits, and every KV slot is free or held by the prefix cache only."""

    def idle() -> dict[str, Any] | None:
        m = metrics(server, uid)
        quiet = m["running_requests"] == 0 and m["waiting_requests"] == 0 and m["plugin_active_requests"] == 0
        return m if quiet and m["kv_free_tokens"] + m["kv_evictable_tokens"] == m["kv_total_tokens"] else None

    return wait_for(idle, timeout, f"{uid} to go idle with its KV freed")


# ---- registration ----


def test_sglite_listed_for_custom_and_builtin_families(server: Server, custom_model: str) -> None:
    status, engines = http("GET", f"{server.endpoint}/v1/engines/{custom_model}")
    assert status == 200
    assert isinstance(engines["sglite"], list) and engines["sglite"][0]["model_format"] == "pytorch"

    # Built-in families restrict engines through their virtualenv packages (virtualenvs are on): sglite must be
    # offered anyway, and refused with a reason that says why where it cannot serve the model.
    status, engines = http("GET", f"{server.endpoint}/v1/engines/qwen2.5-instruct")
    assert status == 200
    assert {p["model_format"] for p in engines["sglite"]} == {"pytorch"}
    # The web UI's launch dialog asks with the user's virtualenv choice; sglite is offered either way.
    for flag in ("true", "false"):
        status, engines = http("GET", f"{server.endpoint}/v1/engines/qwen2.5-instruct?enable_virtual_env={flag}")
        assert status == 200 and isinstance(engines["sglite"], list), (flag, engines.get("sglite"))
    status, engines = http("GET", f"{server.endpoint}/v1/engines/qwen2.5-vl-instruct")
    assert status == 200
    assert isinstance(engines["sglite"], str) and "sglite serves pytorch/safetensors" in engines["sglite"]


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
        {"model": cli_model, "prompt": "hi", "max_tokens": 4, "logprobs": 2},
    )
    assert status == 400 and "log probabilities are not supported" in str(body)
    status, body = http(
        "POST", server.endpoint + "/v1/completions", {"model": cli_model, "prompt": "hi", "max_tokens": 4, "top_p": 0}
    )
    assert status == 400 and "top_p" in str(body)
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(
            model=cli_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True
        )


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

    status, body = http(
        "POST", server.endpoint + "/v1/models",
        {"model_name": custom_model, "model_engine": "sglite", "model_uid": "bad-rest", "max_running_requests": "0"},
    )
    assert status == 400 and "max_running_requests" in str(body), body
    status, models = http("GET", server.endpoint + "/v1/models")
    assert not {"bad-fraction", "bad-key", "bad-rest"} & {m["id"] for m in models["data"]}


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

    pid = m["pid"]
    terminate(server, builtin_model)
    wait_for(lambda: not _alive(pid), 60, f"model process {pid} to exit")
    status, models = http("GET", server.endpoint + "/v1/models")
    assert builtin_model not in {x["id"] for x in models["data"]}


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
