// Attention straight from the paged KV cache: decode_attention for one new token per
// sequence, prefill_attention (at the end of the file) for a fresh prompt's rows.
//
// Built with packed_linear.cpp into one extension (cpu_kernels.py); called by attention.py
// as torch.ops.tgi_cpu.decode_attention, for decode steps and for rows continuing cached
// sequences (a speculative step's), each then a one-token query over its own context. The
// torch path gathers every
// sequence's blocks into a padded copy per layer, then runs SDPA; here each task reads a
// stretch of one sequence's blocks in place, once, for all the query heads.
// A context is cut into partitions of kPartition tokens, one task each, whose softmaxes are
// combined after (as flash-decoding does), so one long context keeps every thread busy; a
// task reads its tokens 16 rows at a time, each row holding all KV heads, and fetches the
// next 16 while it multiplies (NOTES 52; before, one task per sequence and KV head read a
// quarter of each row at a time).
// Scores and softmax in float32; the output is rounded once to the query's dtype. Scores are
// reduced and exponentiated 16 tokens at a time (benchmarks/NOTES.md 8, 11); each cache row
// is widened once for all the query heads that share it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "parallel.h"
#include "simd.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

namespace {

using tgi_simd::exp16;
using tgi_simd::load16;
using tgi_simd::tail_mask;

// r[i] = sum of the 16 lanes of v[i]: 15 adds and 30 shuffles for 16 sums, where 16
// _mm512_reduce_add_ps would cost ~8 dependent instructions each.
inline __m512 transpose_sum16(const __m512* v) {
  __m512 pairs[8], quads[4], octs[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v2i(0+2), v2i+1(0+2), v2i(1+3), v2i+1(1+3)]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: one partial sum of each of v4i..v4i+3
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)  // lanes [v8i..+3 half, v8i..+3 half, v8i+4..+7 half, ... half]
    octs[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                            _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(octs[0], octs[1], 0x88),
                       _mm512_shuffle_f32x4(octs[0], octs[1], 0xDD));
}

// Accumulator vectors per row: CH = head_dim / 16 when known at compile time, else up to 16.
template <int CH>
constexpr int kMaxChunks = CH > 0 ? CH : 16;
// Query heads (or vectors) a pass takes at once: their CH accumulators each fill half the
// registers.
template <int CH>
constexpr int kHeadsPerPass = CH > 0 && CH <= 16 ? 16 / CH : 1;

// A task's share of the softmax over its tokens for each of its query heads: the running
// maximum `m`, the sum `l` of exp(score - m), and `acc`, the values weighted by those
// exponentials, [heads, head_dim] (indexed by query head; a task fills only its own).
struct Partial {
  float *m, *l, *acc;
};

// What every task shares: the cache geometry and the scaled query rows of the task's sequence.
struct Geometry {
  int64_t block_size, kv_heads, group, head_dim;
  int64_t row() const { return kv_heads * head_dim; }  // elements of one token's cache row
};

// Runs pass<HN>(h0) over a group's heads [h0, h0 + HN), HN = HG while HG heads are left,
// then 2, then 1.
template <int HG, typename Pass>
inline void by_heads(int64_t group, const Pass& pass) {
  int64_t h0 = 0;
  for (; h0 + HG <= group; h0 += HG) pass(std::integral_constant<int, HG>{}, h0);
  if constexpr (HG > 2)
    for (; h0 + 2 <= group; h0 += 2) pass(std::integral_constant<int, 2>{}, h0);
  for (; h0 < group; ++h0) pass(std::integral_constant<int, 1>{}, h0);
}

// Softmax numerators in place over a score row's 16-lane steps [from, to): the lanes
// valid(i) picks take part, the rest become 0. Returns {their maximum, the exponentials' sum}.
template <typename Valid>
inline std::pair<float, float> exponentiate(float* s, int64_t from, int64_t to,
                                            const Valid& valid) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top = minus_inf;
  for (int64_t i = from; i < to; i += 16)
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(minus_inf, valid(i), s + i));
  const float m = _mm512_reduce_max_ps(top);
  const __m512 max = _mm512_set1_ps(m);
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = from; i < to; i += 16) {
    const __m512 e =
        _mm512_maskz_mov_ps(valid(i), exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), max)));
    _mm512_storeu_ps(s + i, e);
    total = _mm512_add_ps(total, e);
  }
  return {m, _mm512_reduce_add_ps(total)};
}

// Fetches the 64-byte lines of one KV head's slice of a cache row (to L1 with T0, L2 with T1).
template <int HINT, typename T>
inline void prefetch_slice(const T* slice, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(slice);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, static_cast<_mm_hint>(HINT));
}

// A run: at most 16 consecutive cache rows of a sequence within one block; `at` is its first
// row's element offset in a cache, `n` its length, and the same for the run after it (n 0:
// none).
struct Run {
  int64_t at, n, next_at, next_n;
};

// A sequence's tokens [lo, hi) as runs.
struct Runs {
  const int64_t* table;
  int64_t block_size, row, hi;
  int64_t at(int64_t t) const {
    return (table[t / block_size] * block_size + t % block_size) * row;
  }
  int64_t length(int64_t t) const {
    return std::min<int64_t>({16, block_size - t % block_size, hi - t});
  }
  Run from(int64_t t) const {
    const int64_t n = length(t), next = t + n;
    return next < hi ? Run{at(t), n, at(next), length(next)} : Run{at(t), n, 0, 0};
  }
};

// f(run, t, g, hn, h0) for each run of tokens [t, runs.hi), each KV head g of [g0, g1) and
// each pass over its query heads (by_heads): the order both the scores and values passes go.
template <int HG, typename F>
inline void each_pass(const Runs& runs, int64_t t, int64_t g0, int64_t g1, int64_t group,
                      const F& f) {
  while (t < runs.hi) {
    const Run run = runs.from(t);
    for (int64_t g = g0; g < g1; ++g)
      by_heads<HG>(group, [&](auto hn, int64_t h0) { f(run, t, g, hn, h0); });
    t += run.n;
  }
}

// Sequence `table`'s tokens [lo, hi) (at most kPartition), KV heads [g0, g1) with their query
// heads, into `part`. Three passes as one (sequence, KV head) task did before (NOTES 52), but
// over all of a task's KV heads at once: each cache row holds them all, so a run of 16 rows
// is one contiguous span, and the next run's rows are fetched slice by slice, spread over
// this run's multiply-adds (fetched in one burst per run, they stalled the loop instead).
// 1. Scores, a run at a time: each key row is widened once for the HN query heads that share
//    it (their rows held in registers), their 16 partial dot products reduced in one go; the
//    run's value rows go to L2.
// 2. Per query head: the maximum, the exponentials in place, their sum.
// 3. Values, a run at a time, each row widened once for HN heads, into `part.acc`.
template <typename T, int CH>
void attend_span(const float* qf, const T* k_cache, const T* v_cache, const int64_t* table,
                 const Geometry& geo, int64_t lo, int64_t hi, int64_t g0, int64_t g1,
                 float* scores, int64_t stride, Partial part) {
  constexpr int HG = kHeadsPerPass<CH>;
  const int64_t group = geo.group, head_dim = geo.head_dim, row = geo.row();
  const int64_t chunks = CH > 0 ? CH : head_dim / 16;
  const int64_t len = hi - lo;
  const Runs runs{table, geo.block_size, row, hi};

  const int64_t slice_bytes = head_dim * int64_t(sizeof(T));
  each_pass<HG>(runs, lo, g0, g1, group,
                [&](const Run& r, int64_t t, int64_t g, auto hn, int64_t h0) {
    constexpr int HN = decltype(hn)::value;
    const int64_t first = g * group + h0;
    alignas(64) __m512 partial[HN][16];
    __m512 qr[HN][kMaxChunks<CH>];  // the HN query rows, in registers for the run
    for (int j = 0; j < HN; ++j)
      for (int64_t c = 0; c < chunks; ++c)
        qr[j][c] = _mm512_loadu_ps(qf + (first + j) * head_dim + c * 16);
    for (int64_t i = 0; i < 16; ++i) {
      if (i >= r.n) {
        for (int j = 0; j < HN; ++j) partial[j][i] = _mm512_setzero_ps();
        continue;
      }
      const T* key = k_cache + r.at + i * row + g * head_dim;
      // Spread over the run, slice by slice: this run's values and the next run's keys.
      prefetch_slice<_MM_HINT_T1>(v_cache + r.at + i * row + g * head_dim, slice_bytes);
      if (i < r.next_n)
        prefetch_slice<_MM_HINT_T0>(k_cache + r.next_at + i * row + g * head_dim, slice_bytes);
      __m512 k[kMaxChunks<CH>];
      for (int64_t c = 0; c < chunks; ++c) k[c] = load16(key + c * 16);
      for (int j = 0; j < HN; ++j) {
        // Two chains of multiply-adds, even and odd chunks, for twice the overlap.
        __m512 even = _mm512_mul_ps(qr[j][0], k[0]), odd = _mm512_setzero_ps();
        for (int64_t c = 1; c < chunks; c += 2) {
          odd = _mm512_fmadd_ps(qr[j][c], k[c], odd);
          if (c + 1 < chunks) even = _mm512_fmadd_ps(qr[j][c + 1], k[c + 1], even);
        }
        partial[j][i] = _mm512_add_ps(even, odd);
      }
    }
    // NOTE: lanes past r.n land in the next run's place (or the row's padding): rewritten.
    for (int j = 0; j < HN; ++j)
      _mm512_storeu_ps(scores + (first + j) * stride + (t - lo), transpose_sum16(partial[j]));
  });

  for (int64_t h = g0 * group; h < g1 * group; ++h) {
    std::tie(part.m[h], part.l[h]) = exponentiate(scores + h * stride, 0, len,
                                                  [&](int64_t i) { return tail_mask(len - i); });
    for (int64_t c = 0; c < head_dim; c += 16)
      _mm512_storeu_ps(part.acc + h * head_dim + c, _mm512_setzero_ps());
  }

  each_pass<HG>(runs, lo, g0, g1, group,
                [&](const Run& r, int64_t t, int64_t g, auto hn, int64_t h0) {
    constexpr int HN = decltype(hn)::value;
    const int64_t first = g * group + h0;
    __m512 acc[HN][kMaxChunks<CH>];
    for (int j = 0; j < HN; ++j)
      for (int64_t c = 0; c < chunks; ++c)
        acc[j][c] = _mm512_loadu_ps(part.acc + (first + j) * head_dim + c * 16);
    for (int64_t i = 0; i < r.n; ++i) {
      const T* value = v_cache + r.at + i * row + g * head_dim;
      if (i < r.next_n)
        prefetch_slice<_MM_HINT_T0>(v_cache + r.next_at + i * row + g * head_dim, slice_bytes);
      __m512 v[kMaxChunks<CH>];
      for (int64_t c = 0; c < chunks; ++c) v[c] = load16(value + c * 16);
      for (int j = 0; j < HN; ++j) {
        const __m512 p = _mm512_set1_ps(scores[(first + j) * stride + (t - lo) + i]);
        for (int64_t c = 0; c < chunks; ++c) acc[j][c] = _mm512_fmadd_ps(p, v[c], acc[j][c]);
      }
    }
    for (int j = 0; j < HN; ++j)
      for (int64_t c = 0; c < chunks; ++c)
        _mm512_storeu_ps(part.acc + (first + j) * head_dim + c * 16, acc[j][c]);
  });
}

// out rows of query heads [h_begin, h_end): acc / l, rounded once to T (zeros for an empty
// context).
template <typename T>
void write_out(const Partial& part, int64_t h_begin, int64_t h_end, int64_t head_dim, T* out) {
  for (int64_t h = h_begin; h < h_end; ++h) {
    const __m512 inv = _mm512_set1_ps(part.l[h] > 0.f ? 1.f / part.l[h] : 0.f);
    for (int64_t c = 0; c < head_dim; c += 16)
      tgi_simd::store16(out + h * head_dim + c,
                        _mm512_mul_ps(_mm512_loadu_ps(part.acc + h * head_dim + c), inv));
  }
}

// Tokens per partition of a context: positions [k * kPartition, (k + 1) * kPartition). A
// partition is one task's tokens, and a context of several partitions combines their
// softmaxes after, so a row's result depends on its own context only: not on the batch,
// nor on the number of threads.
constexpr int64_t kPartition = 256;
// A query head's row of scores: a partition and the last run's 16 lanes past its end.
constexpr int64_t kScoreStride = kPartition + 16;

// One task: sequence `seq`'s tokens [lo, hi), KV heads [g0, g1); `slot` its Partial in the
// scratch when the sequence has several partitions, else -1 (it writes the output itself).
struct Task {
  int64_t seq, lo, hi, g0, g1, slot;
};

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& tables, const at::Tensor& lens, double scale, int64_t window,
            at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const Geometry geo{k_cache.size(1), k_cache.size(2), heads / k_cache.size(2), head_dim};
  const int64_t width = tables.size(1), kv_heads = geo.kv_heads;
  const T *qp = q.data_ptr<T>(), *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();

  // The partitions of every context, and the contexts of several: {sequence, first scratch
  // slot, partitions}.
  std::vector<Task> tasks;
  std::vector<std::array<int64_t, 3>> parted;
  int64_t slots = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t end = lp[b], start = window > 0 ? std::max<int64_t>(0, end - window) : 0;
    const int64_t first = start / kPartition, last = std::max(start, end - 1) / kPartition;
    const bool several = last > first;
    if (several) parted.push_back({b, slots, last - first + 1});
    for (int64_t k = first; k <= last; ++k)
      tasks.push_back({b, std::max(start, k * kPartition), std::min(end, (k + 1) * kPartition),
                       0, kv_heads, several ? slots++ : -1});
  }
  if (tasks.empty()) return;
  // Few tasks (one short context, a small batch): also split by KV head, which changes no
  // result, so that every thread has work.
  const int64_t threads = at::get_num_threads();
  const int64_t split = std::min<int64_t>(kv_heads, (4 * threads + int64_t(tasks.size()) - 1) /
                                                        int64_t(tasks.size()));
  if (split > 1) {
    std::vector<Task> finer;
    const int64_t per = (kv_heads + split - 1) / split;
    for (const Task& task : tasks)
      for (int64_t g = 0; g < kv_heads; g += per)
        finer.push_back({task.seq, task.lo, task.hi, g, std::min(kv_heads, g + per), task.slot});
    tasks.swap(finer);
  }

  const int64_t per_slot = heads * (head_dim + 2);
  // NOTE: not zeroed: each slot's heads are all written by the tasks that share it. (0.5 MB
  // a layer at 32 x 1024 tokens; the shard's malloc keeps freed memory, so no page faults.)
  const std::unique_ptr<float[]> scratch(new float[slots * per_slot]);
  auto slot_of = [&](int64_t slot) {
    float* base = scratch.get() + slot * per_slot;
    return Partial{base, base + heads, base + 2 * heads};
  };
  tgi_parallel::guided_for(int64_t(tasks.size()), 1, [&](int64_t begin, int64_t finish) {
    thread_local std::vector<float> own, qf, scores;
    own.resize(per_slot);
    qf.resize(heads * head_dim);
    scores.resize(heads * kScoreStride);
    int64_t scaled = -1;  // the sequence whose scaled query rows are in qf
    for (int64_t i = begin; i < finish; ++i) {
      const Task& task = tasks[i];
      const T* qs = qp + task.seq * heads * head_dim;
      if (scaled != task.seq) {
        for (int64_t e = 0; e < heads * head_dim; ++e) qf[e] = float(qs[e]) * float(scale);
        scaled = task.seq;
      }
      const Partial part = task.slot >= 0
          ? slot_of(task.slot) : Partial{own.data(), own.data() + heads, own.data() + 2 * heads};
      const int64_t h_begin = task.g0 * geo.group, h_end = task.g1 * geo.group;
      if (task.hi <= task.lo) {  // an empty context
        std::fill(part.acc + h_begin * head_dim, part.acc + h_end * head_dim, 0.f);
        std::fill(part.l + h_begin, part.l + h_end, 0.f);
      } else {
        auto* span = &attend_span<T, 0>;
        switch (head_dim / 16) {
          case 2: span = &attend_span<T, 2>; break;
          case 4: span = &attend_span<T, 4>; break;
          case 8: span = &attend_span<T, 8>; break;
        }
        span(qf.data(), kp, vp, tp + task.seq * width, geo, task.lo, task.hi, task.g0, task.g1,
             scores.data(), kScoreStride, part);
      }
      if (task.slot < 0)
        write_out(part, h_begin, h_end, head_dim, op + task.seq * heads * head_dim);
    }
  });

  // Contexts of several partitions: their softmaxes combined, in partition order.
  tgi_parallel::guided_for(int64_t(parted.size()), 1, [&](int64_t begin, int64_t finish) {
    thread_local std::vector<float> combined;
    combined.resize(per_slot);
    const Partial total{combined.data(), combined.data() + heads, combined.data() + 2 * heads};
    for (int64_t i = begin; i < finish; ++i) {
      const auto [b, first, count] = parted[i];
      for (int64_t h = 0; h < heads; ++h) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t k = 0; k < count; ++k) top = std::max(top, slot_of(first + k).m[h]);
        __m512 acc[16];
        for (int64_t c = 0; c < head_dim / 16; ++c) acc[c] = _mm512_setzero_ps();
        float l = 0.f;
        for (int64_t k = 0; k < count; ++k) {
          const Partial p = slot_of(first + k);
          const float w = std::exp(p.m[h] - top);
          l += p.l[h] * w;
          const __m512 wv = _mm512_set1_ps(w);
          for (int64_t c = 0; c < head_dim / 16; ++c)
            acc[c] = _mm512_fmadd_ps(_mm512_loadu_ps(p.acc + h * head_dim + c * 16), wv, acc[c]);
        }
        total.l[h] = l;
        for (int64_t c = 0; c < head_dim / 16; ++c)
          _mm512_storeu_ps(total.acc + h * head_dim + c * 16, acc[c]);
      }
      write_out(total, 0, heads, head_dim, op + b * heads * head_dim);
    }
  });
}

// ---- Prefill: many query rows of one sequence ---------------------------------------------
//
// A prefill's rows through the decode path each re-read their whole context and reduce every
// dot product across lanes; here one task takes a sequence and a KV head, widens and transposes
// its keys once ([head_dim, tokens]), and then each block of query rows gets 16 scores per
// multiply-add, a key column against a query element broadcast, with no reduction (NOTES 54).

// Query vectors (rows x the KV head's query heads) a block takes: 8 rows of a group of 4.
constexpr int64_t kPrefillVectors = 32;

template <typename T, int CH>
void prefill_sequence(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                      const Geometry& geo, int64_t heads, int64_t rows, int64_t first_pos,
                      int64_t window, float scale, int64_t g, T* out) {
  const int64_t D = geo.head_dim, group = geo.group, bs = geo.block_size, row = geo.row();
  const int64_t chunks = CH > 0 ? CH : D / 16;
  const int64_t last_pos = first_pos + rows - 1;
  const auto row_lo = [&](int64_t pos) {
    return window > 0 ? std::max<int64_t>(0, pos + 1 - window) : 0;
  };
  const int64_t lo = row_lo(first_pos), len = last_pos + 1 - lo;
  const int64_t stride = (len + 31) / 32 * 32 + 32;  // the last 32-token tile's zeros fit
  // A block's vectors: kPrefillVectors, or one row's when a KV head has more query heads;
  // padded to the scores pass's 8.
  const int64_t most = (std::max(kPrefillVectors, group) + 7) / 8 * 8;
  thread_local std::vector<float> keys_t, scores, qv, inv;
  thread_local std::vector<const T*> values;
  keys_t.resize(D * stride);
  scores.resize(most * stride);
  qv.resize(most * D);
  inv.resize(most);
  values.resize(len);
  // Keys transposed and widened: keys_t[d * stride + i] = k(lo + i)[d]; zero past len.
  for (int64_t i = 0; i < len; ++i) {
    const int64_t t = lo + i, at = (table[t / bs] * bs + t % bs) * row + g * D;
    values[i] = v_cache + at;
    const T* key = k_cache + at;
    for (int64_t d = 0; d < D; ++d) keys_t[d * stride + i] = float(key[d]);
  }
  for (int64_t d = 0; d < D; ++d)
    std::fill(&keys_t[d * stride + len], &keys_t[d * stride] + stride, 0.f);

  const int64_t rows_per_block = std::max<int64_t>(1, kPrefillVectors / group);
  for (int64_t r0 = 0; r0 < rows; r0 += rows_per_block) {
    const int64_t r1 = std::min(rows, r0 + rows_per_block), nv = (r1 - r0) * group;
    // Vector v: row r0 + v / group, query head g * group + v % group; padded with zeros.
    std::fill(qv.begin(), qv.end(), 0.f);
    for (int64_t v = 0; v < nv; ++v) {
      const T* src = q + ((r0 + v / group) * heads + g * group + v % group) * D;
      for (int64_t d = 0; d < D; ++d) qv[v * D + d] = float(src[d]) * scale;
    }
    // The block's tokens, relative to lo: [begin, end), begin a multiple of 16.
    const int64_t begin = (row_lo(first_pos + r0) - lo) / 16 * 16;
    const int64_t end = first_pos + r1 - lo;
    const int64_t groups = (nv + 7) / 8;
    for (int64_t i = begin; i < end; i += 32) {  // 32 tokens: each broadcast feeds 2 FMAs
      for (int64_t v8 = 0; v8 < groups; ++v8) {
        const float* qg = &qv[v8 * 8 * D];
        __m512 acc[8][2];
        for (int k = 0; k < 8; ++k) acc[k][0] = acc[k][1] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; ++d) {
          const __m512 lo16 = _mm512_loadu_ps(&keys_t[d * stride + i]);
          const __m512 hi16 = _mm512_loadu_ps(&keys_t[d * stride + i + 16]);
          for (int k = 0; k < 8; ++k) {
            const __m512 qk = _mm512_set1_ps(qg[k * D + d]);
            acc[k][0] = _mm512_fmadd_ps(qk, lo16, acc[k][0]);
            acc[k][1] = _mm512_fmadd_ps(qk, hi16, acc[k][1]);
          }
        }
        for (int k = 0; k < 8; ++k) {
          _mm512_storeu_ps(&scores[(v8 * 8 + k) * stride + i], acc[k][0]);
          _mm512_storeu_ps(&scores[(v8 * 8 + k) * stride + i + 16], acc[k][1]);
        }
      }
    }
    // Softmax of each vector over its row's tokens [row_lo(pos), pos] (the rest weigh 0).
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t pos = first_pos + r0 + v / group;
      const int64_t a = row_lo(pos) - lo, b = pos + 1 - lo;  // valid [a, b)
      auto valid = [&](int64_t i) {  // the lanes of tokens [i, i + 16) in [a, b)
        if (i + 16 <= a || i >= b) return __mmask16(0);
        const __mmask16 from_a = i >= a ? __mmask16(0xFFFF) : __mmask16(0xFFFFu << (a - i));
        return __mmask16(from_a & tail_mask(b - i));
      };
      inv[v] = 1.f / exponentiate(&scores[v * stride], begin, end, valid).second;
    }
    // Values: HN vectors at a time, their accumulators in registers.
    auto values_pass = [&](auto hn, int64_t v0) {
      constexpr int HN = decltype(hn)::value;
      __m512 acc[HN][kMaxChunks<CH>];
      for (int j = 0; j < HN; ++j)
        for (int64_t c = 0; c < chunks; ++c) acc[j][c] = _mm512_setzero_ps();
      const int64_t stop = first_pos + r0 + (v0 + HN - 1) / group + 1 - lo;
      for (int64_t i = begin; i < stop; ++i) {
        __m512 vrow[kMaxChunks<CH>];
        for (int64_t c = 0; c < chunks; ++c) vrow[c] = load16(values[i] + c * 16);
        for (int j = 0; j < HN; ++j) {
          const __m512 w = _mm512_set1_ps(scores[(v0 + j) * stride + i]);
          for (int64_t c = 0; c < chunks; ++c) acc[j][c] = _mm512_fmadd_ps(w, vrow[c], acc[j][c]);
        }
      }
      for (int j = 0; j < HN; ++j) {
        const int64_t v = v0 + j;
        T* dst = out + ((r0 + v / group) * heads + g * group + v % group) * D;
        const __m512 scale_v = _mm512_set1_ps(inv[v]);
        for (int64_t c = 0; c < chunks; ++c)
          tgi_simd::store16(dst + c * 16, _mm512_mul_ps(acc[j][c], scale_v));
      }
    };
    by_heads<kHeadsPerPass<CH>>(nv, values_pass);
  }
}

template <typename T>
void prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
             const at::Tensor& tables, const at::Tensor& cu_seqlens, const at::Tensor& lens,
             double scale, int64_t window, at::Tensor& out) {
  const int64_t seqs = lens.size(0), heads = q.size(1), head_dim = q.size(2);
  const Geometry geo{k_cache.size(1), k_cache.size(2), heads / k_cache.size(2), head_dim};
  const int64_t width = tables.size(1), kv_heads = geo.kv_heads;
  const T *qp = q.data_ptr<T>(), *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
  const int64_t *tp = tables.data_ptr<int64_t>(), *cp = cu_seqlens.data_ptr<int64_t>(),
                *lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  auto* one = &prefill_sequence<T, 0>;
  switch (head_dim / 16) {
    case 2: one = &prefill_sequence<T, 2>; break;
    case 4: one = &prefill_sequence<T, 4>; break;
    case 8: one = &prefill_sequence<T, 8>; break;
  }
  // Longest sequences first, so the last tasks to start are short.
  std::vector<int64_t> order(seqs * kv_heads);
  for (int64_t i = 0; i < seqs * kv_heads; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return lp[a / kv_heads] > lp[b / kv_heads];
  });
  tgi_parallel::guided_for(seqs * kv_heads, 1, [&](int64_t begin, int64_t finish) {
    for (int64_t i = begin; i < finish; ++i) {
      const int64_t s = order[i] / kv_heads, g = order[i] % kv_heads;
      const int64_t rows = cp[s + 1] - cp[s];
      if (rows <= 0) continue;
      one(qp + cp[s] * heads * head_dim, kp, vp, tp + s * width, geo, heads, rows, lp[s] - rows,
          window, float(scale), g, op + cp[s] * heads * head_dim);
    }
  });
}

// What both attention ops ask of q [rows, heads, D] and the caches [blocks, bs, kv heads, D].
void check_heads_and_caches(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache) {
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= 256 && q.size(2) == k_cache.size(3),
              "head_dim: a multiple of 16, at most 256");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "q and the contiguous caches share one dtype");
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens,
                             double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [tokens, heads, D], cache [blocks, bs, kv, D]");
  check_heads_and_caches(q, k_cache, v_cache);
  const auto qc = q.contiguous(), tables = block_tables.contiguous();
  const auto cu = cu_seqlens_q.to(at::kLong).contiguous(), lens = context_lens.contiguous();
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(tables.size(0) == lens.size(0) && cu.numel() == lens.numel() + 1,
              "one block table row, one context length and one query span per sequence");
  auto out = at::empty_like(qc);
  if (q.scalar_type() == at::kFloat) {
    prefill<float>(qc, k_cache, v_cache, tables, cu, lens, scale, window, out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
    prefill<c10::BFloat16>(qc, k_cache, v_cache, tables, cu, lens, scale, window, out);
  }
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [batch, heads, D], cache [blocks, bs, kv, D]");
  check_heads_and_caches(q, k_cache, v_cache);
  const auto qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == q.size(0) && lens.numel() == q.size(0),
              "one block table row and one context length per query row");
  auto out = at::empty_like(qc);
  if (q.scalar_type() == at::kFloat) {
    attend<float>(qc, k_cache, v_cache, tables, lens, scale, window, out);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
    attend<c10::BFloat16>(qc, k_cache, v_cache, tables, lens, scale, window, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tgi_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, &decode_attention);
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor cu_seqlens_q, Tensor context_lens, float scale, int window) -> Tensor");
  m.impl("prefill_attention", c10::DispatchKey::CPU, &prefill_attention);
}
