"""The machine's own ceilings, measured in the same run: the cores' multiply-add peak, matmul
GFLOP/s and memory bandwidth.

Upstream: `compare.py`. Every throughput of the report can then be read as a share of these:
a decode step at batch b reads every weight once (bandwidth-bound at small b) and does
2 x params FLOPs per token (compute-bound at large b).

NOTE: the matmul libraries are no roof. On the AMD EPYC (Zen 5) this was written on, MKL
(`F.linear`) reaches 165-185 float32 GFLOP/s where the cores issue 440-500 (two 512-bit FMAs
a cycle each), and the shard's own kernel 400-460 (benchmarks/NOTES.md 28). So the report's shares
are of the multiply-add peak, measured by a loop of independent FMAs, where it builds.
"""

import ctypes
import logging
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tgi_server.shard.layers import cpu_kernels
from tgi_server.shard.layers.linear import onednn_pack, onednn_packable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roof:
    threads: int
    # (dtype, m) -> GFLOP/s of [m, k] @ [k, n] with the model's k and n
    matmul_gflops: dict[str, float]
    bandwidth_gb_s: float  # reading a 1 GiB tensor
    copy_gb_s: float = float("nan")  # copying it: bytes read + bytes written per second
    # dtype -> GFLOP/s of independent 512-bit multiply-adds on every thread: the cores' peak
    fma_gflops: dict[str, float] = field(default_factory=dict)

    def peak_gflops(self, dtype: str) -> float:
        """The cores' multiply-add peak where measured, else the fastest matmul."""
        if dtype in self.fma_gflops:
            return self.fma_gflops[dtype]
        return max((v for k, v in self.matmul_gflops.items() if k.startswith(dtype + " ")),
                   default=float("nan"))


def _best_time(fn, repeats: int, min_time_s: float = 0.3) -> float:
    fn()  # warmup (and oneDNN/MKL kernel selection)
    best, start, n = float("inf"), time.perf_counter(), 0
    while n < repeats or time.perf_counter() - start < min_time_s:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    """x [m, k] @ w.T with w [n, k]: the fastest of nn.Linear's kernel, oneDNN on a weight
    packed once and the shard's packed kernel, so the figure is the best this build reaches."""
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype)
    seconds = _best_time(lambda: torch.nn.functional.linear(x, w), repeats=5)
    if onednn_packable(w):
        packed = onednn_pack(w)
        onednn = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        seconds = min(seconds, _best_time(onednn, repeats=5))
    if cpu_kernels.available(dtype):
        ours = cpu_kernels.pack_linear_weight(w)
        seconds = min(seconds, _best_time(lambda: cpu_kernels.packed_linear(x, ours, None), 5))
    return 2 * m * k * n / seconds / 1e9


_FMA_SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
// 12 independent accumulators in registers (more than FMA latency x ports) per thread; `b`
// comes from the caller so nothing folds. Returns seconds for `iters` x 12 instructions, or
// -1 for bfloat16 where this compiler cannot emit vdpbf16ps.
#define TWELVE(op) op(a0) op(a1) op(a2) op(a3) op(a4) op(a5) op(a6) op(a7) op(a8) op(a9) \
                   op(a10) op(a11)
#define INIT(a) __m512 a = _mm512_set1_ps(b * (float)(seed++));
#define SUM(a) sink += _mm512_reduce_add_ps(a);
#define FMA(a) a = _mm512_fmadd_ps(a, bv, cv);
#define DOT(a) a = _mm512_dpbf16_ps(a, bh, bh);
double fma_loop(int threads, int bf16, long iters, float b) {
#ifndef __AVX512BF16__
  if (bf16) return -1.0;
#endif
  double start = omp_get_wtime();
  float sink = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    int seed = 1;  // distinct starting values: equal chains would be merged into one
    TWELVE(INIT)
    const __m512 bv = _mm512_set1_ps(b), cv = _mm512_set1_ps(1e-3f);
    if (!bf16) {
      for (long it = 0; it < iters; ++it) { TWELVE(FMA) }
    } else {
#ifdef __AVX512BF16__
      const __m512bh bh = _mm512_cvtne2ps_pbh(bv, bv);
      for (long it = 0; it < iters; ++it) { TWELVE(DOT) }
#endif
    }
    TWELVE(SUM)
  }
  return omp_get_wtime() - start + (sink == 1234.5f ? 1e-12 : 0.0);
}
"""


def fma_peak_gflops(threads: int, dtypes: tuple[str, ...]) -> dict[str, float]:
    """dtype -> GFLOP/s of 512-bit multiply-adds on `threads` threads (float32: FMA, 32 FLOP an
    instruction; bfloat16: vdpbf16ps, 64). Empty without a C compiler or AVX-512."""
    if not torch.cpu._is_avx512_supported():
        return {}
    wanted = [d for d in dtypes if d == "float32"
              or (d == "bfloat16" and torch.cpu._is_avx512_bf16_supported())]
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp, "fma.c"), Path(tmp, "fma.so")
        src.write_text(_FMA_SOURCE)
        try:
            subprocess.run(["cc", "-O2", "-march=native", "-fopenmp", "-shared", "-fPIC",
                            str(src), "-o", str(lib)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            logger.warning("no multiply-add peak: the loop did not build (%s)", e)
            return {}
        loop = ctypes.CDLL(str(lib)).fma_loop
        loop.restype = ctypes.c_double
        loop.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_float]
        iters, peaks = 20_000_000, {}
        for name in wanted:
            flop = 12 * 16 * 2 * (2 if name == "bfloat16" else 1) * iters * threads
            seconds = min(loop(threads, int(name == "bfloat16"), iters, 1.0001) for _ in range(3))
            if seconds > 0:
                peaks[name] = flop / seconds / 1e9
        return peaks


def bandwidth_gb_s(num_bytes: int = 1 << 30) -> tuple[float, float]:
    """(read, copy) GB/s over `num_bytes`: a sum reads them (a decode step mostly reads
    weights); a copy reads and writes them (counted twice)."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    read = _best_time(lambda: src.sum(), repeats=3)
    dst = torch.empty_like(src)
    copy = _best_time(lambda: dst.copy_(src), repeats=3)
    return num_bytes / read / 1e9, 2 * num_bytes / copy / 1e9


def measure(hidden: int, intermediate: int, threads: int,
            dtypes: tuple[str, ...] = ("float32", "bfloat16"),
            batch_sizes: tuple[int, ...] = (1, 32, 256)) -> Roof:
    """Matmuls shaped like the model's MLP up-projection (k = hidden, n = 2 x intermediate)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gflops = {f"{name} m={m}": matmul_gflops(m, hidden, 2 * intermediate, getattr(torch, name))
                  for name in dtypes for m in batch_sizes}
        return Roof(threads, gflops, *bandwidth_gb_s(), fma_peak_gflops(threads, dtypes))
    finally:
        torch.set_num_threads(previous)


def describe(roof: Roof) -> str:
    mm = ", ".join(f"{k}: {v:.0f}" for k, v in roof.matmul_gflops.items())
    fma = ", ".join(f"{k}: {v:.0f}" for k, v in roof.fma_gflops.items()) or "not measured"
    return (f"- roofs ({roof.threads} threads): multiply-add peak GFLOP/s {fma}; "
            f"matmul GFLOP/s (best of MKL, oneDNN, the shard's kernel) {mm}; "
            f"memory bandwidth {roof.bandwidth_gb_s:.1f} GB/s read, {roof.copy_gb_s:.1f} GB/s "
            "copied (read + write), over 1 GiB")
