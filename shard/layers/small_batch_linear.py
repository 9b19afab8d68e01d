"""The small-batch linear kernel (small_batch_linear.cpp): built once per machine, then loaded.

Upstream: `linear.py` routes a linear layer with at most `MAX_ROWS` token rows here when
`available(dtype)`; larger batches go to oneDNN. The first shard on a machine compiles the
kernel with torch.utils.cpp_extension (gcc and ninja, ~30 s on 2 cores; later starts load
the cached build). Without a compiler or AVX-512 the shard logs one warning and uses oneDNN
for every batch size.
"""

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cpp")
# NOTE: measured crossover with oneDNN's packed kernels (benchmarks/NOTES.md).
MAX_ROWS = 2


@functools.cache
def _load() -> bool:
    if not torch.cpu._is_avx512_supported():
        return False
    try:
        from torch.utils.cpp_extension import load

        # NOTE: -march=native: built on the machine it runs on. -fopenmp makes at::parallel_for
        # use the libgomp.so.1 torch has already loaded (same soname), so one thread pool.
        load(name="tgi_small_batch_linear", sources=[str(SOURCE)],
             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 -- any build failure falls back to oneDNN
        logger.warning("small-batch linear kernel not built (%s); oneDNN serves every batch",
                       str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    return True


def available(dtype: torch.dtype) -> bool:
    """Whether the kernel runs `dtype` natively on this CPU (building it on first use)."""
    if dtype == torch.bfloat16 and not torch.cpu._is_avx512_bf16_supported():
        return False
    return dtype in (torch.float32, torch.bfloat16) and _load()


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """x [m <= 8, k] @ weight [n, k].T (+ bias) -> [m, n], in x's dtype."""
    return torch.ops.tgi_cpu.small_batch_linear(x, weight, bias)
