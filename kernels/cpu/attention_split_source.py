"""Split-KV decode of the CPU attention kernel (spliced into ``attention_source.CPU_ATTENTION_CPP`` after
``load_decode_q``): a decode (request, KV head)'s keys are cut into chunks whose online-softmax states (running max,
sum, unnormalised accumulator) are merged in chunk order.

The chunks depend on the history's length only (at most ``kMaxChunks`` chunks of whole 64-key blocks), and every
decode row is computed from them, on one thread (``decode_item``, chunks in turn) or spread over the threads
(``decode_split``, one work item per chunk, for a batch of a request or two whose (request, KV head) items alone
would leave threads idle): a row's result does not depend on the batch or the thread count.
"""

from __future__ import annotations

__all__ = ["SPLIT_KV"]

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
