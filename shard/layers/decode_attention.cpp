// Decode attention straight from the paged KV cache: one new token per sequence.
//
// Built with packed_linear.cpp into one extension (cpu_kernels.py); called by attention.py
// as torch.ops.tgi_cpu.decode_attention, for decode steps and for the rows of a short
// prefill, each then a one-token query over its own context. The torch path gathers every
// sequence's blocks into a padded copy per layer, then runs SDPA; here each (sequence, KV
// head) task reads its blocks in place, once, for the `heads / kv_heads` query heads that
// share them.
// Scores and softmax in float32; the output is rounded once to the query's dtype. Scores are
// reduced and exponentiated 16 tokens at a time (benchmarks/NOTES.md 8, 11); each cache row
// is widened once for all the query heads of a pass, and rows are prefetched ahead, since
// the blocks are scattered and waiting on memory was most of the cost (NOTES 22).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "parallel.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <limits>
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

// One (sequence, KV head) task: its tokens [start, start + n) in the paged cache
// [blocks, block_size, kv_heads, head_dim] through `table`, and its query heads' score rows,
// `stride` apart.
struct Span {
  const int64_t* table;
  int64_t start, n, block_size, kv_heads, head_dim, kv_head, stride;
};

// Accumulator vectors per row: CH = head_dim / 16 when known at compile time, else up to 16.
template <int CH>
constexpr int kMaxChunks = CH > 0 ? CH : 16;
template <int CH>
inline int64_t chunks_of(const Span& s) { return CH > 0 ? CH : s.head_dim / 16; }

// Walks a span's tokens through its block table without a division per token, prefetching
// the same row of the next block (a block's rows are not contiguous per head, and the blocks
// are scattered: the hardware prefetcher does not follow them).
template <typename T>
struct TokenCursor {
  const T* cache;
  const int64_t* table;
  int64_t block_size, row_stride, head_offset, block, offset, last_block, row_bytes;
  TokenCursor(const T* cache, const Span& s)
      : cache(cache), table(s.table), block_size(s.block_size),
        row_stride(s.kv_heads * s.head_dim), head_offset(s.kv_head * s.head_dim),
        block(s.start / s.block_size), offset(s.start % s.block_size),
        last_block((s.start + s.n - 1) / s.block_size),
        row_bytes(s.head_dim * int64_t(sizeof(T))) {}
  const T* row(int64_t b) const {
    return cache + (table[b] * block_size + offset) * row_stride + head_offset;
  }
  // Also fetches this token's row of `other` (the values, while the keys are walked) to L2.
  const T* next(const T* other = nullptr) {
    const T* current = row(block);
    if (other != nullptr) {
      const char* v = reinterpret_cast<const char*>(other + (current - cache));
      for (int64_t byte = 0; byte < row_bytes; byte += 64) _mm_prefetch(v + byte, _MM_HINT_T1);
    }
    if (block < last_block) {
      const char* ahead = reinterpret_cast<const char*>(row(block + 1));
      for (int64_t byte = 0; byte < row_bytes; byte += 64) _mm_prefetch(ahead + byte, _MM_HINT_T0);
    }
    if (++offset == block_size) offset = 0, ++block;
    return current;
  }
};

// Scores of query heads [h0, h0 + HN) over the span's tokens, 16 tokens at a time: each key
// row is loaded (and widened) once for the HN heads, each head's 16 partial dot products
// reduced in one go. qf rows are pre-scaled float32. The first pass (h0 == 0) also fetches
// each token's value row to L2 for values_pass.
template <typename T, int CH, int HN>
void scores_pass(const float* qf, const T* k_cache, const T* v_cache, const Span& s, int64_t h0,
                 float* scores) {
  const int64_t chunks = chunks_of<CH>(s), head_dim = s.head_dim;
  TokenCursor<T> keys(k_cache, s);
  alignas(64) __m512 partial[HN][16];
  for (int64_t base = 0; base < s.n; base += 16) {
    const int64_t count = std::min<int64_t>(16, s.n - base);
    for (int64_t i = 0; i < 16; ++i) {
      if (i >= count) {
        for (int j = 0; j < HN; ++j) partial[j][i] = _mm512_setzero_ps();
        continue;
      }
      const T* row = keys.next(h0 == 0 ? v_cache : nullptr);
      __m512 k[kMaxChunks<CH>];
      for (int64_t c = 0; c < chunks; ++c) k[c] = load16(row + c * 16);
      for (int j = 0; j < HN; ++j) {
        const float* qj = qf + (h0 + j) * head_dim;
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c)
          sum = _mm512_fmadd_ps(_mm512_loadu_ps(qj + c * 16), k[c], sum);
        partial[j][i] = sum;
      }
    }
    for (int j = 0; j < HN; ++j)
      _mm512_storeu_ps(scores + (h0 + j) * s.stride + base, transpose_sum16(partial[j]));
  }
}

// Outputs of query heads [h0, h0 + HN): the softmax numerators (`scores`) times the values,
// each value row loaded once for the HN heads, times 1 / denominator, rounded once.
template <typename T, int CH, int HN>
void values_pass(const float* scores, const float* inv, const T* v_cache, const Span& s,
                 int64_t h0, T* out) {
  const int64_t chunks = chunks_of<CH>(s), head_dim = s.head_dim;
  __m512 acc[HN][kMaxChunks<CH>];
  for (int j = 0; j < HN; ++j)
    for (int64_t c = 0; c < chunks; ++c) acc[j][c] = _mm512_setzero_ps();
  TokenCursor<T> values(v_cache, s);
  for (int64_t t = 0; t < s.n; ++t) {
    const T* row = values.next();
    __m512 v[kMaxChunks<CH>];
    for (int64_t c = 0; c < chunks; ++c) v[c] = load16(row + c * 16);
    for (int j = 0; j < HN; ++j) {
      const __m512 p = _mm512_set1_ps(scores[(h0 + j) * s.stride + t]);
      for (int64_t c = 0; c < chunks; ++c) acc[j][c] = _mm512_fmadd_ps(p, v[c], acc[j][c]);
    }
  }
  alignas(64) float row[16];
  for (int j = 0; j < HN; ++j) {
    const __m512 scale_j = _mm512_set1_ps(inv[h0 + j]);
    for (int64_t c = 0; c < chunks; ++c) {
      _mm512_store_ps(row, _mm512_mul_ps(acc[j][c], scale_j));
      for (int d = 0; d < 16; ++d) out[(h0 + j) * head_dim + c * 16 + d] = T(row[d]);
    }
  }
}

// One (sequence, KV head): the `group` query heads sharing it. q / out rows [group, D]; the
// cache is [blocks, block_size, kv_heads, D]. CH = D / 16 when known at compile time (the
// accumulators then live in registers), 0 for any other multiple of 16 up to 256. Heads go
// through the two passes HG at a time, HG * CH accumulators filling half the registers.
template <typename T, int CH>
void attend_one(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                int64_t start, int64_t end, int64_t block_size, int64_t kv_heads, int64_t group,
                int64_t head_dim, float scale, int64_t kv_head, T* out) {
  constexpr int HG = CH > 0 && CH <= 16 ? 16 / CH : 1;
  const int64_t n = end - start;
  const int64_t stride = (n + 15) / 16 * 16;  // one score row per query head
  const Span span{table, start, n, block_size, kv_heads, head_dim, kv_head, stride};
  thread_local std::vector<float> qf, scores, inv;
  qf.resize(group * head_dim);
  scores.resize(group * stride);
  inv.resize(group);
  for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = float(q[i]) * scale;

  // Runs pass<HN> over heads [h0, h0 + HN) for HN = HG while HG heads are left, then 2, 1.
  auto by_heads = [&](auto pass) {
    int64_t h0 = 0;
    for (; h0 + HG <= group; h0 += HG) pass(std::integral_constant<int, HG>{}, h0);
    if constexpr (HG > 2)
      for (; h0 + 2 <= group; h0 += 2) pass(std::integral_constant<int, 2>{}, h0);
    for (; h0 < group; ++h0) pass(std::integral_constant<int, 1>{}, h0);
  };
  by_heads([&](auto hn, int64_t h0) {
    scores_pass<T, CH, decltype(hn)::value>(qf.data(), k_cache, v_cache, span, h0,
                                            scores.data());
  });

  // Softmax numerators in place; 1 / denominator per head.
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < group; ++j) {
    float* s = &scores[j * stride];
    __m512 top = minus_inf;
    for (int64_t t = 0; t < n; t += 16)
      top = _mm512_max_ps(top, _mm512_mask_loadu_ps(minus_inf, tail_mask(n - t), s + t));
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 m = tail_mask(n - t);
      const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), max)));
      _mm512_storeu_ps(s + t, e);
      total = _mm512_add_ps(total, e);
    }
    inv[j] = 1.f / _mm512_reduce_add_ps(total);
  }

  by_heads([&](auto hn, int64_t h0) {
    values_pass<T, CH, decltype(hn)::value>(scores.data(), inv.data(), v_cache, span, h0, out);
  });
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& tables, const at::Tensor& lens, double scale, int64_t window,
            at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = heads / kv_heads, width = tables.size(1);
  const T *qp = q.data_ptr<T>(), *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  tgi_parallel::guided_for(batch * kv_heads, 1, [&](int64_t begin, int64_t finish) {
    for (int64_t task = begin; task < finish; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads, end = lp[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, end - window) : 0;
      const int64_t offset = (b * heads + g * group) * head_dim;
      auto* one = &attend_one<T, 0>;
      switch (head_dim / 16) {
        case 2: one = &attend_one<T, 2>; break;
        case 4: one = &attend_one<T, 4>; break;
        case 8: one = &attend_one<T, 8>; break;
      }
      one(qp + offset, kp, vp, tp + b * width, start, end, block_size, kv_heads, group,
          head_dim, float(scale), g, op + offset);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [batch, heads, D], cache [blocks, bs, kv, D]");
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= 256 && q.size(2) == k_cache.size(3),
              "head_dim: a multiple of 16, at most 256");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "q and the contiguous caches share one dtype");
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
}
