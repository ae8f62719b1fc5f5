"""``sglite demo``: a tiny model served by a real Xinference through the sglite engine, end to end, offline.

Steps (each one printed as it happens): make the tiny demo checkpoint if it is missing (a random-weight Qwen2
model with a ChatML template: its text is gibberish, the serving path is real), start ``xinference-local`` on
127.0.0.1 with auth off in a fresh ``XINFERENCE_HOME``, register the checkpoint as a custom model, launch it with
``xinference launch --model-engine sglite``, stream a chat answer to the terminal, ask for a JSON-schema-constrained
answer and parse it, then print the web UI URL and the exact ``curl`` / OpenAI-client commands to try. Without
``--keep-serving`` everything is shut down and removed at the end; with it, the server stays up until Ctrl-C.

Module-level imports are standard library only: ``sglite --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from xinf_sglang.registration.custom_model import custom_llm_family

DEFAULT_MODEL_DIR = Path("~/.cache/sglite/demo-model").expanduser()
MODEL_NAME = "sglite-demo"
MODEL_UID = "sglite-demo"
SERVER_START_TIMEOUT = 300.0
LAUNCH_TIMEOUT = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sglite demo``."""
    parser.add_argument("--keep-serving", action="store_true", help="keep Xinference running until Ctrl-C")
    parser.add_argument("--port", type=int, default=9997, help="port of the Xinference REST API (default 9997)")
    parser.add_argument(
        "--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
        help=f"the checkpoint folder to serve (e.g. sglite fetch-smollm2's hf_dir); the tiny demo checkpoint is "
        f"made there if it is missing (default {DEFAULT_MODEL_DIR})",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    demo = _Demo(port=args.port, model_dir=Path(args.model_dir).expanduser(), keep_serving=args.keep_serving)
    # SIGTERM (kill, a service manager) must shut the server down like Ctrl-C does; by default it would end this
    # process alone and leave xinference-local and the model process running.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return demo.run()
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except _DemoError as e:
        _say(f"error: {e}")
        return 1
    finally:
        demo.shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


def _say(message: str) -> None:
    print(f"[sglite demo] {message}", flush=True)


class _Demo:
    def __init__(self, port: int, model_dir: Path, keep_serving: bool) -> None:
        self.port = port
        self.model_dir = model_dir
        self.keep_serving = keep_serving
        self.endpoint = f"http://127.0.0.1:{port}"
        self.home: Path | None = None
        self.log: Path | None = None
        self.server: subprocess.Popen | None = None
        self.bin = Path(sys.executable).parent

    # ---- steps ----

    def run(self) -> int:
        self.ensure_model()
        self.start_server()
        self.register_model()
        self.launch_model()
        self.chat()
        structured_output_demo(self.endpoint, MODEL_UID)
        self.show_runtime_metrics()
        self.print_instructions()
        if self.keep_serving:
            _say("serving; press Ctrl-C to stop")
            with contextlib.suppress(KeyboardInterrupt):
                while self.server is not None and self.server.poll() is None:
                    time.sleep(1)
            if self.server is not None and self.server.poll() is not None:
                raise _DemoError(f"xinference-local exited with code {self.server.returncode}; see {self.log}")
        return 0

    def ensure_model(self) -> None:
        if (self.model_dir / "config.json").is_file():
            _say(f"using the demo checkpoint in {self.model_dir}")
            return
        if self.model_dir.exists() and any(self.model_dir.iterdir()):
            raise _DemoError(f"{self.model_dir} exists but holds no checkpoint; remove it or pass --model-dir")
        _say(f"making the tiny demo checkpoint (random Qwen2 weights, ChatML template) in {self.model_dir} ...")
        from xinf_sglang.runtime.testing.tiny_model import make_tiny_model

        make_tiny_model(self.model_dir, "qwen2", seed=0)

    def start_server(self) -> None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", self.port)) == 0:
                raise _DemoError(f"port {self.port} is in use; pass --port N")
        self.home = Path(tempfile.mkdtemp(prefix="sglite-demo-xinference-"))
        self.log = self.home / "xinference-local.log"
        _say(f"starting xinference-local on {self.endpoint} (XINFERENCE_HOME={self.home}, log {self.log}) ...")
        with open(self.log, "wb") as out:
            self.server = subprocess.Popen(
                [str(self.bin / "xinference-local"), "--host", "127.0.0.1", "--port", str(self.port)],
                env=self._env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so shutdown also reaches the model processes
            )
        started = time.monotonic()

        def ready() -> bool:
            if self.server is not None and self.server.poll() is not None:
                raise _DemoError(f"xinference-local exited with code {self.server.returncode}; see {self.log}")
            return self._http("GET", "/v1/models", timeout=5, quiet=True)[0] == 200

        _wait(ready, SERVER_START_TIMEOUT, "Xinference to start", tick=lambda: _say(
            f"  ... still starting ({time.monotonic() - started:.0f}s; Xinference loads its model catalog)"))
        _say(f"Xinference is up after {time.monotonic() - started:.0f}s")

    def register_model(self) -> None:
        # The chat template goes into the registration so that clients can read it (xinf_sglang.lang.OpenAI
        # renders a program's roles with it; examples/lang_*.py run against this server).
        family = custom_llm_family(self.model_dir, MODEL_NAME, f"sglite demo: {self.model_dir}", chat_template=True)
        _say(f"registering {self.model_dir} as the custom LLM {MODEL_NAME!r} (POST /v1/model_registrations/LLM)")
        status, body = self._http(
            "POST", "/v1/model_registrations/LLM", {"model": json.dumps(family), "persist": True}
        )
        if status != 200:
            raise _DemoError(f"registration failed ({status}): {body}")
        status, engines = self._http("GET", f"/v1/engines/{MODEL_NAME}")
        if status != 200 or not isinstance(engines, dict) or not isinstance(engines.get("sglite"), list):
            reason = engines.get("sglite") if isinstance(engines, dict) else engines
            raise _DemoError(f"Xinference does not offer the sglite engine for {MODEL_NAME}: {reason}")

    def launch_model(self) -> None:
        command = [
            str(self.bin / "xinference"), "launch", "--model-engine", "sglite", "--model-name", MODEL_NAME,
            "--model-uid", MODEL_UID, "--context-length", "2048", "--mem_fraction_static", "0.5",
            "-e", self.endpoint,
        ]
        _say("launching: " + " ".join(["xinference", *command[1:]]))
        started = time.monotonic()
        try:
            done = subprocess.run(
                command, env=self._env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            raise _DemoError(f"the launch took over {LAUNCH_TIMEOUT:.0f}s; see {self.log}") from None
        if done.returncode != 0:
            raise _DemoError(f"launch failed:\n{done.stderr.strip()}")
        _say(f"model {MODEL_UID!r} is ready after {time.monotonic() - started:.0f}s")

    def chat(self) -> None:
        from openai import OpenAI  # Xinference depends on openai

        client = OpenAI(base_url=self.endpoint + "/v1", api_key="not-needed", max_retries=0, timeout=120)
        question = "Tell me about sglite."
        _say(f"streaming a chat answer (POST /v1/chat/completions, stream=true) to: {question!r}")
        print("  assistant> ", end="", flush=True)
        usage = None
        stream = client.chat.completions.create(
            model=MODEL_UID, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0.8,
            stream=True, stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
            usage = chunk.usage or usage
        print(flush=True)
        if usage is not None:
            _say(f"usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens "
                 "(random weights: the words are noise, the serving path is real)")

    def show_runtime_metrics(self) -> None:
        try:
            from xinf_sglang.serving.metrics import get_runtime_metrics

            m = get_runtime_metrics(self.endpoint, MODEL_UID, timeout=30)
        except Exception as e:  # informative only
            _say(f"(runtime metrics unavailable: {e})")
            return
        _say(
            f"runtime: KV pool {m['kv_total_tokens']} tokens ({m['kv_free_tokens']} free, "
            f"{m['kv_evictable_tokens']} cached), {m['finished_requests']} finished request(s), "
            f"prefix cache hit rate {m['cache_hit_rate']:.0%}"
        )

    def print_instructions(self) -> None:
        body = json.dumps(
            {"model": MODEL_UID, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}
        )
        print(
            f"""
Web UI:        {self.endpoint}/   (Launch Model -> LLM -> {MODEL_NAME} -> engine sglite)
OpenAI API:    {self.endpoint}/v1   (model: {MODEL_UID})

Try it with curl:
  curl {self.endpoint}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{body}'

Or with the OpenAI client:
  {sys.executable} -c "from openai import OpenAI; c = OpenAI(base_url='{self.endpoint}/v1', api_key='x'); \\
print(c.chat.completions.create(model='{MODEL_UID}', messages=[{{'role': 'user', 'content': 'Hello!'}}], \\
max_tokens=32).choices[0].message.content)"

Runtime metrics (KV pool, batch, cache hits):
  {sys.executable} -c "from xinf_sglang.serving.metrics import get_runtime_metrics; \\
print(get_runtime_metrics('{self.endpoint}', '{MODEL_UID}'))"
""",
            flush=True,
        )

    # ---- shutdown ----

    def shutdown(self) -> None:
        """Terminate the model and the server (whole process group) and remove the temporary home."""
        if self.server is not None and self.server.poll() is None:
            _say("shutting down: terminating the model and Xinference ...")
            with contextlib.suppress(Exception):
                self._http("DELETE", f"/v1/models/{MODEL_UID}", timeout=60, quiet=True)
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.server.pid, sig)
                try:
                    self.server.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, signal.SIGKILL)  # model processes left in the group
        self.server = None
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None
            _say("done")

    # ---- helpers ----

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            XINFERENCE_HOME=str(self.home),
            XINFERENCE_AUTH_ADVANCED="0",  # a local demo: no login (Xinference 4.x turns auth on by default)
            HF_HUB_OFFLINE="1",  # the demo needs no model hub
            TRANSFORMERS_OFFLINE="1",
        )
        return env

    def _http(
        self, method: str, path: str, body: Any = None, timeout: float = 120, quiet: bool = False
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.endpoint + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except OSError:
            if quiet:
                return 0, None
            raise
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")


# A small schema whose every field is bounded (string length, integer range, enum, no extra keys): the grammar
# then ends the answer within a few dozen tokens even on the random-weight demo model.
DEMO_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "stars": {"type": "integer", "minimum": 0, "maximum": 5},
        "language": {"enum": ["python", "rust", "go"]},
    },
    "required": ["name", "stars", "language"],
    "additionalProperties": False,
}
DEMO_MESSAGES = [{"role": "user", "content": "Describe a project as JSON."}]


def structured_output_demo(endpoint: str, model_uid: str) -> None:
    """Structured output: one JSON-schema-constrained chat request, its parsed answer, and how to send one."""
    from openai import APIError, OpenAI

    client = OpenAI(base_url=endpoint + "/v1", api_key="not-needed", max_retries=0, timeout=120)
    response_format = {"type": "json_schema", "json_schema": {"name": "project", "schema": DEMO_SCHEMA}}
    _say("structured output: asking for JSON matching a schema (response_format json_schema) ...")
    try:
        r = client.chat.completions.create(
            model=model_uid,
            messages=DEMO_MESSAGES,  # type: ignore[arg-type]
            response_format=response_format,  # type: ignore[arg-type]
            max_tokens=64,
            temperature=0,
        )
    except APIError as e:
        raise _DemoError(f"the JSON-schema request failed: {e} {getattr(e, 'body', '')}") from None
    text = r.choices[0].message.content or ""
    try:
        parsed = json.loads(text)
    except ValueError:
        raise _DemoError(f"the constrained answer is not JSON ({r.choices[0].finish_reason}): {text!r}") from None
    _say(f"  raw answer ({r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens): {text}")
    _say(f"  parsed: name={parsed['name']!r} stars={parsed['stars']} language={parsed['language']!r} "
         "(the schema holds by construction; the values are the random model's)")
    _print_structured_howto(endpoint, model_uid, response_format)


def _print_structured_howto(endpoint: str, model_uid: str, response_format: dict) -> None:
    """How to send the demo's constrained request yourself: curl, the OpenAI client, the other constraints."""
    body = json.dumps(
        {
            "model": model_uid,
            "messages": DEMO_MESSAGES,
            "max_tokens": 64,
            "response_format": response_format,
        }
    )
    print(
        f"""
Structured output (JSON schema) with curl:
  curl {endpoint}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{body}'

Or with the OpenAI client:
  {sys.executable} -c "from openai import OpenAI; c = OpenAI(base_url='{endpoint}/v1', api_key='x'); \\
print(c.chat.completions.create(model='{model_uid}', messages=[{{'role': 'user', 'content': 'Describe a project as JSON.'}}], \\
max_tokens=64, response_format={{'type': 'json_schema', 'json_schema': {{'name': 'project', 'schema': {DEMO_SCHEMA!r}}}}}\\
).choices[0].message.content)"

Also: extra_body={{"regex": ...}} / {{"choice": [...]}} / {{"ebnf": ...}}
      (or guided_regex / guided_choice / guided_grammar).
""",
        flush=True,
    )


def _wait(predicate: Callable[[], bool], timeout: float, what: str, tick: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    next_tick = time.monotonic() + 15
    while not predicate():
        now = time.monotonic()
        if now > deadline:
            raise _DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        if now > next_tick:
            tick()
            next_tick = now + 15
        time.sleep(1)
