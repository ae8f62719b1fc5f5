"""`TPLauncher`: rank 0's side of a tensor-parallel engine: the other ranks' processes and their lifecycle.

The ranks are plain subprocesses (``python -m ...tp.worker``), not ``multiprocessing`` children: Xinference runs
a model in a daemonic process, which ``multiprocessing`` refuses to give children. Each rank exits by itself when
this process is gone (worker.py), `stop` ends them on shutdown, and `fail` ends them when a step failed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import torch

from ..config import EngineConfig
from ..errors import ConfigError
from .batch import send_stop
from .group import RankFailure, TPGroup, connect_store, loopback_env

logger = logging.getLogger("xinf_sglang.runtime")

__all__ = ["TPLauncher"]

DEATH_NOTICE_S = 1.0  # after a failed step, how long to wait for a dying rank's exit to show (to name it)
STOP_WAIT_S = 10.0  # how long a rank may take to leave its loop after stop before it is killed


class TPLauncher:
    """Spawns ranks 1..size-1 of ``config`` and joins rank 0 (this process) to their group (``group``).

    ``failure`` is set once the group has failed (`fail`): from then on no step can run, and every caller sees
    the same error. `check` finds a rank that died while the engine idled (no step noticed it).
    """

    def __init__(self, config: EngineConfig, size: int, device: torch.device) -> None:
        self.size = size
        self.store = connect_store(0, size, is_master=True)
        payload = config.model_dump_json().encode()
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, size):
            cmd = [sys.executable, "-m", "xinf_sglang.runtime.tp.worker",
                   str(rank), str(size), str(self.store.port), str(os.getpid())]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=loopback_env(dict(os.environ)))
            proc.stdin.write(payload)
            proc.stdin.close()
            self.procs.append(proc)
        self._stopped = False
        self.failure: RankFailure | None = None
        self._failing = threading.RLock()  # the scheduler thread (a failed step) and a watcher (check) may race
        try:
            self.group = TPGroup.connect(0, size, self.store, device, config.tp_timeout_s, self.check_peers)
        except BaseException as e:
            self.abandon(e)
            raise

    @property
    def pids(self) -> list[int]:
        """The process ids of ranks 1..size-1."""
        return [p.pid for p in self.procs]

    def check_peers(self) -> None:
        """Raise when a rank reported a startup error (``ConfigError`` with its message) or has exited. Reports
        come first: a rank that exited because a peer failed (`group.PeerFailure`) must not hide that peer's
        own error."""
        for rank in range(1, len(self.procs) + 1):
            key = f"error/{rank}"
            if self.store.check([key]):
                raise ConfigError(f"tensor-parallel rank {rank}: {self.store.get(key).decode()}")
        for rank, proc in enumerate(self.procs, start=1):
            if proc.poll() is not None:
                raise RankFailure(f"tensor-parallel rank {rank} (pid {proc.pid}) {_exit_text(proc.returncode)} "
                                  "during startup")

    def abandon(self, cause: BaseException) -> None:
        """Rank 0's own start failed: tell the ranks (they leave their waits at once, `group.PeerFailure`) and
        end them."""
        try:
            self.store.set("error/0", f"{type(cause).__name__}: {cause}")
        except Exception:  # the store is gone too: ending the processes below is enough
            logger.warning("sglite: could not tell the tensor-parallel ranks that rank 0 failed", exc_info=True)
        self.stop(graceful=False)

    def fail(self, cause: BaseException) -> RankFailure:
        """After a failed step: stop every rank and return the error that names what happened (the first
        failure's error, if the group had already failed)."""
        with self._failing:
            if self.failure is None:
                self.failure = self._failure(cause)
            return self.failure

    def check(self) -> RankFailure | None:
        """The group's failure, or None while every rank runs. A rank found dead fails the group here (its other
        ranks are stopped), so an idle engine learns of it before its next step. Ranks ended by `stop` are not
        a failure."""
        with self._failing:
            if self.failure is None and not self._stopped and any(p.poll() is not None for p in self.procs):
                self.fail(RuntimeError("a rank exited between steps"))
            return self.failure

    def _failure(self, cause: BaseException) -> RankFailure:
        dead = self._dead_ranks(DEATH_NOTICE_S)
        self.stop(graceful=False)
        if dead:
            what = "; ".join(f"rank {r} (pid {p.pid}) {_exit_text(p.returncode)}" for r, p in dead)
        else:
            what = f"a collective failed or timed out ({type(cause).__name__}: {cause})"
        message = (f"tensor-parallel engine failed: {what}; its other ranks were stopped and the model must be "
                   "relaunched")
        logger.error("sglite %s", message)
        return RankFailure(message)

    def _dead_ranks(self, wait_s: float) -> list[tuple[int, subprocess.Popen]]:
        """The ranks that have exited, waiting up to ``wait_s`` for one to: a peer's socket closes (and this
        rank's collective fails) a moment before the peer's exit can be reaped."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [(r, p) for r, p in enumerate(self.procs, start=1) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                return dead
            time.sleep(0.02)

    def stop(self, graceful: bool = True) -> None:
        """End every rank: ask them to stop (``graceful``), then terminate and kill what is left. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if graceful and hasattr(self, "group") and all(p.poll() is None for p in self.procs):
            try:
                send_stop(self.group)
            except Exception:  # a broken group: the ranks are ended below anyway
                logger.warning("sglite: could not tell the tensor-parallel ranks to stop", exc_info=True)
        for proc in self.procs:
            _end(proc, STOP_WAIT_S if graceful else 0.0)
        group = getattr(self, "group", None)
        if group is not None and not graceful and group.device.type == "cuda":
            try:
                group.pg.abort()  # a NCCL communicator would otherwise keep waiting for the dead peers
            except Exception:
                logger.warning("sglite: aborting the NCCL communicator failed", exc_info=True)


def _end(proc: subprocess.Popen, wait_s: float) -> None:
    """Wait ``wait_s`` for ``proc`` to exit, then SIGTERM, then SIGKILL, reaping it (no zombie left)."""
    for step in (None, signal.SIGTERM, signal.SIGKILL):
        if step is not None and proc.poll() is None:
            proc.send_signal(step)
        try:
            proc.wait(timeout=wait_s if step is None else 5.0)
            return
        except subprocess.TimeoutExpired:
            continue


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is running"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
