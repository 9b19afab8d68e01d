// y[m, n] = x[m, k] @ w[n, k]^T (+ bias) for a few rows m: one pass over the weight.
//
// Built at shard start-up by small_batch_linear.py (torch.utils.cpp_extension, -march=native)
// and called as torch.ops.tgi_cpu.small_batch_linear. At decode with a handful of sequences
// a linear layer is a stream over its weight; oneDNN's kernels read it at ~23 (bfloat16) to
// ~30 (float32) GB/s on AVX-512 machines where a plain read reaches ~36. Here each thread
// streams its own rows of w once and multiplies them with every row of x (held in L1/L2).
// float32: FMA; bfloat16: AVX512-BF16 dot products (vdpbf16ps) accumulating in float32.
// Both round once to the output dtype, after the bias, as oneDNN does.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

namespace {

constexpr int64_t kMaxRows = 8;

// Dot products of M rows of x with one row of w, float32.
template <int M>
inline void dot_rows(const float* x, int64_t k, const float* w, float* out) {
  int64_t c = 0;
#ifdef __AVX512F__
  __m512 acc[M][2];
  for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (; c + 32 <= k; c += 32) {
    const __m512 w0 = _mm512_loadu_ps(w + c), w1 = _mm512_loadu_ps(w + c + 16);
    for (int i = 0; i < M; ++i) {
      acc[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * k + c), w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * k + c + 16), w1, acc[i][1]);
    }
  }
  for (int i = 0; i < M; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
#else
  for (int i = 0; i < M; ++i) out[i] = 0.f;
#endif
  for (; c < k; ++c)
    for (int i = 0; i < M; ++i) out[i] += x[i * k + c] * w[c];
}

// Same for bfloat16 x and w, float32 sums.
template <int M>
inline void dot_rows(const c10::BFloat16* x, int64_t k, const c10::BFloat16* w, float* out) {
  int64_t c = 0;
#if defined(__AVX512BF16__)
  __m512 acc[M];
  for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
  for (; c + 32 <= k; c += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + c);
    for (int i = 0; i < M; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(x + i * k + c), wv);
  }
  for (int i = 0; i < M; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
#else
  for (int i = 0; i < M; ++i) out[i] = 0.f;
#endif
  for (; c < k; ++c)
    for (int i = 0; i < M; ++i) out[i] += float(x[i * k + c]) * float(w[c]);
}

template <typename T, int M>
void rows_kernel(const T* x, const T* w, const T* bias, T* y, int64_t k, int64_t n) {
  // NOTE: 16 rows of w per task: big enough to amortize, small enough to balance 2+ threads.
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    float out[M];
    for (int64_t j = begin; j < end; ++j) {
      dot_rows<M>(x, k, w + j * k, out);
      const float b = bias ? float(bias[j]) : 0.f;
      for (int i = 0; i < M; ++i) y[i * n + j] = T(out[i] + b);
    }
  });
}

template <typename T>
void dispatch_rows(const T* x, const T* w, const T* b, T* y, int64_t m, int64_t k, int64_t n) {
  switch (m) {
    case 1: return rows_kernel<T, 1>(x, w, b, y, k, n);
    case 2: return rows_kernel<T, 2>(x, w, b, y, k, n);
    case 3: return rows_kernel<T, 3>(x, w, b, y, k, n);
    case 4: return rows_kernel<T, 4>(x, w, b, y, k, n);
    case 5: return rows_kernel<T, 5>(x, w, b, y, k, n);
    case 6: return rows_kernel<T, 6>(x, w, b, y, k, n);
    case 7: return rows_kernel<T, 7>(x, w, b, y, k, n);
    default: return rows_kernel<T, 8>(x, w, b, y, k, n);
  }
}

at::Tensor small_batch_linear(const at::Tensor& x, const at::Tensor& w,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [m, k], w [n, k]");
  TORCH_CHECK(x.size(0) <= kMaxRows, "at most ", kMaxRows, " rows");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "x and w must have one dtype");
  const auto xc = x.contiguous(), wc = w.contiguous();
  const auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  auto y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    dispatch_rows<float>(xc.data_ptr<float>(), wc.data_ptr<float>(),
                         bc.defined() ? bc.data_ptr<float>() : nullptr, y.data_ptr<float>(),
                         m, k, n);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
    using B = c10::BFloat16;
    dispatch_rows<B>(xc.data_ptr<B>(), wc.data_ptr<B>(), bc.defined() ? bc.data_ptr<B>() : nullptr,
                     y.data_ptr<B>(), m, k, n);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(tgi_cpu, m) {
  m.def("small_batch_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.impl("small_batch_linear", c10::DispatchKey::CPU, &small_batch_linear);
}
