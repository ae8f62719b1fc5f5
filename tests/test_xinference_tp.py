"""sglite with tensor parallelism inside a real Xinference on CPU: ``xinference launch --model-engine sglite
--tp_size 2`` starts a gloo rank beside the model's process, serves a chat whose greedy reply equals the
single-rank model's, and terminating the model leaves no rank behind. Killing a rank fails the open request with
sglite's message (a 503), ends the model's process, and Xinference relaunches the model, which serves again."""

from __future__ import annotations

import subprocess
import threading
from typing import Any

import psutil
import pytest

pytest.importorskip("openai")
pytest.importorskip("xinference")

from .xinference_server import (  # noqa: E402
    BIN,
    LAUNCH_TIMEOUT,
    REQUEST_TIMEOUT,
    Server,
    http,
    log_mark,
    logs_since,
    metrics,
    openai_client,
    server_env,
    wait_for,
)

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


def test_a_killed_rank_fails_the_open_request_and_xinference_relaunches_the_model(
    server: Server, custom_model: str
) -> None:
    uid = "tiny-tp-fault"
    before = {p.pid for p in _ranks()}
    _launch(server, custom_model, uid, "--tp_size", "2")
    model = psutil.Process(metrics(server, uid)["pid"])
    [rank] = [p for p in _ranks() if p.pid not in before]
    assert rank.ppid() == model.pid, "the rank is a child of the model's process"

    mark = log_mark(server)
    outcome: dict[str, Any] = {}
    asking = threading.Thread(target=_long_chat, args=(server, uid, outcome))
    asking.start()
    wait_for(lambda: metrics(server, uid)["decode_steps"] >= 5, timeout=REQUEST_TIMEOUT, what="decode steps")
    rank.kill()
    asking.join(REQUEST_TIMEOUT)
    assert not asking.is_alive(), "the open request hung after its rank was killed"
    error = outcome.get("error")
    assert getattr(error, "status_code", None) == 503, f"expected a 503, got {outcome}"
    detail = error.response.json()["detail"]
    assert "rank 1" in detail and "SIGKILL" in detail and "relaunches" in detail and "address=" not in detail, detail

    wait_for(lambda: not _alive(model), timeout=60, what="the failed model's process to exit")
    assert "ending the model process now" in logs_since(server, mark), "the model process logged why it ended"
    wait_for(lambda: _model_pid(server, uid) not in (None, model.pid), timeout=LAUNCH_TIMEOUT,
             what="Xinference to relaunch the model in a new process", interval=2.0)
    relaunched = _model_pid(server, uid)
    assert _reply(server, uid)  # the relaunched model serves
    [new_rank] = [p for p in _ranks() if p.pid not in before]
    assert new_rank.ppid() == relaunched and not _alive(rank)
    status, _ = http("DELETE", f"{server.endpoint}/v1/models/{uid}", timeout=LAUNCH_TIMEOUT)
    assert status == 200
    wait_for(lambda: not _alive(new_rank), timeout=60, what="the relaunched model's rank to exit")


def _long_chat(server: Server, uid: str, outcome: dict[str, Any]) -> None:
    """A chat that decodes far longer than the test waits; what it returned or raised goes into ``outcome``."""
    try:
        outcome["reply"] = openai_client(server).chat.completions.create(
            model=uid, messages=[{"role": "user", "content": "Go on."}], max_tokens=900, temperature=0,
            extra_body={"ignore_eos": True},
        )
    except Exception as e:  # the test inspects it
        outcome["error"] = e


def _model_pid(server: Server, uid: str) -> int | None:
    """The process id of ``uid``'s model, or None while it cannot answer (down, relaunching, loading)."""
    try:
        return metrics(server, uid)["pid"]
    except Exception:
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
