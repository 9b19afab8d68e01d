"""KV-cache block allocator: the router is the single owner of the shards' KV blocks.

Upstream: the router sizes it from the shards' `WarmupResponse` (num_blocks, block_size).
Downstream: `queue.py` allocates blocks for each request it batches; the batcher frees them
when a request finishes. Block ids travel to the shards in `Request.block_ids`; token `i`
of a request lives in slot `block_ids[i // block_size] * block_size + i % block_size`.
Pure: no I/O, no torch.
"""

import heapq
from collections.abc import Iterable


class BlockAllocator:
    """A free list of block ids in `[0, num_blocks)`, handed out lowest id first.

    Invariants (checked by `check_integrity`): every id is either free or used, never
    both; `num_free_blocks + num_used_blocks == num_blocks`. Allocation is all or nothing.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A min-heap keeps allocation deterministic: the lowest free ids go first.
        self._free_block_ids: list[int] = list(range(num_blocks))
        self._used_block_ids: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return len(self._used_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens (ceil division)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.num_blocks_for(num_tokens) <= len(self._free_block_ids)

    def allocate(self, num_tokens: int) -> list[int] | None:
        """Block ids (ascending) for `num_tokens` tokens, or None when too few are free."""
        num_needed_blocks = self.num_blocks_for(num_tokens)
        if num_needed_blocks > len(self._free_block_ids):
            return None
        block_ids = [heapq.heappop(self._free_block_ids) for _ in range(num_needed_blocks)]
        self._used_block_ids.update(block_ids)
        return block_ids

    def free(self, block_ids: Iterable[int]) -> None:
        """Return blocks to the free list; freeing a block that is not in use raises."""
        block_ids = list(block_ids)
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"duplicate block ids in free(): {sorted(block_ids)}")
        not_used = [block_id for block_id in block_ids if block_id not in self._used_block_ids]
        if not_used:
            raise ValueError(f"double free or unknown block ids: {not_used}")
        for block_id in block_ids:
            self._used_block_ids.remove(block_id)
            heapq.heappush(self._free_block_ids, block_id)

    def check_integrity(self) -> None:
        """Raise RuntimeError if the free and used sets are inconsistent."""
        free = set(self._free_block_ids)
        if len(free) != len(self._free_block_ids):
            raise RuntimeError("duplicate block ids in the free list")
        if free & self._used_block_ids:
            raise RuntimeError(f"blocks both free and used: {sorted(free & self._used_block_ids)}")
        if free | self._used_block_ids != set(range(self.num_blocks)):
            raise RuntimeError(
                f"free ({len(free)}) + used ({len(self._used_block_ids)}) blocks "
                f"!= total ({self.num_blocks})"
            )
