"""The machine's own ceilings, measured in the same run: matmul GFLOP/s and memory bandwidth.

Upstream: `compare.py`. Every throughput of the report can then be read as a share of these:
a decode step at batch b reads every weight once (bandwidth-bound at small b) and does
2 x params FLOPs per token (compute-bound at large b).
"""

import time
from dataclasses import dataclass

import torch

from tgi_server.shard.layers.linear import onednn_pack, onednn_packable


@dataclass(frozen=True)
class Roof:
    threads: int
    # (dtype, m) -> GFLOP/s of [m, k] @ [k, n] with the model's k and n
    matmul_gflops: dict[str, float]
    bandwidth_gb_s: float  # reading a 1 GiB tensor
    copy_gb_s: float = float("nan")  # copying it: bytes read + bytes written per second

    def peak_gflops(self, dtype: str) -> float:
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
    """x [m, k] @ w.T with w [n, k]: the faster of nn.Linear's kernel and oneDNN on a weight
    packed once (what the shard runs), so the roof is the best this torch build reaches."""
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype)
    seconds = _best_time(lambda: torch.nn.functional.linear(x, w), repeats=5)
    if onednn_packable(w):
        packed = onednn_pack(w)
        onednn = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        seconds = min(seconds, _best_time(onednn, repeats=5))
    return 2 * m * k * n / seconds / 1e9


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
        return Roof(threads, gflops, *bandwidth_gb_s())
    finally:
        torch.set_num_threads(previous)


def describe(roof: Roof) -> str:
    mm = ", ".join(f"{k}: {v:.0f}" for k, v in roof.matmul_gflops.items())
    return (f"- roofs ({roof.threads} threads): matmul GFLOP/s {mm}; "
            f"memory bandwidth {roof.bandwidth_gb_s:.1f} GB/s read, {roof.copy_gb_s:.1f} GB/s "
            "copied (read + write), over 1 GiB")
