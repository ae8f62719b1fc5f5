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

``PACKED16_CPP`` (AVX-512 BF16 builds): bfloat16 GEMM on a weight packed once (`pack16`), 12 rows x 32 columns
a tile in 24 accumulators, one ``vdpbf16ps`` per broadcast pair of x and 16 columns, no horizontal sums.
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

# Register-blocked bfloat16 GEMM on a weight packed once at load (AVX-512 BF16 builds only; see ``linear16.py``).
PACKED16_CPP = r"""
#ifdef L16_DPBF16
constexpr int kPackMR = 12, kPackNR = 2;  // 12 x rows x 2 strips: 24 accumulators + 2 weights + 1 broadcast

// W [N, K] -> [S = ceil(N / 16)][P = ceil(K / 2)][16][2]: strip s, pair p holds columns 16 s .. 16 s + 15 of
// k = 2 p, 2 p + 1 as one 32-bit pair each (the layout vdpbf16ps multiplies by a broadcast pair of x); zero-padded.
void pack16(const uint16_t* w, int64_t N, int64_t K, uint16_t* out) {
  const int64_t S = (N + 15) / 16, P = (K + 1) / 2;
  std::memset(out, 0, S * P * 32 * sizeof(uint16_t));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) out[((n / 16) * P + k / 2) * 32 + (n % 16) * 2 + (k & 1)] = w[n * K + k];
}

// x's pair k = 2 p, 2 p + 1 of one row broadcast to 16 lanes; the last pair of an odd K (tail): its high half zero
template <bool tail>
inline __m512bh pair_of(const uint16_t* x, int64_t p) {
  if (tail) return (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[2 * p]));
  int32_t v;
  std::memcpy(&v, x + 2 * p, sizeof v);
  return (__m512bh)_mm512_set1_epi32(v);
}

// float32 -> bfloat16 as c10::BFloat16 does it (round to nearest even, NaN -> 0x7fc0), 16 lanes
inline __m256i round_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

struct Packed16 {
  const uint16_t* x; int64_t M; int64_t sx;  // x rows (row stride sx)
  const uint16_t* w; int64_t N; int64_t K;   // packed weight of W [N, K]
  const uint16_t* bias;                      // [N] or null
  uint16_t* y;                               // [M, N], contiguous
};

// Rows [m, m + MR) x strips [s, s + NR): every output one float32 sum over k = 0, 1, ... (vdpbf16ps on each pair,
// in order), plus the bias, rounded once. pf: the next strips, prefetched while these are read (or null).
template <int MR, int NR>
void packed_tile(const Packed16& t, int64_t m, int64_t s, const uint16_t* pf) {
  const int64_t P = (t.K + 1) / 2, strip = P * 32;
  const uint16_t* w = t.w + s * strip;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const uint16_t* x = t.x + m * t.sx;
  auto step = [&](int64_t p, auto tail) {
    __m512i wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(w + j * strip + p * 32);
    if (pf)
      for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + j * strip + p * 32), _MM_HINT_T0);
    for (int i = 0; i < MR; ++i) {
      const __m512bh xb = pair_of<decltype(tail)::value>(x + i * t.sx, p);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xb, (__m512bh)wv[j]);
    }
  };
  for (int64_t p = 0; p < t.K / 2; ++p) step(p, std::false_type{});
  if (t.K & 1) step(t.K / 2, std::true_type{});
  for (int j = 0; j < NR; ++j) {
    const int64_t n = (s + j) * 16, cols = std::min<int64_t>(16, t.N - n);
    const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
    __m512 b = _mm512_setzero_ps();
    if (t.bias)
      b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, t.bias + n)), 16));
    for (int i = 0; i < MR; ++i)
      _mm256_mask_storeu_epi16(t.y + (m + i) * t.N + n, mask, round_bf16(_mm512_add_ps(acc[i][j], b)));
  }
}

// packed_tile for mr <= MR rows and nr <= NR strips (template arguments: the accumulators stay registers)
template <int MR, int NR>
void packed_tile_any(const Packed16& t, int64_t m, int64_t mr, int64_t s, int64_t nr, const uint16_t* pf) {
  if constexpr (NR > 1) {
    if (nr < NR) return packed_tile_any<MR, NR - 1>(t, m, mr, s, nr, pf);
  }
  if constexpr (MR > 1) {
    if (mr < MR) return packed_tile_any<MR - 1, NR>(t, m, mr, s, nr, pf);
  }
  packed_tile<MR, NR>(t, m, s, pf);
}

// Strips [s0, s1) for rows [m0, m1): kPackNR strips at a time, reused from cache by the row blocks, which split
// the rows evenly (41 rows: 6 blocks of 7 or 6); with prefetch, the first row block prefetches the next strips.
void run_packed_rows(const Packed16& t, int64_t s0, int64_t s1, int64_t m0, int64_t m1, bool prefetch) {
  const int64_t S = (t.N + 15) / 16, P = (t.K + 1) / 2;
  const int64_t blocks = (m1 - m0 + kPackMR - 1) / kPackMR;
  for (int64_t s = s0; s < s1; s += kPackNR) {
    const int64_t nr = std::min<int64_t>(kPackNR, s1 - s);
    const uint16_t* next = prefetch && s + nr < S ? t.w + (s + nr) * P * 32 : nullptr;
    for (int64_t b = 0, m = m0; b < blocks; ++b) {
      const int64_t mr = (m1 - m) / (blocks - b);  // the remaining rows spread over the remaining blocks
      packed_tile_any<kPackMR, kPackNR>(t, m, mr, s, nr, b == 0 ? next : nullptr);
      m += mr;
    }
  }
}

// Strips [s0, s1) for every row, kPackRows rows at a time: at prefill the rows of x a strip meets stay in L2
// (2048 rows of the LM head: 222 ms without, against oneDNN's 191); the first pass streams the strips in.
void run_packed(const Packed16& t, int64_t s0, int64_t s1) {
  constexpr int64_t kPackRows = 192;
  for (int64_t m = 0; m < t.M; m += kPackRows) run_packed_rows(t, s0, s1, m, std::min(t.M, m + kPackRows), m == 0);
}
#endif
"""

LINEAR16_MODULE_CPP = r"""
}  // namespace

struct LinearPool16 : PoolHandle {
  static constexpr int64_t kChunkRows = 64;  // rows per claim: 72 KB of weights at K = 576, as the float32 kernel's 32
  static constexpr int64_t kChunkStrips = 6;  // 16-column strips per claim of the packed kernel: 3 tiles wide

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
#ifdef L16_DPBF16
  // W [N, K] bfloat16 -> run_packed's layout, once at load
  static at::Tensor pack(const at::Tensor& w) {
    const int64_t N = w.size(0), K = w.size(1);
    at::Tensor out = at::empty({(N + 15) / 16, (K + 1) / 2, 16, 2}, w.options());
    pack16(static_cast<const uint16_t*>(w.data_ptr()), N, K, static_cast<uint16_t*>(out.data_ptr()));
    return out;
  }
  at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& w, int64_t N, const c10::optional<at::Tensor>& bias) {
    const int64_t M = x.size(0), K = x.size(1);
    at::Tensor y = at::empty({M, N}, x.options());
    if (M == 0 || N == 0) return y;
    Packed16 t{static_cast<const uint16_t*>(x.data_ptr()), M, x.stride(0), static_cast<const uint16_t*>(w.data_ptr()),
               N, K, bias.has_value() ? static_cast<const uint16_t*>(bias->data_ptr()) : nullptr,
               static_cast<uint16_t*>(y.data_ptr())};
    const int64_t S = w.size(0), chunks = (S + kChunkStrips - 1) / kChunkStrips;
    const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), chunks));
    // OpenMP, not the pool: in the engine torch's ops and the attention kernel leave OpenMP threads spinning on the
    // cores the pool wants (120 linears of 40 rows: 27.9 ms a step on the pool, 18.5 on OpenMP); chunks are
    // claimed from a counter, so a thread that starts late takes no work.
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads) if (threads > 1)
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;)
      run_packed(t, c * kChunkStrips, std::min(S, (c + 1) * kChunkStrips));
    return y;
  }
#endif
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<LinearPool16>(m, "LinearPool16", pybind11::module_local())  // each build (ISA) its own type
      .def(pybind11::init<int64_t, int64_t>())
      .def_property_readonly("threads", &LinearPool16::threads)
      .def("linear", &LinearPool16::linear, pybind11::call_guard<pybind11::gil_scoped_release>())
#ifdef L16_DPBF16
      .def_static("pack", &LinearPool16::pack)
      .def("linear_packed", &LinearPool16::linear_packed, pybind11::call_guard<pybind11::gil_scoped_release>())
#endif
      ;
  m.attr("isa_bfloat16") = VBF16::name;
  m.attr("isa_float16") = VF16::name;
}
"""
