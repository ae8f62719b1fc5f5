"""C++ of the 16-bit-float CPU decode linear (``linear16.py``): ``y = x @ W^T (+ bias)`` for bfloat16 or float16
``x``, ``W [N, K]`` (row-major, as stored) and ``bias``, float32 accumulation, each output rounded once.

One micro-kernel template over an ISA ``V`` and an element type ``T``: a tile of 4 weight rows x ``V::kRows``
input rows keeps one accumulator per output, walks K in steps of ``V::W`` values (the last step zero-padded) and
sums each accumulator's lanes at the end. ``V``:

- ``VDot`` (AVX-512 BF16, bfloat16 only): ``vdpbf16ps`` on 32 values a step (pairs of exact products added to
  16 float lanes);
- ``V512`` (AVX-512F/BW): 16 values a step converted to float (bfloat16: widened and shifted left 16; float16:
  ``vcvtph2ps``), FMAs;
- ``V256`` (AVX2 + FMA): the same on 8 values (float16 needs F16C);
- ``VScalar``: one value a step.

An output's arithmetic depends only on K and the build, never on the tile it was computed in, its row's position
in the batch or the thread that ran it. Denormal inputs count as zero in ``vdpbf16ps`` (its definition).
Needs the pool's includes (``pool_source.py``) and ``<c10/util/BFloat16.h> <c10/util/Half.h> <cstring>``.
"""

LINEAR16_CPP = r"""
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define L16_AVX2 1
#endif
#if defined(L16_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define L16_AVX512 1
#endif
#if defined(L16_AVX512) && defined(__AVX512BF16__)
#define L16_DPBF16 1
#endif

struct BF16 {
  static float to_float(uint16_t v) {
    const uint32_t b = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &b, sizeof f);
    return f;
  }
  static uint16_t from_float(float f) { return c10::BFloat16(f).x; }  // round to nearest even
};
struct F16 {
  static float to_float(uint16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
  static uint16_t from_float(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
};

struct VScalar {
  static constexpr int W = 1, kRows = 1;
  static constexpr const char* name = "scalar";
  using acc_t = float;
  using raw_t = float;
  static acc_t zero() { return 0.f; }
  template <class T> static raw_t load(const uint16_t* p) { return T::to_float(*p); }
  template <class T> static raw_t load_tail(const uint16_t* p, int64_t) { return T::to_float(*p); }
  static acc_t madd(acc_t a, raw_t w, raw_t x) { return a + w * x; }
  static float sum(acc_t a) { return a; }
};

#ifdef L16_AVX2
struct V256 {
  static constexpr int W = 8, kRows = 2;  // 4 x 2 accumulators + 4 weights + 1 input of 16 registers
  static constexpr const char* name = "avx2";
  using acc_t = __m256;
  using raw_t = __m256;
  static acc_t zero() { return _mm256_setzero_ps(); }
  template <class T> static raw_t cvt(__m128i h) {
#ifdef __F16C__
    if (std::is_same<T, F16>::value) return _mm256_cvtph_ps(h);
#endif
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  template <class T> static raw_t load(const uint16_t* p) {
    return cvt<T>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  template <class T> static raw_t load_tail(const uint16_t* p, int64_t n) {
    uint16_t buf[W] = {0};
    std::memcpy(buf, p, n * sizeof(uint16_t));
    return load<T>(buf);
  }
  static acc_t madd(acc_t a, raw_t w, raw_t x) { return _mm256_fmadd_ps(w, x, a); }
  static float sum(acc_t v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#endif

#ifdef L16_AVX512
inline float sum512(__m512 v) {
  return V256::sum(_mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
struct V512 {
  static constexpr int W = 16, kRows = 4;  // 4 x 4 accumulators + 4 weights + 1 input of 32 registers
  static constexpr const char* name = "avx512";
  using acc_t = __m512;
  using raw_t = __m512;
  static acc_t zero() { return _mm512_setzero_ps(); }
  template <class T> static raw_t cvt(__m256i h) {
    if (std::is_same<T, F16>::value) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  template <class T> static raw_t load(const uint16_t* p) {
    return cvt<T>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  template <class T> static raw_t load_tail(const uint16_t* p, int64_t n) {
    return cvt<T>(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
  }
  static acc_t madd(acc_t a, raw_t w, raw_t x) { return _mm512_fmadd_ps(w, x, a); }
  static float sum(acc_t v) { return sum512(v); }
};
#endif

#ifdef L16_DPBF16
struct VDot {  // bfloat16 only
  static constexpr int W = 32, kRows = 6;  // 4 x 6 accumulators + 4 weights + 1 input of 32 registers
  static constexpr const char* name = "avx512bf16";
  using acc_t = __m512;
  using raw_t = __m512i;
  static acc_t zero() { return _mm512_setzero_ps(); }
  template <class T> static raw_t load(const uint16_t* p) { return _mm512_loadu_si512(p); }
  template <class T> static raw_t load_tail(const uint16_t* p, int64_t n) {
    return _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1), p);
  }
  static acc_t madd(acc_t a, raw_t w, raw_t x) { return _mm512_dpbf16_ps(a, (__m512bh)w, (__m512bh)x); }
  static float sum(acc_t v) { return sum512(v); }
};
#endif

#if defined(L16_DPBF16)
using VBF16 = VDot;
#elif defined(L16_AVX512)
using VBF16 = V512;
#elif defined(L16_AVX2)
using VBF16 = V256;
#else
using VBF16 = VScalar;
#endif
#if defined(L16_AVX512)
using VF16 = V512;
#elif defined(L16_AVX2) && defined(__F16C__)
using VF16 = V256;
#else
using VF16 = VScalar;
#endif

// out[i][r] = w[r] . x[i] for 4 weight rows and MB input rows, all K long.
template <class V, class T, int MB>
inline void dot_tile(const uint16_t* const* w, const uint16_t* const* x, int64_t K, float (*out)[4], bool prefetch) {
  typename V::acc_t acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < 4; ++r) acc[i][r] = V::zero();
  int64_t k = 0;
  for (; k + V::W <= K; k += V::W) {
    typename V::raw_t wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = V::template load<T>(w[r] + k);
#ifdef L16_AVX2
    if (prefetch)
      for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(w[r] + 4 * K + k), _MM_HINT_T0);
#endif
    for (int i = 0; i < MB; ++i) {
      const typename V::raw_t xv = V::template load<T>(x[i] + k);
      for (int r = 0; r < 4; ++r) acc[i][r] = V::madd(acc[i][r], wv[r], xv);
    }
  }
  if (k < K) {  // zero-padded last step: the padding adds 0 * 0
    typename V::raw_t wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = V::template load_tail<T>(w[r] + k, K - k);
    for (int i = 0; i < MB; ++i) {
      const typename V::raw_t xv = V::template load_tail<T>(x[i] + k, K - k);
      for (int r = 0; r < 4; ++r) acc[i][r] = V::madd(acc[i][r], wv[r], xv);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < 4; ++r) out[i][r] = V::sum(acc[i][r]);
}

// dot_tile for mb <= MB input rows (MB a template argument: the tile's accumulators stay registers).
template <class V, class T, int MB>
inline void dot_tile_rows(int64_t mb, const uint16_t* const* w, const uint16_t* const* x, int64_t K, float (*out)[4],
                          bool prefetch) {
  if constexpr (MB > 1) {
    if (mb < MB) return dot_tile_rows<V, T, MB - 1>(mb, w, x, K, out, prefetch);
  }
  dot_tile<V, T, MB>(w, x, K, out, prefetch);
}

struct Task16 {
  const uint16_t* x; int64_t M; int64_t sx;  // x rows (row stride sx)
  const uint16_t* w; int64_t N; int64_t K;   // weight [N, K], contiguous
  const uint16_t* bias;                      // [N] or null
  uint16_t* y;                               // [M, N], contiguous
};

// Output rows [n0, n1) of every input row: blocks of 4 weight rows (a short last block repeats its last row),
// each block reused from L1 for all input rows, V::kRows input rows at a time.
template <class V, class T>
void run_rows16(const Task16& t, int64_t n0, int64_t n1) {
  float out[V::kRows][4];
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t r = std::min<int64_t>(4, n1 - n);
    const uint16_t* w[4];
    for (int64_t i = 0; i < 4; ++i) w[i] = t.w + (n + std::min(i, r - 1)) * t.K;
    float b[4] = {0.f, 0.f, 0.f, 0.f};
    if (t.bias)
      for (int64_t i = 0; i < r; ++i) b[i] = T::to_float(t.bias[n + i]);
    for (int64_t m = 0; m < t.M; m += V::kRows) {
      const int64_t mb = std::min<int64_t>(V::kRows, t.M - m);
      const uint16_t* x[V::kRows];
      for (int64_t i = 0; i < V::kRows; ++i) x[i] = t.x + (m + std::min(i, mb - 1)) * t.sx;
      dot_tile_rows<V, T, V::kRows>(mb, w, x, t.K, out, m == 0);  // the first tile prefetches the next block
      for (int64_t i = 0; i < mb; ++i) {
        uint16_t* y = t.y + (m + i) * t.N + n;
        for (int64_t j = 0; j < r; ++j) y[j] = T::from_float(out[i][j] + b[j]);
      }
    }
  }
}
"""

LINEAR16_MODULE_CPP = r"""
}  // namespace

struct LinearPool16 : PoolHandle {
  static constexpr int64_t kChunkRows = 64;  // rows per claim: 72 KB of weights at K = 576, as the float32 kernel's 32

  using PoolHandle::PoolHandle;
  int64_t threads() const { return pool->threads(); }
  at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0 || N == 0) return y;
    Task16 t{static_cast<const uint16_t*>(x.data_ptr()), M, x.stride(0), static_cast<const uint16_t*>(w.data_ptr()),
             N, K, bias.has_value() ? static_cast<const uint16_t*>(bias->data_ptr()) : nullptr,
             static_cast<uint16_t*>(y.data_ptr())};
    if (w.scalar_type() == at::kBFloat16)
      pool->run(N, kChunkRows, [&t](int64_t n0, int64_t n1) { run_rows16<VBF16, BF16>(t, n0, n1); });
    else
      pool->run(N, kChunkRows, [&t](int64_t n0, int64_t n1) { run_rows16<VF16, F16>(t, n0, n1); });
    return y;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<LinearPool16>(m, "LinearPool16", pybind11::module_local())  // each build (ISA) its own type
      .def(pybind11::init<int64_t, int64_t>())
      .def_property_readonly("threads", &LinearPool16::threads)
      .def("linear", &LinearPool16::linear, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.attr("isa_bfloat16") = VBF16::name;
  m.attr("isa_float16") = VF16::name;
}
"""
