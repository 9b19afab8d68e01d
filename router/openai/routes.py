"""OpenAI-compatible handlers: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Upstream: OpenAI clients (the `openai` SDK, huggingface_hub's `InferenceClient`, LangChain...).
Downstream: `protocol.py` parses and translates the request, the native `routes.validate`
checks it with TGI's rules, `serving.py` runs its choices on the shared `Infer`; this file
shapes the answers. Errors are OpenAI's `{"error": {...}}`: 400 for invalid requests, 404 for
an unknown model, 429 when overloaded; a stream failing midway ends with an error event.
"""

import functools
import json
import time
from collections.abc import AsyncIterator

import pydantic
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tgi_server.router import routes as native
from tgi_server.router.infer import InferError, InferEvent, TokenInfo
from tgi_server.router.openai import protocol as p
from tgi_server.router.openai.chat_template import ChatTemplateError, render_chat
from tgi_server.router.openai.serving import (
    ChoiceText,
    Job,
    OpenAIServing,
    check_capacity,
    run,
    stream,
)
from tgi_server.router.streaming import sse_response
from tgi_server.router.types import ValidRequest

# Native parameter names in the validator's messages -> what OpenAI clients sent.
_NATIVE_NAMES = {"`max_new_tokens`": "`max_tokens`", "`inputs`": "the prompt",
                 "`top_n_tokens`": "`top_logprobs`"}


# ---- errors --------------------------------------------------------------------------------


def openai_error(e: Exception) -> p.OpenAIError:
    if isinstance(e, p.OpenAIError):
        return e
    if isinstance(e, ChatTemplateError):
        return p.invalid_request(str(e), "messages")
    if isinstance(e, InferError) and e.error_type == "validation":
        message = e.message
        for native_name, name in _NATIVE_NAMES.items():
            message = message.replace(native_name, name)
        return p.invalid_request(message)
    if isinstance(e, InferError) and e.error_type == "overloaded":
        return p.OpenAIError(e.message, 429, "rate_limit_error", code="rate_limit_exceeded")
    if isinstance(e, InferError):
        return p.OpenAIError(e.message, e.status, "server_error", code=e.error_type)
    return p.OpenAIError(f"{type(e).__name__}: {e}", 500, "server_error")


def error_response(e: Exception) -> JSONResponse:
    error = openai_error(e)
    return JSONResponse(p.OpenAIErrorResponse.of(error).model_dump(mode="json"), status_code=error.status)


def error_event(e: Exception) -> p.OpenAIErrorResponse:
    return p.OpenAIErrorResponse.of(openai_error(e))


def answers_errors(handler):
    """Every refusal of `handler` is an OpenAI error body with its status."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except (p.OpenAIError, InferError, ChatTemplateError) as e:
            return error_response(e)

    return wrapped


async def parse_body(request: Request, model: type[pydantic.BaseModel]):
    try:
        return model.model_validate(json.loads(await request.body()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise p.invalid_request(f"The request body is not valid JSON: {e}") from e
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise p.invalid_request(f"{where or 'body'}: {first['msg']}", where or None) from e


# ---- shared by both endpoints ----------------------------------------------------------------


def serving(request: Request) -> OpenAIServing:
    return request.app.state.openai  # built with the router state, in `app.py`'s lifespan


def openai_stream(events: AsyncIterator[pydantic.BaseModel]) -> Response:
    return sse_response(events, error_event, done_marker="[DONE]", prefix="data: ")


@functools.lru_cache(maxsize=4096)
def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def token_text(request: Request, token: TokenInfo) -> str:
    return _token_text(request.app.state.router.tokenizer, token.id)


def _logprob(value: float | None) -> float:
    # NOTE: OpenAI's logprobs are numbers; -9999 is what it reports for "impossible".
    return -9999.0 if value is None else max(value, -9999.0)


# ---- chat ----------------------------------------------------------------------------------


@answers_errors
async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, p.ChatCompletionRequest)
    job = await chat_job(request, body)
    if body.stream:
        check_capacity(request.app.state.router.infer, len(job.prompts) * job.gen.n)
        return openai_stream(chat_chunks(job, body.include_usage))
    results = await run(job)
    tokenizer = request.app.state.router.tokenizer
    choices = []
    for index, (valid, events) in enumerate(zip(job.choices, results)):
        text = ChoiceText(tokenizer, valid)
        for event in events:
            text.push(event)
        choices.append(p.ChatChoice(
            index=index, message=p.AssistantMessage(content=text.text),
            logprobs=p.ChoiceLogprobs(content=[token_logprob(request, e) for e in events])
            if job.gen.logprobs else None,
            finish_reason=p.finish_reason(events[-1].finish_reason),
        ))
    usage = job.usage(sum(events[-1].num_generated_tokens for events in results),
                      sum(job.cached_tokens(i, events[-1]) for i, events in enumerate(results)))
    response = p.ChatCompletion(**job.header("chatcmpl"), choices=choices, usage=usage)
    return JSONResponse(response.model_dump(mode="json"))


async def chat_job(request: Request, body: p.ChatCompletionRequest) -> Job:
    state, openai = request.app.state.router, serving(request)
    model = openai.model_name(body.model)
    gen = body.to_generation_params(openai.vocab_size)
    started_at = time.monotonic()
    prompt = await state.in_validation_pool(render_chat, state.tokenizer,
                                            body.template_messages(), openai.chat_template)
    valid = await native.validate(request, prompt, gen.parameters, bool(body.stream),
                                  add_special_tokens=False)
    return Job.of(request, gen, model, [valid], started_at)


def token_logprob(request: Request, event: InferEvent) -> p.TokenLogprob:
    def top(token: TokenInfo, text: str) -> p.TopLogprob:
        return p.TopLogprob(token=text, logprob=_logprob(token.logprob), bytes=list(text.encode()))

    sampled = top(event.token, token_text(request, event.token))
    return p.TokenLogprob(**sampled.model_dump(),
                          top_logprobs=[top(t, t.text) for t in event.top_tokens])


async def chat_chunks(job: Job, include_usage: bool) -> AsyncIterator[p.ChatCompletionChunk]:
    header = job.header("chatcmpl")
    tokenizer = job.request.app.state.router.tokenizer
    texts = [ChoiceText(tokenizer, valid) for valid in job.choices]
    for index in range(len(texts)):
        delta = p.ChatDelta(role="assistant", content="")
        yield p.ChatCompletionChunk(**header, choices=[p.ChatChunkChoice(index=index, delta=delta)])
    num_generated_tokens = num_cached_tokens = 0
    async for index, event in stream(job):
        content = texts[index].push(event)
        logprobs = None
        if job.gen.logprobs:
            logprobs = p.ChoiceLogprobs(content=[token_logprob(job.request, event)])
        finish = None if event.finish_reason is None else p.finish_reason(event.finish_reason)
        if finish is not None:
            num_generated_tokens += event.num_generated_tokens
            num_cached_tokens += job.cached_tokens(index, event)
        elif not content and logprobs is None:
            continue
        choice = p.ChatChunkChoice(index=index, delta=p.ChatDelta(content=content or None),
                                   logprobs=logprobs, finish_reason=finish)
        yield p.ChatCompletionChunk(**header, choices=[choice])
    if include_usage:
        yield p.ChatCompletionChunk(**header, choices=[],
                                    usage=job.usage(num_generated_tokens, num_cached_tokens))


# ---- completions ---------------------------------------------------------------------------


@answers_errors
async def completions(request: Request) -> Response:
    body = await parse_body(request, p.CompletionRequest)
    job = await completion_job(request, body)
    if body.stream:
        check_capacity(request.app.state.router.infer, len(job.prompts) * job.gen.n)
        return openai_stream(completion_chunks(job, body.include_usage))
    results = await run(job)
    tokenizer = request.app.state.router.tokenizer
    choices, num_generated_tokens, num_cached_tokens = [], 0, 0
    for index, (valid, events) in enumerate(zip(job.choices, results)):
        choice = CompletionChoiceBuilder(job, index, tokenizer, valid)
        text = choice.start(events[0]) + "".join(choice.push(e) for e in events)
        choices.append(p.CompletionChoice(
            index=index, text=text, logprobs=choice.logprobs,
            finish_reason=choice.finish_reason(events[-1])))
        num_generated_tokens += events[-1].num_generated_tokens if job.gen.keep_generated else 0
        num_cached_tokens += job.cached_tokens(index, events[-1])
    response = p.Completion(**job.header("cmpl"), choices=choices,
                            usage=job.usage(num_generated_tokens, num_cached_tokens))
    return JSONResponse(response.model_dump(mode="json"))


async def completion_job(request: Request, body: p.CompletionRequest) -> Job:
    state, openai = request.app.state.router, serving(request)
    model = openai.model_name(body.model)
    prompts = body.prompts()
    if len(prompts) > state.config.max_client_batch_size:
        raise p.invalid_request(
            f"at most {state.config.max_client_batch_size} prompts per request "
            f"(`--max-client-batch-size`), got {len(prompts)}", "prompt")
    gen = body.to_generation_params(openai.vocab_size)
    if gen.parameters.decoder_input_details and body.stream:
        raise p.invalid_request("`echo` with `logprobs` is not supported when streaming", "echo")
    if gen.parameters.decoder_input_details and not state.config.enable_prefill_logprobs:
        raise p.invalid_request(
            "`echo` with `logprobs` needs the prompt's logprobs: restart the server with "
            "`--enable-prefill-logprobs`", "echo")
    started_at = time.monotonic()
    valids = [await native.validate(request, prompt, gen.parameters, bool(body.stream))
              for prompt in prompts]
    return Job.of(request, gen, model, valids, started_at)


class CompletionChoiceBuilder:
    """One completion choice: the echoed prompt, then text and logprobs token by token."""

    def __init__(self, job: Job, index: int, tokenizer, valid: ValidRequest):
        self.job, self.gen = job, job.gen
        self.text = ChoiceText(tokenizer, valid, keep=self.gen.keep_generated)
        self.prompt = job.prompt_of(index)
        self.logprobs = p.CompletionLogprobs() if self.gen.logprobs else None
        self.num_chars = 0
        self.num_taken = 0

    def start(self, first: InferEvent | None) -> str:
        """The echoed prompt (with its tokens' logprobs when asked), or nothing."""
        if not self.gen.echo:
            return ""
        if self.logprobs is not None and first is not None:
            for i, token in enumerate(first.prefill_tokens or []):
                text = token_text(self.job.request, token)
                self._add(text, None if i == 0 else token.logprob, None if i == 0 else {})
                self.num_chars += len(text)
        self.num_chars = len(self.prompt.inputs)
        return self.prompt.inputs

    def push(self, event: InferEvent) -> str:
        """The text this event adds; its logprobs go to `self.logprobs`."""
        delta = self.text.push(event)
        if self.logprobs is not None and self.gen.keep_generated:
            alternatives = {token_text(self.job.request, t): _logprob(t.logprob)
                            for t in event.top_tokens}
            self._add(token_text(self.job.request, event.token), event.token.logprob,
                      alternatives)
        # NOTE: a token's offset is where the text it completed starts in the choice's text.
        self.num_chars += len(delta)
        return delta

    def take_logprobs(self) -> p.CompletionLogprobs | None:
        """The logprobs added since the last call (one stream chunk's worth)."""
        if self.logprobs is None:
            return None
        lp, start = self.logprobs, self.num_taken
        self.num_taken = len(lp.tokens)
        return p.CompletionLogprobs(tokens=lp.tokens[start:], token_logprobs=lp.token_logprobs[start:],
                                    top_logprobs=lp.top_logprobs[start:],
                                    text_offset=lp.text_offset[start:])

    def _add(self, text: str, logprob: float | None, alternatives: dict | None) -> None:
        lp = self.logprobs
        lp.tokens.append(text)
        lp.token_logprobs.append(None if logprob is None else _logprob(logprob))
        # As OpenAI: the sampled token is always among its top logprobs.
        lp.top_logprobs.append(None if alternatives is None
                               else {text: _logprob(logprob), **alternatives})
        lp.text_offset.append(self.num_chars)

    def finish_reason(self, event: InferEvent) -> str | None:
        if event.finish_reason is None:
            return None
        return p.finish_reason(event.finish_reason) if self.gen.keep_generated else "length"


async def completion_chunks(job: Job, include_usage: bool) -> AsyncIterator[p.Completion]:
    header = job.header("cmpl")
    tokenizer = job.request.app.state.router.tokenizer
    builders = [CompletionChoiceBuilder(job, i, tokenizer, v) for i, v in enumerate(job.choices)]
    for index, builder in enumerate(builders):
        if job.gen.echo:
            choice = p.CompletionChoice(index=index, text=builder.start(None))
            yield p.Completion(**header, choices=[choice])
    num_generated_tokens = num_cached_tokens = 0
    async for index, event in stream(job):
        text = builders[index].push(event)
        logprobs = builders[index].take_logprobs()
        finish = builders[index].finish_reason(event)
        if finish is not None:
            num_cached_tokens += job.cached_tokens(index, event)
        if finish is not None and job.gen.keep_generated:
            num_generated_tokens += event.num_generated_tokens
        if not text and not (logprobs and logprobs.tokens) and finish is None:
            continue
        choice = p.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        yield p.Completion(**header, choices=[choice])
    if include_usage:
        yield p.Completion(**header, choices=[],
                           usage=job.usage(num_generated_tokens, num_cached_tokens))


# ---- models --------------------------------------------------------------------------------


def model_card(openai: OpenAIServing, name: str) -> p.Model:
    return p.Model(id=name, created=openai.created, max_model_len=openai.max_model_len)


async def list_models(request: Request) -> Response:
    openai = serving(request)
    models = p.ModelList(data=[model_card(openai, name) for name in openai.model_names])
    return JSONResponse(models.model_dump(mode="json"))


@answers_errors
async def retrieve_model(request: Request) -> Response:
    openai = serving(request)
    name = openai.model_name(request.path_params["model"])
    return JSONResponse(model_card(openai, name).model_dump(mode="json"))


def routes() -> list[Route]:
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
    ]
