"""Runs the choices of an OpenAI request on the native path and turns tokens into OpenAI text.

Upstream: `routes.py`, with the `ValidRequest` of each choice (from the native `Validator`).
Downstream: the same `Infer` (queue, batcher) as `/generate`. `n` choices are `n` independent
requests, each holding one concurrency permit. `ChoiceText` turns a choice's tokens into
content: special tokens skipped (as `decode(skip_special_tokens=True)`), stop sequences cut
off, and text that may still become a stop sequence held back while streaming.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tgi_server.router.infer import Infer, InferEvent, overloaded
from tgi_server.router.openai.chat_template import read_chat_template
from tgi_server.router.openai.protocol import OpenAIError
from tgi_server.router.tokenizer import IncrementalDetokenizer, StopSequenceMatcher
from tgi_server.router.types import ValidRequest

# Model names always accepted: "tgi" (TGI's convention) and "dummy", which huggingface_hub's
# InferenceClient sends when it was given a base URL instead of a model id.
ALIASES = ("tgi", "dummy")


@dataclass(frozen=True)
class OpenAIServing:
    """What the OpenAI routes need beyond the router state; built on first use."""

    model_names: tuple[str, ...]
    chat_template: str | None
    vocab_size: int
    max_model_len: int
    created: int

    @classmethod
    def build(cls, state: Any) -> "OpenAIServing":
        config = state.config
        return cls(
            model_names=config.served_model_name or (config.model_id or config.tokenizer,),
            chat_template=read_chat_template(config.chat_template),
            vocab_size=state.info.vocab_size,
            max_model_len=state.limits.max_total_tokens,
            created=int(time.time()),
        )

    def model_name(self, requested: str | None) -> str:
        """The name to answer with; an unknown one is OpenAI's 404 `model_not_found`."""
        if requested in self.model_names:
            return requested
        if requested is None or requested in ALIASES:
            return self.model_names[0]
        raise OpenAIError(f"The model `{requested}` does not exist. Served: "
                          f"{', '.join(self.model_names)}", 404, "invalid_request_error",
                          "model", "model_not_found")


def check_capacity(infer: Infer, num_requests: int) -> None:
    """429 before a stream starts, when its choices cannot all get a permit now."""
    if infer.num_in_flight + num_requests > infer.max_concurrent_requests:
        infer.metrics.request_failure.inc(err="overloaded")
        raise overloaded()


@contextlib.asynccontextmanager
async def permits(infer: Infer, num_requests: int):
    """One concurrency permit per choice, all or none."""
    acquired = 0
    try:
        for _ in range(num_requests):
            infer.try_acquire()
            acquired += 1
        yield
    finally:
        for _ in range(acquired):
            infer.release()


async def generate_all(infer: Infer, requests: list[ValidRequest]) -> list[list[InferEvent]]:
    """Every event of every choice; cancelling this cancels them all."""
    async with permits(infer, len(requests)):
        tasks = [asyncio.ensure_future(infer.generate_all(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()


async def stream_all(infer: Infer, requests: list[ValidRequest]
                     ) -> AsyncIterator[tuple[int, InferEvent]]:
    """(choice index, event) as each choice's tokens arrive, until every choice finished."""
    async with permits(infer, len(requests)):
        if len(requests) == 1:
            async for event in infer.generate(requests[0]):
                yield 0, event
            return
        events: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, request: ValidRequest) -> None:
            try:
                async for event in infer.generate(request):
                    events.put_nowait((index, event))
            except Exception as e:  # noqa: BLE001 -- re-raised by the consumer below
                events.put_nowait((index, e))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
        try:
            num_running = len(requests)
            while num_running:
                index, event = await events.get()
                if isinstance(event, Exception):
                    raise event
                yield index, event
                if event.finish_reason is not None:
                    num_running -= 1
        finally:
            for task in tasks:
                task.cancel()


class ChoiceText:
    """One choice's content, delta by delta: what the client may see after each token."""

    def __init__(self, tokenizer: Any, request: ValidRequest, keep: bool = True):
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.input_ids,
                                                  skip_special_tokens=True)
        stop = request.stopping.stop_sequences
        # NOTE: the batcher detects the stop sequence (and ends generation) on the same text;
        # here the match is cut off, and a tail that may still grow into one is held back.
        self.stop = StopSequenceMatcher(stop, include_stop_sequence=False) if stop else None
        self.keep = keep
        self.parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def push(self, event: InferEvent) -> str:
        """The content this event adds (maybe empty)."""
        delta = self.detokenizer.push(event.token.id)
        final = event.finish_reason is not None
        if final:
            delta += self.detokenizer.flush()
        if self.stop is not None:
            delta = self.stop.push(delta)[0] + (self.stop.flush() if final else "")
        if not self.keep:
            return ""
        self.parts.append(delta)
        return delta
