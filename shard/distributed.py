"""Tensor-parallel process group of one shard, and the two collectives the layers use.

Upstream: `shard/cli.py` calls `init_distributed` once at startup with the launcher's rank,
world size and rendezvous address. Downstream: `layers/linear.py` (`all_reduce` after
row-parallel matmuls) and `layers/embedding.py` (`all_reduce` of embeddings, `all_gather` of
logits) receive the `ParallelState` and never look at the environment.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits in the tensor-parallel group; `group` is None at world size 1."""

    rank: int = 0
    world_size: int = 1
    group: object | None = None


SINGLE = ParallelState()


def init_distributed(
    rank: int, world_size: int, master_addr: str, master_port: int, device: str
) -> ParallelState:
    """Join the process group (gloo on CPU, nccl on CUDA); world size 1 creates none."""
    if world_size == 1:
        return ParallelState(rank=0, world_size=1, group=None)
    is_cuda = torch.device(device).type == "cuda"
    if is_cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend="nccl" if is_cuda else "gloo",
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
    )
    return ParallelState(rank=rank, world_size=world_size, group=dist.group.WORLD)


def all_reduce(x: torch.Tensor, tp: ParallelState) -> torch.Tensor:
    """Sum `x` over the ranks, in place; a no-op at world size 1."""
    if tp.world_size == 1:
        return x
    dist.all_reduce(x, group=tp.group)
    return x


def all_gather(x: torch.Tensor, tp: ParallelState, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` in rank order; a no-op at world size 1."""
    if tp.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.world_size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


def all_gather_object(obj: object, tp: ParallelState) -> list:
    """Every rank's `obj` (picklable), in rank order; used once at startup, not per step."""
    if tp.world_size == 1:
        return [obj]
    objects: list = [None] * tp.world_size
    dist.all_gather_object(objects, obj, group=tp.group)
    return objects
