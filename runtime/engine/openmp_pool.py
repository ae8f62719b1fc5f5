"""Handing the CPU's OpenMP threads to the scheduler thread.

torch's CPU ops and sglite's C++ kernels run their parallel regions on OpenMP, whose runtime (libgomp in torch's
wheels) keeps one pool of worker threads per thread that ever opened a region. The engine loads the model on the
caller's thread, which leaves that thread's pool alive, then runs every model step on the scheduler thread, which
gets a second pool. With more OpenMP threads than cores, libgomp stops spinning between regions (its throttled spin
count) and each region pays a futex wake-up: measured on the 2-core machine, a 262k-element ``mul_`` took 6-7 us a
region from a thread alone with its pool and 28-54 us beside a live pool of another thread; a decode step opens
~150 regions. ``omp_pause_resource_all`` (OpenMP 5.0) frees the calling thread's pool, so the scheduler thread's
pool is the only one left: called once on the thread that built the engine, right before the scheduler starts.
A later parallel region on that thread builds a new pool (correct, only slower again); the engine does no such work
after startup.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache

__all__ = ["release_calling_thread_pool"]

logger = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1  # omp_pause_soft: threads released, state kept; the runtime re-creates them on demand
_RUNTIMES = ("libgomp", "libiomp", "libomp")


@cache
def _loaded_runtime() -> ctypes.CDLL:
    """The OpenMP runtime this process has loaded (torch's bundled one). Raises LookupError when none is mapped
    (yet): a failure is not cached, so a call after torch has loaded its runtime finds it."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError as e:  # not Linux: nothing to release
        raise LookupError("no /proc/self/maps") from e
    for path in sorted(paths):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(_RUNTIMES) and ".so" in name:
            lib = ctypes.CDLL(path)
            if hasattr(lib, "omp_pause_resource_all"):
                return lib
    raise LookupError("no OpenMP runtime with omp_pause_resource_all is loaded")


def release_calling_thread_pool() -> bool:
    """Free the OpenMP worker pool of the calling thread; True when a runtime did so. Safe to call anywhere outside
    a parallel region: a thread that needs a pool again gets a new one."""
    try:
        lib = _loaded_runtime()
    except LookupError:
        return False
    rc = lib.omp_pause_resource_all(ctypes.c_int(_OMP_PAUSE_SOFT))
    if rc != 0:
        logger.debug("omp_pause_resource_all returned %d: the loading thread keeps its OpenMP pool", rc)
    return rc == 0
