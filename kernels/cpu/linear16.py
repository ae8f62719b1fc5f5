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

On a CPU with AVX-512 BF16 a bfloat16 weight is instead packed once at load (`pack`, the dense linear method's
``process_weights_after_loading``) for `linear_packed`, a register-blocked GEMM that serves every batch size: 12
rows x 32 columns of float32 accumulators, each step one broadcast pair of x times 16 columns' pairs of weights
(``vdpbf16ps``), no horizontal sums. SmolLM2-135M's 120 layer linears of 30 distinct layers, min of 15 from a
non-main thread (the bench in the commit of issue 35): 13.4 ms at 41 rows against oneDNN's 19.2 and this kernel's
forced 20.8; 18.0 at 64 rows against 25.8; 8.3 at 16 rows against 9.1 here.

As the float32 kernel, results do not depend on the thread count, the batch size or the row's position in the batch
(they do depend on the build: ``vdpbf16ps`` adds products in pairs and flushes denormal inputs to zero).
``linear_ref`` (``F.linear``) is the ground truth; tests/test_cpu_linear.py bounds the error of every build.
"""

from __future__ import annotations

import functools

import torch

from .build import load_cpp
from .linear import SPIN_US
from .linear16_source import LINEAR16_CPP, LINEAR16_MODULE_CPP, PACKED16_CPP
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
    return load_cpp("sglite_cpu_linear16", _INCLUDES + POOL_CPP + LINEAR16_CPP + PACKED16_CPP + LINEAR16_MODULE_CPP, None,
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


# The register-blocked kernel on a weight packed once at load (AVX-512 BF16 CPUs, bfloat16): every batch size.


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `pack` takes ``weight``: a 2-D bfloat16 CPU tensor, on a CPU with AVX-512 BF16 (elsewhere bfloat16
    linears stay on `linear16_cpu` up to ``CPU16_SKINNY_MAX_M`` rows and oneDNN beyond)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
            and hasattr(load().LinearPool16, "pack"))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` (`can_pack`) in `linear_packed`'s layout, ``[ceil(N / 16), ceil(K / 2), 16, 2]``: 16
    output columns by pairs of K, zero-padded (the same bytes as ``weight`` but for the padding)."""
    return load().LinearPool16.pack(weight.contiguous())


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The ``[n, k]`` weight that `pack` packed (a copy)."""
    return packed.permute(0, 2, 1, 3).reshape(packed.shape[0] * 16, -1)[:n, :k].contiguous()


def linear_packed(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear_ref(x, unpack(packed, n, K), bias)`` for bfloat16 ``x [..., K]`` of any number of rows (``bias [n]``
    bfloat16): float32 sums over k in order, each output rounded once; a row's result depends on neither the
    batch, its position nor the thread count. 12 rows x 32 columns a tile, columns split over OpenMP threads.
    Raises ValueError for inputs of another dtype or width."""
    k = x.shape[-1]
    if x.dtype != torch.bfloat16 or packed.dim() != 4 or (k + 1) // 2 != packed.shape[1] or (
            bias is not None and (bias.dtype != x.dtype or bias.shape != (n,) or not bias.is_contiguous())):
        raise ValueError(f"linear_packed takes bfloat16 x [..., K] of a packed [{n}, K] weight and bias; got x "
                         f"{tuple(x.shape)} {x.dtype}, packed {tuple(packed.shape)}, bias "
                         f"{None if bias is None else (tuple(bias.shape), bias.dtype)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = _pool(torch.get_num_threads()).linear_packed(x2, packed, n, bias)
    return y.view(*x.shape[:-1], n)
