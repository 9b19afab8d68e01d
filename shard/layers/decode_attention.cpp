// Decode attention straight from the paged KV cache: one new token per sequence.
//
// Built with small_batch_linear.cpp into one extension (kernels.py); called by attention.py
// as torch.ops.tgi_cpu.decode_attention. The torch path gathers every sequence's blocks into
// a padded copy per layer, then runs SDPA; here each (sequence, KV head) task reads its
// blocks in place, once, for the `heads / kv_heads` query heads that share them.
// Scores and softmax in float32; the output is rounded once to the query's dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
void attend_one(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,
                int64_t start, int64_t end, int64_t block_size, int64_t kv_heads, int64_t group,
                int64_t head_dim, float scale, int64_t kv_head, T* out) {
  // q / out: the group's rows [group, head_dim]; the cache is [blocks, block_size, kv, D].
  const int64_t n = end - start, chunks = head_dim / 16;
  std::vector<float> qf(group * head_dim), acc(group * head_dim, 0.f), scores(group * n);
  for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = float(q[i]) * scale;
  auto slot = [&](int64_t t) {
    return ((table[t / block_size] * block_size + t % block_size) * kv_heads + kv_head) * head_dim;
  };
  for (int64_t t = start; t < end; ++t) {
    const T* k = k_cache + slot(t);
    for (int64_t j = 0; j < group; ++j) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c)
        sum = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[j * head_dim + c * 16]), load16(k + c * 16), sum);
      scores[j * n + (t - start)] = _mm512_reduce_add_ps(sum);
    }
  }
  std::vector<float> inv(group);
  for (int64_t j = 0; j < group; ++j) {
    float* s = &scores[j * n];
    const float top = *std::max_element(s, s + n);
    float total = 0.f;
    for (int64_t t = 0; t < n; ++t) total += (s[t] = std::exp(s[t] - top));
    inv[j] = 1.f / total;
  }
  for (int64_t t = start; t < end; ++t) {
    const T* v = v_cache + slot(t);
    for (int64_t j = 0; j < group; ++j) {
      const __m512 p = _mm512_set1_ps(scores[j * n + (t - start)]);
      float* a = &acc[j * head_dim];
      for (int64_t c = 0; c < chunks; ++c)
        _mm512_storeu_ps(a + c * 16, _mm512_fmadd_ps(p, load16(v + c * 16), _mm512_loadu_ps(a + c * 16)));
    }
  }
  for (int64_t j = 0; j < group; ++j)
    for (int64_t d = 0; d < head_dim; ++d) out[j * head_dim + d] = T(acc[j * head_dim + d] * inv[j]);
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
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t finish) {
    for (int64_t task = begin; task < finish; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads, end = lp[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, end - window) : 0;
      const int64_t offset = (b * heads + g * group) * head_dim;
      attend_one<T>(qp + offset, kp, vp, tp + b * width, start, end, block_size, kv_heads,
                    group, head_dim, float(scale), g, op + offset);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [batch, heads, D], cache [blocks, bs, kv, D]");
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) == k_cache.size(3), "head_dim: a multiple of 16");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "q and the contiguous caches share one dtype");
  const auto qc = q.contiguous(), tables = block_tables.contiguous(), lens = context_lens.contiguous();
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "int64 tables");
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
