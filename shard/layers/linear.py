"""Tensor-parallel linear layers whose parameters load only this rank's slice.

Upstream: `models/llama.py` builds them with a `ParallelState`. Downstream: `weights.py` calls
`param.weight_loader(param, loaded, shard_id)` for every checkpoint tensor, where `loaded` is a
`torch.Tensor` or a lazy safetensors slice (`safe_open(...).get_slice(name)`); the loaders
below read only the rows/columns this rank owns, so no rank ever materializes a full matrix.

Column-parallel layers split the output features (no communication); row-parallel layers
split the input features and all-reduce their partial sums.

On CPU, `pack_linear_weights(model)` (called by the shard once the weights are loaded) reorders
every weight once, and the packed copy replaces the dense one: into the layout of the
shard's own kernel (`cpu_kernels.packed_linear`, every batch size) where it builds, else into
oneDNN's blocked layout (`F.linear` would repack the weight on every call).
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import ParallelState, all_reduce
from . import cpu_kernels

logger = logging.getLogger(__name__)


def loaded_shape(loaded) -> list[int]:
    """Shape of a checkpoint tensor or of a lazy safetensors slice."""
    return list(loaded.shape) if isinstance(loaded, torch.Tensor) else list(loaded.get_shape())


def load_full(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def load_narrow(loaded, dim: int, start: int, length: int) -> torch.Tensor:
    """`loaded.narrow(dim, start, length)`, reading only that range from a lazy slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = [slice(None)] * len(loaded_shape(loaded))
    index[dim] = slice(start, start + length)
    return loaded[tuple(index)]


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    # NOTE: copy_ would silently broadcast a wrong-shaped checkpoint tensor.
    if dst.shape != src.shape:
        raise ValueError(
            f"checkpoint tensor has shape {list(src.shape)}, expected {list(dst.shape)}"
        )
    dst.copy_(src)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the world size ({denominator})")
    return numerator // denominator


def onednn_packable(weight: torch.Tensor) -> bool:
    """Whether this torch build can reorder and multiply `weight` with oneDNN on this CPU."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32 and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] reordered once into oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def pack_module_weight(module: nn.Module, dense_read_elsewhere: bool = False) -> bool:
    """Sets `module.packed_weight` from `module.weight` (once) and frees the dense weight
    unless another reader (`dense_read_elsewhere`: a tied embedding) needs it."""
    weight = module.weight
    if module.packed_weight is not None or weight.device.type != "cpu":
        return False
    if cpu_kernels.available(weight.dtype):
        module.packed_weight = cpu_kernels.pack_linear_weight(weight,
                                                              in_place=not dense_read_elsewhere)
    elif onednn_packable(weight):
        module.packed_weight = onednn_pack(weight)
    else:
        return False
    if not dense_read_elsewhere:
        weight.data = weight.data.new_empty(0)  # the dense weight is no longer read
    return True


def linear(x: torch.Tensor, weight: torch.Tensor,
           packed: torch.Tensor | cpu_kernels.PackedWeight | None,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out], through the packed weight when there is one."""
    if packed is None:
        return F.linear(x, weight, bias)
    if isinstance(packed, cpu_kernels.PackedWeight):
        return cpu_kernels.packed_linear(x, packed, bias)
    # NOTE: the op torch.compile's CPU freezing emits; measured 1.2-3x F.linear's speed at
    # batch 1-64 on AVX-512 (benchmarks/NOTES.md), whose kernels repack the weight every call.
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_linear_weights(model: nn.Module) -> int:
    """Packs the weight of every layer that has a `pack_weight()` (linear layers, LM head);
    returns how many were packed (0 where neither kernel can: other devices, dtypes or builds)."""
    layers = [m for m in model.modules() if hasattr(m, "pack_weight")]
    packed = sum(m.pack_weight() for m in layers)
    kinds = {type(m.packed_weight) for m in layers if m.packed_weight is not None}
    logger.info("packed %d weight matrices for %s", packed,
                "the shard's linear kernel" if cpu_kernels.PackedWeight in kinds else "oneDNN")
    return packed


class LinearBase(nn.Module):
    """y = x @ weight.T + bias with `weight` [output_size_per_rank, input_size_per_rank].

    After `pack_weight()` the weight is in `packed_weight` and `weight` is empty.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: ParallelState) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed_weight: torch.Tensor | cpu_kernels.PackedWeight | None = None

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        raise NotImplementedError

    def pack_weight(self) -> bool:
        return pack_module_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed_weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Splits the output features: rank r owns rows [r * n, (r + 1) * n) of the weight."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: ParallelState) -> None:
        super().__init__(input_size, _divide(output_size, tp.world_size, "output size"), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        rows = param.shape[0]
        copy_checked(param.data, load_narrow(loaded, 0, self.tp.rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices fused along the output (gate_proj | up_proj)."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool, tp: ParallelState
    ) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        world = self.tp.world_size
        rows = self.output_sizes[shard_id] // world
        offset = sum(self.output_sizes[:shard_id]) // world
        src = load_narrow(loaded, 0, self.tp.rank * rows, rows)
        copy_checked(param.data.narrow(0, offset, rows), src)


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj | k_proj | v_proj fused; each rank owns whole heads.

    When the world size exceeds the number of kv heads, each kv head is replicated on
    `world_size // num_kv_heads` consecutive ranks.
    """

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
        tp: ParallelState,
    ) -> None:
        world = tp.world_size
        self.head_dim = head_dim
        self.num_heads_per_rank = _divide(num_heads, world, "number of attention heads")
        if num_kv_heads >= world:
            self.num_kv_heads_per_rank = _divide(num_kv_heads, world, "number of kv heads")
        else:
            _divide(world, num_kv_heads, "world size vs kv heads")
            self.num_kv_heads_per_rank = 1
        self.kv_head_start = tp.rank * num_kv_heads // world
        output_size = (self.num_heads_per_rank + 2 * self.num_kv_heads_per_rank) * head_dim
        super().__init__(hidden_size, output_size * world, bias, tp)

    @property
    def q_size(self) -> int:
        return self.num_heads_per_rank * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads_per_rank * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str) -> None:
        if shard_id == "q":
            rows, offset, start = self.q_size, 0, self.tp.rank * self.q_size
        else:
            rows, start = self.kv_size, self.kv_head_start * self.head_dim
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
        copy_checked(param.data.narrow(0, offset, rows), load_narrow(loaded, 0, start, rows))


class RowParallelLinear(LinearBase):
    """Splits the input features; the partial products are summed over ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: ParallelState) -> None:
        super().__init__(_divide(input_size, tp.world_size, "input size"), output_size, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if param.dim() == 1:  # the bias is whole on every rank
            copy_checked(param.data, load_full(loaded))
            return
        cols = param.shape[1]
        copy_checked(param.data, load_narrow(loaded, 1, self.tp.rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: only rank 0 adds the bias, so the all-reduce counts it once.
        bias = self.bias if self.tp.rank == 0 else None
        return all_reduce(linear(x, self.weight, self.packed_weight, bias), self.tp)
