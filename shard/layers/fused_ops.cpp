// The elementwise work of a decoder layer, one pass each: residual add + RMSNorm, SiLU-and-mul,
// rotary embedding in place, the store of a step's keys and values into the paged cache. In
// eager torch each is 4-8 ops with a temporary per op; at decode that is ~1000 dispatches a
// step (benchmarks/NOTES.md 12). And the one reduction sampling needs over the logits: argmax,
// max and log-sum-exp per row in two passes, so no [batch, vocab] log_softmax is written
// (NOTES 33).
//
// Called by norm.py, activation.py and rotary.py through cpu_kernels.py when the shapes allow
// (rows a multiple of 16 elements). Every intermediate is rounded to the tensor's dtype where
// torch's ops round it (the eager modules, and transformers, round after each op), so a
// bfloat16 result differs from eager only where a float32 sum is added up in another order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>

#include "simd.h"

namespace {

using tgi_simd::exp16;
using tgi_simd::load16;
using tgi_simd::round_to;
using tgi_simd::store16;
using tgi_simd::tail_mask;

// out = weight * T(r * rsqrt(mean(r^2) + eps)), r = x + residual (residual and x written back
// when `add`), one row at a time.
template <typename T, bool add>
void rms_rows(T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* xr = x + i * n;
      T* rr = add ? residual + i * n : xr;
      __m512 squares = _mm512_setzero_ps();
      for (int64_t c = 0; c < n; c += 16) {
        __m512 v = load16(xr + c);
        if (add) {
          v = round_to<T>(_mm512_add_ps(v, load16(rr + c)));
          store16(rr + c, v);
        }
        squares = _mm512_fmadd_ps(v, v, squares);
      }
      const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(squares) / float(n) + eps);
      const __m512 scale = _mm512_set1_ps(inv);
      T* o = out + i * n;
      for (int64_t c = 0; c < n; c += 16) {
        const __m512 normed = round_to<T>(_mm512_mul_ps(load16(rr + c), scale));
        store16(o + c, _mm512_mul_ps(load16(weight + c), normed));
      }
    }
  });
}

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 16 == 0,
              what, ": a contiguous [rows, n] tensor with n a multiple of 16");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              what, ": float32 or bfloat16 only");
}

template <bool add>
void rms_dispatch(at::Tensor& x, at::Tensor* residual, const at::Tensor& weight, at::Tensor& out,
                  double eps) {
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) &&
              weight.scalar_type() == x.scalar_type(), "rms norm: weight [n] of x's dtype");
  const int64_t rows = x.size(0), n = x.size(1);
  if (x.scalar_type() == at::kFloat) {
    rms_rows<float, add>(x.data_ptr<float>(), residual ? residual->data_ptr<float>() : nullptr,
                         weight.data_ptr<float>(), out.data_ptr<float>(), rows, n, float(eps));
  } else {
    using B = c10::BFloat16;
    rms_rows<B, add>(x.data_ptr<B>(), residual ? residual->data_ptr<B>() : nullptr,
                     weight.data_ptr<B>(), out.data_ptr<B>(), rows, n, float(eps));
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  auto xc = x;
  auto out = at::empty_like(x);
  rms_dispatch<false>(xc, nullptr, weight, out, eps);
  return out;
}

// residual += x; x = rms_norm(residual) (both in place).
void add_rms_norm_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm_");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.is_contiguous() &&
              residual.scalar_type() == x.scalar_type(), "add_rms_norm_: residual like x");
  rms_dispatch<true>(x, &residual, weight, x, eps);
}

// [rows, 2n] (gate | up) -> [rows, n]: T(T(silu(gate)) * up).
template <typename T>
void silu_rows(const T* x, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows * n / 16, 64, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const int64_t i = v * 16 / n, c = v * 16 % n;
      const __m512 gate = load16(x + i * 2 * n + c), up = load16(x + i * 2 * n + n + c);
      const __m512 denominator =
          _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate)));
      const __m512 silu = round_to<T>(_mm512_div_ps(gate, denominator));
      store16(out + i * n + c, _mm512_mul_ps(silu, up));
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "silu_and_mul");
  TORCH_CHECK(x.size(1) % 32 == 0, "silu_and_mul: halves a multiple of 16");
  const int64_t rows = x.size(0), n = x.size(1) / 2;
  auto out = at::empty({rows, n}, x.options());
  if (x.scalar_type() == at::kFloat) {
    silu_rows<float>(x.data_ptr<float>(), out.data_ptr<float>(), rows, n);
  } else {
    using B = c10::BFloat16;
    silu_rows<B>(x.data_ptr<B>(), out.data_ptr<B>(), rows, n);
  }
  return out;
}

// Neox rotary in place on [tokens, heads, D] rows (a view of the fused qkv output is fine):
// x1' = T(T(x1 c) - T(x2 s)), x2' = T(T(x2 c) + T(x1 s)), with c, s rounded to T first.
template <typename T>
void rotate_rows(T* x, int64_t tokens, int64_t heads, int64_t row_stride, int64_t head_dim,
                 const float* cos_sin, const int64_t* positions) {
  const int64_t half = head_dim / 2;
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cs = cos_sin + positions[t] * head_dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* row = x + t * row_stride + h * head_dim;
        for (int64_t c = 0; c < half; c += 16) {
          const __m512 cv = round_to<T>(_mm512_loadu_ps(cs + c));
          const __m512 sv = round_to<T>(_mm512_loadu_ps(cs + half + c));
          const __m512 x1 = load16(row + c), x2 = load16(row + half + c);
          store16(row + c, _mm512_sub_ps(round_to<T>(_mm512_mul_ps(x1, cv)),
                                         round_to<T>(_mm512_mul_ps(x2, sv))));
          store16(row + half + c, _mm512_add_ps(round_to<T>(_mm512_mul_ps(x2, cv)),
                                                round_to<T>(_mm512_mul_ps(x1, sv))));
        }
      }
    }
  });
}

void rotary_one(at::Tensor& x, const at::Tensor& cos_sin, const at::Tensor& positions) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) &&
              x.size(2) % 32 == 0, "rotary_: x [tokens, heads, D], rows contiguous, D % 32 == 0");
  TORCH_CHECK(x.size(0) == positions.numel(), "rotary_: one position per token");
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2);
  if (x.scalar_type() == at::kFloat) {
    rotate_rows<float>(x.data_ptr<float>(), tokens, heads, x.stride(0), d,
                       cos_sin.data_ptr<float>(), positions.data_ptr<int64_t>());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rotary_: float32 or bfloat16 only");
    using B = c10::BFloat16;
    rotate_rows<B>(x.data_ptr<B>(), tokens, heads, x.stride(0), d, cos_sin.data_ptr<float>(),
                   positions.data_ptr<int64_t>());
  }
}

void rotary_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos_sin, const at::Tensor& positions) {
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() &&
              cos_sin.dim() == 2 && cos_sin.size(1) == q.size(2),
              "rotary_: cos_sin [positions, D] float32");
  const auto pos = positions.to(at::kLong).contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < pos.numel(); ++t)
    TORCH_CHECK(p[t] >= 0 && p[t] < cos_sin.size(0), "rotary_: position ", p[t], " past the cache");
  rotary_one(q, cos_sin, pos);
  rotary_one(k, cos_sin, pos);
}

// k/v [tokens, kv_heads, D] (rows contiguous; a view of the fused qkv output is fine) into the
// slots of the paged caches, viewed as [slots, kv_heads * D]: what index_copy_ does, at one
// memcpy per row rather than a TensorIterator walk (~45 us a call at 32 tokens).
void store_kv_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& slots) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(), "store_kv_: caches of one contiguous shape");
  const int64_t tokens = k.size(0), row = k.size(1) * k.size(2);
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1 &&
                  k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "store_kv_: k, v [tokens, kv_heads, D] with contiguous rows");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "store_kv_: k, v in the caches' dtype");
  TORCH_CHECK(k_cache.numel() % row == 0, "store_kv_: a cache slot holds kv_heads * D values");
  const int64_t num_slots = k_cache.numel() / row;
  const auto s = slots.to(at::kLong).contiguous();
  TORCH_CHECK(s.numel() == tokens, "store_kv_: one slot per token");
  const int64_t* sp = s.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "store_kv_: slot ", sp[t], " out of range");
  const int64_t bytes = row * k.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kc + sp[t] * bytes, kp + t * ks, bytes);
      std::memcpy(vc + sp[t] * bytes, vp + t * vs, bytes);
    }
  });
}

// Per row of float32 logits [rows, vocab]: the first index of the largest value (of the first
// NaN, if any, as torch.argmax), that value, and log(sum(exp(x - max))). log_softmax(x)[i] is
// then (x[i] - max) - log_sum, as torch computes it; a row with a NaN gives NaN for both.
std::tuple<at::Tensor, at::Tensor, at::Tensor> argmax_logsumexp(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "argmax_logsumexp: float32 logits [rows, vocab]");
  const auto x = logits.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n > 0, "argmax_logsumexp: an empty vocabulary");
  auto ids = at::empty({rows}, x.options().dtype(at::kLong));
  auto maxes = at::empty({rows}, x.options());
  auto log_sums = at::empty({rows}, x.options());
  const float* xp = x.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* mp = maxes.data_ptr<float>();
  float* lp = log_sums.data_ptr<float>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * n;
      // Pass 1: the largest value, or the first NaN.
      __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      int64_t first_nan = -1;
      for (int64_t c = 0; c < n && first_nan < 0; c += 16) {
        const __mmask16 mask = tail_mask(n - c);
        const __m512 v = _mm512_maskz_loadu_ps(mask, row + c);
        const __mmask16 nans = _mm512_mask_cmp_ps_mask(mask, v, v, _CMP_UNORD_Q);
        if (nans) first_nan = c + __builtin_ctz(nans);
        vmax = _mm512_mask_max_ps(vmax, mask, vmax, v);
      }
      if (first_nan >= 0) {
        ip[r] = first_nan;
        mp[r] = lp[r] = nan;
        continue;
      }
      const float m = _mm512_reduce_max_ps(vmax);
      // Pass 2: sum(exp(x - m)) and the first index holding m.
      const __m512 mv = _mm512_set1_ps(m);
      __m512 sum = _mm512_setzero_ps();
      int64_t first = -1;
      for (int64_t c = 0; c < n; c += 16) {
        const __mmask16 mask = tail_mask(n - c);
        const __m512 v = _mm512_maskz_loadu_ps(mask, row + c);
        if (first < 0) {
          const __mmask16 hit = _mm512_mask_cmp_ps_mask(mask, v, mv, _CMP_EQ_OQ);
          if (hit) first = c + __builtin_ctz(hit);
        }
        sum = _mm512_mask_add_ps(sum, mask, sum, exp16(_mm512_sub_ps(v, mv)));
      }
      ip[r] = first < 0 ? 0 : first;  // all -inf: torch.argmax gives 0 too
      mp[r] = m;
      lp[r] = std::log(_mm512_reduce_add_ps(sum));
    }
  });
  return {ids, maxes, log_sums};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tgi_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos_sin, Tensor positions) -> ()");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.impl("add_rms_norm_", c10::DispatchKey::CPU, &add_rms_norm_);
  m.impl("silu_and_mul", c10::DispatchKey::CPU, &silu_and_mul);
  m.def("store_kv_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");
  m.def("argmax_logsumexp(Tensor logits) -> (Tensor, Tensor, Tensor)");
  m.impl("rotary_", c10::DispatchKey::CPU, &rotary_);
  m.impl("store_kv_", c10::DispatchKey::CPU, &store_kv_);
  m.impl("argmax_logsumexp", c10::DispatchKey::CPU, &argmax_logsumexp);
}
