// Work sharing for the shard's CPU kernels (packed_linear.cpp, decode_attention.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace tgi_parallel {

// f(begin, end) over [0, n) on torch's intra-op threads, each thread taking the next chunk
// when it finishes one: chunks of (what is left) / (2 x threads), at least `grain`, so the
// first are long runs over consecutive items and the last are short.
//
// NOTE: not at::parallel_for's static split into one range per thread: on this machine's two
// cores the router, the shard's event loop and the load generator take one core or the other
// for a millisecond at a time, and a static split makes the op wait for the thread that lost
// its core (benchmarks/NOTES.md 49). Here the other thread takes over its remaining chunks.
template <typename F>
void guided_for(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (threads <= 1 || at::in_parallel_region()) return f(0, n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t seen = next.load(std::memory_order_relaxed);
      if (seen >= n) return;
      const int64_t size = std::max(grain, (n - seen) / (2 * threads));
      const int64_t begin = next.fetch_add(size, std::memory_order_relaxed);
      if (begin >= n) return;
      f(begin, std::min(n, begin + size));
    }
  });
}

}  // namespace tgi_parallel
