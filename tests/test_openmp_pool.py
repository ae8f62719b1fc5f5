"""The loading thread's OpenMP pool is released before the scheduler thread starts (runtime/engine/openmp_pool.py):
the pool's worker threads really exit, and torch keeps computing correctly on both threads afterwards."""

import os
import threading
import time

import pytest
import torch

from xinf_sglang.runtime.engine.openmp_pool import release_calling_thread_pool


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _parallel_region() -> torch.Tensor:
    a = torch.arange(1 << 18, dtype=torch.float32)  # above torch's grain (32k elements): a parallel region
    return a.mul_(2.0)


def _wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.mark.skipif(torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task"),
                    reason="needs a multi-threaded OpenMP torch on Linux")
def test_release_frees_the_calling_threads_pool_and_torch_still_computes():
    def run() -> None:  # a fresh thread: its pool is its own, whatever the test process did before
        _parallel_region()
        with_pool = _os_threads()
        assert release_calling_thread_pool() is True
        assert _wait_for(lambda: _os_threads() <= with_pool - (torch.get_num_threads() - 1)), \
            "the pool's worker threads did not exit"
        out = _parallel_region()  # a new pool on demand, same result
        assert torch.equal(out, torch.arange(1 << 18, dtype=torch.float32) * 2)
        assert release_calling_thread_pool() is True  # and this one goes too: the thread leaves no pool behind

    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _capture(run, errors))
    t.start()
    t.join()
    if errors:
        raise errors[0]


def _capture(fn, errors: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as e:  # re-raised on the test's thread
        errors.append(e)


def test_release_outside_linux_or_without_a_runtime_is_a_no_op_that_says_so():
    # On this build torch maps libgomp; the call must be repeatable and never raise on a thread without a pool.
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(release_calling_thread_pool()))
    t.start()
    t.join()
    assert result in ([True], [False])
