"""Building sglite's C++ CPU kernels: one place for the compiler flags and the build-or-load step.

Each kernel file (``attention.py``, ``linear.py``, ``elementwise.py``) holds its C++ source (the
attention kernel's is in ``attention_source.py``) and calls ``load_cpp`` from a ``functools.cache``'d
``load()``. torch compiles an extension once per source and flags
and caches it in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); a source change rebuilds it.
Needs g++ and ninja.
"""

from __future__ import annotations

import logging
import time
from types import ModuleType

import torch

logger = logging.getLogger(__name__)


# C++ shared by the kernels' sources (pasted inside their anonymous namespace; needs <algorithm>, <cmath>,
# <cstdint>, <cstring>): exp(x) in place (Cephes' expf polynomial, ~1 ulp), written so that gcc vectorises it;
# std::exp does not vectorise without -ffast-math, which would also break the attention kernel's -inf handling.
# gcc 12 (checked with -fopt-info-vec) left an earlier form of this scalar: std::floor does not vectorise without
# -fno-trapping-math, std::min/max's reference arguments become per-lane arrays, and a clamp in the same loop is
# jump-threaded into branches that would speculate trapping float ops. Hence the clamp in a loop of its own with
# quiet compares, and floor from a truncating int cast: the same values (NaN stays NaN), 8 or 16 lanes at a time.
# Inputs are clamped to [-87, 88] (the float range of exp's result), so large |x| give ~0 and ~1.7e38, never NaN.
SIMD_EXP = r"""
inline void exp_inplace(float* x, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {  // the clamp: a loop of its own, quiet compares (see above)
    const float v = x[i];
    const float lo = __builtin_isless(v, -87.0f) ? -87.0f : v;
    x[i] = __builtin_isgreater(lo, 88.0f) ? 88.0f : lo;
  }
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float v = x[i];
    const float t = v * 1.44269504088896341f + 0.5f;
    const int32_t ti = static_cast<int32_t>(t);  // |t| < 128
    const float fx = static_cast<float>(ti - (__builtin_isless(t, static_cast<float>(ti)) ? 1 : 0));  // floor(t)
    float r = v - fx * 0.693359375f + fx * 2.12194440e-4f;
    float z = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(float));
    x[i] = y * scale;
  }
}
"""


def build_flags(prefix: str, isa: str | None = None, avx512: bool = False, bf16: bool = False) -> tuple[str, list[str]]:
    """Extension name and compiler flags for this CPU: the ISA is part of the name, so a cache directory shared
    between machines never hands an AVX2 build to a CPU without AVX2.

    ``isa``: ``"DEFAULT"`` (scalar), ``"AVX2"`` or ``"AVX512"`` instead of what torch reports (tests build every
    path of a kernel on one machine). ``avx512``: the kernel has paths of its own for F16C (with AVX2) and for
    AVX-512 (+ VNNI where the CPU has it); off, an AVX-512 CPU gets the AVX2 flags, as the older kernels expect.
    ``bf16`` (with ``avx512``): also AVX-512 BF16 (``vdpbf16ps``) where the CPU has it.
    """
    cap = isa or torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ... (x86) or e.g. "SVE256"
    flags = ["-O3", "-fopenmp"]
    if cap in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"] + (["-mf16c"] if avx512 else [])
    name = f"{prefix}_{cap.lower()}"
    if avx512 and cap == "AVX512":  # torch's AVX512 capability means F, BW, VL and DQ
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        if getattr(torch.cpu, "_is_vnni_supported", lambda: False)():
            flags.append("-mavx512vnni")
            name += "vnni"
        if bf16 and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            flags.append("-mavx512bf16")
            name += "bf16"
    return name, flags


def load_cpp(prefix: str, source: str, functions: list[str] | None, what: str, way_out: str,
             isa: str | None = None, avx512: bool = False, bf16: bool = False) -> ModuleType:
    """Build (or load from torch's cache) the extension ``prefix`` from ``source`` exporting ``functions`` (None:
    the source defines its own ``PYBIND11_MODULE``); ``isa``, ``avx512`` and ``bf16`` as in `build_flags`.

    Raises RuntimeError naming ``what`` failed, the cause, and ``way_out`` (how to run without it).
    """
    from torch.utils.cpp_extension import load_inline

    name, flags = build_flags(prefix, isa, avx512, bf16)
    start = time.perf_counter()
    try:
        module = load_inline(
            name=name, cpp_sources=source, functions=functions, extra_cflags=flags, extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # compiler or ninja missing, headers mismatch, ...
        raise RuntimeError(
            f"sglite's {what} ({name}) could not be built: {type(e).__name__}: {e}. It needs g++ and ninja "
            f"(pip install ninja) and writes to TORCH_EXTENSIONS_DIR; or {way_out}"
        ) from e
    logger.info("%s %s ready in %.1f s", what, name, time.perf_counter() - start)
    return module
