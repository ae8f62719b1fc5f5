"""The AVX-512 softmax and bf16 P @ V of the CPU attention kernel (spliced into ``attention_source.CPU_ATTENTION_CPP``
after the tiles of attention_tiles_source.py, inside ``SGLITE_ATTN_AVX512``).

- Softmax of a block: running max, exp, row sum and the rescale of the state in 16-lane vectors (the scalar loops it
  replaces were most of an extend item's time: gcc vectorises neither a float max nor a float sum without
  -ffast-math). The row sum adds the 16 lanes' partial sums in a fixed order, so a row's result still depends on
  its own inputs only.
- P @ V with bf16 values (``SGLITE_ATTN_BF16DP``, head dim a multiple of 32): the block's V stays bf16, two keys'
  rows interleaved as 32-bit pairs (``vpunpck[lh]wd``: no conversion to float), the probabilities are rounded to
  bf16 pairs and ``vdpbf16ps`` adds both keys' products into float accumulators: half the multiply-adds of the
  float tile and no float copy of V. The interleave works within 128-bit lanes, so the accumulator holds a row's
  head dims permuted (``pair_dim``); `unpermute_acc` puts them back once, after the last block.
  Rounding P to bf16 is what GPU flash attention does; the sum of P stays in float. Float and fp16 pools keep the
  float tile.
"""

from __future__ import annotations

__all__ = ["AVX512_PV"]

AVX512_PV = r"""
// exp of 16 lanes: exp_inplace's polynomial (Cephes' expf, inputs clamped to [-87, 88]) in AVX-512 intrinsics,
// since a block's rows are short (a tail under 16 lanes is where exp_inplace ran scalar).
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f),
                                                         _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF |
                                                                                _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(fx, _mm512_set1_ps(2.12194440e-4f), r);
  const __m512 z = _mm512_mul_ps(r, r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, z, r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// softmax_block with 16-lane vectors: row i's scores s[0..64) (nv visible) -> probabilities (0 past nv), its
// state (m, l, acc) rescaled. Rows that see none of the block keep their state.
inline void softmax_block_avx512(Scratch& sc, int i, int nv, int d) {
  float* s = sc.s.data() + i * kBlockKeys;
  if (nv <= 0) {
    std::fill(s, s + kBlockKeys, 0.f);
    return;
  }
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < nv; j += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, lanes(nv - j), s + j));
  const float m_new = std::max(sc.m[i], _mm512_reduce_max_ps(mx));
  const __m512 mv = _mm512_set1_ps(m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < kBlockKeys; j += 16) {  // the whole block: P @ V on pairs reads one key past an odd nb
    const __mmask16 k = lanes(nv - j);
    const __m512 p = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mv)));
    _mm512_storeu_ps(s + j, p);  // zero past nv
    sum = _mm512_add_ps(sum, p);
  }
  const float alpha = std::isinf(sc.m[i]) ? 0.f : std::exp(sc.m[i] - m_new);  // first visible block: no state yet
  const __m512 av = _mm512_set1_ps(alpha);
  float* acc = sc.acc.data() + i * d;
  for (int c = 0; c < d; c += 16) {
    const __mmask16 k = lanes(d - c);
    _mm512_mask_storeu_ps(acc + c, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, acc + c), av));
  }
  sc.l[i] = sc.l[i] * alpha + _mm512_reduce_add_ps(sum);
  sc.m[i] = m_new;
}

#ifdef SGLITE_ATTN_BF16DP
// Whether P @ V of T values runs on bf16 pairs (vdpbf16ps) for head dim d.
template <typename T>
inline bool pv_pairs(int d) {
  return kDpPairs<T> && d % 32 == 0;
}

// The block's V as pairs: vt (as 32-bit words) [pair w][d], word p of a 32-dim chunk holding dims pair_dim(p) of
// keys 2w and 2w + 1 (the odd key past nb reads as 0, so that its 0 probability never meets a NaN).
template <typename T>
void load_v_pairs(const Pool<T>& pool, int64_t h, const int32_t* slots, int nb, int d, Scratch& sc) {
  float* vt = sc.vt.data();
  for (int j = 0; j < nb; j += 2) {
    const T* a = pool.vrow(slots[j], h);
    const T* b = j + 1 < nb ? pool.vrow(slots[j + 1], h) : nullptr;
    for (int c0 = 0; c0 < d; c0 += 32) {
      const __m512i x = _mm512_loadu_si512(a + c0);
      const __m512i y = b ? _mm512_loadu_si512(b + c0) : _mm512_setzero_si512();
      _mm512_storeu_si512(vt, _mm512_unpacklo_epi16(x, y));
      _mm512_storeu_si512(vt + 16, _mm512_unpackhi_epi16(x, y));
      vt += 32;
    }
  }
}

// Head dim of word p (0..32) of a chunk of pairs: unpacklo holds dims 0-3 of each 128-bit lane's 8, unpackhi 4-7.
inline int pair_dim(int p) { return 8 * ((p % 16) / 4) + (p >= 16 ? 4 : 0) + p % 4; }

// acc rows from the pairs' order back to head-dim order.
inline void unpermute_acc(Scratch& sc, int nq, int d) {
  float tmp[32];
  for (int i = 0; i < nq; ++i)
    for (int c0 = 0; c0 < d; c0 += 32) {
      float* a = sc.acc.data() + i * d + c0;
      for (int p = 0; p < 32; ++p) tmp[pair_dim(p)] = a[p];
      std::copy(tmp, tmp + 32, a);
    }
}

// Rows' probabilities as bf16 pairs: pp[i][w] = (p[i][2w], p[i][2w + 1]) (round to nearest even).
inline void pack_p(Scratch& sc, int nq) {
  for (int i = 0; i < nq; ++i) {
    const float* s = sc.s.data() + i * kBlockKeys;
    for (int j = 0; j < kBlockKeys; j += 32) {
      const __m512bh p = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + j + 16), _mm512_loadu_ps(s + j));
      _mm512_storeu_si512(sc.pp.data() + i * (kBlockKeys / 2) + j / 2, (__m512i)p);
    }
  }
}

// acc[i][c0 .. c0 + 64) += sum_w pp[i][w] . vt[w][c0 ..] for rows i0 .. i0 + R: R x 4 float accumulators.
template <int R>
inline void pv_dp_tile(const uint32_t* pp, const float* vt, float* acc, int i0, int np, int d, int c0) {
  const int nv = std::min(4, (d - c0) / 16);
  __m512 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < nv; ++v) a[r][v] = _mm512_loadu_ps(acc + (i0 + r) * d + c0 + 16 * v);
  for (int w = 0; w < np; ++w) {
    const float* vr = vt + w * d + c0;
    __m512bh x[4];
    for (int v = 0; v < nv; ++v) x[v] = (__m512bh)_mm512_loadu_ps(vr + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[(i0 + r) * (kBlockKeys / 2) + w]));
      for (int v = 0; v < nv; ++v) a[r][v] = _mm512_dpbf16_ps(a[r][v], b, x[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < nv; ++v) _mm512_storeu_ps(acc + (i0 + r) * d + c0 + 16 * v, a[r][v]);
}
template <int R>
struct PvDpTile {
  static void run(int i0, const uint32_t* pp, const float* vt, float* acc, int np, int d) {
    for (int c0 = 0; c0 < d; c0 += 64) pv_dp_tile<R>(pp, vt, acc, i0, np, d, c0);
  }
};
#else
template <typename T>
inline bool pv_pairs(int) {
  return false;
}
template <typename T>
void load_v_pairs(const Pool<T>&, int64_t, const int32_t*, int, int, Scratch&) {}
inline void unpermute_acc(Scratch&, int, int) {}
#endif

// The block's V in the layout its P @ V reads: bf16 pairs or float rows.
template <typename T>
void load_v_block(const Pool<T>& pool, int64_t h, const int32_t* slots, int nb, int d, Scratch& sc) {
  if (pv_pairs<T>(d)) {
    load_v_pairs(pool, h, slots, nb, d, sc);
  } else {
    load_v(pool, h, slots, nb, d, sc);
  }
}

// acc += P @ V of the block for all nq rows (the probabilities in sc.s, V as load_v_block left it).
template <typename T>
void pv_block(Scratch& sc, int nq, int nb, int d) {
#ifdef SGLITE_ATTN_BF16DP
  if (pv_pairs<T>(d)) {
    pack_p(sc, nq);
    by_rows<PvDpTile>(nq, static_cast<const uint32_t*>(sc.pp.data()), static_cast<const float*>(sc.vt.data()),
                      sc.acc.data(), (nb + 1) / 2, d);
    return;
  }
#endif
  by_rows<PvTile>(nq, static_cast<const float*>(sc.s.data()), static_cast<const float*>(sc.vt.data()),
                  sc.acc.data(), nb, d);
}
"""
