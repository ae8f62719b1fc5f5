"""sglite with tensor parallelism inside a real Xinference on CPU: ``xinference launch --model-engine sglite
--tp_size 2`` starts a gloo rank beside the model's process, serves a chat whose greedy reply equals the
single-rank model's, and terminating the model leaves no rank behind."""

from __future__ import annotations

import subprocess

import psutil
import pytest

pytest.importorskip("openai")
pytest.importorskip("xinference")

from .xinference_server import (  # noqa: E402
    BIN,
    LAUNCH_TIMEOUT,
    Server,
    http,
    openai_client,
    server_env,
    wait_for,
)
from .xinference_server import custom_model, qwen2_dir, server  # noqa: E402, F401  (pytest fixtures)

WORKER_MODULE = "xinf_sglang.runtime.tp.worker"


def _launch(server: Server, model: str, uid: str, *options: str) -> None:
    done = subprocess.run(
        [str(BIN / "xinference"), "launch", "--model-engine", "sglite", "--model-name", model, "--model-uid", uid,
         "--context-length", "1024", *options, "-e", server.endpoint],
        env=server_env(server.home), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{server.log_tail()}"


def _ranks() -> list[psutil.Process]:
    """Tensor-parallel rank processes of this machine's sglite engines started by this test session's server."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if WORKER_MODULE in " ".join(proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def _reply(server: Server, uid: str) -> str:
    r = openai_client(server).chat.completions.create(
        model=uid, messages=[{"role": "user", "content": "Say something."}], max_tokens=12, temperature=0,
    )
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    return r.choices[0].message.content


def test_tp_size_2_serves_a_chat_and_leaves_no_rank(server: Server, custom_model: str) -> None:
    before = {p.pid for p in _ranks()}
    _launch(server, custom_model, "tiny-tp1")
    single = _reply(server, "tiny-tp1")
    http("DELETE", f"{server.endpoint}/v1/models/tiny-tp1", timeout=LAUNCH_TIMEOUT)

    _launch(server, custom_model, "tiny-tp2", "--tp_size", "2")
    ranks = [p for p in _ranks() if p.pid not in before]
    assert len(ranks) == 1, "one rank process beside the model's own"
    assert _reply(server, "tiny-tp2") == single  # greedy: the sharded model says what the whole one says
    status, _ = http("DELETE", f"{server.endpoint}/v1/models/tiny-tp2", timeout=LAUNCH_TIMEOUT)
    assert status == 200
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks),
             timeout=60, what="the tensor-parallel rank to exit after the model was terminated")
