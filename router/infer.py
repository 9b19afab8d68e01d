"""`Infer`: the one code path that generates, shared by the native and OpenAI routes.

Upstream: `routes.py` (and later the OpenAI routes) hand it a `ValidRequest`. Downstream: it
queues an `Entry` and wakes the `Batcher`, which pushes `InferEvent`s into the entry's
`RequestState`; `generate` yields them until the final one. A caller that stops iterating
(client disconnect) cancels the request: the batcher then frees its blocks.
"""

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tgi_server.router.metrics import Metrics
from tgi_server.router.queue import Entry, Queue
from tgi_server.router.types import FinishReason, ValidRequest


class InferError(Exception):
    """A request that could not be served; `error_type` and `status` follow TGI."""

    def __init__(self, message: str, error_type: str, status: int):
        super().__init__(message)
        self.message, self.error_type, self.status = message, error_type, status


def overloaded() -> InferError:
    return InferError("Model is overloaded", "overloaded", 429)


def generation_error(message: str) -> InferError:
    return InferError(f"Request failed during generation: {message}", "generation", 424)


@dataclass(slots=True)
class TokenInfo:
    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass(slots=True)
class InferEvent:
    """One generated token; the final event also carries the finish reason and full text."""

    token: TokenInfo
    top_tokens: list[TokenInfo]
    num_generated_tokens: int
    finish_reason: FinishReason | None = None
    # Final event only: the generated text (special tokens skipped, stop sequence included).
    generated_text: str | None = None
    # First event only, when decoder_input_details was asked: the prompt tokens.
    prefill_tokens: list[TokenInfo] | None = None
    # Final event only: timestamps (time.monotonic) for headers and metrics.
    queued_at: float = 0.0
    started_at: float = 0.0
    # Final event only: prompt tokens whose k/v came from the prefix cache.
    cached_tokens: int = 0


@dataclass(slots=True)
class RequestState:
    """Where the batcher sends one request's events (the `Entry.sink`)."""

    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated_ids: list[int] = field(default_factory=list)
    started_at: float = 0.0
    # The batcher's per-request text state (detokenizer, stop matcher), made at prefill.
    text: object = None


class Infer:
    def __init__(self, queue: Queue, batcher, metrics: Metrics, max_concurrent_requests: int):
        self.queue = queue
        self.batcher = batcher
        self.metrics = metrics
        self.max_concurrent_requests = max_concurrent_requests
        self.num_in_flight = 0
        self._ids = itertools.count(1)

    def try_acquire(self) -> None:
        """Take a concurrency permit without waiting (TGI answers 429 rather than queueing)."""
        if self.num_in_flight >= self.max_concurrent_requests:
            self.metrics.request_failure.inc(err="overloaded")
            raise overloaded()
        self.num_in_flight += 1

    def release(self) -> None:
        self.num_in_flight -= 1

    async def generate(self, request: ValidRequest) -> AsyncIterator[InferEvent]:
        """Yield the request's events; the caller holds a permit (`try_acquire`)."""
        state = RequestState()
        entry = Entry(request=request, id=next(self._ids), queued_at=time.monotonic(), sink=state)
        self.queue.append(entry)
        self.metrics.queue_size.set(len(self.queue))
        self.batcher.notify()
        done = False
        try:
            while True:
                event = await state.events.get()
                if isinstance(event, InferError):
                    done = True
                    raise event
                if event.finish_reason is not None:
                    done = True
                yield event
                if done:
                    return
        finally:
            if not done:
                entry.cancelled = True
                self.batcher.notify()

    async def generate_all(self, request: ValidRequest) -> list[InferEvent]:
        return [event async for event in self.generate(request)]
