"""Runs the choices of an OpenAI request on the native path and turns tokens into OpenAI text.

Upstream: `routes.py` builds a `Job`: the validated prompts (from the native `Validator`) and
their choices. Downstream: the same `Infer` (queue, batcher) as `/generate`; `n` choices are
`n` independent requests, each holding one concurrency permit, with the native metrics. `ChoiceText` turns a choice's tokens into
content: special tokens skipped (as `decode(skip_special_tokens=True)`), stop sequences cut
off, and text that may still become a stop sequence held back while streaming.
"""

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from tgi_server.router import routes as native
from tgi_server.router.infer import Infer, InferError, InferEvent, overloaded
from tgi_server.router.openai.chat_template import read_chat_template
from tgi_server.router.openai.protocol import (
    GenerationParams,
    OpenAIError,
    PromptTokensDetails,
    Usage,
)
from tgi_server.router.tokenizer import IncrementalDetokenizer, StopSequenceMatcher
from tgi_server.router.types import ValidRequest

# Model names always accepted: "tgi" (TGI's convention) and "dummy", which huggingface_hub's
# InferenceClient sends when it was given a base URL instead of a model id.
ALIASES = ("tgi", "dummy")
SYSTEM_FINGERPRINT = f"tgi-server-{native.VERSION}"


@dataclass(frozen=True)
class OpenAIServing:
    """What the OpenAI routes need beyond the router state; built at start-up (`app.py`)."""

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


@dataclass(slots=True)
class Job:
    """The validated prompts of one request and their choices, `n` per prompt, in order."""

    request: Request
    gen: GenerationParams
    model: str
    prompts: list[ValidRequest]
    started_at: float
    choices: list[ValidRequest]

    @classmethod
    def of(cls, request: Request, gen: GenerationParams, model: str,
           prompts: list[ValidRequest], started_at: float) -> "Job":
        choices = [gen.choice_request(v, i) for v in prompts for i in range(gen.n)]
        return cls(request, gen, model, prompts, started_at, choices)

    def prompt_of(self, choice: int) -> ValidRequest:
        return self.prompts[choice // self.gen.n]

    def usage(self, num_completion_tokens: int, num_cached_tokens: int = 0) -> Usage:
        """`num_cached_tokens`: the prefix-cached prompt tokens of each prompt's first choice
        (`cached_tokens`), as its prompt tokens are counted once however many choices."""
        num_prompt_tokens = sum(v.num_prompt_tokens for v in self.prompts)
        return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                     total_tokens=num_prompt_tokens + num_completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=num_cached_tokens))

    def cached_tokens(self, choice: int, final: InferEvent) -> int:
        """What `final`, the last event of `choice`, adds to `usage`'s cached tokens."""
        return final.cached_tokens if choice % self.gen.n == 0 else 0

    def on_choice_done(self, choice: int, final: InferEvent) -> None:
        """Metrics once per prompt (as `/generate` with best_of), on its first choice."""
        if choice % self.gen.n == 0:
            native.record_success(self.request.app.state.router, self.prompt_of(choice), final,
                                  self.started_at)

    def on_failure(self, e: Exception) -> None:
        if isinstance(e, InferError) and e.error_type != "overloaded":
            self.request.app.state.router.metrics.request_failure.inc(err=e.error_type)

    def header(self, prefix: str) -> dict:
        return dict(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=self.model,
                    system_fingerprint=SYSTEM_FINGERPRINT)


async def run(job: Job) -> list[list[InferEvent]]:
    infer = job.request.app.state.router.infer
    try:
        results = await native.until_disconnect(job.request, generate_all(infer, job.choices))
    except InferError as e:
        job.on_failure(e)
        raise
    for choice, events in enumerate(results):
        job.on_choice_done(choice, events[-1])
    return results


async def stream(job: Job) -> AsyncIterator[tuple[int, InferEvent]]:
    try:
        async for choice, event in stream_all(job.request.app.state.router.infer, job.choices):
            if event.finish_reason is not None:
                job.on_choice_done(choice, event)
            yield choice, event
    except InferError as e:
        job.on_failure(e)
        raise


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
