"""Continuous batching: the only async loop that talks to the shards.

Upstream: `infer.py` appends entries to the `Queue` and calls `notify()`. Downstream: the
`ShardedClient`. The loop follows TGI's batching task (without chunking): prefill a new batch,
then decode the running batch step after step; between steps, waiting requests are prefilled
and joined when they fit the budgets and enough are waiting (`waiting_served_ratio`) or the
running batch has waited `max_waiting_tokens` steps. After every call, finished and cancelled
requests leave through FilterBatch and their KV blocks return to the allocator at once.

Prefix caching: once a prefill has run, its prompts' full blocks are registered with the
allocator, so requests queued later with the same prefix start from them; when a request
leaves, the full blocks of its prompt and generated tokens are registered too (a chat's next
turn starts with both).

Decodes look ahead (`BatchingConfig.lookahead`): the shards start the next step before they
answer, so the round trip to the router and its dispatch of the tokens overlap that step. A
batch whose step already ran is collected alone (a Decode without compute) before new
requests join it; a request stopped by the router meanwhile costs one discarded token.
"""

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from tgi_server.router.block_allocator import BlockAllocator
from tgi_server.router.client import BatchRequest, CachedBatch, Generation, ShardError
from tgi_server.router.infer import InferEvent, RequestState, TokenInfo, generation_error
from tgi_server.router.metrics import Metrics
from tgi_server.router.queue import Entry, Queue
from tgi_server.router.tokenizer import IncrementalDetokenizer, StopSequenceMatcher
from tgi_server.router.types import FinishReason

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int | None
    max_waiting_tokens: int
    waiting_served_ratio: float
    enable_prefill_logprobs: bool = False
    lookahead: bool = True


@dataclass(slots=True)
class TextState:
    detokenizer: IncrementalDetokenizer
    stop: StopSequenceMatcher | None


class Batcher:
    def __init__(self, client, queue: Queue, allocator: BlockAllocator, tokenizer,
                 config: BatchingConfig, metrics: Metrics):
        self.client = client
        self.queue = queue
        self.allocator = allocator
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics
        self.special_ids = set(tokenizer.all_special_ids)
        self.running: dict[int, Entry] = {}
        self.healthy = True
        self.num_prefilled_requests = 0
        self._queue_drops_counted = 0
        self._wakeup = asyncio.Event()
        self._batch_ids = iter(range(1, 2**63))

    def notify(self) -> None:
        self._wakeup.set()

    # ---- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        idle = True
        while True:
            self.queue.remove_cancelled()
            self._count_queue_drops()
            if idle or not len(self.queue):
                await self._wakeup.wait()
            self._wakeup.clear()
            try:
                # NOTE: validation keeps every request within max_batch_total_tokens, so the
                # head of the queue always fits an idle cache; `idle` guards against spinning.
                idle = not await self._serve_until_idle()
            except Exception as e:  # noqa: BLE001 -- every request in flight gets the error
                logger.exception("batching step failed")
                await self._fail_running(e)

    async def _serve_until_idle(self) -> bool:
        """Serve until no request runs; False if nothing could be prefilled."""
        cfg = self.config
        before = self.num_prefilled_requests
        cached = await self._prefill(None, cfg.max_batch_size, cfg.max_batch_total_tokens)
        # NOTE: as TGI's `waiting_tokens`: 1 after a prefill, back to 1 whenever requests
        # were prefilled to join (even if they all finished at once or failed).
        waiting_steps = 1
        while cached is not None:
            batches = [cached]
            num_prefilled = self.num_prefilled_requests
            new = await self._join_waiting(cached, waiting_steps)
            if self.num_prefilled_requests > num_prefilled:
                waiting_steps = 1
            if new is not None:
                if cached.ahead:
                    cached = await self._decode([cached], lookahead=False)
                batches = [b for b in (cached, new) if b is not None]
            cached = await self._decode(batches, lookahead=self.config.lookahead)
            waiting_steps += 1
        self._check_idle()
        return self.num_prefilled_requests > before

    async def _join_waiting(self, cached: CachedBatch, waiting_steps: int) -> CachedBatch | None:
        """Prefill waiting requests to join the running batch, if the budgets allow."""
        self.queue.remove_cancelled()
        self._count_queue_drops()
        if not len(self.queue):
            return None
        cfg = self.config
        size = cached.size
        # NOTE: a chunked prefill goes on at every step, as TGI's chunking ignores the ratio.
        forced = waiting_steps >= cfg.max_waiting_tokens or self.queue.front_is_chunked()
        min_size = None if forced else math.floor(size * cfg.waiting_served_ratio)
        max_size = None if cfg.max_batch_size is None else cfg.max_batch_size - size
        if max_size is not None and max_size <= 0:
            return None
        token_budget = cfg.max_batch_total_tokens - cached.max_tokens
        new = await self._prefill(min_size, max_size, token_budget)
        if new is not None:
            self.metrics.batch_concat.inc(reason="wait_exceeded" if min_size is None else "backpressure")
        return new

    async def _prefill(self, min_size, max_size, token_budget: int) -> CachedBatch | None:
        entries = self.queue.next_batch(min_size, max_size, self.config.max_batch_prefill_tokens,
                                        token_budget)
        self.metrics.queue_size.set(len(self.queue))
        self._count_queue_drops()
        if not entries:
            return None
        self.num_prefilled_requests += len(entries)
        now = time.monotonic()
        for entry in entries:
            self.running[entry.id] = entry
            if entry.sink.text is None:  # its first prefill (or chunk)
                entry.sink.started_at = now
                self.metrics.request_queue_duration.observe(now - entry.queued_at)
                entry.sink.text = self._text_state(entry)
                if entry.cache_hit:
                    self.metrics.prefix_cache_hit_tokens.inc(entry.cache_hit)
        self.metrics.batch_next_size.observe(len(entries))
        requests = [
            BatchRequest(e.id, e.request, e.block_ids, cache_len=e.cache_len,
                         chunk_len=e.chunk_len,
                         # NOTE: as in TGI, prompt logprobs cost a full-vocab projection per
                         # prompt token, so they are computed only with --enable-prefill-logprobs.
                         prefill_logprobs=(e.request.decoder_input_details
                                           and self.config.enable_prefill_logprobs))
            for e in entries
        ]
        batch_id = next(self._batch_ids)
        cached = await self._call("prefill", self.client.prefill(batch_id, requests),
                                  [e.id for e in entries], [batch_id])
        for entry in entries:
            # NOTE: requests that finished or failed meanwhile have left (their blocks too).
            if entry.id not in self.running:
                continue
            computed = entry.request.num_prompt_tokens
            if entry.chunk_len:
                # the rest of its prompt goes in the next prefill, which it leads
                del self.running[entry.id]
                entry.cache_len += entry.chunk_len
                entry.chunk_len = 0
                computed = entry.cache_len
                self.queue.push_front(entry)
                self.metrics.batch_concat.inc(reason="chunking")
            if entry.prompt_keys:
                self.allocator.cache(entry.block_ids,
                                     entry.prompt_keys[:computed // self.allocator.block_size])
        return cached

    async def _decode(self, batches: list[CachedBatch], lookahead: bool) -> CachedBatch | None:
        ids = [rid for b in batches for rid in b.request_ids]
        return await self._call("decode", self.client.decode(batches, lookahead), ids,
                                [b.id for b in batches])

    async def _call(self, method: str, call, request_ids: list[int],
                    batch_ids: list[int]) -> CachedBatch | None:
        self.metrics.batch_inference_count.inc(method=method)
        start = time.monotonic()
        try:
            result = await call
        except ShardError as e:
            self.metrics.batch_inference_failure.inc(method=method)
            # As TGI: only the batches of the failed call are dropped; a failed prefill of
            # joining requests leaves the running batch to go on.
            await self._fail(request_ids, e, batch_ids)
            return None
        m = self.metrics
        m.batch_inference_duration.labels(method).observe(time.monotonic() - start)
        m.batch_forward_duration.labels(method).observe(result.forward_ns / 1e9)
        if method == "decode":
            m.batch_concat_duration.labels(method).observe(result.concat_ns / 1e9)
        m.batch_inference_success.inc(method=method)
        start = time.monotonic()
        stepped: set[int] = set()
        for generation in result.generations:
            if generation.request_id not in stepped:  # a step's first token for the request
                stepped.add(generation.request_id)
                m.request_skipped_tokens.observe(generation.accepted)
            if generation.drafted:
                m.speculation_draft_tokens.inc(generation.drafted)
                m.speculation_accepted_tokens.inc(generation.accepted)
            self._dispatch(generation)
        m.batch_decode_duration.labels(method).observe(time.monotonic() - start)
        return await self._filter(result.batch)

    async def _filter(self, cached: CachedBatch | None) -> CachedBatch | None:
        """Drop finished and cancelled requests from the shards' batch."""
        if cached is None:
            self._set_batch_gauges(None)
            return None
        for rid in cached.request_ids:
            entry = self.running.get(rid)
            if entry is not None and entry.cancelled:
                self._drop(entry)
        keep = [rid for rid in cached.request_ids if rid in self.running]
        if len(keep) < cached.size:
            start = time.monotonic()
            if keep:
                cached = await self.client.filter_batch(cached.id, keep)
            else:
                await self.client.clear_cache(cached.id)
                cached = None
            self.metrics.batch_filter_duration.observe(time.monotonic() - start)
        self._set_batch_gauges(cached)
        return cached

    # ---- per-request events --------------------------------------------------------------

    def _text_state(self, entry: Entry) -> TextState:
        stop = entry.request.stopping.stop_sequences
        return TextState(
            detokenizer=IncrementalDetokenizer(self.tokenizer, entry.request.input_ids),
            stop=StopSequenceMatcher(stop) if stop else None,
        )

    def _token(self, token_id: int, logprob: float | None, text: str | None = None) -> TokenInfo:
        if text is None:
            text = self.tokenizer.decode([token_id])
        if logprob is not None and math.isnan(logprob):
            logprob = None
        return TokenInfo(token_id, text, logprob, token_id in self.special_ids)

    def _dispatch(self, g: Generation) -> None:
        entry = self.running.get(g.request_id)
        if entry is None:
            return
        if entry.cancelled:
            # NOTE: finished on the shard, it is in no batch left to filter: release it now.
            if g.finish_reason is not None:
                self._drop(entry)
            return
        state: RequestState = entry.sink
        text: TextState = state.text
        state.generated_ids.append(g.token_id)
        delta = text.detokenizer.push(g.token_id)
        finish = g.finish_reason
        if text.stop is not None and finish is None and text.stop.push(delta)[1]:
            finish = FinishReason.STOP_SEQUENCE
        if finish is not None:
            # The last token carries any bytes held back as an incomplete character, so the
            # streamed texts add up to the full text.
            delta += text.detokenizer.flush()
        event = InferEvent(
            token=self._token(g.token_id, g.logprob, delta),
            top_tokens=[self._token(i, lp) for i, lp in g.top_tokens],
            num_generated_tokens=len(state.generated_ids),
            finish_reason=finish,
        )
        if g.prefill_tokens is not None:
            event.prefill_tokens = [self._token(i, lp) for i, lp in g.prefill_tokens]
        if finish is not None:
            event.generated_text = self.tokenizer.decode(state.generated_ids, skip_special_tokens=True)
            event.queued_at, event.started_at = entry.queued_at, state.started_at
            event.cached_tokens = entry.cache_hit
            self._release(entry)
        state.events.put_nowait(event)

    def _drop(self, entry: Entry) -> None:
        """A running request whose client went away (TGI's `tgi_request_failure{err="dropped"}`)."""
        self._release(entry)
        self.metrics.request_failure.inc(err="dropped")

    def _count_queue_drops(self) -> None:
        """Queued requests whose client went away, dropped by the queue since the last count."""
        new = self.queue.num_dropped - self._queue_drops_counted
        if new:
            self.metrics.request_failure.inc(new, err="dropped")
            self._queue_drops_counted = self.queue.num_dropped

    def _release(self, entry: Entry, computed: bool = True) -> None:
        """The request left the batch: its blocks go back to the allocator now, the full ones
        of its tokens' k/v cached (`computed`: the steps that made them succeeded)."""
        self.running.pop(entry.id, None)
        if entry.block_ids is None:
            return
        if computed and entry.prompt_keys is not None:
            # k/v is in the cache for every token but the newest
            tokens = entry.request.input_ids + tuple(entry.sink.generated_ids)
            keys = self.allocator.block_keys(tokens, len(tokens) - 1, known=entry.prompt_keys)
            self.allocator.cache(entry.block_ids, keys)
        self.allocator.free(entry.block_ids)
        entry.block_ids = None

    async def _fail(self, request_ids: list[int], error: Exception,
                    batch_ids: list[int | None]) -> None:
        """Fail `request_ids` and drop `batch_ids` from the shards (None: every batch)."""
        logger.error("generation failed for %d requests: %s", len(request_ids), error)
        self.healthy = False
        # NOTE: a shard that failed may have restarted with an empty KV cache (the router
        # outlives it when run on its own): no later request may start from its blocks.
        self.allocator.forget_cached()
        for rid in request_ids:
            entry = self.running.get(rid)
            if entry is not None:
                self._release(entry, computed=False)
                entry.sink.events.put_nowait(generation_error(str(error)))
        for batch_id in batch_ids:
            try:
                await self.client.clear_cache(batch_id)
            except ShardError:
                logger.exception("ClearCache failed after a generation error")

    async def _fail_running(self, error: Exception) -> None:
        await self._fail(list(self.running), error, [None])

    def _set_batch_gauges(self, cached: CachedBatch | None) -> None:
        self.metrics.batch_current_size.set(cached.size if cached else 0)
        self.metrics.batch_current_max_tokens.set(cached.max_tokens if cached else 0)
        self.metrics.kv_blocks_free.set(self.allocator.num_free_blocks)
        self.metrics.kv_blocks_cached.set(self.allocator.num_cached_blocks)

    def _check_idle(self) -> None:
        """With nothing running, every block must be free again, but those of a request
        between the chunks of its prefill."""
        if not self.running:
            self.allocator.check_integrity()
            held = len(self.queue.held_blocks())
            if self.allocator.num_free_blocks + held != self.allocator.num_blocks:
                logger.error("KV block leak: %d of %d blocks free while idle",
                             self.allocator.num_free_blocks, self.allocator.num_blocks)

