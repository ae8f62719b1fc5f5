"""``sglite bench offline --isolate``: each engine (sglite, each baseline) runs in a fresh process of its own, so its
startup and its memory are its own: startup is the seconds from that process's creation (interpreter, imports,
loading the model) to the engine being ready, and the peak RSS is that of the process and all its children (the
scheduler or tensor-parallel processes, grammar compilers), sampled every `SAMPLE_S` and never below the process's
own high-water mark (``ru_maxrss``, which catches a spike between samples). In one shared process the second
engine would start with the first one's imports and freed-but-kept heap.
"""

from __future__ import annotations

import multiprocessing
import resource
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil

T = TypeVar("T")
SAMPLE_S = 0.05


@dataclass(frozen=True)
class ProcessCost:
    """What one engine's process cost: seconds from its creation to ready, and its tree's peak RSS in bytes."""

    startup_s: float
    peak_rss_bytes: int


def process_age() -> float:
    """Seconds since this process was created (the clock an isolated child reads when its engine is ready)."""
    return time.time() - psutil.Process().create_time()


def run_isolated(fn: Callable[..., tuple[T, float]], *args: Any) -> tuple[T, ProcessCost]:
    """``fn(*args)`` in a fresh (spawned) process; ``fn`` returns ``(value, process_age() when ready)``.

    Raises:
        RuntimeError: the child failed (its traceback in the message) or died without an answer.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, fn, args), daemon=False)
    child.start()
    send.close()
    peak = 0
    try:
        watched = psutil.Process(child.pid)
        while not receive.poll(SAMPLE_S):
            if not child.is_alive():
                raise RuntimeError(f"the isolated benchmark process died (exit code {child.exitcode})")
            peak = max(peak, _tree_rss(watched))
        status, payload = receive.recv()
    finally:
        child.join()
    if status == "error":
        raise RuntimeError(f"the isolated benchmark process failed:\n{payload}")
    value, ready_age, own_peak = payload
    return value, ProcessCost(ready_age, max(peak, own_peak))


def run_external(argv: list[str], env: dict[str, str]) -> ProcessCost:
    """Run the command ``argv`` (another interpreter: a baseline in its own virtualenv) to its end, its output
    passed through, sampling its process tree's RSS. The startup it reports is 0: only the command knows when its
    engine was ready, so it writes that itself.

    Raises:
        RuntimeError: the command exited with a non-zero status.
    """
    child = subprocess.Popen(argv, env=env)
    peak = 0
    watched = psutil.Process(child.pid)
    while child.poll() is None:
        peak = max(peak, _tree_rss(watched))
        time.sleep(SAMPLE_S)
    if child.returncode != 0:
        raise RuntimeError(f"{argv[1] if len(argv) > 1 else argv[0]} exited with status {child.returncode}")
    return ProcessCost(0.0, peak)


def _tree_rss(process: psutil.Process) -> int:
    """RSS of ``process`` and its descendants now (0 for those that exited meanwhile)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _child(send: Any, fn: Callable[..., tuple[Any, float]], args: tuple) -> None:
    """The spawned process: run ``fn``, send ``("ok", (value, ready age, own peak RSS))`` or ``("error", text)``."""
    try:
        value, ready_age = fn(*args)
        own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        send.send(("ok", (value, ready_age, own_peak)))
    except BaseException:  # the parent re-raises it with the traceback; nothing else could report it
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()

