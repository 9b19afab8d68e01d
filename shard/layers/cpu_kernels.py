"""The shard's CPU kernels (packed_linear.cpp, decode_attention.cpp, fused_ops.cpp,
decode_layer.cpp): built once per machine, then loaded.

Upstream: `linear.py` packs every linear weight with `pack_linear_weight` when
`available(dtype)` and runs the layer through `packed_linear` at every batch size (else
oneDNN); `attention.py` runs decode steps through `decode_attention` and fresh prompts
through `prefill_attention`;
`norm.py`, `activation.py` and `rotary.py` run their elementwise work through `fused_ops.cpp`
when `fused(x)`; `models/llama.py` runs a decode step's layers through `decode_layer`, which
calls those same ops from C++. The first shard on a machine compiles them with
torch.utils.cpp_extension (gcc and ninja, ~15 s on 2 cores; later starts load the cached
build). Without a compiler or AVX-512 the shard logs one warning and uses the torch paths.
"""

import functools
import hashlib
import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(f)
           for f in ("packed_linear.cpp", "decode_attention.cpp", "fused_ops.cpp",
                     "decode_layer.cpp")]
# Every header beside the sources: a new one needs no entry here to trigger rebuilds.
HEADERS = sorted(Path(__file__).parent.glob("*.h"))


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
        # NOTE: torch rebuilds when a source or a flag changes, not a header: the headers'
        # digest goes in as a define so that an edited header rebuilds too.
        headers = hashlib.sha256(b"".join(h.read_bytes() for h in HEADERS)).hexdigest()[:16]
        load(name="tgi_cpu_kernels", sources=[str(p) for p in SOURCES],
             extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off",
                           f"-DTGI_HEADERS_DIGEST={headers}"],
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


def store_kv_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor) -> None:
    """k, v [tokens, kv_heads, D] into slots `slots` [tokens] of the caches (any shape whose
    slots hold kv_heads * D values each, contiguous), in place."""
    torch.ops.tgi_cpu.store_kv_(k_cache, v_cache, k, v, slots)


def argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of float32 `logits` [rows, vocab]: argmax (int64), max and log(sum(exp(x -
    max))), all [rows]; log_softmax(x) = (x - max) - log_sum."""
    return torch.ops.tgi_cpu.argmax_logsumexp(logits)


class PackedWeight(NamedTuple):
    """A linear weight [n, k] in packed_linear.cpp's layout (see there): blocks of 16 output
    features, float32 [n / 16][k][16], bfloat16 [n / 16][k / 2][16][2]; padded with zeros."""

    data: torch.Tensor
    out_features: int


def pack_linear_weight(weight: torch.Tensor, in_place: bool = False) -> PackedWeight:
    """`weight` [n, k] in packed_linear.cpp's layout; `in_place`: in weight's own storage,
    which then holds only the packed copy (no second copy at packing's peak)."""
    n, k = weight.shape
    per_step = 2 if weight.dtype == torch.bfloat16 else 1
    steps = (k + per_step - 1) // per_step
    padding = (0, -k % per_step, 0, -n % 16)
    if any(padding) or not (in_place and weight.is_contiguous()):  # a new tensor
        source = F.pad(weight.detach(), padding) if any(padding) else weight.detach()
        blocks = source.reshape(-1, 16, steps, per_step).transpose(1, 2).contiguous()
    else:
        # NOTE: each block of 16 rows is packed within its own bytes, so a few blocks at a
        # time go through one buffer of at most 1 MiB (a new tensor per chunk left the heap
        # fragmented behind it: measured +16 MiB per 4096-wide layer).
        blocks = weight.detach().view(-1, 16, steps, per_step)
        flat = blocks.view(blocks.shape[0], -1)
        step = max(1, (1 << 20) // flat[0].nbytes)
        buffer = flat.new_empty(step, flat.shape[1])
        for start in range(0, blocks.shape[0], step):
            count = min(step, blocks.shape[0] - start)
            buffer[:count].view(count, steps, 16, per_step).copy_(
                blocks[start:start + count].transpose(1, 2))
            flat[start:start + count].copy_(buffer[:count])
        blocks = flat.view(-1, steps, 16, per_step)
    return PackedWeight(blocks if per_step == 2 else blocks.squeeze(-1), n)


def packed_linear(x: torch.Tensor, weight: PackedWeight,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., k] @ weight.T (+ bias) -> [..., n], in x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, k)
    if weight.data.dim() == 4 and k % 2:
        x = F.pad(x, (0, 1))  # the packed weight's k is padded to pairs
    y = torch.ops.tgi_cpu.packed_linear(x, weight.data, bias, weight.out_features)
    return y.view(*lead, weight.out_features)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     sliding_window: int | None) -> torch.Tensor:
    """q [batch, heads, D] (one token per sequence, the last of its context) over the paged
    cache [num_blocks, block_size, kv_heads, D] -> [batch, heads, D]."""
    return torch.ops.tgi_cpu.decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                              scale, sliding_window or 0)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      context_lens: torch.Tensor, scale: float,
                      sliding_window: int | None) -> torch.Tensor:
    """q [tokens, heads, D], the new tokens of each sequence (cu_seqlens_q), the last ones of
    its context, each attending causally over the paged cache -> [tokens, heads, D]."""
    return torch.ops.tgi_cpu.prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                               context_lens, scale, sliding_window or 0)


def decode_layer(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 *layer) -> torch.Tensor:
    """One decoder layer of a decode step (decode_layer.cpp): hidden [tokens, hidden] -> its
    output; `residual` gets the attention output added in place (at the first layer, pass the
    embeddings as both). `layer`: the static arguments `LlamaDecoderLayer.fused_decode_args`
    gives."""
    return torch.ops.tgi_cpu.decode_layer(hidden, residual, positions, slots, block_tables,
                                          context_lens, *layer)
