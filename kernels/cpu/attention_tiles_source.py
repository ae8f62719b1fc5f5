"""The AVX-512 tiles of the CPU attention kernel (spliced into ``attention_source.CPU_ATTENTION_CPP`` after `Pool`
and `Scratch`): register-blocked score and P @ V tiles over up to 6 query rows, with no horizontal sum per
(row, key). Compiled only where the extension is built with AVX-512 (``SGLITE_ATTN_AVX512``); elsewhere ``attend``
keeps its scalar-vector loop.

- Scores: a block of keys is transposed once into [D, 64] tiles. bf16 keys on a CPU with AVX-512 BF16
  (``SGLITE_ATTN_BF16DP``) stay bf16: pairs of head dims are transposed as 32-bit words, and ``vdpbf16ps``
  multiplies them with the query's pairs (the query is bf16 already: the model's q, or its rotation rounded to
  bf16 as the reference rounds it), products exact in float, sums in float. Other dtypes are converted to float.
- P @ V (the float tile): a block of V is converted to float once (reading V rows straight from the pool in the
  tile instead measured slower on a pool beyond the caches: the conversion loop keeps more rows in flight). bf16
  values take the pairs tile of attention_pv_source.py instead.

``SPLIT_KV`` (also here, though not AVX-512 only) is the split-KV decode, spliced after ``load_decode_q`` in every
build: a decode (request, KV head)'s keys are cut into chunks whose online-softmax states (running max, sum,
unnormalised accumulator) are merged in chunk order.

The chunks depend on the history's length only (at most ``kMaxChunks`` chunks of whole 64-key blocks), and every
decode row is computed from them, on one thread (``decode_item``, chunks in turn) or spread over the threads
(``decode_split``, one work item per chunk, for a batch of a request or two whose (request, KV head) items alone
would leave threads idle): a row's result does not depend on the batch or the thread count.
"""

from __future__ import annotations

__all__ = ["AVX512_TILES", "SPLIT_KV"]

AVX512_TILES = r"""
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SGLITE_ATTN_AVX512 1

// 16 lanes of a row of T as float; lanes past `mask` read as 0.
template <typename T>
inline __m512 load16(const T* p, __mmask16 mask) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(mask, p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i x = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
  }
}

inline __mmask16 lanes(int n) {  // the first min(n, 16) lanes
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << std::max(n, 0)) - 1u);
}

// r[c] <- lane c of r[0..16): a 16x16 transpose in registers.
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    t[m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);
    t[m + 4] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
    t[m + 8] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    t[m + 12] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
  }
  for (int m = 0; m < 4; ++m) {
    r[m] = _mm512_shuffle_f32x4(t[m], t[m + 8], 0x88);
    r[m + 8] = _mm512_shuffle_f32x4(t[m], t[m + 8], 0xDD);
    r[m + 4] = _mm512_shuffle_f32x4(t[m + 4], t[m + 12], 0x88);
    r[m + 12] = _mm512_shuffle_f32x4(t[m + 4], t[m + 12], 0xDD);
  }
}

// One block of nb keys, transposed: kt[c][j] (keys nb.. zero) as float, or with Pairs (bf16 keys) as 32-bit words
// that each hold head dims (2c, 2c + 1) of key j, not converted.
template <typename T, bool Pairs>
void load_k(const Pool<T>& pool, int64_t h, const int32_t* slots, int nb, int d, Scratch& sc) {
  float* kt = sc.kt.data();
  const int nw = Pairs ? d / 2 : d;
  for (int j0 = 0; j0 < kBlockKeys; j0 += 16) {
    for (int c0 = 0; c0 < nw; c0 += 16) {
      const __mmask16 mc = lanes(nw - c0);
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        if (j0 + j >= nb) {
          r[j] = _mm512_setzero_ps();
        } else if constexpr (Pairs) {
          r[j] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mc, pool.krow(slots[j0 + j], h) + 2 * c0));
        } else {
          r[j] = load16(pool.krow(slots[j0 + j], h) + c0, mc);
        }
      }
      transpose16(r);
      const int nc = std::min(16, nw - c0);
      for (int c = 0; c < nc; ++c) _mm512_storeu_ps(kt + (c0 + c) * kBlockKeys + j0, r[c]);
    }
  }
}

// One block of nb values as float: vt[j][c].
template <typename T>
void load_v(const Pool<T>& pool, int64_t h, const int32_t* slots, int nb, int d, Scratch& sc) {
  float* vt = sc.vt.data();
  for (int j = 0; j < nb; ++j) {
    const T* vr = pool.vrow(slots[j], h);
    for (int c0 = 0; c0 < d; c0 += 16) {
      const __mmask16 mc = lanes(d - c0);
      _mm512_mask_storeu_ps(vt + j * d + c0, mc, load16(vr + c0, mc));
    }
  }
}

// s[i][0..64) = scale * q[i] . kt[:, 0..64) for rows i0 .. i0 + R: R x 4 accumulators, one broadcast per (row, c).
template <int R>
inline void scores_tile(const float* q, const float* kt, float* s, int i0, int d, float scale) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* qr = q + i0 * d;
  for (int c = 0; c < d; ++c) {
    const float* kc = kt + c * kBlockKeys;
    const __m512 k0 = _mm512_loadu_ps(kc), k1 = _mm512_loadu_ps(kc + 16), k2 = _mm512_loadu_ps(kc + 32),
                 k3 = _mm512_loadu_ps(kc + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(qr[r * d + c]);
      acc[r][0] = _mm512_fmadd_ps(b, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, k1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(b, k2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(b, k3, acc[r][3]);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(s + (i0 + r) * kBlockKeys + 16 * v, _mm512_mul_ps(acc[r][v], sv));
}

// acc[i][c0 .. c0 + 64) += sum_j p[i][j] * vt[j][c0 ..] for rows i0 .. i0 + R (lanes past d masked off).
template <int R>
inline void pv_tile(const float* p, const float* vt, float* acc, int i0, int nb, int d, int c0) {
  __mmask16 mk[4];
  for (int v = 0; v < 4; ++v) mk[v] = lanes(d - c0 - 16 * v);
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) a[r][v] = _mm512_maskz_loadu_ps(mk[v], acc + (i0 + r) * d + c0 + 16 * v);
  for (int j = 0; j < nb; ++j) {
    const float* vr = vt + j * d + c0;
    __m512 x[4];
    for (int v = 0; v < 4; ++v) x[v] = _mm512_maskz_loadu_ps(mk[v], vr + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 b = _mm512_set1_ps(p[(i0 + r) * kBlockKeys + j]);
      for (int v = 0; v < 4; ++v) a[r][v] = _mm512_fmadd_ps(b, x[v], a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(acc + (i0 + r) * d + c0 + 16 * v, mk[v], a[r][v]);
}

constexpr int kTileRows = 6;  // rows per micro-kernel call: 6 x 4 accumulators + 4 key/value vectors fit 32 zmm

template <template <int> class F, typename... A>
inline void by_rows(int nq, A... args) {
  int i0 = 0;
  for (; i0 + kTileRows <= nq; i0 += kTileRows) F<kTileRows>::run(i0, args...);
  switch (nq - i0) {
    case 1: F<1>::run(i0, args...); break;
    case 2: F<2>::run(i0, args...); break;
    case 3: F<3>::run(i0, args...); break;
    case 4: F<4>::run(i0, args...); break;
    case 5: F<5>::run(i0, args...); break;
    default: break;
  }
}
template <int R>
struct ScoresTile {
  static void run(int i0, const float* q, const float* kt, float* s, int d, float scale) {
    scores_tile<R>(q, kt, s, i0, d, scale);
  }
};
template <int R>
struct PvTile {
  static void run(int i0, const float* p, const float* vt, float* acc, int nb, int d) {
    for (int c0 = 0; c0 < d; c0 += 64) pv_tile<R>(p, vt, acc, i0, nb, d, c0);
  }
};

#if defined(__AVX512BF16__)
#define SGLITE_ATTN_BF16DP 1
// s[i][0..64) = scale * q[i] . K[0..64) from bf16 pairs: qp[i][w] and kp[w][j] hold dims (2w, 2w + 1) of query i
// and key j; vdpbf16ps adds both products (exact in float) to the float accumulator.
template <int R>
inline void scores_dp_tile(const uint32_t* qp, const float* kp, float* s, int i0, int nw, float scale) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  const uint32_t* qr = qp + i0 * nw;
  for (int w = 0; w < nw; ++w) {
    const float* kw = kp + w * kBlockKeys;
    __m512bh k[4];
    for (int v = 0; v < 4; ++v) k[v] = (__m512bh)_mm512_loadu_ps(kw + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(qr[r * nw + w]));
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], b, k[v]);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(s + (i0 + r) * kBlockKeys + 16 * v, _mm512_mul_ps(acc[r][v], sv));
}
template <int R>
struct ScoresDpTile {
  static void run(int i0, const uint32_t* qp, const float* kp, float* s, int nw, float scale) {
    scores_dp_tile<R>(qp, kp, s, i0, nw, scale);
  }
};
#endif

// Whether scores of T keys come from bf16 pairs (vdpbf16ps) rather than float tiles.
template <typename T>
constexpr bool kDpPairs =
#ifdef SGLITE_ATTN_BF16DP
    std::is_same_v<T, c10::BFloat16>;
#else
    false;
#endif

// Before the first block: the query rows (float, bf16 values) as bf16 pairs where the scores use them.
template <typename T>
void prepare_q(int nq, int d, Scratch& sc) {
  if (!kDpPairs<T> || d % 2) return;
  for (int i = 0; i < nq * d / 2; ++i) {  // exact: the values are bf16 already, the low halves are zero
    uint32_t lo, hi;
    std::memcpy(&lo, &sc.q[2 * i], 4);
    std::memcpy(&hi, &sc.q[2 * i + 1], 4);
    sc.qp[i] = (lo >> 16) | (hi & 0xFFFF0000u);
  }
}

// sc.s[i][0..64) = scale * q[i] . key j of the block of nb keys at `slots` (zero past nb).
template <typename T>
void load_block_scores(const Pool<T>& pool, int64_t h, const int32_t* slots, int nb, int nq, int d, float scale,
                       Scratch& sc) {
#ifdef SGLITE_ATTN_BF16DP
  if constexpr (kDpPairs<T>) {
    if (d % 2 == 0) {
      load_k<T, true>(pool, h, slots, nb, d, sc);
      by_rows<ScoresDpTile>(nq, static_cast<const uint32_t*>(sc.qp.data()),
                            static_cast<const float*>(sc.kt.data()), sc.s.data(), d / 2, scale);
      return;
    }
  }
#endif
  load_k<T, false>(pool, h, slots, nb, d, sc);
  by_rows<ScoresTile>(nq, static_cast<const float*>(sc.q.data()), static_cast<const float*>(sc.kt.data()),
                      sc.s.data(), d, scale);
}
#endif
"""

SPLIT_KV = r"""
// Keys per chunk of a history of `len` keys: whole blocks, at most kMaxChunks chunks.
inline int64_t chunk_keys(int64_t len) {
  const int64_t blocks = (len + kBlockKeys - 1) / kBlockKeys;
  return std::max<int64_t>(1, (blocks + kMaxChunks - 1) / kMaxChunks) * kBlockKeys;
}

inline int64_t num_chunks(int64_t len) { return (len + chunk_keys(len) - 1) / chunk_keys(len); }

// A chunk's state of nq rows: m[nq], l[nq], acc[nq][D].
inline int64_t state_size(int nq, int d) { return static_cast<int64_t>(nq) * (d + 2); }

inline void save_state(const Scratch& sc, int nq, int d, float* st) {
  std::copy(sc.m.begin(), sc.m.begin() + nq, st);
  std::copy(sc.l.begin(), sc.l.begin() + nq, st + nq);
  std::copy(sc.acc.begin(), sc.acc.begin() + nq * d, st + 2 * nq);
}

// The normalised result of n chunk states (st, consecutive), merged in chunk order, into out [nq][D]; no keys: 0.
inline void merge_states(const float* st, int64_t n, int nq, int d, float* out) {
  const int64_t size = state_size(nq, d);
  for (int i = 0; i < nq; ++i) {
    float mx = -INFINITY, l = 0.f;
    for (int64_t c = 0; c < n; ++c) mx = std::max(mx, st[c * size + i]);
    float* o = out + i * d;
    std::fill(o, o + d, 0.f);
    for (int64_t c = 0; c < n && !std::isinf(mx); ++c) {
      const float* s = st + c * size;
      const float w = std::isinf(s[i]) ? 0.f : std::exp(s[i] - mx);
      l += s[nq + i] * w;
      const float* a = s + 2 * nq + i * d;
      for (int k = 0; k < d; ++k) o[k] += w * a[k];
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int k = 0; k < d; ++k) o[k] *= inv;
  }
}

// Decode of a small batch with one work item per (request, KV head, chunk): q loaded (new tokens stored) on the
// calling thread first, chunks on `threads` threads, then each (request, KV head) merged on the calling thread.
template <typename T>
void decode_split(const at::Tensor& q, T* out, const Pool<T>& pool, const int32_t* r2t, int64_t r2t_stride,
                  const int64_t* rows, const int64_t* lens, const NewTok& nt, int64_t hkv, int group, int d,
                  float scale, int threads) {
  const int64_t pairs = q.size(0) * hkv, qn = static_cast<int64_t>(group) * d, size = state_size(group, d);
  Scratch sc0(group, d);
  std::vector<float> qf(pairs * qn);
  std::vector<int64_t> first(pairs + 1, 0);  // first chunk item of each (request, KV head)
  for (int64_t i = 0; i < pairs; ++i) {
    load_decode_q<T>(q, pool, nt, i / hkv, i % hkv, group, d, qf.data() + i * qn, sc0);
    first[i + 1] = first[i] + num_chunks(lens[i / hkv]);
  }
  std::vector<float> st(first[pairs] * size);
#pragma omp parallel num_threads(threads)
  {
    Scratch sc(group, d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < first[pairs]; ++it) {
      const int64_t i = std::upper_bound(first.begin(), first.end(), it) - first.begin() - 1, b = i / hkv;
      const int64_t len = lens[b], ck = chunk_keys(len), c0 = (it - first[i]) * ck;
      std::copy(qf.begin() + i * qn, qf.begin() + (i + 1) * qn, sc.q.begin());
      attend(pool, i % hkv, r2t + rows[b] * r2t_stride, group, group, d, &len, scale, sc, c0, std::min(len, c0 + ck));
      save_state(sc, group, d, st.data() + it * size);
    }
  }
  for (int64_t i = 0; i < pairs; ++i) {
    merge_states(st.data() + first[i] * size, first[i + 1] - first[i], group, d, sc0.acc.data());
    T* ob = out + ((i / hkv) * q.size(1) + (i % hkv) * group) * d;
    for (int k = 0; k < qn; ++k) ob[k] = static_cast<T>(sc0.acc[k]);
  }
}
"""
