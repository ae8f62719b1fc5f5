"""A real ``xinference-local`` for integration tests, and the tiny checkpoint registered in it.

Plain helpers first, then the fixtures, which ``tests/conftest.py`` imports so that every module sees the same
ones (a module must not import them itself: pytest would then make that module a fixture of its own, and a server).

One server per pytest session (Xinference's default settings, per-model virtual environments on, auth off, its own
``XINFERENCE_HOME``), started by the first test that asks for ``server`` and killed with its process group at the
end of the session. Each module launches its own models under uids of its own and terminates them in its module
teardown; the module-scoped ``server`` fixture then checks that the module left no model running (it terminates
any it finds and reports them as an error of the module's last test), so every module starts on an empty server.
Nothing is mocked: the engine reaches Xinference only through the installed ``xinf_sglang_autoload.pth`` hook.
"""

from __future__ import annotations

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from xinf_sglang.registration.custom_model import custom_llm_family

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


def free_port() -> int:
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


def server_env(home: Path) -> dict[str, str]:
    """Environment of the server and of the ``xinference`` CLI talking to it."""
    from torch.utils.cpp_extension import get_default_build_root

    env = dict(os.environ)
    # Xinference points XDG_CACHE_HOME into its fresh XINFERENCE_HOME, so its model processes would compile
    # sglite's CPU extensions again (~40 s each) although this test process builds the very same sources; a user's
    # home persists between server starts, so only the first launch ever compiles. torch locks the folder per build.
    env.setdefault("TORCH_EXTENSIONS_DIR", get_default_build_root())
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


def kill_group(proc: subprocess.Popen) -> None:
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


@contextlib.contextmanager
def running_server(home: Path) -> Iterator[Server]:
    """``xinference-local`` on 127.0.0.1 (a free port), serving ``/v1/models``; killed, with its group, on exit."""
    port = free_port()
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "xinference-local"), "--host", "127.0.0.1", "--port", str(port)],
            env=server_env(home),
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
        kill_group(proc)


@contextlib.contextmanager
def registered_model(
    server: Server, model_dir: Path, name: str = CUSTOM_NAME, chat_template: bool = False
) -> Iterator[str]:
    """``model_dir`` registered (persisted) as the custom LLM family ``name`` (``chat_template``: with the
    checkpoint's template copied into the registration); unregistered on exit."""
    status, body = http(
        "POST",
        server.endpoint + "/v1/model_registrations/LLM",
        {"model": json.dumps(custom_llm_family(model_dir, name, chat_template=chat_template)), "persist": True},
    )
    assert status == 200, body
    try:
        yield name
    finally:
        http("DELETE", f"{server.endpoint}/v1/model_registrations/LLM/{name}")


def openai_client(server: Server) -> Any:
    """The real OpenAI client on the server's ``/v1`` (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=server.endpoint + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT)


def metrics(server: Server, uid: str) -> dict[str, Any]:
    """sglite's runtime metrics of model ``uid`` (engine counters and the plugin's bookkeeping)."""
    from xinf_sglang.serving.metrics import get_runtime_metrics

    return get_runtime_metrics(server.endpoint, uid, timeout=60)


def wait_idle(server: Server, uid: str, timeout: float = 120) -> dict[str, Any]:
    """Metrics once nothing runs, waits or is tracked by the plugin, and every KV slot is free or held by the
    prefix cache only."""

    def idle() -> dict[str, Any] | None:
        m = metrics(server, uid)
        quiet = m["running_requests"] == 0 and m["waiting_requests"] == 0 and m["plugin_active_requests"] == 0
        return m if quiet and m["kv_free_tokens"] + m["kv_evictable_tokens"] == m["kv_total_tokens"] else None

    return wait_for(idle, timeout, f"{uid} to go idle with its KV freed and no request tracked")


def running_models(server: Server) -> set[str]:
    """The uids of the models the server serves now."""
    status, body = http("GET", server.endpoint + "/v1/models")
    assert status == 200, body
    return {m["id"] for m in body["data"]}


def terminate(server: Server, uid: str) -> None:
    """Terminate model ``uid`` (``DELETE /v1/models/{uid}``; no error if it is not running)."""
    http("DELETE", f"{server.endpoint}/v1/models/{uid}", timeout=LAUNCH_TIMEOUT)


def log_mark(server: Server) -> dict[Path, int]:
    """The sizes of Xinference's log files (``XINFERENCE_HOME/logs``) now, for :func:`logs_since`."""
    return {p: p.stat().st_size for p in (server.home / "logs").rglob("*.log*") if p.is_file()}


def logs_since(server: Server, mark: dict[Path, int]) -> str:
    """What Xinference's log files gained since ``mark``: where a model process's own loggers write (its console
    filters out other packages' loggers, such as sglite's). The server is shared by every module, so a test looks
    only at the lines written while it ran. A file smaller than at the mark was rotated: read whole."""
    parts = []
    for path in sorted(log_mark(server)):
        data = path.read_bytes()
        start = mark.get(path, 0)
        parts.append(data[start if start <= len(data) else 0:].decode(errors="replace"))
    return "".join(parts)


# ---- fixtures ----


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The session's one ``xinference-local``; tests ask for ``server``, which also checks each module's cleanup."""
    with running_server(tmp_path_factory.mktemp("xinference-home")) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Iterator[Server]:
    """The shared server, for one module: at the module's end (after its own fixtures terminated their models)
    no model may be left running. Leftovers are terminated, so that the next module starts clean, and reported."""
    before = running_models(shared_server)
    yield shared_server
    left = running_models(shared_server) - before
    for uid in sorted(left):
        terminate(shared_server, uid)
    assert not left, f"the module left models running on the shared server (now terminated): {sorted(left)}"


@pytest.fixture(scope="session")
def qwen2_dir(tiny_model) -> Path:
    return tiny_model(arch="qwen2", seed=0)


@pytest.fixture(scope="session")
def custom_model(shared_server: Server, qwen2_dir: Path) -> Iterator[str]:
    """The tiny checkpoint registered (once per session) as a custom LLM family; returns its model name."""
    with registered_model(shared_server, qwen2_dir) as name:
        yield name
