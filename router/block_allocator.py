"""KV-cache block allocator: the router is the single owner of the shards' KV blocks.

Upstream: the router sizes it from the shards' `WarmupResponse` (num_blocks, block_size).
Downstream: `queue.py` allocates blocks for each request it batches, starting with the cached
blocks of its prompt's prefix; the batcher registers the blocks a step filled (`cache`) and
frees them when a request finishes. Block ids travel to the shards in `Request.block_ids`;
token `i` of a request lives in slot `block_ids[i // block_size] * block_size + i % block_size`.
Pure: no I/O, no torch.

Prefix caching (TGI v3's radix allocator, vLLM's block hashes): a full block is known by a
key, a digest of its tokens and of the key of the block before it, so one key names the
whole prefix up to the block's end. A request whose prompt starts with cached blocks shares
them (they are counted by reference) and its prefill starts after them. A block nobody
references keeps its k/v and its key; it is reused for other tokens only when no uncached
block is free, least recently released first.
"""

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

# The digest of the (empty) prefix before a sequence's first block.
_ROOT = b""


class BlockAllocator:
    """Block ids in `[0, num_blocks)`: free ones handed out lowest id first, cached ones shared.

    Every block is in exactly one state (checked by `check_integrity`): referenced by running
    requests (`_refs`, with its count), cached and unreferenced (`_evictable`, oldest first),
    or free (`_free_block_ids`). A cached block, referenced or not, has a key (`_key_of`) and
    is what `_block_of` finds for it. Allocation is all or nothing.
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
        self._refs: dict[int, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones and cached ones nobody references."""
        return len(self._free_block_ids) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return len(self._refs)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._key_of)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens (ceil division)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.num_blocks_for(num_tokens) <= self.num_free_blocks

    # ---- prefix keys -------------------------------------------------------------------

    def block_keys(self, token_ids: Sequence[int], num_tokens: int,
                   known: Sequence[bytes] = ()) -> list[bytes]:
        """The keys of the full blocks among the first `num_tokens` of `token_ids`; `known`:
        keys of these tokens' first blocks computed before, which are not computed again."""
        size = self.block_size
        keys = list(known[:num_tokens // size])
        key = keys[-1] if keys else _ROOT
        for start in range(len(keys) * size, num_tokens - size + 1, size):
            tokens = array("I", token_ids[start:start + size]).tobytes()
            key = hashlib.blake2b(key + tokens, digest_size=16).digest()
            keys.append(key)
        return keys

    def match(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, name cached blocks."""
        for i, key in enumerate(keys):
            if key not in self._block_of:
                return i
        return len(keys)

    # ---- allocation --------------------------------------------------------------------

    def allocate(self, num_tokens: int, cached: Sequence[bytes] = ()) -> list[int] | None:
        """Block ids for `num_tokens` tokens, or None when too few are free: first the cached
        blocks named by `cached` (keys `match` found), then fresh ones in ascending order."""
        shared = [self._block_of[key] for key in cached]
        num_fresh = self.num_blocks_for(num_tokens) - len(shared)
        # the shared blocks nobody referenced yet are no longer free once taken
        available = self.num_free_blocks - sum(1 for b in shared if b in self._evictable)
        if num_fresh > available:
            return None
        for block_id in shared:
            self._take(block_id)
        fresh = []
        for _ in range(num_fresh):
            if self._free_block_ids:
                block_id = heapq.heappop(self._free_block_ids)
            else:
                block_id, _ = self._evictable.popitem(last=False)
                del self._block_of[self._key_of.pop(block_id)]
            self._refs[block_id] = 1
            fresh.append(block_id)
        return shared + sorted(fresh)

    def _take(self, block_id: int) -> None:
        if block_id in self._evictable:
            del self._evictable[block_id]
        self._refs[block_id] = self._refs.get(block_id, 0) + 1

    def cache(self, block_ids: Sequence[int], keys: Sequence[bytes]) -> None:
        """Registers `block_ids[i]` under `keys[i]`: its k/v now hold that prefix's block.
        A key already cached in another block (the same prefix computed twice) is skipped."""
        for block_id, key in zip(block_ids, keys):
            if block_id not in self._refs:
                raise ValueError(f"caching block {block_id}, which is not in use")
            if key in self._block_of or block_id in self._key_of:
                continue
            self._block_of[key] = block_id
            self._key_of[block_id] = key

    def forget_cached(self) -> None:
        """Drop every cached prefix: unreferenced cached blocks become free, referenced ones
        plain (after a shard failure, when the shards' KV may be gone)."""
        for block_id in self._evictable:
            heapq.heappush(self._free_block_ids, block_id)
        self._evictable.clear()
        self._block_of.clear()
        self._key_of.clear()

    def free(self, block_ids: Iterable[int]) -> None:
        """Release one reference to each block; freeing a block that is not in use raises.

        A cached block nobody references any more stays cached. Pass a request's blocks in
        order: they are released last first, so a longer prefix is evicted before its start.
        """
        block_ids = list(block_ids)
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"duplicate block ids in free(): {sorted(block_ids)}")
        not_used = [block_id for block_id in block_ids if block_id not in self._refs]
        if not_used:
            raise ValueError(f"double free or unknown block ids: {not_used}")
        for block_id in reversed(block_ids):
            self._refs[block_id] -= 1
            if self._refs[block_id]:
                continue
            del self._refs[block_id]
            if block_id in self._key_of:
                self._evictable[block_id] = None
            else:
                heapq.heappush(self._free_block_ids, block_id)

    def check_integrity(self) -> None:
        """Raise RuntimeError if the block states are inconsistent."""
        free = set(self._free_block_ids)
        if len(free) != len(self._free_block_ids):
            raise RuntimeError("duplicate block ids in the free list")
        used, evictable = set(self._refs), set(self._evictable)
        for a, b, what in ((free, used, "free and used"), (free, evictable, "free and cached"),
                           (used, evictable, "used and cached unreferenced")):
            if a & b:
                raise RuntimeError(f"blocks both {what}: {sorted(a & b)}")
        if free | used | evictable != set(range(self.num_blocks)):
            raise RuntimeError(
                f"free ({len(free)}) + used ({len(used)}) + cached ({len(evictable)}) blocks "
                f"!= total ({self.num_blocks})"
            )
        if any(count < 1 for count in self._refs.values()):
            raise RuntimeError("a used block with no reference")
        if {self._block_of.get(k) for k in self._key_of.values()} != set(self._key_of) or \
                len(self._block_of) != len(self._key_of):
            raise RuntimeError("the cache's keys and blocks disagree")
        if evictable - set(self._key_of) or free & set(self._key_of):
            raise RuntimeError("an unreferenced cached block without a key, or a free one with one")
