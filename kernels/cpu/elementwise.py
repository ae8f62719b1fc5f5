"""RMSNorm (with its residual add) and SiLU-and-mul on the CPU: one C++ call each instead of a chain of torch ops.

At batch 1 a decode step of SmolLM2-135M runs 61 RMSNorms and 30 SiLU-and-muls on rows of 576 and 1536 floats.
The references (``rms_norm_ref``: add, cast, pow, mean, add, rsqrt, mul, cast, mul; ``silu_and_mul_ref``: chunk,
silu, mul) spend most of their time in per-op dispatch, not arithmetic: 19% of a 2-thread batch-1 step in a
py-spy profile (2026-12-02); in bfloat16 at batch 40, 30% (issue 35). Here each row is one pass (residual add,
float32 sum of squares, scale and weight) and SiLU uses the vectorised exp shared with the attention kernel
(``build.SIMD_EXP``).

Rows are float32, bfloat16 or float16 (one C++ template over the element type): loaded to float32, computed in
float32, rounded to the dtype at the reference's rounding points (HF's): the residual sum (stored as the new
residual), the normalised value before the weight multiply and that product; SiLU before the multiply by up and
that product. The residual sum and every product are therefore bit-exact; only the order of the float32 sum of
squares and exp's last bit differ from the references, so in half precision the normalised value (or the SiLU)
can land one ulp of the dtype away when its float32 value sits next to a rounding boundary (rare; the tests
check exactly that bound). Rows are split over torch's intra-op threads only when a call is big enough to pay for
a wake-up (prefill); a decode row stays on the calling thread.
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
#include <vector>

namespace {
"""
    + SIMD_EXP
    + r"""
// elements per thread below which a call stays on the calling thread: the engine calls from its scheduler thread,
// where an OpenMP team's wake-up costs ~30-40 us (a batch-41 SiLU, 63k outputs: 53-59 us on two threads
// against 25 us on one); 2^17 keeps decode batches serial and splits prefill-sized calls
constexpr int64_t kGrain = 1 << 17;
constexpr int kTile = 512;           // SiLU works in tiles that stay in L1

// Element types: S is the storage, ld widens to float32 (exact), st rounds a float32 to nearest-even in S the way
// torch's casts do (c10::BFloat16 / c10::Half), rnd is st then ld (the value the reference sees after a cast).
struct F32 {
  using S = float;
  static inline float ld(float v) { return v; }
  static inline float st(float v) { return v; }
  static inline float rnd(float v) { return v; }
};
struct BF16 {  // the bit-shift conversions of c10::BFloat16 (they vectorise; NaN -> 0x7FC0 like torch)
  using S = uint16_t;
  static inline float ld(uint16_t b) {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static inline uint16_t st(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const uint16_t r = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? static_cast<uint16_t>(0x7FC0) : r;
  }
  static inline float rnd(float v) { return ld(st(v)); }
};
inline float f32_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t bits_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
// c10::Half's portable conversions (FP16 library: exact, round to nearest even, subnormals, inf and NaN), not its
// F16C path: _cvtss_sh / _cvtsh_ss are scalar and gcc does not vectorise them (nor _Float16 without AVX512-FP16);
// these are integer selects and float multiplies, which it does.
struct F16 {
  using S = uint16_t;
  static inline float ld(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = f32_bits((two_w >> 4) + (0xE0u << 23)) * f32_bits(15u << 23);  // * 2^-112
    const float denormalized = f32_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return f32_bits(sign | (two_w < (1u << 27) ? bits_f32(denormalized) : bits_f32(normalized)));
  }
  static inline uint16_t st(float f) {
    float base = (std::fabs(f) * f32_bits(239u << 23)) * f32_bits(17u << 23);  // * 2^112 * 2^-110
    const uint32_t w = bits_f32(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = f32_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = bits_f32(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
  static inline float rnd(float v) { return ld(st(v)); }
};

// Rows [m0, m1) of rms_norm_ref in E's dtype: x + r rounded to E and stored (HF adds in the dtype), the float32 sum
// of squares and scale of that rounded sum, the normalised value rounded to E, times the weight, rounded again.
// buf: n floats of scratch.
template <typename E>
void rms_rows(const typename E::S* x, int64_t sx, const typename E::S* r, int64_t sr, const typename E::S* w,
              typename E::S* out, typename E::S* new_r, int64_t m0, int64_t m1, int64_t n, float eps, float* buf) {
  using S = typename E::S;
  for (int64_t m = m0; m < m1; ++m) {
    const S* xr = x + m * sx;
    S* o = out + m * n;
    if (r != nullptr) {
      const S* rr = r + m * sr;
      S* nr = new_r + m * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const S s = E::st(E::ld(xr[i]) + E::ld(rr[i]));
        nr[i] = s;
        buf[i] = E::ld(s);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = E::ld(xr[i]);
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += buf[i] * buf[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = E::st(E::ld(w[i]) * E::rnd(buf[i] * inv));
  }
}

template <typename E>
void rms_norm_typed(const torch::Tensor& x, const torch::Tensor& weight, float eps, const torch::Tensor* residual,
                    torch::Tensor& out, torch::Tensor& new_r) {
  using S = typename E::S;
  const int64_t m = x.size(0), n = x.size(1);
  const S* xp = static_cast<const S*>(x.data_ptr());
  const S* r = residual ? static_cast<const S*>(residual->data_ptr()) : nullptr;
  const int64_t sx = x.stride(0), sr = residual ? residual->stride(0) : 0;
  const S* wp = static_cast<const S*>(weight.data_ptr());
  S* op = static_cast<S*>(out.data_ptr());
  S* nrp = r ? static_cast<S*>(new_r.data_ptr()) : nullptr;
  at::parallel_for(0, m, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)), [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(static_cast<size_t>(n));
    rms_rows<E>(xp, sx, r, sr, wp, op, nrp, m0, m1, n, eps, buf.data());
  });
}

// (out, new_residual or undefined); x [M, N] with unit last stride, residual like x or undefined, weight [N]; all
// of one dtype (float32, bfloat16 or float16).
// Checked here (a few compares) so that the decode path can call it with no Python checks (`rms_norm_rows`).
std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                                    c10::optional<torch::Tensor> residual) {
  const torch::Tensor* r = residual.has_value() ? &*residual : nullptr;
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.stride(1) == 1, "rms_norm: CPU x [M, N] with unit last stride");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == x.scalar_type() && weight.is_contiguous() &&
                  weight.dim() == 1 && weight.size(0) == x.size(1), "rms_norm: weight [N] of x's dtype");
  TORCH_CHECK(r == nullptr || (r->device().is_cpu() && r->scalar_type() == x.scalar_type() && r->dim() == 2 &&
                               r->size(0) == x.size(0) && r->size(1) == x.size(1) && r->stride(1) == 1),
              "rms_norm: a residual like x");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  torch::Tensor new_r;
  if (r) new_r = torch::empty({x.size(0), x.size(1)}, x.options());
  const float e = static_cast<float>(eps);
  switch (x.scalar_type()) {
    case torch::kFloat: rms_norm_typed<F32>(x, weight, e, r, out, new_r); break;
    case torch::kBFloat16: rms_norm_typed<BF16>(x, weight, e, r, out, new_r); break;
    case torch::kHalf: rms_norm_typed<F16>(x, weight, e, r, out, new_r); break;
    default: TORCH_CHECK(false, "rms_norm: float32, bfloat16 or float16 rows, got ", x.scalar_type());
  }
  return {out, new_r};
}

// silu(gate) * up for rows of E (silu rounded to E before the multiply, the product rounded again).
template <typename E>
void silu_and_mul_typed(const torch::Tensor& gate_up, torch::Tensor& out) {
  using S = typename E::S;
  const int64_t m = gate_up.size(0), h = gate_up.size(1) / 2, s = gate_up.stride(0);
  const S* gu = static_cast<const S*>(gate_up.data_ptr());
  S* op = static_cast<S*>(out.data_ptr());
  at::parallel_for(0, m, std::max<int64_t>(1, kGrain / std::max<int64_t>(h, 1)), [&](int64_t m0, int64_t m1) {
    float gf[kTile], e[kTile];
    for (int64_t row = m0; row < m1; ++row) {
      const S* g = gu + row * s;
      const S* u = g + h;
      S* o = op + row * h;
      for (int64_t t0 = 0; t0 < h; t0 += kTile) {
        const int len = static_cast<int>(std::min<int64_t>(kTile, h - t0));
#pragma omp simd
        for (int i = 0; i < len; ++i) {
          gf[i] = E::ld(g[t0 + i]);
          e[i] = -gf[i];
        }
        exp_inplace(e, len);
#pragma omp simd
        for (int i = 0; i < len; ++i) o[t0 + i] = E::st(E::rnd(gf[i] / (1.0f + e[i])) * E::ld(u[t0 + i]));
      }
    }
  });
}

// silu(gate) * up for gate_up [M, 2H] (gate first) with unit last stride; out [M, H] in gate_up's dtype.
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  auto out = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  switch (gate_up.scalar_type()) {
    case torch::kFloat: silu_and_mul_typed<F32>(gate_up, out); break;
    case torch::kBFloat16: silu_and_mul_typed<BF16>(gate_up, out); break;
    case torch::kHalf: silu_and_mul_typed<F16>(gate_up, out); break;
    default: TORCH_CHECK(false, "silu_and_mul: float32, bfloat16 or float16 rows, got ", gate_up.scalar_type());
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "fused residual add + RMSNorm of float32 / bfloat16 / float16 rows");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of float32 / bfloat16 / float16 rows");
}
"""
)


@functools.cache
def load():
    """The compiled extension (built on first use, then loaded from torch's cache).

    Raises RuntimeError naming the cause and the way out when it cannot be built.
    """
    return load_cpp(
        "sglite_cpu_elementwise", _CPP, None, "CPU norm/activation kernel", "run on a machine with g++ and ninja",
        avx512=True,  # 16 lanes for the conversions and the exp
    )


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rows_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in DTYPES and t.dim() >= 1 and t.stride(-1) == 1


def supports_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether ``rms_norm_cpu`` takes these inputs: CPU tensors of one dtype (float32, bfloat16 or float16) with a
    unit last stride, a contiguous ``weight [N]`` and a residual shaped like ``x``. (A weight of another dtype
    promotes the reference's output: not taken.)"""
    return (
        _rows_ok(x)
        and weight.dtype == x.dtype
        and weight.device.type == "cpu"
        and weight.shape == x.shape[-1:]
        and weight.is_contiguous()
        and (residual is None or (_rows_ok(residual) and residual.dtype == x.dtype and residual.shape == x.shape))
    )


def supports_silu_and_mul(gate_up: torch.Tensor) -> bool:
    """Whether ``silu_and_mul_cpu`` takes ``gate_up``: a float32, bfloat16 or float16 CPU tensor of even last dim,
    unit last stride."""
    return _rows_ok(gate_up) and gate_up.shape[-1] % 2 == 0


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
            f"rms_norm_cpu takes float32/bfloat16/float16 CPU x [..., N] with unit last stride, weight [N] and a "
            f"residual like x (one dtype); got x "
            f"{tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, residual "
            f"{None if residual is None else (tuple(residual.shape), residual.dtype)}"
        )
    return rms_norm_cpu_unchecked(x, weight, eps, residual)


def rms_norm_cpu_unchecked(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rms_norm_cpu`` for a caller that has checked ``supports_rms_norm`` itself (the dispatcher, per layer and
    step: the second check was ~1% of a batch-1 GGUF decode step in py-spy)."""
    out, new_r = load().rms_norm(_rows(x), weight, float(eps), None if residual is None else _rows(residual))
    return out.view(x.shape), (new_r.view(x.shape) if residual is not None else None)


def rms_norm_rows(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rms_norm_cpu`` for 2-D rows (a decode step's hidden states, ~60 calls a token): no Python checks, reshapes
    or views; the C++ checks what it reads (CPU, one dtype, unit last stride, shapes) and raises RuntimeError."""
    out, new_r = load().rms_norm(x, weight, eps, residual)
    return out, (None if residual is None else new_r)


def silu_and_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul_ref``'s contract for inputs ``supports_silu_and_mul`` accepts. Raises ValueError otherwise."""
    if not supports_silu_and_mul(gate_up):
        raise ValueError(
            f"silu_and_mul_cpu takes a float32/bfloat16/float16 CPU gate_up [..., 2H] with unit last stride; got "
            f"{tuple(gate_up.shape)} {gate_up.dtype} {gate_up.device}"
        )
    return silu_and_mul_cpu_unchecked(gate_up)


def silu_and_mul_cpu_unchecked(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul_cpu`` for a caller that has checked ``supports_silu_and_mul`` itself (the dispatcher)."""
    out = load().silu_and_mul(_rows(gate_up))
    return out.view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
