"""The waiting queue and the choice of the next batch to prefill.

Upstream: `infer.py` appends one `Entry` per validated request.
Downstream: `batcher.py` calls `next_batch(...)` and sends the returned entries, with their
allocated `block_ids` and `cache_len`, to the shards in a Prefill. Pure and synchronous: the
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
    # Prompt tokens whose k/v are in the first blocks of `block_ids` before its next prefill:
    # from the prefix cache, then from earlier chunks of a chunked prefill.
    cache_len: int = 0
    # Of those, the tokens the prefix cache gave (for usage and metrics).
    cache_hit: int = 0
    # Chunked prefill: the prompt tokens after `cache_len` its next prefill computes, when that
    # is not all of them (0: all). An entry between chunks waits at the queue's front with its
    # blocks.
    chunk_len: int = 0
    # The prefix keys of the prompt's full blocks (`BlockAllocator.block_keys`), set by the
    # queue when prefix caching is on.
    prompt_keys: list[bytes] | None = None
    # Set by the caller when the client went away; the queue then drops the entry.
    cancelled: bool = False
    # Opaque to the queue: where the caller routes this request's events.
    sink: object = None

    @property
    def between_chunks(self) -> bool:
        """Of a queued entry: it holds its blocks, its prefill part done."""
        return self.block_ids is not None


class Queue:
    """FIFO of waiting entries; `next_batch` takes from the front, never skips an entry."""

    def __init__(self, allocator: BlockAllocator, prefix_caching: bool = False,
                 prefill_logprobs: bool = False, chunking: bool = False) -> None:
        self.allocator = allocator
        # Prefix caching: a request starts from the cached blocks of its prompt's prefix.
        # Chunking: the prompt that does not fit what is left of the prefill budget is cut.
        # Neither applies to a request for its prompt's logprobs (`decoder_input_details`
        # where `prefill_logprobs`, i.e. --enable-prefill-logprobs): one whole prefill gives them.
        self.prefix_caching = prefix_caching
        self.prefill_logprobs = prefill_logprobs
        self.chunking = chunking
        self._entries: deque[Entry] = deque()
        # Cancelled entries dropped so far (TGI's `tgi_request_failure{err="dropped"}`).
        self.num_dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> None:
        self._entries.append(entry)

    def push_front(self, entry: Entry) -> None:
        """`entry` between the chunks of its prefill: it leads the next batch."""
        self._entries.appendleft(entry)

    def front_is_chunked(self) -> bool:
        """Whether the front entry is between the chunks of its prefill."""
        return bool(self._entries) and self._entries[0].between_chunks

    def held_blocks(self) -> set[int]:
        """The blocks waiting entries hold (those between the chunks of their prefill)."""
        return {b for entry in self._entries if entry.between_chunks for b in entry.block_ids}

    def remove_cancelled(self) -> list[Entry]:
        """Drop every cancelled entry now (not only those `next_batch` reaches)."""
        cancelled = [entry for entry in self._entries if entry.cancelled]
        if cancelled:
            self._entries = deque(entry for entry in self._entries if not entry.cancelled)
            for entry in cancelled:
                self._drop(entry)
        return cancelled

    def _drop(self, entry: Entry) -> None:
        self.num_dropped += 1
        if entry.between_chunks:
            self.allocator.free(entry.block_ids)
            entry.block_ids = None

    def next_batch(
        self,
        min_size: int | None,
        max_size: int | None,
        prefill_token_budget: int,
        token_budget: int,
    ) -> list[Entry] | None:
        """Take entries from the front while they fit; None if fewer than `min_size` fit.

        Each entry costs its prompt tokens not in the prefix cache of `prefill_token_budget`
        (rounded up to a multiple of the block size, as TGI does) and `num_prompt_tokens +
        max_new_tokens` of `token_budget`, and needs blocks for that many tokens. The first
        entry that does not fit stops the batch and stays at the front; with `chunking`, one
        whose prompt exceeds what is left of the prefill budget takes it all, in whole blocks,
        as a chunk (`chunk_len`), and ends the batch. Taken entries get `block_ids` and
        `cache_len`; an entry between chunks keeps its blocks.
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
        computing: set[bytes] = set()  # the prompt blocks this batch's prefill will compute
        block_size = self.allocator.block_size
        while self._entries and (max_size is None or len(batch) < max_size):
            entry = self._entries.popleft()
            if entry.cancelled:
                self._drop(entry)
                continue
            request = entry.request
            continuing = entry.between_chunks  # its prefill's next chunk
            cached: list[bytes] = []
            if not continuing:
                usable = self._usable_keys(entry)
                cached = usable[:self.allocator.match(usable)]
                if len(cached) < len(usable) and usable[len(cached)] in computing:
                    # NOTE: its prompt continues one this batch computes: in the next prefill,
                    # those blocks are cached and it computes only the rest (several requests
                    # arriving at once with one system prompt compute it once).
                    self._entries.appendleft(entry)
                    break
            done = entry.cache_len if continuing else len(cached) * block_size
            remaining = request.num_prompt_tokens - done
            chunk = 0
            if num_prefill_tokens + remaining > prefill_token_budget:
                if self.chunking and not self._wants_prompt_logprobs(entry):
                    chunk = (prefill_token_budget - num_prefill_tokens) // block_size * block_size
                if chunk <= 0:
                    self._entries.appendleft(entry)
                    break
            num_tokens += request.max_num_tokens
            if num_tokens > token_budget:
                self._entries.appendleft(entry)
                break
            if not continuing:
                block_ids = self.allocator.allocate(request.max_num_tokens, cached)
                if block_ids is None:
                    self._entries.appendleft(entry)
                    break
                entry.block_ids = block_ids
                entry.cache_len = entry.cache_hit = done
            entry.chunk_len = chunk
            num_prefill_tokens += chunk or remaining
            batch.append(entry)
            computing.update(entry.prompt_keys or ())
            if chunk:
                break  # the prefill budget is spent
        return batch

    def _wants_prompt_logprobs(self, entry: Entry) -> bool:
        return self.prefill_logprobs and entry.request.decoder_input_details

    def _usable_keys(self, entry: Entry) -> list[bytes]:
        """The keys of the prompt blocks `entry`'s prefill could start from if cached."""
        if not self.prefix_caching:
            return []
        request = entry.request
        if entry.prompt_keys is None:
            entry.prompt_keys = self.allocator.block_keys(request.input_ids,
                                                          request.num_prompt_tokens)
        if self._wants_prompt_logprobs(entry):
            return []
        # NOTE: never the block of the prompt's last token, whose logits the prefill needs
        # (TGI: "if the whole prompt is cached, prefix_len is reduced by 1"); so a request never
        # writes into a block it shares.
        return entry.prompt_keys[:(request.num_prompt_tokens - 1) // self.allocator.block_size]

    def _roll_back(self, batch: list[Entry]) -> None:
        """Put the batch's entries back at the front, in order, the blocks allocated for them
        freed (an entry between chunks keeps its own)."""
        for entry in reversed(batch):
            assert entry.block_ids is not None
            entry.chunk_len = 0
            if entry.cache_len == entry.cache_hit:  # allocated by this batch
                self.allocator.free(entry.block_ids)
                entry.block_ids = None
                entry.cache_len = entry.cache_hit = 0
            self._entries.appendleft(entry)
