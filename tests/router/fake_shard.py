"""`FakeShardClient`: a pure-Python stand-in for `ShardedClient` with the shard's semantics.

Used by `test_batcher.py` and `test_app.py` in place of gRPC shards. It keeps a
`dict[batch_id, FakeBatch]` as `shard/server.py` does: Prefill caches the new batch, Decode
pops and concatenates the given handles (the first id survives), FilterBatch keeps the given
requests, ClearCache drops one batch or all. A Decode with `lookahead` in which no request
finished leaves its batch `ahead`: the fake generates that step's tokens when the next Decode
collects them (the same tokens the real shard computes early), and a Decode mixing ahead and
other batches is rejected as the real shard rejects it. A request finishes on eos (EOS_TOKEN,
unless `ignore_eos_token`) or `max_new_tokens` (LENGTH), stays in its batch until filtered,
and the response carries no batch once every request of it finished.

The next token is `(last_token * 31 + 7) % vocab_size` (`next_token`), so tests can predict
every generation. With `tokens_per_step` > 1 a decode step yields that many tokens per request
(fewer when it finishes), as a speculating shard whose drafts were accepted. Every call is recorded in `calls`; anything the real shard would reject or
silently corrupt (decoding a finished request, an unknown batch id, overlapping or too few KV
blocks...) is appended to `violations` and raised as a `ShardError`.
"""

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from tgi_server.router.client import (
    BatchRequest,
    CachedBatch,
    Generation,
    ShardError,
    ShardInfo,
    StepResult,
)
from tgi_server.router.types import FinishReason

VOCAB_SIZE = 512
EOS_TOKEN_ID = 2  # the eos id of the tiny test tokenizer (tgi-make-model)


def next_token(last_token: int, vocab_size: int = VOCAB_SIZE) -> int:
    return (last_token * 31 + 7) % vocab_size


def chain(last_token: int, n: int, vocab_size: int = VOCAB_SIZE) -> list[int]:
    """The n tokens the fake generates after a prompt ending with `last_token`."""
    tokens = []
    for _ in range(n):
        last_token = next_token(last_token, vocab_size)
        tokens.append(last_token)
    return tokens


def logprob(token_id: int) -> float:
    return -0.1 * (1 + token_id % 5)


@dataclass
class FakeRequest:
    id: int
    input_ids: list[int]
    block_ids: list[int]
    max_new_tokens: int
    ignore_eos: bool
    top_n_tokens: int
    prefill_logprobs: bool
    # Prompt tokens in the prefix cache: their blocks, first in `block_ids`, are shared.
    cache_len: int = 0
    # Chunked prefill: the prompt tokens after cache_len this prefill computes (0: the rest).
    chunk_len: int = 0
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass
class FakeBatch:
    id: int
    requests: list[FakeRequest]
    ahead: bool = False

    @property
    def request_ids(self) -> tuple[int, ...]:
        return tuple(r.id for r in self.requests)

    def cached(self) -> CachedBatch:
        # As shard/batch.py: KV tokens reserved, and tokens whose k/v are in the cache.
        max_tokens = sum(len(r.input_ids) + r.max_new_tokens for r in self.requests)
        current = sum(len(r.input_ids) + len(r.generated) - 1 for r in self.requests)
        return CachedBatch(self.id, self.request_ids, max_tokens, current, self.ahead)


class FakeShardClient:
    """The client surface the batcher and the app use, over an in-memory shard.

    `delay`: seconds each Prefill/Decode sleeps (0 still yields to the event loop once).
    `before_step`: awaited at the start of every Prefill/Decode with (method, step index);
    tests use it to enqueue requests or hold the batcher at an exact step.
    """

    def __init__(self, *, vocab_size: int = VOCAB_SIZE,
                 eos_token_ids: tuple[int, ...] = (EOS_TOKEN_ID,), block_size: int = 4,
                 num_blocks: int = 64, max_position_embeddings: int = 128, delay: float = 0.0,
                 tokens_per_step: int = 1):
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_position_embeddings = max_position_embeddings
        self.delay = delay
        self.tokens_per_step = tokens_per_step
        self.before_step: Callable[[str, int], Awaitable[None]] | None = None
        self.health_error: Exception | None = None
        self.batches: dict[int, FakeBatch] = {}
        # Every request ever prefilled, by id (kept after it leaves its batch).
        self.requests: dict[int, FakeRequest] = {}
        # request id -> (cache_len, chunk_len) of each chunk of its prefill before the last
        self.chunks: dict[int, list[tuple[int, int]]] = {}
        self.calls: list[tuple] = []
        self.violations: list[str] = []
        self.num_steps = 0
        # Decodes that returned a step which had run ahead (lookahead).
        self.num_collected = 0
        self._failures: dict[str, list[str]] = {"prefill": [], "decode": []}
        self.closed = False

    # ---- test controls ---------------------------------------------------------------------

    def fail_next(self, method: str, message: str = "CUDA out of memory") -> None:
        """Make the next `method` ("prefill" or "decode") call fail as a shard would."""
        self._failures[method].append(message)

    def calls_of(self, *methods: str) -> list[tuple]:
        return [c for c in self.calls if c[0] in methods]

    @property
    def live_request_ids(self) -> set[int]:
        return {r.id for b in self.batches.values() for r in b.requests}

    # ---- the batcher's calls ---------------------------------------------------------------

    async def prefill(self, batch_id: int, requests: list[BatchRequest]):
        self.calls.append(("prefill", batch_id, tuple(r.id for r in requests)))
        await self._step("prefill", ())
        if batch_id in self.batches:
            self._violation(f"Prefill of batch {batch_id}, already cached")
        new = [self._new_request(r) for r in requests]
        self._check_blocks(new)
        self._check_chunks(new)
        # As the real shard: a chunk that stops short of its prompt's end yields no token and
        # leaves no request behind; the router sends the rest later.
        chunked = [r for r in new if r.chunk_len and r.cache_len + r.chunk_len < len(r.input_ids)]
        for r in chunked:
            self.chunks.setdefault(r.id, []).append((r.cache_len, r.chunk_len))
        new = [r for r in new if r not in chunked]
        for r in new:
            self.requests[r.id] = r
        if not new:
            return StepResult([], None, forward_ns=1000)
        return self._generate(FakeBatch(batch_id, new), prefill=True)

    async def decode(self, batches: list[CachedBatch], lookahead: bool = False):
        self.calls.append(("decode", tuple((b.id, b.request_ids) for b in batches)))
        await self._step("decode", [b.id for b in batches])
        if not batches:
            self._violation("Decode with no batch")
        cached = [self._pop(b.id) for b in batches]
        for handle, batch in zip(batches, cached):
            if handle.request_ids != batch.request_ids:
                self._violation(f"Decode of batch {handle.id} with {handle.request_ids}, "
                                f"the shard holds {batch.request_ids}")
            done = [r.id for r in batch.requests if r.finish_reason is not None]
            if done:
                self._violation(f"Decode of finished requests {done} (batch {batch.id})")
        if len({b.ahead for b in cached}) > 1:
            self._violation(f"Decode mixes ahead and other batches: {batches}")
        merged = FakeBatch(cached[0].id, [r for b in cached for r in b.requests])
        result = self._generate(merged, prefill=False)
        if lookahead and all(g.finish_reason is None for g in result.generations):
            merged.ahead = True
            result = replace(result, batch=merged.cached())
        self.num_collected += cached[0].ahead
        return result

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> CachedBatch:
        self.calls.append(("filter", batch_id, tuple(request_ids)))
        batch = self._pop(batch_id)
        unknown = set(request_ids) - set(batch.request_ids)
        if unknown:
            self._violation(f"FilterBatch {batch_id} with unknown requests {sorted(unknown)}")
        if not request_ids:
            self._violation(f"FilterBatch {batch_id} keeping nothing (ClearCache is the call)")
        keep = set(request_ids)
        batch = FakeBatch(batch_id, [r for r in batch.requests if r.id in keep], batch.ahead)
        self.batches[batch_id] = batch
        return batch.cached()

    async def clear_cache(self, batch_id: int | None = None) -> None:
        self.calls.append(("clear", batch_id))
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    # ---- the app's calls -------------------------------------------------------------------

    async def info(self) -> ShardInfo:
        self.calls.append(("info",))
        return ShardInfo(
            model_id="fake-org/fake-model", model_type="llama", dtype="float32",
            device_type="cpu", block_size=self.block_size, vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            eos_token_ids=self.eos_token_ids, world_size=1,
        )

    async def warmup(self, max_input_tokens: int, max_prefill_tokens: int, max_total_tokens: int,
                     max_batch_total_tokens: int) -> int:
        self.calls.append(("warmup", max_input_tokens, max_prefill_tokens, max_total_tokens,
                           max_batch_total_tokens))
        if self.batches:
            self._violation("Warmup with batches in flight")
        return self.num_blocks

    async def health(self, timeout: float = 5.0) -> None:
        self.calls.append(("health",))
        if self.health_error is not None:
            raise self.health_error

    async def close(self) -> None:
        self.closed = True

    # ---- shard semantics -------------------------------------------------------------------

    async def _step(self, method: str, batch_ids) -> None:
        step, self.num_steps = self.num_steps, self.num_steps + 1
        if self.before_step is not None:
            await self.before_step(method, step)
        await asyncio.sleep(self.delay)
        if self._failures[method]:
            # Like the real shard, a failed Decode has already popped its batches.
            for batch_id in batch_ids:
                self.batches.pop(batch_id, None)
            raise ShardError(f"fake shard: {method} failed: {self._failures[method].pop(0)}")

    def _new_request(self, r: BatchRequest) -> FakeRequest:
        return FakeRequest(
            id=r.id, input_ids=list(r.request.input_ids), block_ids=list(r.block_ids),
            max_new_tokens=r.request.stopping.max_new_tokens,
            ignore_eos=r.request.stopping.ignore_eos_token,
            top_n_tokens=r.request.top_n_tokens, prefill_logprobs=r.prefill_logprobs,
            cache_len=r.cache_len, chunk_len=r.chunk_len,
        )

    def _check_blocks(self, new: list[FakeRequest]) -> None:
        live = {r.id: r for b in self.batches.values() for r in b.requests}
        # block -> (request, its index in that request's table)
        in_use = {block: (rid, i) for rid, r in live.items() for i, block in enumerate(r.block_ids)}
        for r in new:
            if r.id in live or r.id in self.requests:
                self._violation(f"request id {r.id} prefilled twice")
            needed = len(r.input_ids) + r.max_new_tokens
            if len(r.block_ids) * self.block_size < needed:
                self._violation(f"request {r.id}: {len(r.block_ids)} blocks for {needed} tokens")
            if r.cache_len % self.block_size or r.cache_len >= len(r.input_ids):
                self._violation(f"request {r.id}: cache_len {r.cache_len} of "
                                f"{len(r.input_ids)} prompt tokens")
            for i, block in enumerate(r.block_ids):
                if not 0 <= block < self.num_blocks:
                    self._violation(f"request {r.id}: block {block} out of range")
                # a cached prefix's block is shared, at the same place of every table
                shared = i < r.cache_len // self.block_size
                if block in in_use and not (shared and in_use[block][1] == i):
                    self._violation(f"request {r.id}: block {block} in use by {in_use[block][0]}")
                in_use.setdefault(block, (r.id, i))

    def _check_chunks(self, new: list[FakeRequest]) -> None:
        """A request's prefill chunks follow each other, block-aligned, over the same blocks."""
        for r in new:
            earlier = self.chunks.get(r.id, [])
            if earlier:
                cache_len, chunk_len = earlier[-1]
                if r.cache_len != cache_len + chunk_len:
                    self._violation(f"request {r.id}: chunk at {r.cache_len} after one of "
                                    f"{chunk_len} at {cache_len}")
            if r.chunk_len % self.block_size:
                self._violation(f"request {r.id}: a chunk of {r.chunk_len} tokens")

    def _generate(self, batch: FakeBatch, prefill: bool):
        generations = []
        for r in batch.requests:
            step = []
            for i in range(1 if prefill else self.tokens_per_step):
                if r.finish_reason is not None:
                    break
                step.append(self._token(r, prefill and i == 0))
            if len(step) > 1:  # as the real client reports a step's accepted drafts
                step[0] = replace(step[0], drafted=len(step) - 1, accepted=len(step) - 1)
            generations += step
        if all(r.finish_reason is not None for r in batch.requests):
            return StepResult(generations, None, forward_ns=1000)
        self.batches[batch.id] = batch
        return StepResult(generations, batch.cached(), forward_ns=1000)

    def _token(self, r: FakeRequest, prefill: bool) -> Generation:
        token = next_token(r.generated[-1] if r.generated else r.input_ids[-1], self.vocab_size)
        r.generated.append(token)
        if token in self.eos_token_ids and not r.ignore_eos:
            r.finish_reason = FinishReason.EOS_TOKEN
        elif len(r.generated) >= r.max_new_tokens:
            r.finish_reason = FinishReason.LENGTH
        top = tuple(((token + k) % self.vocab_size, logprob(token) - k)
                    for k in range(r.top_n_tokens))
        prefill_tokens = None
        if prefill and r.prefill_logprobs:
            prefill_tokens = tuple((t, math.nan if i == 0 else -1.0)
                                   for i, t in enumerate(r.input_ids))
        return Generation(r.id, token, logprob(token), top, r.finish_reason, prefill_tokens)

    def _pop(self, batch_id: int) -> FakeBatch:
        batch = self.batches.pop(batch_id, None)
        if batch is None:
            self._violation(f"batch {batch_id} not found in the shard's cache")
        return batch

    def _violation(self, message: str) -> None:
        self.violations.append(message)
        raise ShardError(f"fake shard: {message}")
