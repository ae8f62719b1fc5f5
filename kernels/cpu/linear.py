"""Linear layers for few rows on the CPU (decode): ``y [M, N] = x [M, K] @ W[N, K]^T (+ bias)``, float32.

At decode every projection is memory-bound: the weights are streamed once per step for a handful of rows. MKL's
``sgemm`` for one to a few rows runs on one thread whatever ``torch.get_num_threads()`` says, and a team of
OpenMP threads woken for each of the ~200 linears of a token costs what the second core would gain. This kernel
splits each weight's output rows over a small pool of its own threads that stay awake (spinning, then yielding)
for a short while after each call, so the second core starts within a microsecond, and it reads each row-major
weight row once per 4-row block with AVX2 FMAs while the block is reused from L1 for every input row.
The pool has as many threads as torch's intra-op pool (``torch.get_num_threads()``), the caller included; its C++
is ``pool_source.py``, shared with the GGUF kernel (``gguf.py``).

Measured on the 2-core AVX2 runner (docs/PERFORMANCE.md) for SmolLM2-135M's 211 float32 weights of one token:
10.4 ms against MKL's 20.4 (column-major weights) and 26.6 (row-major).

Every output element is one dot product computed by one thread in a fixed order, so results do not depend on
the thread count, the batch size or the row's position in the batch. ``linear_ref`` (``F.linear``) is the
ground truth; tests compare both on random inputs.

A forked child gets a fresh pool (the parent's threads do not exist in it).
"""

from __future__ import annotations

import functools

import torch

from .build import load_cpp
from .pool_source import POOL_CPP

# The pool has ``torch.get_num_threads()`` threads (the caller included), the intra-op thread count the engine set;
# one pool per count, created on first use. (On 2026-12-02 a pool of 2 hung once: a pool thread still leaving one
# call claimed a chunk of the next call's larger count; fixed in run(), with the stress test in
# tests/test_cpu_linear.py, before the pool went back to two threads.)
# Up to this many rows the kernel is used; beyond it MKL's register-blocked sgemm on all cores wins.
CPU_SKINNY_MAX_M = 16
# How long (microseconds) a pool thread keeps polling for the next call before it sleeps: the gap between two
# linears of one decode step is 5-50 us; the gap between two steps is longer and pays one wake-up.
SPIN_US = 200

_CPP = (r"""
#include <torch/extension.h>
#include <pthread.h>
#include <sched.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SGLITE_AVX2 1
#endif

namespace {
""" + POOL_CPP + r"""
#ifdef SGLITE_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Dot products of rows w[0..R) (R <= 4, each K long) with x; out[r] = w[r] . x. Eight lanes accumulate
// k = 8j + lane; the tail k >= K8 is added in order after the lane sum.
template <int R>
inline void dot_rows(const float* const* w, const float* x, int64_t K, float* out) {
  int64_t k = 0;
#ifdef SGLITE_AVX2
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + k), xv, acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
#else
  for (int r = 0; r < R; ++r) out[r] = 0.f;
#endif
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r) out[r] += w[r][k] * x[k];
}

struct Task {
  const float* x; int64_t M; int64_t sx;   // x rows (row stride sx)
  const float* w; int64_t N; int64_t K;    // weight [N, K], contiguous
  const float* bias;                       // [N] or null
  float* y;                                // [M, N], contiguous
};

// Output rows [n0, n1) of every input row: blocks of 4 weight rows, each block reused for all M input rows.
void run_rows(const Task& t, int64_t n0, int64_t n1) {
  float out[4];
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t r = std::min<int64_t>(4, n1 - n);
    const float* w[4];
    for (int64_t i = 0; i < 4; ++i) w[i] = t.w + (n + std::min(i, r - 1)) * t.K;
    for (int64_t m = 0; m < t.M; ++m) {
      const float* x = t.x + m * t.sx;
      if (r == 4) dot_rows<4>(w, x, t.K, out);
      else for (int64_t i = 0; i < r; ++i) dot_rows<1>(w + i, x, t.K, out + i);
      float* y = t.y + m * t.N + n;
      for (int64_t i = 0; i < r; ++i) y[i] = out[i] + (t.bias ? t.bias[n + i] : 0.f);
    }
  }
}

}  // namespace

struct LinearPool : PoolHandle {
  static constexpr int64_t kChunkRows = 32;  // rows per claim: ~1.5 us of work at K = 576

  using PoolHandle::PoolHandle;
  int64_t threads() const { return pool->threads(); }
  at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0 || N == 0) return y;
    Task t{x.data_ptr<float>(), M, x.stride(0), w.data_ptr<float>(), N, K,
           bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>()};
    pool->run(N, kChunkRows, [&t](int64_t n0, int64_t n1) { run_rows(t, n0, n1); });
    return y;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<LinearPool>(m, "LinearPool")
      .def(pybind11::init<int64_t, int64_t>())
      .def_property_readonly("threads", &LinearPool::threads)
      .def("linear", &LinearPool::linear, pybind11::call_guard<pybind11::gil_scoped_release>());
}
""")


@functools.cache
def load():
    """The compiled extension (built on first use, then loaded from torch's cache).

    Raises RuntimeError naming the cause and the way out when it cannot be built.
    """
    return load_cpp("sglite_cpu_linear", _CPP, None, "CPU linear kernel", "run on a machine with g++ and ninja")


@functools.cache
def _pool(threads: int):
    """One pool per thread count for the process, like torch's own intra-op pool (created on first use)."""
    return load().LinearPool(threads, SPIN_US)


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``linear_cpu`` takes these inputs: float32 CPU tensors, ``x`` with at most ``CPU_SKINNY_MAX_M`` rows
    and a contiguous last dim, ``weight [N, K]`` contiguous, ``bias`` contiguous if given."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.shape[-1] == weight.shape[1]
        and x.numel() <= CPU_SKINNY_MAX_M * max(1, x.shape[-1])
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.shape == weight.shape[:1]))
    )


def linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear_ref``'s contract for inputs that ``supports`` accepts, on a pool of ``torch.get_num_threads()``
    threads.
    Raises ValueError for anything else."""
    if not supports(x, weight, bias):
        raise ValueError(
            f"linear_cpu takes float32 CPU x [<= {CPU_SKINNY_MAX_M} rows, K] and a contiguous weight [N, K]; got x "
            f"{tuple(x.shape)} {x.dtype} {x.device}, weight {tuple(weight.shape)} {weight.dtype}"
        )
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = _pool(torch.get_num_threads()).linear(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
