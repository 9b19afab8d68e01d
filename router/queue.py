"""The waiting queue and the choice of the next batch to prefill.

Upstream: `infer.py` appends one `Entry` per validated request.
Downstream: `batcher.py` calls `next_batch(...)` and sends the returned entries, with their
freshly allocated `block_ids`, to the shards in a Prefill. Pure and synchronous: the
batcher owns the only async loop.
"""

from collections import deque
from dataclasses import dataclass

from .block_allocator import BlockAllocator
from .types import ValidRequest


@dataclass(slots=True)
class Entry:
    """One request waiting for (or running in) a batch."""

    request: ValidRequest
    id: int
    # time.monotonic() when the request was queued (for the queue-duration metric).
    queued_at: float
    # KV blocks for num_prompt_tokens + max_new_tokens tokens, set by `next_batch`.
    block_ids: list[int] | None = None
    # Set by the caller when the client went away; the queue then drops the entry.
    cancelled: bool = False
    # Opaque to the queue: where the caller routes this request's events.
    sink: object = None


class Queue:
    """FIFO of waiting entries; `next_batch` takes from the front, never skips an entry."""

    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self._entries: deque[Entry] = deque()
        # Cancelled entries dropped so far (TGI's `tgi_request_failure{err="dropped"}`).
        self.num_dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> None:
        self._entries.append(entry)

    def remove_cancelled(self) -> list[Entry]:
        """Drop every cancelled entry now (not only those `next_batch` reaches)."""
        cancelled = [entry for entry in self._entries if entry.cancelled]
        if cancelled:
            self._entries = deque(entry for entry in self._entries if not entry.cancelled)
            self.num_dropped += len(cancelled)
        return cancelled

    def next_batch(
        self,
        min_size: int | None,
        max_size: int | None,
        prefill_token_budget: int,
        token_budget: int,
    ) -> list[Entry] | None:
        """Take entries from the front while they fit; None if fewer than `min_size` fit.

        Each entry costs `num_prompt_tokens` of `prefill_token_budget` (rounded up to a
        multiple of the block size, as TGI does) and `num_prompt_tokens + max_new_tokens`
        of `token_budget`, and needs blocks for that many tokens. The first entry that does
        not fit stops the batch and stays at the front. Taken entries get `block_ids`.
        """
        if not self._entries:
            return None
        if min_size is not None and len(self._entries) < min_size:
            return None
        block_size = self.allocator.block_size
        prefill_token_budget = -(-prefill_token_budget // block_size) * block_size
        batch = self._take(max_size, prefill_token_budget, token_budget)
        if not batch:
            return None
        if min_size is not None and len(batch) < min_size:
            self._roll_back(batch)
            return None
        return batch

    def _take(
        self, max_size: int | None, prefill_token_budget: int, token_budget: int
    ) -> list[Entry]:
        batch: list[Entry] = []
        num_prefill_tokens = 0
        num_tokens = 0
        while self._entries and (max_size is None or len(batch) < max_size):
            entry = self._entries.popleft()
            if entry.cancelled:
                self.num_dropped += 1
                continue
            request = entry.request
            num_prefill_tokens += request.num_prompt_tokens
            num_tokens += request.max_num_tokens
            if num_prefill_tokens > prefill_token_budget or num_tokens > token_budget:
                self._entries.appendleft(entry)
                break
            block_ids = self.allocator.allocate(request.max_num_tokens)
            if block_ids is None:
                self._entries.appendleft(entry)
                break
            entry.block_ids = block_ids
            batch.append(entry)
        return batch

    def _roll_back(self, batch: list[Entry]) -> None:
        """Free the batch's blocks and put its entries back at the front, in order."""
        for entry in reversed(batch):
            assert entry.block_ids is not None
            self.allocator.free(entry.block_ids)
            entry.block_ids = None
            self._entries.appendleft(entry)
