"""C++ of the GGUF CPU kernels' dot products, dequantization and threading (after ``gguf_source.GGUF_TYPES_CPP``).

Activations, three ways (`gguf.py` says which is used and why):

- ``Q16``: int16 per 32 values (scale ``amax / 32767``), dotted with the weight codes widened to int16
  (``madd_epi16``; AVX-512 VNNI ``dpwssd``). The int16 copy of a 32-value block is stored in the order
  ``[0-7, 16-23, 8-15, 24-31]``, so that unpacking the 32 codes' low / high bytes of each 128-bit lane lines
  up with it and the two products sum to the same lanes as the other paths (lanes 0-3: values 0-15).
- ``Q8``: int8 per 32 values (scale ``amax / 127``), llama.cpp's scheme (``maddubs``; VNNI ``dpbusd``).
- ``F32``: the float rows as they are, the codes converted to floats.

The offsets (``Sub::o``) always multiply the exact float sums of each 16 activations.

With AVX-512 BW + VNNI (``GG_ZMM``), Q16 takes two sub-blocks a step: their 64 codes in one 512-bit register, the
activations of each full pair of sub-blocks laid out to match it (``code_pos``), each int32 lane of the dot product
scaled by its own weight and activation scales (``dot_pair``); the per-block float conversions and the serial
accumulator chain of the 256-bit step were what bound it (the 256-bit kernel ran as fast on a cached weight as on one
streamed from memory). The quantized activations live in per-thread buffers reused across calls.
"""

GGUF_KERNEL_CPP = r"""
#ifdef GG_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Products of 32 codes with 32 int8 activations summed in fours: int32 lanes 0-3 cover values 0-15, 4-7 16-31.
template <bool kSigned>
inline __m256i dot32(__m256i c, const int8_t* xq) {
  __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  if (kSigned) {  // u8 x s8 instructions: move the codes' signs onto the activations
    x = _mm256_sign_epi8(x, c);
    c = _mm256_abs_epi8(c);
  }
#ifdef GG_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1));  // codes <= 63: no saturation
#endif
}

// The same with int16 activations in Q16::pos order: the same lanes.
template <bool kSigned>
inline __m256i dot32(__m256i c, const int16_t* xq) {
  const __m256i sign = kSigned ? _mm256_cmpgt_epi8(_mm256_setzero_si256(), c) : _mm256_setzero_si256();
  const __m256i a = _mm256_unpacklo_epi8(c, sign), b = _mm256_unpackhi_epi8(c, sign);
  const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16));
#ifdef GG_VNNI
  return _mm256_dpwssd_epi32(_mm256_madd_epi16(a, xa), b, xb);
#else
  return _mm256_add_epi32(_mm256_madd_epi16(a, xa), _mm256_madd_epi16(b, xb));
#endif
}

// 32 codes as four vectors of 8 floats, in order.
template <bool kSigned>
inline void codes_f32(__m256i c, __m256* f) {
  const __m128i h[2] = {_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)};
  for (int i = 0; i < 4; ++i) {
    const __m128i part = (i & 1) ? _mm_srli_si128(h[i / 2], 8) : h[i / 2];
    f[i] = _mm256_cvtepi32_ps(kSigned ? _mm256_cvtepi8_epi32(part) : _mm256_cvtepu8_epi32(part));
  }
}

// acc[m] += sub-block . x[m0 + m] for MB rows, without the offsets.
template <class T, int MB, class P>
inline void sub_dot(__m256i cv, const Sub& u, const Act<P>& a, int64_t m0, int64_t e, __m256* acc) {
  if constexpr (std::is_same_v<P, F32>) {
    __m256 f[4];
    codes_f32<T::kSigned>(cv, f);
    for (int i = 0; i < 4; ++i) f[i] = _mm256_mul_ps(f[i], _mm256_set1_ps(u.s[i / 2]));
    for (int m = 0; m < MB; ++m) {
      const float* x = a.x + (m0 + m) * a.sx + 32 * e;
      for (int i = 0; i < 4; ++i) acc[m] = _mm256_fmadd_ps(f[i], _mm256_loadu_ps(x + 8 * i), acc[m]);
    }
  } else {
    const __m256 sv = _mm256_setr_ps(u.s[0], u.s[0], u.s[0], u.s[0], u.s[1], u.s[1], u.s[1], u.s[1]);
    for (int m = 0; m < MB; ++m) {
      const int64_t r = m0 + m;
      const __m256i p = dot32<T::kSigned>(cv, a.q + r * a.K + 32 * e);
      const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(a.d[r * (a.K / 32) + e]));
      acc[m] = _mm256_fmadd_ps(f, sv, acc[m]);
    }
  }
}

#ifdef GG_ZMM
// [a x4, b x4, c x4, d x4]: a value per 16-value half of a pair of sub-blocks, along the lanes of its dot product.
// Built in registers: the Subs were just written as scalars, and a vector load of them would stall on the stores.
inline __m512 spread4(float a, float b, float c, float d) {
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                               _mm512_castps128_ps512(_mm_setr_ps(a, b, c, d)));
}

// Weight scales and offsets of two consecutive one-sub-block blocks (kSubs == 1) along a pair's lanes, their float16
// fields converted in one instruction (T::subs per block took a third of the pair's instructions).
template <class T>
inline void pair_affine(const uint8_t* b0, const uint8_t* b1, __m512* ws, __m512* wo) {
  uint32_t h0, h1;  // d, m (or the next field: unused)
  std::memcpy(&h0, b0, 4);
  std::memcpy(&h1, b1, 4);
  const __m512 f = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(static_cast<int>(h0)),
                                                                        static_cast<int>(h1), 1)));  // d0 m0 d1 m1
  *ws = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2), f);
  if constexpr (T::kMinField)
    *wo = _mm512_permutexvar_ps(_mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3), f);
  else
    *wo = _mm512_mul_ps(*ws, _mm512_set1_ps(T::kOffset));  // exact: a power of two
}

// The 64 codes of sub-blocks (b0, k0) and (b1, k1): the type's own two-block decoder where it has one.
template <class T>
inline __m512i codes512(const uint8_t* b0, int k0, const uint8_t* b1, int k1) {
  if constexpr (requires { T::codes512(b0, b1); }) return T::codes512(b0, b1);
  else return _mm512_inserti64x4(_mm512_castsi256_si512(T::codes256(b0, k0)), T::codes256(b1, k1), 1);
}

// acc[m] += pair . x[m0 + m] and off[m] += the pair's offsets times the activations' sums, for sub-blocks e = 2p
// and e + 1 (codes c: e's 32 in the low half, e+1's in the high; ws, wo: their scales and offsets per lane). Int32
// lane l of the dot product holds the 16 products of values 16 (l / 4) .. of the pair (two halves of e, then of
// e+1), so each lane is scaled by its half's weight scale and its sub-block's activation scale (Act::v).
template <class T, int MB>
inline void dot_pair(__m512i c, __m512 ws, __m512 wo, const Act<Q16>& a, int64_t m0, int64_t p, __m512* acc,
                     __m512* off) {
  const __m512i sign = T::kSigned ? _mm512_movm_epi8(_mm512_cmplt_epi8_mask(c, _mm512_setzero_si512()))
                                  : _mm512_setzero_si512();
  const __m512i lo = _mm512_unpacklo_epi8(c, sign), hi = _mm512_unpackhi_epi8(c, sign);
  const int64_t pairs = a.K / 64;
  for (int m = 0; m < MB; ++m) {
    const int64_t r = m0 + m;
    const int16_t* xq = a.q + r * a.K + 64 * p;
    const float* v = a.v + (r * pairs + p) * 32;
    __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
    dot = _mm512_dpwssd_epi32(dot, hi, _mm512_loadu_si512(xq + 32));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, _mm512_loadu_ps(v)), acc[m]);
    if (!T::kSigned) off[m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(v + 16), off[m]);
  }
}

// out[m] = W[row] . x[m0 + m] for Q16 activations, two sub-blocks a step (an odd last one as `dot_row` takes it).
template <class T, int MB>
void dot_row_zmm(const uint8_t* row, const Act<Q16>& a, int64_t m0, float* out) {
  const int64_t ne = a.K / 32, pairs = ne / 2, K16 = a.K / 16;
  __m512 acc[MB], off[MB];
  __m256 tail[MB];
  for (int m = 0; m < MB; ++m) acc[m] = off[m] = _mm512_setzero_ps(), tail[m] = _mm256_setzero_ps();
  Sub sub[T::kSubs];
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t e = 2 * p;
    const uint8_t* b0 = row + e / T::kSubs * T::kBytes;
    const uint8_t* b1 = row + (e + 1) / T::kSubs * T::kBytes;
    const int k0 = static_cast<int>(e % T::kSubs), k1 = T::kSubs == 1 ? 0 : k0 + 1;
    __m512 ws, wo;
    if constexpr (T::kSubs == 1) {
      pair_affine<T>(b0, b1, &ws, &wo);
    } else {
      if (k0 == 0) T::subs(b0, sub);
      ws = spread4(sub[k0].s[0], sub[k0].s[1], sub[k1].s[0], sub[k1].s[1]);
      wo = spread4(sub[k0].o[0], sub[k0].o[1], sub[k1].o[0], sub[k1].o[1]);
    }
    dot_pair<T, MB>(codes512<T>(b0, k0, b1, k1), ws, wo, a, m0, p, acc, off);
  }
  float tail_off[MB] = {};
  if (ne % 2) {  // kSubs == 1 types only: K is a whole number of blocks
    const uint8_t* blk = row + (ne - 1) * T::kBytes;
    T::subs(blk, sub);
    sub_dot<T, MB, Q16>(T::codes256(blk, 0), sub[0], a, m0, ne - 1, tail);
    for (int m = 0; m < MB; ++m)
      tail_off[m] = sub[0].o[0] * a.s[(m0 + m) * K16 + 2 * (ne - 1)] + sub[0].o[1] * a.s[(m0 + m) * K16 + 2 * ne - 1];
  }
  for (int m = 0; m < MB; ++m)  // offsets added lane-wise first: one horizontal sum per row
    out[m] = _mm512_reduce_add_ps(T::kSigned ? acc[m] : _mm512_add_ps(acc[m], off[m])) + hsum(tail[m]) + tail_off[m];
}
#endif
#else
template <class T, int MB, class P>
inline void sub_dot(const uint8_t* c, const Sub& u, const Act<P>& a, int64_t m0, int64_t e, float* acc) {
  for (int m = 0; m < MB; ++m) {
    const int64_t r = m0 + m;
    float half[2] = {0.f, 0.f};
    if constexpr (std::is_same_v<P, F32>) {
      const float* x = a.x + r * a.sx + 32 * e;
      for (int i = 0; i < 32; ++i) half[i / 16] += (T::kSigned ? float(int8_t(c[i])) : float(c[i])) * x[i];
    } else {
      const typename P::Code* x = a.q + r * a.K + 32 * e;
      int32_t p[2] = {0, 0};
      for (int i = 0; i < 32; ++i) p[i / 16] += (T::kSigned ? int32_t(int8_t(c[i])) : int32_t(c[i])) * x[P::pos(i)];
      half[0] = a.d[r * (a.K / 32) + e] * p[0];
      half[1] = a.d[r * (a.K / 32) + e] * p[1];
    }
    acc[m] += u.s[0] * half[0] + u.s[1] * half[1];
  }
}
#endif

// out[m] = W[row] . x[m0 + m] for MB activation rows: each sub-block is decoded once for all of them.
template <class T, int MB, class P>
void dot_row(const uint8_t* row, const Act<P>& a, int64_t m0, float* out) {
#ifdef GG_ZMM
  if constexpr (std::is_same_v<P, Q16>) return dot_row_zmm<T, MB>(row, a, m0, out);
#endif
  const int64_t nb = a.K / T::kValues, K16 = a.K / 16;
  float off[MB] = {};
  Sub sub[T::kSubs];
#ifdef GG_AVX2
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
#else
  float acc[MB] = {};
  uint8_t c[32];
#endif
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * T::kBytes;
    T::subs(blk, sub);
    for (int k = 0; k < T::kSubs; ++k) {
      const int64_t e = b * T::kSubs + k;
#ifdef GG_AVX2
      sub_dot<T, MB, P>(T::codes256(blk, k), sub[k], a, m0, e, acc);
#else
      T::codes(blk, k, c);
      sub_dot<T, MB, P>(c, sub[k], a, m0, e, acc);
#endif
      if (!T::kSigned)  // Q8_0 has no offset
        for (int m = 0; m < MB; ++m)
          off[m] += sub[k].o[0] * a.s[(m0 + m) * K16 + 2 * e] + sub[k].o[1] * a.s[(m0 + m) * K16 + 2 * e + 1];
    }
  }
  for (int m = 0; m < MB; ++m) {
#ifdef GG_AVX2
    out[m] = hsum(acc[m]) + off[m];
#else
    out[m] = acc[m] + off[m];
#endif
  }
}

// Rows [n0, n1) of y [M, N]: activation rows in groups of 8, 4, 2, 1 (each group decodes the weight row once).
template <class T, class P>
void gemv_rows(const uint8_t* w, const Act<P>& a, int64_t M, int64_t N, const float* bias, float* y, int64_t n0,
               int64_t n1) {
  const int64_t row_bytes = a.K / T::kValues * T::kBytes;
  float out[8];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t m0 = 0; m0 < M;) {
      const int64_t left = M - m0, mb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
      switch (mb) {
        case 8: dot_row<T, 8, P>(row, a, m0, out); break;
        case 4: dot_row<T, 4, P>(row, a, m0, out); break;
        case 2: dot_row<T, 2, P>(row, a, m0, out); break;
        default: dot_row<T, 1, P>(row, a, m0, out);
      }
      for (int64_t m = 0; m < mb; ++m) y[(m0 + m) * N + n] = out[m] + (bias ? bias[n] : 0.f);
      m0 += mb;
    }
  }
}

// Rows [n0, n1) of W as float32 [N, K].
template <class T>
void dequantize_rows(const uint8_t* w, int64_t K, float* out, int64_t n0, int64_t n1) {
  const int64_t nb = K / T::kValues;
  Sub sub[T::kSubs];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = w + (n * nb + b) * T::kBytes;
      T::subs(blk, sub);
      for (int k = 0; k < T::kSubs; ++k) {
        float* o = out + n * K + (b * T::kSubs + k) * 32;
        const Sub& u = sub[k];
#ifdef GG_AVX2
        __m256 f[4];
        codes_f32<T::kSigned>(T::codes256(blk, k), f);
        for (int i = 0; i < 4; ++i)
          _mm256_storeu_ps(o + 8 * i, _mm256_fmadd_ps(f[i], _mm256_set1_ps(u.s[i / 2]), _mm256_set1_ps(u.o[i / 2])));
#else
        uint8_t c[32];
        T::codes(blk, k, c);
        for (int i = 0; i < 32; ++i)
          o[i] = u.s[i / 16] * (T::kSigned ? float(int8_t(c[i])) : float(c[i])) + u.o[i / 16];
#endif
      }
    }
}

// Rows per claim of the pool: about 128 KB of weights, so that each thread streams long runs of memory (the hardware
// prefetchers restart at every jump). For SmolLM2's 120 Q4_1 linears of one token on 2 threads: 4 KB claims 10.5
// ms, 16 KB 6.2, 64 KB 3.5-3.9, 128 KB 3.3, 256 KB 3.7-3.8 (one thread: 5.3).
// The claims of one call are a whole number per thread, of equal size: 3 claims on 2 threads left one thread idle for
// a third of SmolLM2's q/k/v linear (and a fifth of its down projection).
constexpr int64_t kChunkBytes = 1 << 17;

int64_t chunk_rows(int64_t n, int64_t row_bytes, int threads) {
  const int64_t per_thread = std::max<int64_t>(1, (n * row_bytes + threads * kChunkBytes - 1) / (threads * kChunkBytes));
  const int64_t chunks = per_thread * threads;
  return std::max<int64_t>(1, (n + chunks - 1) / chunks);
}

int64_t check_weight(const at::Tensor& w, int64_t type, int64_t K) {
  TORCH_CHECK(w.dtype() == at::kByte && w.is_contiguous() && w.dim() >= 2, "GGUF weight: contiguous uint8 [N, ...]");
  int64_t values = 0, bytes = 0;
  TORCH_CHECK(with_type(type, [&]<class T>() { values = T::kValues; bytes = T::kBytes; }),
              "GGUF type ", type, " has no CPU kernel");
  TORCH_CHECK(K % values == 0 && w.numel() == w.size(0) * (K / values) * bytes, "GGUF weight of ", w.size(0),
              " rows does not hold ", K, " values of type ", type, " per row");
  return w.size(0);
}

template <class P>
at::Tensor gemv_on(Pool& pool, const at::Tensor& x, const at::Tensor& w, int64_t type, const float* bias) {
  const int64_t M = x.size(0), K = x.size(1), N = check_weight(w, type, K);
  at::Tensor y = at::empty({M, N}, x.options());
  const int64_t pairs = zmm_pairs<P>(K);
  // The quantized rows live in buffers of the calling thread, reused by its next call (an allocation per linear
  // was a visible part of a batch-1 step); pool threads only read them while this call waits.
  thread_local std::vector<typename P::Code> qbuf;
  thread_local std::vector<float> fbuf;
  qbuf.resize(std::max<size_t>(qbuf.size(), M * K));
  fbuf.resize(std::max<size_t>(fbuf.size(), M * (K / 32 + K / 16 + pairs * 32)));
  float* d = fbuf.data();
  float* s = d + M * (K / 32);
  float* v = s + M * (K / 16);
  typename P::Code* qp = qbuf.data();
  quantize<P>(x.data_ptr<float>(), x.stride(0), M, K, qp, d, s);  // F32 too: it needs the sums
  pair_vectors(d, s, M, K, pairs, v);
  const Act<P> a{x.data_ptr<float>(), x.stride(0), qp, d, s, K, v};
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  with_type(type, [&]<class T>() {
    pool.run(N, chunk_rows(N, w.numel() / N, pool.threads()),
             [&](int64_t n0, int64_t n1) { gemv_rows<T, P>(wp, a, M, N, bias, yp, n0, n1); });
  });
  return y;
}

}  // namespace

// The kernels on a pool of threads (one per thread count, `gguf.py`).
struct GGUFPool : PoolHandle {
  using PoolHandle::PoolHandle;

  at::Tensor dequantize(const at::Tensor& w, int64_t type, int64_t K) {
    const int64_t N = check_weight(w, type, K);
    at::Tensor out = at::empty({N, K}, at::kFloat);
    const uint8_t* wp = w.data_ptr<uint8_t>();
    float* op = out.data_ptr<float>();
    with_type(type, [&]<class T>() {
      pool->run(N, chunk_rows(N, w.numel() / N, pool->threads()),
                [&](int64_t n0, int64_t n1) { dequantize_rows<T>(wp, K, op, n0, n1); });
    });
    return out;
  }

  // y [M, N] = x [M, K] . W^T (+ bias) on the blocks, activations as act: 0 Q16, 1 Q8, 2 F32 (any M: the caller
  // sends few rows here and `gemm`s many).
  at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, int64_t type, const c10::optional<at::Tensor>& bias,
                  int64_t act) {
    const float* bp = checked_bias(x, w, bias);
    if (act == 1) return gemv_on<Q8>(*pool, x, w, type, bp);
    if (act == 2) return gemv_on<F32>(*pool, x, w, type, bp);
    return gemv_on<Q16>(*pool, x, w, type, bp);
  }

  // The same with Q16 activations for many rows: the weight decoded once per tile of 16 rows (`gemm_on`, gguf.py);
  // without AVX-512 VNNI, dequantized to float32 and multiplied by torch.
  at::Tensor gemm(const at::Tensor& x, const at::Tensor& w, int64_t type, const c10::optional<at::Tensor>& bias) {
    const float* bp = checked_bias(x, w, bias);
    check_weight(w, type, x.size(1));
#ifdef GG_ZMM
    return gemm_on(*pool, x, w, type, bp);
#else
    return bp ? at::linear(x, dequantize(w, type, x.size(1)), *bias) : at::linear(x, dequantize(w, type, x.size(1)));
#endif
  }

  static const float* checked_bias(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
    TORCH_CHECK(x.device().is_cpu() && x.dtype() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
                "x: float32 CPU [M, K], rows contiguous");
    TORCH_CHECK(!bias.has_value() || (bias->dtype() == at::kFloat && bias->is_contiguous() && bias->dim() == 1 &&
                                      bias->size(0) == w.size(0)), "bias: float32 [N]");
    return bias.has_value() ? bias->data_ptr<float>() : nullptr;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<GGUFPool>(m, "GGUFPool", pybind11::module_local())  // each build (ISA) its own type
      .def(pybind11::init<int64_t, int64_t>())
      .def("dequantize", &GGUFPool::dequantize, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("gemv", &GGUFPool::gemv, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("gemm", &GGUFPool::gemm, pybind11::call_guard<pybind11::gil_scoped_release>());
}
"""

ACTIVATIONS = ("q16", "q8", "f32")
"""``GGUFPool.gemv``'s ``act`` argument: the index in this tuple."""
