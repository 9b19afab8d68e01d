"""The paged KV cache: one tensor for all layers, with per-layer views bound to `Attention`.

Upstream: `model_runner.py` sizes the cache with `kv_cache_bytes_per_block` (after profiling
the memory a forward takes) and calls `allocate_kv_cache` once. Downstream: every `Attention`
module of the model gets `k_cache`/`v_cache` views `[num_blocks, block_size, kv_heads, head_dim]`
into `cache[0, layer]` / `cache[1, layer]`. Block ids come from the router (ARCHITECTURE.md).
"""

import math
import mmap

import torch
from torch import nn

from .attention import Attention


def kv_cache_bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes on this rank: k and v of `block_size` tokens in every layer."""
    per_token = 2 * model.num_layers * model.num_kv_heads_per_rank * model.head_dim
    return per_token * block_size * dtype.itemsize


def allocate_kv_cache(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """Allocates `[2, num_layers, num_blocks, block_size, kv_heads, head_dim]` and binds it."""
    layers = [module for module in model.modules() if isinstance(module, Attention)]
    if len(layers) != model.num_layers:
        raise RuntimeError(f"found {len(layers)} Attention modules, expected {model.num_layers}")
    # NOTE: zeros, not empty: unwritten slots are read (then masked) by the torch path, and
    # garbage NaNs would survive the mask as 0 * NaN.
    shape = (2, len(layers), num_blocks, block_size, model.num_kv_heads_per_rank, model.head_dim)
    cache = _zeros(shape, dtype, torch.device(device))
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]
    return cache


# Below this a memset costs nothing worth avoiding.
_LAZY_ZEROS_BYTES = 64 << 20


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros; on CPU, for a large cache, pages of a fresh anonymous mapping instead.

    The kernel zero-fills those pages on first touch, so a cache sized to most of the RAM
    costs nothing at start-up (torch.zeros wrote all 17.5 GiB of the default CPU cache:
    21 s of a 43 s start) and only the blocks in use become resident.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < _LAZY_ZEROS_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # NOTE: 2 MiB pages where the kernel allows them (transparent_hugepage "madvise" or
        # "always"): a decode step writing into fresh blocks faults once per 2 MiB, not once
        # per 4 KiB (at 32 sequences, ~190 faults a step), and attention's reads of the
        # blocks miss the TLB less (NOTES 33).
        region.madvise(mmap.MADV_HUGEPAGE)
    # NOTE: the tensor's storage holds the mmap object: unmapped when the last view goes.
    pages = torch.frombuffer(region, dtype=torch.uint8)
    return pages.view(dtype).view(shape)
