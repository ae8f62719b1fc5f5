"""GGUF linear layers on the CPU: ``y [M, N] = x [M, K] @ W[N, K]^T (+ bias)`` read from GGML's blocks.

``W`` stays as the file stores it: ``qweight`` uint8 ``[N, K / block_values, block_bytes]`` (one row of blocks per
output feature; ``block`` is its ``kernels.quant.gguf_reference.GGUFBlock``, which lists the types). Two paths:

- Decode (``M <= gemv_max_m()``): each sub-block of 32 weights is decoded to small integer codes (``gguf_source.py``)
  and dotted with the activations rounded to int16 per 32 values (one float scale each; ``gguf_kernel_source.py``):
  AVX2 ``madd``, AVX-512 VNNI ``dpwssd`` where the CPU has it, a scalar loop without AVX2; with AVX-512 (BW + VNNI)
  two sub-blocks a step in 512-bit registers (SmolLM2's Q4_1 linears of one token on 2 threads: 3.05 -> 2.75 ms,
  one thread at 2048 x 1536: Q4_1 136 -> 112 us, Q8_0 91 -> 71, Q6_K 245 -> 207). A weight row is decoded
  once for up to 8 activation rows. The offsets of the formats with a minimum (Q4_1, Q5_1, Q4_K, Q5_K) and of the
  signed ones stored unsigned (Q4_0, Q5_0, Q6_K) multiply the exact float sum of each 16 activations. Output rows
  are claimed in ~128 KB runs (a whole number per thread) by a pool of ``torch.get_num_threads()`` threads that
  stays awake between calls (``pool_source.py``, shared with the float linear kernel: in the engine OpenMP's
  wake-ups doubled this kernel's time).
- More rows (prefill, and decode batches past ``GEMV_MAX_M``): with AVX-512 VNNI, tiles (``GGUF_TILES_CPP`` below):
  the activations quantized to int16 as above (natural order), each tile of 16 weight rows decoded once to int16
  codes transposed so that one 512-bit lane holds one output feature, then for up to 12 activation rows at a time one
  ``vpdpwssd`` per pair of values (the pair broadcast) into exact int32 sums per 32 values (Q6_K: 16), scaled by
  the weight's and the activation's scales; the offsets times the exact sums as in decode. The same activation
  rounding as the decode path (~3e-5 of the bound), at twice float32's multiply-adds per instruction, and no
  float32 copy of the weight. The former path, still taken without VNNI: dequantize to float32 per call, then
  MKL. SmolLM2's Q4_1 linears of 30 layers on 2 threads: 68.7 -> 19.3 ms at 40 rows, 1104 -> 490 ms at 1024;
  ``sglite bench decode`` at batch 40: 186 -> 88 ms a step.

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

from .build import build_flags, load_cpp
from .gguf_kernel_source import ACTIVATIONS, GGUF_KERNEL_CPP
from .gguf_source import GGUF_TYPES_CPP
from .linear import SPIN_US
from .pool_source import POOL_CPP

# Up to this many rows the blocks are read directly (`gemv`); beyond, the tiles (`gemm`). Interleaved, SmolLM2's Q4_1
# linears of one layer (x30) on 2 threads, ms: 1 / 2 / 4 / 8 rows 1.9 / 3.2 / 4.6 / 10.0 against the tiles' 3.4 / 3.8 /
# 4.3 / 5.7; Q6_K at K = 768 / 1536: 6.9 / 7.5 / 10.1 / 22.2 against 8.3 / 7.7 / 8.6 / 10.3.
GEMV_MAX_M = 3
# Without the tiles (no AVX-512 VNNI), up to this many rows; beyond, dequantize + MKL (13.6 / 27 / 59 / 123 ms at
# 8 / 16 / 32 / 64 rows against 35 / 41 / 61 / 160, scripts/bench_cpu_gguf.py).
GEMV_MAX_M_WITHOUT_TILES = 32


@functools.cache
def load(isa: str | None = None):
    """The compiled extension for this CPU (``isa``: force ``"DEFAULT"`` / ``"AVX2"`` / ``"AVX512"``, for tests).

    Raises RuntimeError naming the cause and the way out when it cannot be built.
    """
    return load_cpp("sglite_cpu_gguf", GGUF_TYPES_CPP + POOL_CPP + GGUF_TILES_CPP + GGUF_KERNEL_CPP, None,
                    "CPU GGUF kernel",
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
    """`gguf_linear_cpu` for a caller that has called `supports` (``act``: the decode rows' activations; the tiles
    take Q16)."""
    flat = x.dim() == 2  # decode's [M, K]: no reshape, no view (every microsecond counts 200 times a token)
    x2 = x if flat else x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    pool = _pool(torch.get_num_threads(), isa)
    if x2.shape[0] <= gemv_max_m(isa):
        y = pool.gemv(x2, qweight, block.ggml_type, bias, ACTIVATIONS.index(act))
    else:
        y = pool.gemm(x2, qweight, block.ggml_type, bias)
    return y if flat else y.view(*x.shape[:-1], qweight.shape[0])


@functools.cache
def gemv_max_m(isa: str | None = None) -> int:
    """Rows up to which the decode kernel runs in this build (`GEMV_MAX_M` where it has the tiles)."""
    return GEMV_MAX_M if "-mavx512vnni" in build_flags("sglite_cpu_gguf", isa, avx512=True)[1] \
        else GEMV_MAX_M_WITHOUT_TILES


def linear_rows(x: torch.Tensor, qweight: torch.Tensor, block: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`gguf_linear_checked` for float32 CPU ``x [M, K]`` with unit last stride (a step's linears, ~120 calls a
    token: no Python checks); the C++ checks the weight and bias against ``x`` and raises RuntimeError."""
    pool = _pool(torch.get_num_threads())
    if x.shape[0] <= gemv_max_m():
        return pool.gemv(x, qweight, block.ggml_type, bias, 0)
    return pool.gemm(x, qweight, block.ggml_type, bias)


def gguf_dequantize_cpu(qweight: torch.Tensor, block: Any, in_features: int, isa: str | None = None) -> torch.Tensor:
    """``W [N, in_features]`` float32 from its blocks (``dequantize_gguf``'s contract, threaded)."""
    return _pool(torch.get_num_threads(), isa).dequantize(qweight.contiguous(), block.ggml_type, in_features)


# The tiles of the many-row path (docstring above), pasted between the pool and GGUF_KERNEL_CPP.
GGUF_TILES_CPP = r"""
#ifdef GG_ZMM
// Activation rows for the tiles: int16 codes in natural order, a scale per 32 values, float sums per 16 and 32.
struct Rows16 {
  const int16_t* q;  // [M, K]
  const float* d;    // [M, K / 32]
  const float* s16;  // [M, K / 16]
  const float* s32;  // [M, K / 32]
  int64_t K;
};

// Rows [m0, m1) of x quantized as `quantize_block_zmm` does (the same codes, scales and sums), in natural order.
void quantize_natural(const float* x, int64_t sx, int64_t K, int16_t* q, float* d, float* s16, float* s32,
                      int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t e = 0; e < K / 32; ++e) {
      const __m512 a = _mm512_loadu_ps(x + m * sx + 32 * e), b = _mm512_loadu_ps(x + m * sx + 32 * e + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const float scale = amax / Q16::kMax, inv = scale > 0.f ? 1.f / scale : 0.f;
      int16_t* o = q + m * K + 32 * e;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o),
                          _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16),
                          _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv)))));
      const float lo = _mm512_reduce_add_ps(a), hi = _mm512_reduce_add_ps(b);
      d[m * (K / 32) + e] = scale;
      s16[m * (K / 16) + 2 * e] = lo;
      s16[m * (K / 16) + 2 * e + 1] = hi;
      s32[m * (K / 32) + e] = lo + hi;
    }
}

// r[j] (16 int32 lanes) <- lane j of the inputs: a 16 x 16 transpose of 32-bit elements.
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2)
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]), r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]), r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }  // r[4g + c]: in 128-bit lane L, element 4L + c of rows 4g .. 4g + 3
  for (int c = 0; c < 4; ++c) {
    const __m512i v = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), w = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xee);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i w2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xee);
    t[c] = _mm512_shuffle_i32x4(v, v2, 0x88), t[4 + c] = _mm512_shuffle_i32x4(v, v2, 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(w, w2, 0x88), t[12 + c] = _mm512_shuffle_i32x4(w, w2, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Values per weight scale: Q6_K's 16, the others' 32.
template <class T>
constexpr int group_values() { return std::is_same_v<T, Q6_K> ? 16 : 32; }

// `rows` (<= 16) weight rows from w as a tile: wc [K / 2][16] int32 lanes, lane j holding codes 2p, 2p + 1 of row j
// as int16; ws / wo [K / G][16] the scale and offset of each G values of each row (zero past `rows`).
template <class T>
void pack_tile(const uint8_t* w, int64_t row_bytes, int rows, int64_t K, int32_t* wc, float* ws, float* wo) {
  constexpr int G = group_values<T>(), kPer = 32 / G;
  Sub sub[T::kSubs];
  std::fill(ws, ws + K / G * 16, 0.f);
  std::fill(wo, wo + K / G * 16, 0.f);
  for (int64_t b = 0; b < K / T::kValues; ++b) {
    for (int j = 0; j < rows; ++j) {
      T::subs(w + j * row_bytes + b * T::kBytes, sub);
      for (int k = 0; k < T::kSubs; ++k)
        for (int h = 0; h < kPer; ++h) {
          const int64_t g = (b * T::kSubs + k) * kPer + h;
          ws[g * 16 + j] = sub[k].s[h], wo[g * 16 + j] = sub[k].o[h];
        }
    }
    for (int k = 0; k < T::kSubs; ++k) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        const __m256i c = j < rows ? T::codes256(w + j * row_bytes + b * T::kBytes, k) : _mm256_setzero_si256();
        r[j] = T::kSigned ? _mm512_cvtepi8_epi16(c) : _mm512_cvtepu8_epi16(c);
      }
      transpose16(r);
      int32_t* o = wc + (b * T::kSubs + k) * 256;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(o + 16 * p, r[p]);
    }
  }
}

// y[m0 .. m0 + MB, n0 .. n0 + 16) (mask: the tile's real columns) = the tile . x rows (+ bias): per G values an
// exact int32 dot product (vpdpwssd, the activation pair broadcast), scaled by the weight's and the row's scales;
// the offsets times the row's exact sums (kOff).
template <int G, int MB, bool kOff>
void tile_rows(const int32_t* wc, const float* ws, const float* wo, const Rows16& a, int64_t m0, __m512 bias,
               __mmask16 mask, float* y, int64_t N) {
  const int64_t K = a.K;
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = bias;
  for (int64_t g = 0; g < K / G; ++g) {
    __m512i dot[MB];
    for (int m = 0; m < MB; ++m) dot[m] = _mm512_setzero_si512();
    for (int p = 0; p < G / 2; ++p) {
      const __m512i wv = _mm512_loadu_si512(wc + (g * G / 2 + p) * 16);
      for (int m = 0; m < MB; ++m) {
        int32_t pair;
        std::memcpy(&pair, a.q + (m0 + m) * K + g * G + 2 * p, 4);
        dot[m] = _mm512_dpwssd_epi32(dot[m], wv, _mm512_set1_epi32(pair));
      }
    }
    const __m512 s = _mm512_loadu_ps(ws + g * 16), o = _mm512_loadu_ps(wo + g * 16);
    for (int m = 0; m < MB; ++m) {
      const __m512 sm = _mm512_mul_ps(s, _mm512_set1_ps(a.d[(m0 + m) * (K / 32) + g * G / 32]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m]), sm, acc[m]);
      if (kOff) acc[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(G == 32 ? a.s32[(m0 + m) * (K / 32) + g]
                                                                   : a.s16[(m0 + m) * (K / 16) + g]), acc[m]);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_mask_storeu_ps(y + (m0 + m) * N, mask, acc[m]);
}

// tile_rows for mb (1 .. MB) rows: each row count its own registers.
template <int G, bool kOff, int MB = 12>
void rows_block(int mb, const int32_t* wc, const float* ws, const float* wo, const Rows16& a, int64_t m0, __m512 bias,
                __mmask16 mask, float* y, int64_t N) {
  if constexpr (MB > 1)
    if (mb < MB) return rows_block<G, kOff, MB - 1>(mb, wc, ws, wo, a, m0, bias, mask, y, N);
  tile_rows<G, MB, kOff>(wc, ws, wo, a, m0, bias, mask, y, N);
}

// Output tiles [t0, t1) of 16 columns of y [M, N]: each weight tile decoded once (the thread's buffers), then
// multiplied with every activation row, 12 rows a step (12 int32 + 12 float accumulators fill the registers).
template <class T>
void gemm_tiles(const uint8_t* w, const Rows16& a, int64_t M, int64_t N, const float* bias, float* y, int64_t t0,
                int64_t t1) {
  constexpr int G = group_values<T>();
  const int64_t K = a.K, row_bytes = K / T::kValues * T::kBytes, groups = K / G, steps = (M + 11) / 12;
  thread_local std::vector<int32_t> codes;
  thread_local std::vector<float> scales;
  codes.resize(std::max<size_t>(codes.size(), K * 8));
  scales.resize(std::max<size_t>(scales.size(), groups * 32));
  int32_t* wc = codes.data();
  float *ws = scales.data(), *wo = ws + groups * 16;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = 16 * t;
    const int rows = static_cast<int>(std::min<int64_t>(16, N - n0));
    const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1);
    pack_tile<T>(w + n0 * row_bytes, row_bytes, rows, K, wc, ws, wo);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int64_t step = 0, m0 = 0; step < steps; ++step) {  // steps of equal rows: 40 = 4 x 10, not 3 x 12 + 4
      const int64_t m1 = M * (step + 1) / steps;
      rows_block<G, !T::kSigned>(static_cast<int>(m1 - m0), wc, ws, wo, a, m0, b, mask, y + n0, N);
      m0 = m1;
    }
  }
}

// y [M, N] = x . W^T (+ bias) by tiles on the pool: x quantized (rows split over the threads), then the tiles.
at::Tensor gemm_on(Pool& pool, const at::Tensor& x, const at::Tensor& w, int64_t type, const float* bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), sx = x.stride(0);
  at::Tensor y = at::empty({M, N}, x.options());
  thread_local std::vector<int16_t> qbuf;  // the calling thread's, reused: pool threads only read it in this call
  thread_local std::vector<float> fbuf;
  qbuf.resize(std::max<size_t>(qbuf.size(), M * K));
  fbuf.resize(std::max<size_t>(fbuf.size(), M * (K / 32 * 2 + K / 16)));
  int16_t* q = qbuf.data();
  float *d = fbuf.data(), *s16 = d + M * (K / 32), *s32 = s16 + M * (K / 16);
  const float* xp = x.data_ptr<float>();
  const int threads = pool.threads();
  pool.run(M, (M + threads - 1) / threads,
           [&](int64_t m0, int64_t m1) { quantize_natural(xp, sx, K, q, d, s16, s32, m0, m1); });
  const Rows16 a{q, d, s16, s32, K};
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + 15) / 16;
  with_type(type, [&]<class T>() {
    pool.run(tiles, std::max<int64_t>(1, tiles / (16 * threads)),
             [&](int64_t t0, int64_t t1) { gemm_tiles<T>(wp, a, M, N, bias, yp, t0, t1); });
  });
  return y;
}
#endif
"""
