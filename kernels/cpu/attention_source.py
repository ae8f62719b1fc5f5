"""The C++ source of the CPU attention kernel (kernels/cpu/attention.py builds it and wraps its functions).

Decode and extend share one online-softmax routine over the pool (``attend``): keys are read block by block
through the slot table, every query head of a KV group at once. Work items run on torch's intra-op threads.
With AVX-512, a block's scores and P @ V are register-blocked tiles over float copies of its K (transposed) and V
(attention_tiles_source.py).
"""

from __future__ import annotations

from .attention_pv_source import AVX512_PV
from .attention_tiles_source import AVX512_TILES, SPLIT_KV
from .build import SIMD_EXP

__all__ = ["CPU_ATTENTION_CPP", "CPU_ATTENTION_FUNCTIONS"]

CPU_ATTENTION_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kBlockKeys = 64;     // keys per online-softmax block (scores of a block stay in L1)
constexpr int kBlockRows = 16;     // new tokens per extend work item
constexpr int64_t kSerialWork = 24576;  // below this many (key row x query head) products: no second thread
constexpr int64_t kSplitWork = 1152;  // split-KV decode over the threads from this much work on (see decode_split)
constexpr int kMaxChunks = 8;     // a decode (request, KV head)'s keys are split into at most this many chunks
constexpr int kPrefetch = 8;       // keys ahead whose K/V rows are prefetched (slots are scattered in the pool)

// Pull the cache lines of one head row in early: a request's slots need not be adjacent, so the hardware
// prefetcher cannot guess the next row and every key would otherwise wait for memory.
template <typename T>
inline void prefetch_row(const T* p, int d) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int off = 0; off < d * static_cast<int>(sizeof(T)); off += 64) __builtin_prefetch(c + off);
}

""" + SIMD_EXP + r"""
template <typename T>
inline const float* as_f32(const T* src, int d, float* tmp) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int i = 0; i < d; ++i) tmp[i] = static_cast<float>(src[i]);
    return tmp;
  }
}

// One layer's K/V pool: [slots, Hkv, D] each, last dim contiguous.
template <typename T>
struct Pool {
  T* k;
  T* v;
  int64_t ks, kh, vs, vh;
  T* krow(int64_t slot, int64_t h) const { return k + slot * ks + h * kh; }
  T* vrow(int64_t slot, int64_t h) const { return v + slot * vs + h * vh; }
};

// Per-thread buffers of one work item of at most `nq` query vectors.
// kt/vt: one block of keys as float tiles, K transposed ([D][kBlockKeys]; bf16 pairs [D/2][kBlockKeys] with
// AVX-512 BF16) and V as is ([kBlockKeys][D]).
struct Scratch {
  std::vector<float> q, s, acc, m, l, tmp, kt, vt, st;
  std::vector<uint32_t> qp;  // q as bf16 pairs, where the scores take them (AVX-512 BF16)
  std::vector<uint32_t> pp;  // a block's probabilities as bf16 pairs, where P @ V takes them (attention_pv_source)
  Scratch(int nq, int d)
      : q(nq * d), s(nq * kBlockKeys), acc(nq * d), m(nq), l(nq), tmp(2 * d), kt(d * kBlockKeys),
        vt(kBlockKeys * d), st(kMaxChunks * nq * (d + 2)), qp(nq * d / 2), pp(nq * kBlockKeys / 2) {}
};

// Softmax step of one block for query i: scores -> probabilities (0 past its visible keys), rescale its state.
inline void softmax_block(Scratch& sc, int i, int nb, int nv, int d) {
  float* s = sc.s.data() + i * kBlockKeys;
  float* acc = sc.acc.data() + i * d;
  float m_blk = -INFINITY;
  for (int j = 0; j < nv; ++j) m_blk = std::max(m_blk, s[j]);
  float m_new = std::max(sc.m[i], m_blk);
  for (int j = 0; j < nv; ++j) s[j] -= m_new;
  exp_inplace(s, nv);
  float sum = 0.f;
  for (int j = 0; j < nv; ++j) sum += s[j];
  for (int j = nv; j < nb; ++j) s[j] = 0.f;
  float alpha = std::isinf(sc.m[i]) ? 0.f : std::exp(sc.m[i] - m_new);  // first visible block: no state yet
  for (int c = 0; c < d; ++c) acc[c] *= alpha;
  sc.l[i] = sc.l[i] * alpha + sum;
  sc.m[i] = m_new;
}

""" + AVX512_TILES + r"""
#ifdef SGLITE_ATTN_AVX512
""" + AVX512_PV + r"""
#endif

// Attention of nq query vectors (sc.q, [nq, D], float) that share KV head h to the keys at positions [begin, stop)
// of the request whose slots are `slots`; query i sees positions below vis[i / group] (vis nondecreasing). Leaves
// the online-softmax state in sc (running max m, sum l, unnormalised acc); `normalize` turns acc into the result.
// AVX-512: each block of keys is converted once into float tiles (K transposed), then the [nq, nb] scores and
// P @ V come from register-blocked tiles (rows x 64 lanes), no horizontal sum per score. Each query row's result
// depends only on its own inputs (same operations in the same order whatever the tiling and the thread).
template <typename T>
void attend(const Pool<T>& pool, int64_t h, const int32_t* slots, int nq, int group, int d,
            const int64_t* vis, float scale, Scratch& sc, int64_t begin, int64_t stop) {
  std::fill(sc.acc.begin(), sc.acc.begin() + nq * d, 0.f);
  std::fill(sc.m.begin(), sc.m.begin() + nq, -INFINITY);
  std::fill(sc.l.begin(), sc.l.begin() + nq, 0.f);
#ifdef SGLITE_ATTN_AVX512
  prepare_q<T>(nq, d, sc);
#endif
  const int64_t end = stop;
  for (int64_t p0 = begin; p0 < end; p0 += kBlockKeys) {
    const int nb = static_cast<int>(std::min<int64_t>(kBlockKeys, end - p0));
#ifdef SGLITE_ATTN_AVX512
    // the next block's rows while this one computes; the first block's all at once (their misses overlap)
    for (int64_t q0 = p0 == begin ? p0 : p0 + kBlockKeys; q0 < std::min(end, p0 + 2 * kBlockKeys); ++q0) {
      prefetch_row(pool.krow(slots[q0], h), d);
      prefetch_row(pool.vrow(slots[q0], h), d);
    }
    // rows that see none of this block (causal) still get scores; softmax_block zeroes them (nv = 0)
    load_v_block(pool, h, slots + p0, nb, d, sc);
    load_block_scores(pool, h, slots + p0, nb, nq, d, scale, sc);
    for (int i = 0; i < nq; ++i)
      softmax_block_avx512(sc, i, static_cast<int>(std::clamp<int64_t>(vis[i / group] - p0, 0, nb)), d);
    pv_block<T>(sc, nq, nb, d);
#else
    for (int j = 0; j < nb; ++j) {
      if (p0 + j + kPrefetch < end) {
        prefetch_row(pool.krow(slots[p0 + j + kPrefetch], h), d);
        prefetch_row(pool.vrow(slots[p0 + j + kPrefetch], h), d);
      }
      const float* kr = as_f32(pool.krow(slots[p0 + j], h), d, sc.tmp.data());
      for (int i = 0; i < nq; ++i) {
        const float* qi = sc.q.data() + i * d;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int c = 0; c < d; ++c) dot += qi[c] * kr[c];
        sc.s[i * kBlockKeys + j] = dot * scale;
      }
    }
    for (int i = 0; i < nq; ++i) {
      const int nv = static_cast<int>(std::clamp<int64_t>(vis[i / group] - p0, 0, nb));
      softmax_block(sc, i, nb, nv, d);
    }
    for (int j = 0; j < nb; ++j) {
      const float* vr = as_f32(pool.vrow(slots[p0 + j], h), d, sc.tmp.data());
      for (int i = 0; i < nq; ++i) {
        const float p = sc.s[i * kBlockKeys + j];
        if (p == 0.f) continue;  // masked (causal) or underflowed
        float* a = sc.acc.data() + i * d;
#pragma omp simd
        for (int c = 0; c < d; ++c) a[c] += p * vr[c];
      }
    }
#endif
  }
#ifdef SGLITE_ATTN_AVX512
  if (pv_pairs<T>(d)) unpermute_acc(sc, nq, d);
#endif
}

inline void normalize(Scratch& sc, int nq, int d) {
  for (int i = 0; i < nq; ++i) {
    const float inv = sc.l[i] > 0.f ? 1.f / sc.l[i] : 0.f;
    for (int c = 0; c < d; ++c) sc.acc[i * d + c] *= inv;
  }
}

// rotate_half rotary of one head vector, in float: out = x * cos + rotate_half(x) * sin.
template <typename T>
inline void rotate(const T* x, const T* cs, const T* sn, int d, float* out) {
  const int half = d / 2;
  for (int c = 0; c < d; ++c) {
    const float partner = c < half ? -static_cast<float>(x[c + half]) : static_cast<float>(x[c - half]);
    out[c] = static_cast<float>(x[c]) * static_cast<float>(cs[c]) + partner * static_cast<float>(sn[c]);
  }
}

inline int threads_for(int64_t work) {
  return work < kSerialWork ? 1 : at::get_num_threads();
}

struct NewTok {  // the decode step's own token, before rotary (all pointers null when absent)
  const void* k = nullptr;
  const void* v = nullptr;
  const void* cos = nullptr;
  const void* sin = nullptr;
  const int64_t* loc = nullptr;
  int64_t kb = 0, kh = 0, vb = 0, vh = 0, cb = 0, sb = 0;
};

// The group's query heads of (b, h) as float into qf ([group, D]); with a new token, rotate them, rotate its k and
// store its K/V in the pool first.
template <typename T>
void load_decode_q(const at::Tensor& q, const Pool<T>& pool, const NewTok& nt, int64_t b, int64_t h, int group,
                   int d, float* qf, Scratch& sc) {
  const T* qb = q.data_ptr<T>() + b * q.stride(0) + h * group * q.stride(1);
  if (nt.k != nullptr) {
    const T* cs = static_cast<const T*>(nt.cos) + b * nt.cb;
    const T* sn = static_cast<const T*>(nt.sin) + b * nt.sb;
    float* kf = sc.tmp.data() + d;
    rotate(static_cast<const T*>(nt.k) + b * nt.kb + h * nt.kh, cs, sn, d, kf);
    T* kdst = pool.krow(nt.loc[b], h);
    T* vdst = pool.vrow(nt.loc[b], h);
    const T* vsrc = static_cast<const T*>(nt.v) + b * nt.vb + h * nt.vh;
    for (int c = 0; c < d; ++c) {
      kdst[c] = static_cast<T>(kf[c]);
      vdst[c] = vsrc[c];
    }
    for (int g = 0; g < group; ++g) {
      rotate(qb + g * q.stride(1), cs, sn, d, qf + g * d);
      // the reference rotates q in its own dtype before attending in float32: round the same way
      for (int c = 0; c < d; ++c) qf[g * d + c] = static_cast<float>(static_cast<T>(qf[g * d + c]));
    }
  } else {
    for (int g = 0; g < group; ++g)
      for (int c = 0; c < d; ++c) qf[g * d + c] = static_cast<float>(qb[g * q.stride(1) + c]);
  }
}

""" + SPLIT_KV + r"""
// Decode item (b, h): [rotate + store the new token], then attend the group's query heads to the history, chunk by
// chunk (the chunks of `decode_split`, in turn on this thread), and merge.
template <typename T>
void decode_item(const at::Tensor& q, T* out, const Pool<T>& pool, const int32_t* r2t, int64_t r2t_stride,
                 const int64_t* rows, const int64_t* lens, const NewTok& nt, int64_t b, int64_t h, int group,
                 int d, float scale, Scratch& sc) {
  load_decode_q<T>(q, pool, nt, b, h, group, d, sc.q.data(), sc);
  const int64_t len = lens[b], ck = chunk_keys(len), n = num_chunks(len), stride = state_size(group, d);
  for (int64_t c = 0; c < n; ++c) {
    attend(pool, h, r2t + rows[b] * r2t_stride, group, group, d, &len, scale, sc, c * ck, std::min(len, c * ck + ck));
    save_state(sc, group, d, sc.st.data() + c * stride);
  }
  merge_states(sc.st.data(), n, group, d, sc.acc.data());
  T* ob = out + (b * q.size(1) + h * group) * d;
  for (int i = 0; i < group * d; ++i) ob[i] = static_cast<T>(sc.acc[i]);
}

template <typename T>
void decode_impl(const at::Tensor& q, const at::Tensor& kb, const at::Tensor& vb, const at::Tensor& r2t,
                 const at::Tensor& rows, const at::Tensor& lens, at::Tensor& out, double scale, const NewTok& nt) {
  const int64_t bs = q.size(0), hkv = kb.size(1);
  const int d = static_cast<int>(q.size(2)), group = static_cast<int>(q.size(1) / hkv);
  Pool<T> pool{kb.data_ptr<T>(), vb.data_ptr<T>(), kb.stride(0), kb.stride(1), vb.stride(0), vb.stride(1)};
  const int64_t* lp = lens.data_ptr<int64_t>();
  int64_t work = 0;
  for (int64_t b = 0; b < bs; ++b) work += lp[b] * q.size(1);
  // With requests enough to keep every thread busy, one work item per request, its KV heads in turn: a pool slot
  // holds every head's row side by side, so the heads after the first read lines the first pulled into the same
  // core's caches (batch 40: 15.8 ms instead of 18.1 for 30 layers). Fewer requests: one item per (request, head).
  const int nthreads = at::get_num_threads();
  if (bs * hkv < 4 * nthreads && nthreads > 1 && work >= kSplitWork) {
    decode_split<T>(q, out.data_ptr<T>(), pool, r2t.data_ptr<int32_t>(), r2t.stride(0), rows.data_ptr<int64_t>(), lp,
                    nt, hkv, group, d, static_cast<float>(scale), nthreads);
    return;
  }
  const int64_t heads_per_item = bs >= 4 * nthreads ? hkv : 1;
  const int64_t items = bs * hkv / heads_per_item;
#pragma omp parallel num_threads(threads_for(work))
  {
    Scratch sc(group, d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it)
      for (int64_t i = it * heads_per_item; i < (it + 1) * heads_per_item; ++i)
        decode_item<T>(q, out.data_ptr<T>(), pool, r2t.data_ptr<int32_t>(), r2t.stride(0),
                       rows.data_ptr<int64_t>(), lp, nt, i / hkv, i % hkv, group, d, static_cast<float>(scale), sc);
  }
}

// Extend item: rows [m0, m0 + n) of request b's new tokens (q rows start + m0 ...), KV head h.
template <typename T>
void extend_item(const at::Tensor& q, T* out, const Pool<T>& pool, const int32_t* slots, int64_t prefix,
                 int64_t start, int64_t m0, int n, int64_t h, int group, int d, float scale, Scratch& sc) {
  int64_t vis[kBlockRows];
  const T* q0 = q.data_ptr<T>();  // the tensor's accessors hoisted: this loop runs for every element of q
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  for (int m = 0; m < n; ++m) {
    vis[m] = prefix + m0 + m + 1;  // causal: new token m0 + m sees the prefix and new tokens up to itself
    const T* qr = q0 + (start + m0 + m) * qs0 + h * group * qs1;
    for (int g = 0; g < group; ++g) {
      float* dst = sc.q.data() + (m * group + g) * d;
      for (int c = 0; c < d; ++c) dst[c] = static_cast<float>(qr[g * qs1 + c]);
    }
  }
  attend(pool, h, slots, n * group, group, d, vis, scale, sc, 0, vis[n - 1]);
  normalize(sc, n * group, d);
  const int64_t hq = q.size(1);
  for (int m = 0; m < n; ++m) {
    T* orow = out + ((start + m0 + m) * hq + h * group) * d;
    for (int i = 0; i < group * d; ++i) orow[i] = static_cast<T>(sc.acc[m * group * d + i]);
  }
}

template <typename T>
void extend_impl(const at::Tensor& q, const at::Tensor& kb, const at::Tensor& vb, const at::Tensor& r2t,
                 const at::Tensor& rows, const at::Tensor& lens, const at::Tensor& ext_lens,
                 const at::Tensor& ext_start, at::Tensor& out, double scale) {
  const int64_t hkv = kb.size(1);
  const int d = static_cast<int>(q.size(2)), group = static_cast<int>(q.size(1) / hkv);
  Pool<T> pool{kb.data_ptr<T>(), vb.data_ptr<T>(), kb.stride(0), kb.stride(1), vb.stride(0), vb.stride(1)};
  const int64_t *lp = lens.data_ptr<int64_t>(), *np = ext_lens.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (request, first new row) of each work item
  int64_t work = 0;
  for (int64_t b = 0; b < rows.size(0); ++b) {
    for (int64_t m0 = 0; m0 < np[b]; m0 += kBlockRows) blocks.emplace_back(b, m0);
    work += np[b] * lp[b] * q.size(1);
  }
  const int64_t items = static_cast<int64_t>(blocks.size()) * hkv;
#pragma omp parallel num_threads(threads_for(work))
  {
    Scratch sc(kBlockRows * group, d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const auto [b, m0] = blocks[it / hkv];
      const int n = static_cast<int>(std::min<int64_t>(kBlockRows, np[b] - m0));
      const int32_t* slots = r2t.data_ptr<int32_t>() + rows.data_ptr<int64_t>()[b] * r2t.stride(0);
      extend_item<T>(q, out.data_ptr<T>(), pool, slots, lp[b] - np[b], ext_start.data_ptr<int64_t>()[b], m0, n,
                     it % hkv, group, d, static_cast<float>(scale), sc);
    }
  }
}

}  // namespace

void decode_attention(at::Tensor q, at::Tensor kb, at::Tensor vb, at::Tensor r2t, at::Tensor rows,
                      at::Tensor lens, at::Tensor out, double scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_impl<scalar_t>(q, kb, vb, r2t, rows, lens, out, scale, NewTok{});
  });
}

void decode_attention_new_token(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cos, at::Tensor sin,
                                at::Tensor loc, at::Tensor kb, at::Tensor vb, at::Tensor r2t, at::Tensor rows,
                                at::Tensor lens, at::Tensor out, double scale) {
  NewTok nt{k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), loc.data_ptr<int64_t>(),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_impl<scalar_t>(q, kb, vb, r2t, rows, lens, out, scale, nt);
  });
}

void extend_attention(at::Tensor q, at::Tensor kb, at::Tensor vb, at::Tensor r2t, at::Tensor rows,
                      at::Tensor lens, at::Tensor ext_lens, at::Tensor ext_start, at::Tensor out, double scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "extend_attention", [&] {
    extend_impl<scalar_t>(q, kb, vb, r2t, rows, lens, ext_lens, ext_start, out, scale);
  });
}
"""

CPU_ATTENTION_FUNCTIONS = ["decode_attention", "decode_attention_new_token", "extend_attention"]
