"""RMSNorm (with its residual add) and SiLU-and-mul on the CPU: one C++ call each instead of a chain of torch ops.

At batch 1 a decode step of SmolLM2-135M runs 61 RMSNorms and 30 SiLU-and-muls on rows of 576 and 1536 floats.
The references (``rms_norm_ref``: add, cast, pow, mean, add, rsqrt, mul, cast, mul; ``silu_and_mul_ref``: chunk,
silu, mul) spend most of their time in per-op dispatch, not arithmetic: 19% of a 2-thread batch-1 step in a
py-spy profile (2026-12-02). Here each row is one pass (residual add, float32 sum of squares, scale and weight)
and SiLU uses the vectorised exp shared with the attention kernel (``build.SIMD_EXP``).

Contracts are those of ``rms_norm_ref`` / ``silu_and_mul_ref`` for float32 CPU tensors (``supports_*`` say which
inputs are taken); results differ from them only in the order of the float32 sum and exp's last bit (tests
compare on fresh random inputs). Rows are split over torch's intra-op threads only when a call is big enough to
pay for a wake-up (prefill); a decode row stays on the calling thread.
"""

from __future__ import annotations

import functools

import torch

from .build import SIMD_EXP, load_cpp

_CPP = (
    r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {
"""
    + SIMD_EXP
    + r"""
constexpr int64_t kGrain = 1 << 15;  // elements per thread below which a call stays on the calling thread
constexpr int kTile = 512;           // SiLU works in tiles that stay in L1

void rms_rows(const float* x, int64_t sx, const float* r, int64_t sr, const float* w, float* out, float* new_r,
              int64_t m0, int64_t m1, int64_t n, float eps) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * sx;
    float* o = out + m * n;
    const float* v = xr;
    if (r != nullptr) {  // the residual add in float32 (the inputs' dtype), stored for the next sublayer
      const float* rr = r + m * sr;
      float* nr = new_r + m * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) nr[i] = xr[i] + rr[i];
      v = nr;
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += v[i] * v[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = w[i] * (v[i] * inv);
  }
}

// (out, new_residual or undefined); x [M, N] with unit last stride, residual like x or undefined.
std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                                    c10::optional<torch::Tensor> residual) {
  const int64_t m = x.size(0), n = x.size(1);
  auto out = torch::empty({m, n}, x.options());
  torch::Tensor new_r;
  const float* r = nullptr;
  int64_t sr = 0;
  if (residual.has_value()) {
    new_r = torch::empty({m, n}, x.options());
    r = residual->data_ptr<float>();
    sr = residual->stride(0);
  }
  const float* xp = x.data_ptr<float>();
  const int64_t sx = x.stride(0);
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* nrp = r ? new_r.data_ptr<float>() : nullptr;
  at::parallel_for(0, m, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)), [&](int64_t m0, int64_t m1) {
    rms_rows(xp, sx, r, sr, wp, op, nrp, m0, m1, n, static_cast<float>(eps));
  });
  return {out, new_r};
}

// silu(gate) * up for gate_up [M, 2H] (gate first) with unit last stride; out [M, H].
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  const int64_t m = gate_up.size(0), h = gate_up.size(1) / 2, s = gate_up.stride(0);
  auto out = torch::empty({m, h}, gate_up.options());
  const float* gu = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, m, std::max<int64_t>(1, kGrain / std::max<int64_t>(h, 1)), [&](int64_t m0, int64_t m1) {
    float e[kTile];
    for (int64_t row = m0; row < m1; ++row) {
      const float* g = gu + row * s;
      const float* u = g + h;
      float* o = op + row * h;
      for (int64_t t0 = 0; t0 < h; t0 += kTile) {
        const int len = static_cast<int>(std::min<int64_t>(kTile, h - t0));
#pragma omp simd
        for (int i = 0; i < len; ++i) e[i] = -g[t0 + i];
        exp_inplace(e, len);
#pragma omp simd
        for (int i = 0; i < len; ++i) o[t0 + i] = g[t0 + i] / (1.0f + e[i]) * u[t0 + i];
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "fused residual add + RMSNorm of float32 rows");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of float32 rows");
}
"""
)


@functools.cache
def load():
    """The compiled extension (built on first use, then loaded from torch's cache).

    Raises RuntimeError naming the cause and the way out when it cannot be built.
    """
    return load_cpp(
        "sglite_cpu_elementwise", _CPP, None, "CPU norm/activation kernel", "run on a machine with g++ and ninja"
    )


def _f32_rows(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() >= 1 and t.stride(-1) == 1


def supports_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether ``rms_norm_cpu`` takes these inputs: float32 CPU tensors with a unit last stride, a contiguous
    ``weight [N]`` and a residual shaped like ``x``."""
    return (
        _f32_rows(x)
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.shape == x.shape[-1:]
        and weight.is_contiguous()
        and (residual is None or (_f32_rows(residual) and residual.shape == x.shape))
    )


def supports_silu_and_mul(gate_up: torch.Tensor) -> bool:
    """Whether ``silu_and_mul_cpu`` takes ``gate_up``: a float32 CPU tensor of even last dim, unit last stride."""
    return _f32_rows(gate_up) and gate_up.shape[-1] % 2 == 0


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t [..., N]`` as ``[M, N]`` (a view when the leading dims allow one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rms_norm_ref``'s contract for inputs ``supports_rms_norm`` accepts: ``(norm(x + residual) * weight,
    x + residual or None)`` as new tensors. Raises ValueError for anything else."""
    if not supports_rms_norm(x, weight, residual):
        raise ValueError(
            f"rms_norm_cpu takes float32 CPU x [..., N] with unit last stride, weight [N] and a residual like x; got x "
            f"{tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, residual "
            f"{None if residual is None else (tuple(residual.shape), residual.dtype)}"
        )
    out, new_r = load().rms_norm(_rows(x), weight, float(eps), None if residual is None else _rows(residual))
    return out.view(x.shape), (new_r.view(x.shape) if residual is not None else None)


def silu_and_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul_ref``'s contract for inputs ``supports_silu_and_mul`` accepts. Raises ValueError otherwise."""
    if not supports_silu_and_mul(gate_up):
        raise ValueError(
            f"silu_and_mul_cpu takes a float32 CPU gate_up [..., 2H] with unit last stride; got "
            f"{tuple(gate_up.shape)} {gate_up.dtype} {gate_up.device}"
        )
    out = load().silu_and_mul(_rows(gate_up))
    return out.view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
