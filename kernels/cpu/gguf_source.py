"""C++ of the GGUF CPU kernels (``gguf.py`` builds it): GGML's block formats decoded to 32-value sub-blocks.

Every kept type is read as sub-blocks of 32 values, each an affine map of small unsigned codes (Q8_0: signed):
``w[i] = scale[i / 16] * code[i] + offset[i / 16]`` (`Sub`). A type is a struct with its block size in values and
bytes, ``subs`` (the scales and offsets of a block's sub-blocks, decoded once per block) and ``codes`` (one
sub-block's 32 codes: into bytes for the scalar path, into one 256-bit register for AVX2); at the end the
activation formats the dot products take (``Q16`` / ``Q8`` / ``F32``, described in ``gguf_kernel_source.py``) and
their quantization. The dot products in ``GGUF_KERNEL_CPP`` are written once for all types on top of that.
Layouts and dequantization formulas are GGML's (``ggml-common.h``, ``dequantize_row_*`` in ``ggml-quants.c``);
``kernels/quant/gguf_reference.py`` states them in torch and is the ground truth.
"""

GGUF_TYPES_CPP = r"""
#include <torch/extension.h>
#include <pthread.h>
#include <sched.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GG_AVX2 1
#endif
#if defined(GG_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define GG_VNNI 1
#endif
#if defined(GG_VNNI) && defined(__AVX512F__) && defined(__AVX512BW__)
#define GG_ZMM 1  // int16 activations two sub-blocks at a time in 512-bit registers (gguf_kernel_source.py)
#endif

namespace {

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef GG_AVX2
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// One sub-block of 32 values: w[i] = s[i / 16] * code[i] + o[i / 16] (two halves for Q6_K's 16-value scales).
struct Sub {
  float s[2];
  float o[2];
};

inline Sub affine(float s, float o) { return Sub{{s, s}, {o, o}}; }

// Scalar: 16 packed bytes -> low nibbles as codes 0..15, high nibbles as codes 16..31 (Q4_0 / Q4_1 / Q5_*).
inline void nibbles(const uint8_t* q, uint8_t* c) {
  for (int j = 0; j < 16; ++j) {
    c[j] = q[j] & 15;
    c[j + 16] = q[j] >> 4;
  }
}

// Scalar: bit j of the little-endian 32 bits at p becomes bit 4 of code j (the fifth bit of Q5_0 / Q5_1).
inline void fifth_bits(const uint8_t* p, uint8_t* c) {
  uint32_t h;
  std::memcpy(&h, p, 4);
  for (int j = 0; j < 32; ++j) c[j] |= ((h >> j) & 1u) << 4;
}

#ifdef GG_AVX2
inline __m256i nibbles256(const uint8_t* q) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i m = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

// bit j of 32 bits -> byte j = 16 or 0 (llama.cpp's bytes_from_bits_32, scaled to the fifth bit)
inline __m256i fifth_bits256(const uint8_t* p) {
  uint32_t h;
  std::memcpy(&h, p, 4);
  const __m256i shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(h)), shuffle);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(16));
}

// 32 bytes of packed pairs -> low (hi == false) or high nibbles, in order.
inline __m256i half_bytes256(const uint8_t* q, bool hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  return _mm256_and_si256(hi ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
}

// bits [shift, shift + width) of 32 bytes, moved to bit 4 (width 1: Q5_K, 2: Q6_K).
inline __m256i high_bits256(const uint8_t* q, int shift, int width) {
  const __m256i v = _mm256_srl_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)),
                                     _mm_cvtsi32_si128(shift));
  return _mm256_and_si256(_mm256_slli_epi16(v, 4), _mm256_set1_epi8(static_cast<char>(((1 << width) - 1) << 4)));
}
#endif

// A one-sub-block type (kSubs == 1) also states its Sub as fields: d (f16) first, then m (f16) if kMinField, and
// offset kOffset * d otherwise (the 512-bit path converts two blocks' fields at once: `pair_affine`).
struct Q8_0 {  // d f16, 32 x int8
  static constexpr int kValues = 32, kBytes = 34, kSubs = 1;
  static constexpr bool kSigned = true, kMinField = false;
  static constexpr float kOffset = 0.f;
  static void subs(const uint8_t* b, Sub* s) { s[0] = affine(f16(b), 0.f); }
  static void codes(const uint8_t* b, int, uint8_t* c) { std::memcpy(c, b + 2, 32); }
#ifdef GG_AVX2
  static __m256i codes256(const uint8_t* b, int) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2)); }
#endif
};

// Q4_0 (d, 16 bytes of nibbles; w = d * (q - 8)) and Q4_1 (d, m, nibbles; w = d * q + m)
template <bool kMin>
struct Q4 {
  static constexpr int kValues = 32, kBytes = kMin ? 20 : 18, kSubs = 1, kQs = kMin ? 4 : 2;
  static constexpr bool kSigned = false, kMinField = kMin;
  static constexpr float kOffset = -8.f;
  static void subs(const uint8_t* b, Sub* s) {
    const float d = f16(b);
    s[0] = affine(d, kMin ? f16(b + 2) : -8.f * d);
  }
  static void codes(const uint8_t* b, int, uint8_t* c) { nibbles(b + kQs, c); }
#ifdef GG_AVX2
  static __m256i codes256(const uint8_t* b, int) { return nibbles256(b + kQs); }
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // Two consecutive blocks' codes (b0's low half): both blocks' nibbles split in one 256-bit register.
  static __m512i codes512(const uint8_t* b0, const uint8_t* b1) {
    const __m256i v = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + kQs))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + kQs)), 1);
    const __m256i m = _mm256_set1_epi8(15);
    const __m512i lh = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m)),
                                          _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);  // b0 lo, b1 lo, b0 hi, b1 hi
    return _mm512_shuffle_i64x2(lh, lh, 0xd8);  // b0 lo, b0 hi, b1 lo, b1 hi
  }
#endif
};

// Q5_0 (d, 32 high bits, nibbles; w = d * (q - 16)) and Q5_1 (d, m, high bits, nibbles; w = d * q + m)
template <bool kMin>
struct Q5 {
  static constexpr int kValues = 32, kBytes = kMin ? 24 : 22, kSubs = 1, kQh = kMin ? 4 : 2;
  static constexpr bool kSigned = false, kMinField = kMin;
  static constexpr float kOffset = -16.f;
  static void subs(const uint8_t* b, Sub* s) {
    const float d = f16(b);
    s[0] = affine(d, kMin ? f16(b + 2) : -16.f * d);
  }
  static void codes(const uint8_t* b, int, uint8_t* c) {
    nibbles(b + kQh + 4, c);
    fifth_bits(b + kQh, c);
  }
#ifdef GG_AVX2
  static __m256i codes256(const uint8_t* b, int) {
    return _mm256_or_si256(nibbles256(b + kQh + 4), fifth_bits256(b + kQh));
  }
#endif
};

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K block (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Q4_K (d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles) and Q5_K (+ 32 bytes of fifth bits before
// the nibbles): 256 values, eight sub-blocks; sub-block k takes the low (k even) or high nibbles of qs[32 (k/2)..],
// Q5_K's fifth bit k of qh[l]; w = d * sc[k] * q - dmin * m[k].
template <bool kFifth>
struct QK {
  static constexpr int kValues = 256, kBytes = kFifth ? 176 : 144, kSubs = 8, kQs = kFifth ? 48 : 16;
  static constexpr bool kSigned = false;
  static void subs(const uint8_t* b, Sub* s) {
    const float d = f16(b), dmin = f16(b + 2);
    for (int k = 0; k < 8; ++k) {
      int sc, m;
      scale_min_k4(k, b + 4, &sc, &m);
      s[k] = affine(d * sc, -dmin * m);
    }
  }
  static void codes(const uint8_t* b, int k, uint8_t* c) {
    const uint8_t* q = b + kQs + 32 * (k / 2);
    for (int l = 0; l < 32; ++l) {
      c[l] = (k & 1) ? q[l] >> 4 : q[l] & 15;
      if (kFifth) c[l] |= ((b[16 + l] >> k) & 1) << 4;
    }
  }
#ifdef GG_AVX2
  static __m256i codes256(const uint8_t* b, int k) {
    const __m256i low = half_bytes256(b + kQs + 32 * (k / 2), k & 1);
    return kFifth ? _mm256_or_si256(low, high_bits256(b + 16, k, 1)) : low;
  }
#endif
};

// Q6_K: ql[128] nibbles, qh[64] 2-bit highs, 16 int8 scales (one per 16 values), d; w = d * sc * (q - 32).
// Sub-block k = 4 n + c (n: which 128-value half, c: which quarter of it) takes the low (c < 2) or high nibbles of
// ql[64 n + 32 (c % 2) + l] and bits 2c..2c+1 of qh[32 n + l].
struct Q6_K {
  static constexpr int kValues = 256, kBytes = 210, kSubs = 8;
  static constexpr bool kSigned = false;
  static void subs(const uint8_t* b, Sub* s) {
    const float d = f16(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int k = 0; k < 8; ++k) {
      const float lo = d * sc[2 * k], hi = d * sc[2 * k + 1];
      s[k] = Sub{{lo, hi}, {-32.f * lo, -32.f * hi}};
    }
  }
  static void codes(const uint8_t* b, int k, uint8_t* c) {
    const int n = k / 4, q = k % 4;
    const uint8_t* ql = b + 64 * n + 32 * (q % 2);
    const uint8_t* qh = b + 128 + 32 * n;
    for (int l = 0; l < 32; ++l)
      c[l] = ((q >= 2 ? ql[l] >> 4 : ql[l] & 15) | (((qh[l] >> (2 * q)) & 3) << 4));
  }
#ifdef GG_AVX2
  static __m256i codes256(const uint8_t* b, int k) {
    const int n = k / 4, q = k % 4;
    return _mm256_or_si256(half_bytes256(b + 64 * n + 32 * (q % 2), q >= 2), high_bits256(b + 128 + 32 * n, 2 * q, 2));
  }
#endif
};

// ggml_type ids of the kept types (ggml.h)
enum GgmlType { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

// Calls f.template operator()<T>() for the struct of ggml type id t; false for a type not kept.
template <class F>
bool with_type(int64_t t, F&& f) {
  switch (t) {
    case kQ4_0: f.template operator()<Q4<false>>(); return true;
    case kQ4_1: f.template operator()<Q4<true>>(); return true;
    case kQ5_0: f.template operator()<Q5<false>>(); return true;
    case kQ5_1: f.template operator()<Q5<true>>(); return true;
    case kQ8_0: f.template operator()<Q8_0>(); return true;
    case kQ4_K: f.template operator()<QK<false>>(); return true;
    case kQ5_K: f.template operator()<QK<true>>(); return true;
    case kQ6_K: f.template operator()<Q6_K>(); return true;
    default: return false;
  }
}

// ---- Activations (Q16 / Q8 / F32: gguf_kernel_source.py's docstring), quantized once per call, before the
// dot products of GGUF_KERNEL_CPP.
struct Q8 {
  using Code = int8_t;
  static constexpr float kMax = 127.f;
  static constexpr int pos(int i) { return i; }
};
struct Q16 {
  using Code = int16_t;
  static constexpr float kMax = 32767.f;
  static constexpr int pos(int i) { return (i & 7) | ((i & 8) << 1) | ((i & 16) >> 1); }  // see the docstring
};
struct F32 {
  using Code = int8_t;  // unused: the float rows are read
  static constexpr float kMax = 127.f;
  static constexpr int pos(int i) { return i; }
};

// Activation rows quantized per 32 values (P's codes, one float scale per 32), and every 16 values' float sum.
// With GG_ZMM, Q16 rows also carry, per pair of sub-blocks, the two scales and four sums laid out along the lanes
// of the pair's dot product (`pair_vectors`).
template <class P>
struct Act {
  const float* x;  // [M, K] float rows, row stride sx
  int64_t sx;
  const typename P::Code* q;  // [M, K], each 32-value block in P::pos order (`code_pos`)
  const float* d;             // [M, K / 32]
  const float* s;             // [M, K / 16]
  int64_t K;
  const float* v = nullptr;   // [M, K / 64, 32]: GG_ZMM's per-pair lanes (Q16 only)
};

// Full pairs of 32-value sub-blocks of a row that the 512-bit path reads as one (none without it).
template <class P>
constexpr int64_t zmm_pairs(int64_t K) {
#ifdef GG_ZMM
  if constexpr (std::is_same_v<P, Q16>) return K / 64;
#endif
  return 0;
}

// Where value i of sub-block e goes in a row's codes: P::pos inside the block, except in a full pair of a 512-bit
// build, whose 64 codes are [e's and e+1's P::pos 0-15, e's and e+1's P::pos 16-31] (the zero-extension of a
// register of both blocks' codes, `dot_pair`, takes them in that order).
template <class P>
inline int64_t code_pos(int64_t e, int i, int64_t pairs) {
  const int p = P::pos(i);
  if (e < 2 * pairs) return 64 * (e / 2) + (p < 16 ? 0 : 32) + 16 * (e % 2) + (p & 15);
  return 32 * e + p;
}

template <class P>
void quantize_rows(const float* x, int64_t sx, int64_t M, int64_t K, typename P::Code* q, float* d, float* s) {
  const int64_t pairs = zmm_pairs<P>(K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t e = 0; e < K / 32; ++e) {
      const float* v = x + m * sx + 32 * e;
      float amax = 0.f, lo = 0.f, hi = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
      for (int i = 0; i < 16; ++i) lo += v[i];
      for (int i = 16; i < 32; ++i) hi += v[i];
      const float scale = amax / P::kMax, inv = scale > 0.f ? 1.f / scale : 0.f;
      for (int i = 0; i < 32; ++i)
        q[m * K + code_pos<P>(e, i, pairs)] = static_cast<typename P::Code>(std::nearbyint(v[i] * inv));
      d[m * (K / 32) + e] = scale;
      s[m * (K / 16) + 2 * e] = lo;
      s[m * (K / 16) + 2 * e + 1] = hi;
    }
}

// Per pair of sub-blocks (e, e + 1) of each row, 32 floats: the activation scale of each int32 lane of the pair's
// dot product (lanes 0-7: e's, 8-15: e+1's), then each 16 values' sum in the first lane of the four lanes that
// hold their products (lanes 0, 4, 8, 12: e's halves, e+1's halves), zero in the others.
void pair_vectors(const float* d, const float* s, int64_t M, int64_t K, int64_t pairs, float* v) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t p = 0; p < pairs; ++p) {
      float* o = v + (m * pairs + p) * 32;
      for (int l = 0; l < 16; ++l) o[l] = d[m * (K / 32) + 2 * p + l / 8];
      for (int l = 0; l < 16; ++l) o[16 + l] = l % 4 ? 0.f : s[m * (K / 16) + 4 * p + l / 4];
    }
}

#ifdef GG_ZMM
// One 32-value block of a Q16 row in 512-bit registers: the codes `quantize_rows` writes (vcvtps2dq rounds to
// nearest even, as std::nearbyint does), its scale and its halves' sums (summed in another order: they may differ in
// the last bit). xa / xb: where values 0-7 and 16-23 / 8-15 and 24-31 go (`code_pos`).
inline void quantize_block_zmm(const float* v, int16_t* xa, int16_t* xb, float* d, float* s) {
  const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const float scale = amax / Q16::kMax, inv = scale > 0.f ? 1.f / scale : 0.f;
  const __m256i qa = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv))));
  const __m256i qb = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(b, _mm512_set1_ps(inv))));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xa), _mm256_castsi256_si128(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xa + 8), _mm256_castsi256_si128(qb));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xb), _mm256_extracti128_si256(qa, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(xb + 8), _mm256_extracti128_si256(qb, 1));
  *d = scale;
  s[0] = _mm512_reduce_add_ps(a);
  s[1] = _mm512_reduce_add_ps(b);
}
#endif

// quantize_rows, in 512-bit registers where the build has them (Q16).
template <class P>
void quantize(const float* x, int64_t sx, int64_t M, int64_t K, typename P::Code* q, float* d, float* s) {
#ifdef GG_ZMM
  if constexpr (std::is_same_v<P, Q16>) {
    const int64_t pairs = K / 64;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t e = 0; e < K / 32; ++e) {
        int16_t* xa = q + m * K + (e < 2 * pairs ? 64 * (e / 2) + 16 * (e % 2) : 32 * e);
        quantize_block_zmm(x + m * sx + 32 * e, xa, xa + (e < 2 * pairs ? 32 : 16), d + m * (K / 32) + e,
                           s + m * (K / 16) + 2 * e);
      }
    return;
  }
#endif
  quantize_rows<P>(x, sx, M, K, q, d, s);
}
"""
