"""Linear layers for few rows on the CPU in bfloat16 or float16: ``y [M, N] = x [M, K] @ W[N, K]^T (+ bias)``.

The 16-bit twin of ``linear.py`` (same pool, ``pool_source.py``; same split of output rows over it): at decode a
bfloat16 weight is half the bytes of a float32 one, and the step is memory-bound. torch's ``F.linear`` in bfloat16
(oneDNN) ran SmolLM2-135M's decode at 33.9 tok/s against 46 for the float32 kernel (issue 35). Here ``x``, ``W``
(row-major as stored, no repacking) and ``bias`` share one dtype; every output is one float32 dot product rounded
once to that dtype. AVX-512 BF16's ``vdpbf16ps`` where the CPU has it, else the values converted to float32
(bfloat16: shifted left 16; float16: F16C) and FMAs on AVX-512 or AVX2, else a scalar loop (C++ and the
arithmetic in ``linear16_source.py``).

Each 4-row weight block prefetches the next one while it is read (without it 9.0 ms instead of 5.9 below).
Measured on the 2-core AVX-512 BF16 machine, SmolLM2-135M's 211 decode weights of one token (269 MB in bfloat16;
``scripts/bench_cpu_linear.py --dtype bfloat16 --rows 1,4,16 --only ...``, each variant in its own process, min of
10): 5.9 / 6.2 / 10.5 ms at 1 / 4 / 16 rows against oneDNN's 13.0 / 15.0 / 19.2 and the float32 kernel's
14.9 / 22.5 / 45.0 (538 MB); float16 5.9 / 6.4 / 15.5 against torch's 6.8 ms at one row and 91 at 16.

As the float32 kernel, results do not depend on the thread count, the batch size or the row's position in the batch
(they do depend on the build: ``vdpbf16ps`` adds products in pairs and flushes denormal inputs to zero).
``linear_ref`` (``F.linear``) is the ground truth; tests/test_cpu_linear.py bounds the error of every build.
"""

from __future__ import annotations

import functools

import torch

from .build import load_cpp
from .linear import SPIN_US
from .linear16_source import LINEAR16_CPP, LINEAR16_MODULE_CPP
from .pool_source import POOL_CPP

# Up to this many rows the kernel is used; beyond, oneDNN (it was 1.8x slower at 16 rows, and it pays OpenMP
# wake-ups in the engine that a loop of calls hides). As the float32 kernel's ``CPU_SKINNY_MAX_M``.
CPU16_SKINNY_MAX_M = 16
DTYPES = (torch.bfloat16, torch.float16)

_INCLUDES = r"""
#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <pthread.h>
#include <sched.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace {
"""


@functools.cache
def load(isa: str | None = None, bf16: bool = True):
    """The compiled extension for this CPU (``isa``: force ``"DEFAULT"`` / ``"AVX2"`` / ``"AVX512"``; ``bf16``
    False: no AVX-512 BF16 instructions; both for tests). Its ``isa_bfloat16`` / ``isa_float16`` name the path each
    dtype takes. Raises RuntimeError naming the cause and the way out when it cannot be built.
    """
    return load_cpp("sglite_cpu_linear16", _INCLUDES + POOL_CPP + LINEAR16_CPP + LINEAR16_MODULE_CPP, None,
                    "CPU 16-bit linear kernel", "run the model in float32 (--dtype float32)", isa=isa, avx512=True,
                    bf16=bf16)


@functools.cache
def _pool(threads: int, isa: str | None = None, bf16: bool = True):
    """One pool per thread count (and build) for the process, like the float32 kernel's."""
    return load(isa, bf16).LinearPool16(threads, SPIN_US)


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``linear16_cpu`` takes these inputs: CPU ``x`` and ``weight [N, K]`` (contiguous) of one dtype,
    bfloat16 or float16, ``x`` with at most ``CPU16_SKINNY_MAX_M`` rows, ``bias`` of that dtype and contiguous if
    given."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in DTYPES
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.shape[-1] == weight.shape[1]
        and x.numel() <= CPU16_SKINNY_MAX_M * max(1, x.shape[-1])
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous() and bias.shape == weight.shape[:1]))
    )


def linear16_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 isa: str | None = None, bf16: bool = True) -> torch.Tensor:
    """``linear_ref``'s contract for inputs that ``supports`` accepts, on a pool of ``torch.get_num_threads()``
    threads (``isa``, ``bf16``: as in `load`). Raises ValueError for anything else."""
    if not supports(x, weight, bias):
        raise ValueError(
            f"linear16_cpu takes bfloat16 or float16 CPU x [<= {CPU16_SKINNY_MAX_M} rows, K], a contiguous weight "
            f"[N, K] and bias of its dtype; got x {tuple(x.shape)} {x.dtype} {x.device}, weight "
            f"{tuple(weight.shape)} {weight.dtype}, bias {None if bias is None else bias.dtype}"
        )
    return linear16_checked(x, weight, bias, isa, bf16)


def linear16_checked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     isa: str | None = None, bf16: bool = True) -> torch.Tensor:
    """`linear16_cpu` for a caller that has called `supports` (the dispatcher, on every decode linear)."""
    flat = x.dim() == 2  # decode's [M, K]: no reshape, no view
    x2 = x if flat else x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = _pool(torch.get_num_threads(), isa, bf16).linear(x2, weight, bias)
    return y if flat else y.view(*x.shape[:-1], weight.shape[0])
