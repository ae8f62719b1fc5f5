"""GGUF linear layers on the CPU: ``y [M, N] = x [M, K] @ W[N, K]^T (+ bias)`` read from GGML's blocks.

``W`` stays as the file stores it: ``qweight`` uint8 ``[N, K / block_values, block_bytes]`` (one row of blocks per
output feature; ``block`` is its ``kernels.quant.gguf_reference.GGUFBlock``, which lists the types). Two paths:

- Decode (``M <= GEMV_MAX_M``): each sub-block of 32 weights is decoded to small integer codes (``gguf_source.py``)
  and dotted with the activations rounded to int16 per 32 values (one float scale each; ``gguf_kernel_source.py``):
  AVX2 ``madd``, AVX-512 VNNI ``dpwssd`` where the CPU has it, a scalar loop without AVX2; with AVX-512 (BW + VNNI)
  two sub-blocks a step in 512-bit registers (SmolLM2's Q4_1 linears of one token on 2 threads: 3.05 -> 2.75 ms,
  one thread at 2048 x 1536: Q4_1 136 -> 112 us, Q8_0 91 -> 71, Q6_K 245 -> 207). A weight row is decoded
  once for up to 8 activation rows. The offsets of the formats with a minimum (Q4_1, Q5_1, Q4_K, Q5_K) and of the
  signed ones stored unsigned (Q4_0, Q5_0, Q6_K) multiply the exact float sum of each 16 activations. Output rows
  are claimed in ~128 KB runs (a whole number per thread) by a pool of ``torch.get_num_threads()`` threads that
  stays awake between calls (``pool_source.py``, shared with the float linear kernel: in the engine OpenMP's
  wake-ups doubled this kernel's time).
- Prefill (more rows): the weight is dequantized to float32 (on the pool, AVX2) and multiplied by MKL.

Why int16 activations (measured on the 2-core AVX-512 machine, SmolLM2's 120 Q4_1 linears of one token,
docs/PERFORMANCE.md): llama.cpp's int8 (``act="q8"``, ``maddubs`` / ``dpbusd``) runs 15-25% faster but moves each
output by ~1e-2 of its bound and changed SmolLM2's greedy tokens against the dequantized weights in 7 of 8 prompts
(within 48 tokens); int16 moves it by ~3e-5 and kept all 8 identical; float32 activations (``act="f32"``, the codes
converted to floats) are exact to float rounding but 1.9x slower at one row.

Contract: ``gguf_linear_ref`` (dequantize, ``F.linear``); tests/test_gguf_quant_kernels.py bounds the error of each
path. Built with ``build.load_cpp`` (AVX-512 flags where torch reports AVX-512: ``avx512=True``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .build import load_cpp
from .gguf_kernel_source import ACTIVATIONS, GGUF_KERNEL_CPP
from .gguf_source import GGUF_TYPES_CPP
from .linear import SPIN_US
from .pool_source import POOL_CPP

# Up to this many rows the blocks are read directly; beyond, dequantize + MKL (SmolLM2's Q4_1 linears of one token on
# 2 threads, scripts/bench_cpu_gguf.py: 13.6 / 27 / 59 / 123 ms at 8 / 16 / 32 / 64 rows against 35 / 41 / 61 / 160;
# 103 at 64 rows in another run).
GEMV_MAX_M = 32


@functools.cache
def load(isa: str | None = None):
    """The compiled extension for this CPU (``isa``: force ``"DEFAULT"`` / ``"AVX2"`` / ``"AVX512"``, for tests).

    Raises RuntimeError naming the cause and the way out when it cannot be built.
    """
    return load_cpp("sglite_cpu_gguf", GGUF_TYPES_CPP + POOL_CPP + GGUF_KERNEL_CPP, None, "CPU GGUF kernel",
                    "load the GGUF dequantized with gguf_dequantize=True", isa=isa, avx512=True)


@functools.cache
def _pool(threads: int, isa: str | None = None):
    """One pool per thread count (and build) for the process, like the linear kernel's (``linear.SPIN_US``)."""
    return load(isa).GGUFPool(threads, SPIN_US)


def supports(x: torch.Tensor, qweight: torch.Tensor, block: Any, bias: torch.Tensor | None) -> bool:
    """Whether `gguf_linear_cpu` takes these inputs: float32 CPU ``x [..., K]``, a contiguous uint8 ``qweight`` of
    ``K`` values of ``block``'s format per row, a float32 ``bias [N]`` if given."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and qweight.dtype == torch.uint8
        and qweight.is_contiguous() and qweight.dim() >= 2 and x.shape[-1] % block.values == 0
        and qweight.numel() == qweight.shape[0] * x.shape[-1] // block.values * block.bytes
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.shape == qweight.shape[:1]))
    )


def gguf_linear_cpu(x: torch.Tensor, qweight: torch.Tensor, block: Any, bias: torch.Tensor | None = None,
                    act: str = "q16", isa: str | None = None) -> torch.Tensor:
    """``gguf_linear_ref``'s contract for inputs `supports` takes (``act``: ``"q16"``, ``"q8"`` or ``"f32"``
    activations in the decode path). Raises ValueError for anything else."""
    if not supports(x, qweight, block, bias) or act not in ACTIVATIONS:
        raise ValueError(f"gguf_linear_cpu takes float32 CPU x [..., K], a contiguous uint8 qweight of a kept type "
                         f"(act {' / '.join(ACTIVATIONS)}); got x {tuple(x.shape)} {x.dtype} {x.device}, qweight "
                         f"{tuple(qweight.shape)} {qweight.dtype} {block.name}, act {act!r}")
    return gguf_linear_checked(x, qweight, block, bias, act, isa)


def gguf_linear_checked(x: torch.Tensor, qweight: torch.Tensor, block: Any, bias: torch.Tensor | None = None,
                        act: str = "q16", isa: str | None = None) -> torch.Tensor:
    """`gguf_linear_cpu` for a caller that has called `supports` (the dispatcher, on every decode linear)."""
    flat = x.dim() == 2  # decode's [M, K]: no reshape, no view (every microsecond counts 200 times a token)
    x2 = x if flat else x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    pool = _pool(torch.get_num_threads(), isa)
    if x2.shape[0] <= GEMV_MAX_M:
        y = pool.gemv(x2, qweight, block.ggml_type, bias, ACTIVATIONS.index(act))
    else:
        y = torch.nn.functional.linear(x2, pool.dequantize(qweight, block.ggml_type, x2.shape[1]), bias)
    return y if flat else y.view(*x.shape[:-1], qweight.shape[0])


def gemv_rows(x: torch.Tensor, qweight: torch.Tensor, block: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`gguf_linear_checked`'s decode path for float32 CPU ``x [M <= GEMV_MAX_M, K]`` with unit last stride (a decode
    step's linears, ~120 calls a token: no Python checks); the C++ checks the weight and bias against ``x`` and raises
    RuntimeError."""
    return _pool(torch.get_num_threads()).gemv(x, qweight, block.ggml_type, bias, 0)


def gguf_dequantize_cpu(qweight: torch.Tensor, block: Any, in_features: int, isa: str | None = None) -> torch.Tensor:
    """``W [N, in_features]`` float32 from its blocks (``dequantize_gguf``'s contract, threaded)."""
    return _pool(torch.get_num_threads(), isa).dequantize(qweight.contiguous(), block.ggml_type, in_features)
