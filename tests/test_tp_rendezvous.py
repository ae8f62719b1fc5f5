"""The rendezvous of a tensor-parallel group on one host (issue 28 point 4): nothing a ``tp_size=2`` CPU engine's
processes open listens beyond the loopback interface (the store and gloo), and a rank whose start failed does not
leave the ranks already waiting for it waiting for the 1,800 s startup timeout: they see its error and exit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

from xinf_sglang.runtime import EngineConfig, SamplingParams
from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.tp.group import connect_store
from xinf_sglang.runtime.tp.launcher import TPLauncher

from .engine_helpers import make_engine

LOOPBACK = {"127.0.0.1", "::1"}
WAIT_S = 120  # bounds a hang; not a timing assertion


def _listening(pid: int) -> set[tuple[int, str, int]]:
    """(fd, address, port) of every listening inet socket of process ``pid``."""
    conns = psutil.Process(pid).net_connections(kind="inet")
    return {(c.fd, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


def test_a_tp_engine_listens_on_loopback_only(tiny_model) -> None:
    before = _listening(os.getpid())  # other tests' servers in this process are not the engine's
    engine = make_engine(tiny_model("llama"), tp_size=2)
    try:
        [out] = engine.generate(input_ids=[[5, 6, 7]], sampling_params=SamplingParams(max_new_tokens=2))
        assert out.error is None
        found = {("rank 0", ip, port) for _, ip, port in _listening(os.getpid()) - before}
        for rank, pid in enumerate(engine.tp.pids, start=1):
            found |= {(f"rank {rank}", ip, port) for _, ip, port in _listening(pid)}
        assert found, "no listening socket found at all: the check would prove nothing"
        outside = sorted(s for s in found if s[1] not in LOOPBACK)
        assert outside == [], f"tensor-parallel sockets listening beyond loopback: {outside}"
    finally:
        engine.shutdown()


def test_a_rank_waiting_for_a_failed_peer_exits_promptly(tiny_model) -> None:
    """Rank 1 of 3 waits for ranks 0 and 2; rank 2 reports a startup error: rank 1 exits at once (it used to wait
    for the store's 1,800 s timeout holding its device) without writing an error of its own over rank 2's."""
    store = connect_store(0, 3, is_master=True)
    config = EngineConfig(model_path=str(tiny_model("llama")), device="cpu", tp_size=3)
    cmd = [sys.executable, "-m", "xinf_sglang.runtime.tp.worker", "1", "3", str(store.port), str(os.getpid())]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    try:
        proc.stdin.write(config.model_dump_json().encode())
        proc.stdin.close()
        store.wait(["hello/1"])  # rank 1 is up and waiting for the others
        store.set("error/2", "ConfigError: rank 2 could not load its shard")
        start = time.monotonic()
        assert proc.wait(timeout=WAIT_S) == 1
        assert time.monotonic() - start < 30, "rank 1 did not notice rank 2's failure promptly"
        assert not store.check(["error/1"]), "rank 1 wrote an error over the one that caused it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_rank_zero_reports_the_failed_ranks_own_error_not_a_waiting_ranks_exit() -> None:
    """Rank 1 exited because rank 2 failed: rank 0 names rank 2 and its message."""
    launcher = object.__new__(TPLauncher)  # only check_peers' inputs: the store and the rank processes
    launcher.store = connect_store(0, 3, is_master=True)
    exited = SimpleNamespace(pid=11, returncode=1, poll=lambda: 1)
    running = SimpleNamespace(pid=12, returncode=None, poll=lambda: None)
    launcher.procs = [exited, running]
    launcher.store.set("error/2", "ConfigError: rank 2 could not load its shard")
    with pytest.raises(ConfigError, match="rank 2: ConfigError: rank 2 could not load its shard"):
        launcher.check_peers()
