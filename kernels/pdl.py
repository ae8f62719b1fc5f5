"""Programmatic dependent launch (PDL) for the kernels of the model's forward.

A decode step at batch 1 is ~10 kernels per layer, each a few microseconds long, so the gap between one kernel's
end and the next one's start (drain, launch, block scheduling: ~1-2 us inside a CUDA graph) is a real share of
the step. On Hopper and newer GPUs a kernel launched with the PDL attribute is scheduled while the kernel before
it in the stream is still running; its programs then wait in ``griddepcontrol.wait`` until that kernel has
completed and its writes are visible. The launch overlaps the tail of the previous kernel instead of following it.

The contract every kernel with a ``USE_PDL`` parameter keeps: it calls ``pdl_wait(USE_PDL)`` before its first load
or store, so it neither reads a predecessor's output early nor overwrites a buffer a predecessor still reads; a
PDL launch is then exactly as ordered as a plain one. The only memory traffic allowed before the wait is
``prefetch_l2`` of data that no kernel writes (the skinny linear warms L2 with its first weight tiles that way);
tests/test_kernels.py checks this for every kernel. ``pdl_wait`` also releases the next kernel right away
(``griddepcontrol.launch_dependents``), which only lets it be scheduled early: its own wait still covers this
kernel's completion. Kernels of other libraries (cuBLAS, torch) in between are launched plainly and wait as usual.

``pdl_kwargs(device)`` gives the launch arguments: PDL on CUDA devices of compute capability 9.0 or newer when
the installed triton has the intrinsics, off everywhere else (older GPUs, the CPU interpreter). Setting
``SGLITE_DISABLE_PDL=1`` in the environment turns it off, to compare or to rule it out when debugging.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # triton is optional (absent on macOS / Windows): then only the references run and nothing here is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

HAS_GDC = False
if triton is not None:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        HAS_GDC = True
    except ImportError:  # pragma: no cover - triton older than the intrinsics: PDL stays off

        @triton.jit
        def gdc_wait():
            pass

        @triton.jit
        def gdc_launch_dependents():
            pass

    @triton.jit
    def pdl_wait(USE_PDL: tl.constexpr):
        """Wait for the previous kernel in the stream (completion and visible writes), then let the next one be
        scheduled. A no-op unless ``USE_PDL`` (which ``pdl_kwargs`` sets only where the intrinsics exist)."""
        if USE_PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def prefetch_l2(ptrs, USE_PDL: tl.constexpr):
        """Ask for the lines at ``ptrs`` to be pulled into L2 (a hint: no value, no fault on the hot path). Only
        for data no kernel writes, such as weights: a kernel may issue it before ``pdl_wait``, so the reads
        overlap the previous kernel. A no-op unless ``USE_PDL`` (without PDL there is nothing to overlap)."""
        if USE_PDL:
            tl.inline_asm_elementwise(
                "prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
            )


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL (see the module docstring for when)."""
    if device.type != "cuda" or not HAS_GDC or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("SGLITE_DISABLE_PDL") == "1":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def pdl_kwargs(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for launching a kernel that takes ``USE_PDL``: the kernel-side flag and triton's launch
    option always agree."""
    on = pdl_supported(device)
    return {"USE_PDL": on, "launch_pdl": on}
