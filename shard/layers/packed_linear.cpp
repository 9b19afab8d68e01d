// y[m, n] = x[m, k] @ w[n, k]^T (+ bias) over a copy of w packed once for AVX-512, any m.
//
// Built at shard start-up by cpu_kernels.py (torch.utils.cpp_extension, -march=native) and
// called as torch.ops.tgi_cpu.packed_linear; `cpu_kernels.pack_linear_weight` makes the packed
// copy, which replaces the dense weight and oneDNN's (benchmarks/NOTES.md 25).
//
// Layout: w's rows in blocks of 16 output features (the last one padded with zeros); within a
// block, for each step along k, the 16 features side by side, so one 64-byte load holds every
// weight one step needs:
//   float32  [n / 16][k][16]          one k per step, FMA;
//   bfloat16 [n / 16][k / 2][16][2]   two k per step (vdpbf16ps's pairs), k padded to even.
// A tile is NB blocks x up to 8 rows of x: 8 x NB float32 accumulators in registers; each
// step loads NB weight vectors and broadcasts one x element (pair) per row, so each weight
// byte is read from memory once per 256 rows and each broadcast feeds NB products. The
// rows are walked in chunks of 8 under one tile, whose weights (NB x 16 x k) stay in L2 for
// all of them; past 8 rows the chunks also prefetch the next tile's weights into L2, so no
// chunk waits on memory (NOTES 28). Measured against oneDNN's packed kernels on the linear
// shapes of a 1024-wide llama: 1.3-2x at 1-8 rows, 1.05-1.15x at 16-64, level at 4096
// (NOTES 25, before the prefetch).
// Both dtypes round once to the output dtype, after the bias, as oneDNN does.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "parallel.h"
#include "simd.h"

#include <algorithm>
#include <type_traits>

namespace {

constexpr int kBlock = 16;       // output features per block: one float32 vector
static_assert(kBlock == 16, "a block's last vector is masked with tgi_simd::tail_mask");
constexpr int kChunkRows = 8;    // rows of x per pass over a tile (8 x 2 accumulators)
constexpr int64_t kRowBlock = 256;  // rows per walk over the thread's tiles: x's chunk stays in L2

template <typename T>
constexpr int64_t kPerStep = std::is_same_v<T, float> ? 1 : 2;  // k per packed step

inline void store(float* y, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(y, mask, v); }
// Round to nearest even, as c10::BFloat16's constructor.
inline void store(c10::BFloat16* y, __m512 v, __mmask16 mask) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_mask_storeu_epi16(y, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

inline __m512 load(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load(const c10::BFloat16* p, __mmask16 mask) {
  const __m256i raw = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Lines of the next tile's weights brought into L2 while this tile computes: one every
// `every` steps, from `next` on, `lines` in all.
struct Prefetch {
  const char* next = nullptr;
  int64_t lines = 0, every = 1, countdown = 1;
  inline void step() {
    if (--countdown == 0) {
      countdown = every;
      if (lines > 0) {
        _mm_prefetch(next, _MM_HINT_T1);
        next += 64;
        --lines;
      }
    }
  }
};

// acc[i][b] = x row i . the 16 features of block b, over all `steps` packed steps.
template <int M, int NB>
inline void products(const float* x, int64_t steps, const float* w, int64_t block_stride,
                     __m512 (&acc)[M][NB], Prefetch pf) {
  for (int64_t p = 0; p < steps; ++p) {
    pf.step();
    __m512 wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_ps(w + b * block_stride + p * kBlock);
    for (int i = 0; i < M; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * steps + p]);
      for (int b = 0; b < NB; ++b) acc[i][b] = _mm512_fmadd_ps(xv, wv[b], acc[i][b]);
    }
  }
}

template <int M, int NB>
inline void products(const c10::BFloat16* x, int64_t steps, const c10::BFloat16* w,
                     int64_t block_stride, __m512 (&acc)[M][NB], Prefetch pf) {
  const auto* pairs = reinterpret_cast<const int32_t*>(x);  // x[i][2p], x[i][2p + 1]
  for (int64_t p = 0; p < steps; ++p) {
    pf.step();
    __m512bh wv[NB];
    for (int b = 0; b < NB; ++b)
      wv[b] = (__m512bh)_mm512_loadu_si512(w + b * block_stride + p * 2 * kBlock);
    for (int i = 0; i < M; ++i) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pairs[i * steps + p]);
      for (int b = 0; b < NB; ++b) acc[i][b] = _mm512_dpbf16_ps(acc[i][b], xv, wv[b]);
    }
  }
}

// Rows [0, M) of x against blocks [block, block + NB) of w; w points at `block`.
template <typename T, int M, int NB>
inline void chunk(const T* x, const T* w, const T* bias, T* y, int64_t steps, int64_t n,
                  int64_t block, Prefetch pf) {
  const int64_t block_stride = steps * kPerStep<T> * kBlock;
  __m512 acc[M][NB];
  for (int i = 0; i < M; ++i)
    for (int b = 0; b < NB; ++b) acc[i][b] = _mm512_setzero_ps();
  products<M, NB>(x, steps, w, block_stride, acc, pf);
  for (int b = 0; b < NB; ++b) {
    const int64_t j = (block + b) * kBlock;
    const __mmask16 mask = tgi_simd::tail_mask(n - j);
    const __m512 bv = bias ? load(bias + j, mask) : _mm512_setzero_ps();
    for (int i = 0; i < M; ++i) store(y + i * n + j, _mm512_add_ps(acc[i][b], bv), mask);
  }
}

// Every row of x against blocks [block, block + NB), in chunks of up to kChunkRows rows.
template <typename T, int NB>
void tile(const T* x, const T* w, const T* bias, T* y, int64_t m, int64_t steps, int64_t n,
          int64_t block, const T* w_end) {
  const int64_t k = steps * kPerStep<T>;
  const T* wb = w + block * steps * kPerStep<T> * kBlock;
  // NOTE: past one chunk of rows, the chunks share out the prefetch of the next tile's weights
  // (NB * steps lines, right after this tile's), spread evenly over their steps, so the next
  // tile's first chunk finds them in L2 rather than waiting on memory. At one chunk (up to 8
  // rows) the step is memory-bound anyway, and prefetching there did not pay (NOTES 27, 31).
  const int64_t chunks = (m + kChunkRows - 1) / kChunkRows;
  const char* next = reinterpret_cast<const char*>(wb + NB * steps * kPerStep<T> * kBlock);
  const int64_t next_lines = chunks > 1 ? std::max<int64_t>(0, std::min<int64_t>(NB * steps,
      (reinterpret_cast<const char*>(w_end) - next) / 64)) : 0;
  const int64_t per_chunk = (next_lines + chunks - 1) / chunks;
  for (int64_t r = 0; r < m; r += kChunkRows) {
    const T* xr = x + r * k;
    T* yr = y + r * n;
    // This chunk's share: at most `steps` lines (NB <= 2 blocks over at least 2 chunks), so
    // one line every steps / per_chunk steps.
    const int64_t first = (r / kChunkRows) * per_chunk;
    Prefetch pf{next + first * 64, std::max<int64_t>(0, std::min(per_chunk, next_lines - first)),
                per_chunk > 0 ? std::max<int64_t>(1, steps / per_chunk) : 1, 1};
    switch (std::min<int64_t>(kChunkRows, m - r)) {
#define CHUNK(M) \
  case M: chunk<T, M, NB>(xr, wb, bias, yr, steps, n, block, pf); break;
      CHUNK(1) CHUNK(2) CHUNK(3) CHUNK(4) CHUNK(5) CHUNK(6) CHUNK(7) CHUNK(8)
#undef CHUNK
    }
  }
}

// NB blocks per tile: 4 at up to 4 rows (16 accumulators, 4 weight streams), else 2.
template <typename T, int NB>
void run(const T* x, const T* w, const T* bias, T* y, int64_t m, int64_t steps, int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock, tiles = blocks / NB;
  const int64_t k = steps * kPerStep<T>;
  const T* w_end = w + blocks * steps * kPerStep<T> * kBlock;
  // NOTE: an item is one tile over one block of rows, row blocks outermost, so a run of items
  // walks consecutive tiles (each prefetching the next) under one block of x held in L2. The
  // blocks past the last whole tile go with the row block's last tile.
  const int64_t row_blocks = (m + kRowBlock - 1) / kRowBlock;
  const int64_t per_block = std::max<int64_t>(tiles, 1);
  auto items = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i / per_block * kRowBlock, t = i % per_block;
      const int64_t rows = std::min(kRowBlock, m - r0);
      const T* xr = x + r0 * k;
      T* yr = y + r0 * n;
      if (tiles > 0) tile<T, NB>(xr, w, bias, yr, rows, steps, n, t * NB, w_end);
      if (tiles == 0 || t == tiles - 1)
        for (int64_t b = tiles * NB; b < blocks; ++b)
          tile<T, 1>(xr, w, bias, yr, rows, steps, n, b, w_end);
    }
  };
  // NOTE: grain 1: a qkv weight is 24 tiles at 1-4 rows, which every thread must share.
  tgi_parallel::guided_for(row_blocks * per_block, 1, items);
}

template <typename T>
void dispatch(const T* x, const T* w, const T* bias, T* y, int64_t m, int64_t steps, int64_t n) {
  if (m <= 4) return run<T, 4>(x, w, bias, y, m, steps, n);
  run<T, 2>(x, w, bias, y, m, steps, n);
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed,
                         const c10::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == packed.scalar_type(), "x [m, k] of w's dtype");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "float32 or bfloat16 only");
  TORCH_CHECK(packed.is_contiguous() && packed.dim() == (bf16 ? 4 : 3) &&
                  packed.size(0) == (n + kBlock - 1) / kBlock && packed.size(2) == kBlock,
              "w is not packed for ", n, " output features");
  const int64_t m = x.size(0), steps = packed.size(1);
  TORCH_CHECK(x.size(1) == steps * (bf16 ? 2 : 1), "x has ", x.size(1), " features, w ",
              steps * (bf16 ? 2 : 1));
  TORCH_CHECK(!bias.has_value() || (bias->numel() == n && bias->scalar_type() == x.scalar_type()),
              "bias must be [n] of x's dtype");
  const auto xc = x.contiguous();
  const auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  if (bf16) {
    using B = c10::BFloat16;
    dispatch<B>(xc.data_ptr<B>(), packed.data_ptr<B>(), bc.defined() ? bc.data_ptr<B>() : nullptr,
                y.data_ptr<B>(), m, steps, n);
  } else {
    dispatch<float>(xc.data_ptr<float>(), packed.data_ptr<float>(),
                    bc.defined() ? bc.data_ptr<float>() : nullptr, y.data_ptr<float>(), m, steps,
                    n);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(tgi_cpu, m) {
  m.def("packed_linear(Tensor x, Tensor w, Tensor? bias, int n) -> Tensor");
  m.impl("packed_linear", c10::DispatchKey::CPU, &packed_linear);
}
