"""The shard's CPU kernels (small_batch_linear.cpp, decode_attention.cpp, fused_ops.cpp): built
once per machine, then loaded.

Upstream: `linear.py` routes a linear layer with at most `MAX_ROWS` token rows to
`small_batch_linear` when `available(dtype)` (larger batches go to oneDNN); `attention.py`
runs decode steps through `decode_attention`; `norm.py`, `activation.py` and `rotary.py` run
their elementwise work through `fused_ops.cpp` when `fused(x)`. The first shard on a machine compiles them with
torch.utils.cpp_extension (gcc and ninja, ~15 s on 2 cores; later starts load the cached
build). Without a compiler or AVX-512 the shard logs one warning and uses the torch paths.
"""

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(f)
           for f in ("small_batch_linear.cpp", "decode_attention.cpp", "fused_ops.cpp")]
# NOTE: measured crossover with oneDNN's packed kernels (benchmarks/NOTES.md).
MAX_ROWS = 2


_disabled = False


def disable() -> None:
    """`--disable-custom-kernels`: `available()` is False from now on (call before loading)."""
    global _disabled
    _disabled = True


@functools.cache
def _load() -> bool:
    if not torch.cpu._is_avx512_supported():
        return False
    try:
        from torch.utils.cpp_extension import load

        # NOTE: -march=native: built on the machine it runs on. -fopenmp makes at::parallel_for
        # use the libgomp.so.1 torch has already loaded (same soname), so one thread pool.
        # -ffp-contract=off: a multiply then an add round twice, as in torch's eager ops
        # (fused_ops.cpp matches them); the kernels' FMAs are explicit.
        load(name="tgi_cpu_kernels", sources=[str(p) for p in SOURCES],
             extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
             extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 -- any build failure falls back to oneDNN
        logger.warning("CPU kernels not built (%s); oneDNN and SDPA serve every batch",
                       str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    return True


def available(dtype: torch.dtype) -> bool:
    """Whether the kernels run `dtype` natively on this CPU (building them on first use)."""
    if _disabled or (dtype == torch.bfloat16 and not torch.cpu._is_avx512_bf16_supported()):
        return False
    return dtype in (torch.float32, torch.bfloat16) and _load()


def fused(x: torch.Tensor, multiple: int = 16) -> bool:
    """Whether fused_ops.cpp takes `x`: a CPU tensor of a dtype the kernels run, whose last
    dimension is a multiple of `multiple`."""
    return x.device.type == "cpu" and x.shape[-1] % multiple == 0 and available(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.tgi_cpu.rms_norm(x, weight, eps)


def add_rms_norm_(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> None:
    """residual += x, then x = rms_norm(residual), both in place."""
    torch.ops.tgi_cpu.add_rms_norm_(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.tgi_cpu.silu_and_mul(x)


def rotary_(q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
            positions: torch.Tensor) -> None:
    """Neox rotary of q [tokens, heads, D] and k [tokens, kv_heads, D] in place; cos_sin
    [positions, D] float32 (cos | sin)."""
    torch.ops.tgi_cpu.rotary_(q, k, cos_sin, positions)


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """x [m <= 8, k] @ weight [n, k].T (+ bias) -> [m, n], in x's dtype."""
    return torch.ops.tgi_cpu.small_batch_linear(x, weight, bias)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     sliding_window: int | None) -> torch.Tensor:
    """q [batch, heads, D] (one token per sequence, the last of its context) over the paged
    cache [num_blocks, block_size, kv_heads, D] -> [batch, heads, D]."""
    return torch.ops.tgi_cpu.decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                              scale, sliding_window or 0)
