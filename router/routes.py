"""TGI's native HTTP API: thin handlers over `Validator` and `Infer`.

Upstream: HTTP clients (TGI's `text-generation` client, `huggingface_hub`, curl). Downstream:
`validation.py` (a `ValidRequest`), `infer.py` (events), `protocol.py` (response models),
`streaming.py` (SSE). Errors are `{"error", "error_type"}` with TGI's status codes.
"""

import asyncio
import dataclasses
import json
import random
import time
from collections.abc import AsyncIterator

import pydantic
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tgi_server.router import protocol as p
from tgi_server.router import tracing
from tgi_server.router.infer import InferError, InferEvent, TokenInfo
from tgi_server.router.metrics import METRICS_MEDIA_TYPE
from tgi_server.router.streaming import sse_response
from tgi_server.router.types import ValidRequest
from tgi_server.router.validation import ValidationError

VERSION = "0.1.0"


def validation_error(message: str) -> InferError:
    return InferError(message, "validation", 422)


def error_response(e: InferError) -> JSONResponse:
    return JSONResponse(p.ErrorResponse(error=e.message, error_type=e.error_type).model_dump(),
                        status_code=e.status)


def error_event(e: Exception) -> p.ErrorResponse:
    if not isinstance(e, InferError):
        e = InferError(f"{type(e).__name__}: {e}", "incomplete_generation_stream", 500)
    return p.ErrorResponse(error=e.message, error_type=e.error_type)


async def parse_body(request: Request, model: type[pydantic.BaseModel]):
    try:
        return model.model_validate(json.loads(await request.body()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a body that is not UTF-8 too
        raise validation_error(f"Failed to parse the request body as JSON: {e}") from e
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        raise validation_error(f"Failed to deserialize the JSON body: {where}: {first['msg']}") from e


async def validate(request: Request, inputs: str, parameters: p.GenerateParameters,
                   stream: bool, add_special_tokens: bool = True) -> ValidRequest:
    state = request.app.state.router
    state.metrics.request_count.inc()
    start = time.monotonic()
    try:
        with tracing.span("validate"):
            valid = await state.in_validation_pool(state.validator.validate, inputs, parameters,
                                                   stream, add_special_tokens=add_special_tokens)
    except ValidationError as e:
        state.metrics.request_failure.inc(err="validation")
        raise validation_error(str(e)) from e
    state.metrics.request_validation_duration.observe(time.monotonic() - start)
    return valid


# ---- one request, start to end --------------------------------------------------------------


async def run_one(state, valid: ValidRequest) -> list[InferEvent]:
    state.infer.try_acquire()
    try:
        return await state.infer.generate_all(valid)
    except InferError:
        raise
    finally:
        state.infer.release()


async def run_best_of(state, valid: ValidRequest) -> list[list[InferEvent]]:
    """`best_of` sequences with their own random seeds, best (highest logprob sum) first."""
    if valid.best_of <= 1:
        return [await run_one(state, valid)]
    variants = [
        dataclasses.replace(valid, sampling=dataclasses.replace(valid.sampling, seed=random.getrandbits(63)))
        for _ in range(valid.best_of)
    ]
    results = await asyncio.gather(*(run_one(state, v) for v in variants))
    return sorted(results, key=lambda events: -sum(e.token.logprob or 0.0 for e in events))


def token_model(t: TokenInfo) -> p.Token:
    return p.Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special)


def record_success(state, valid: ValidRequest, final: InferEvent, validated_at: float) -> dict[str, str]:
    """Observe the request's metrics; returns TGI's timing headers."""
    now = time.monotonic()
    m = state.metrics
    n = final.num_generated_tokens
    inference = now - final.started_at
    per_token = inference / max(n, 1)
    m.request_success.inc()
    m.request_duration.observe(now - final.queued_at)
    m.request_inference_duration.observe(inference)
    m.request_mean_time_per_token_duration.observe(per_token)
    m.request_generated_tokens.observe(n)
    m.request_input_length.observe(valid.num_prompt_tokens)
    m.request_max_new_tokens.observe(valid.stopping.max_new_tokens)
    ms = lambda s: str(int(s * 1000))  # noqa: E731
    tracing.record(
        {"total_time_ms": (now - validated_at) * 1000,
         "validation_time_ms": (final.queued_at - validated_at) * 1000,
         "queue_time_ms": (final.started_at - final.queued_at) * 1000,
         "inference_time_ms": inference * 1000, "time_per_token_ms": per_token * 1000},
        final.queued_at, final.started_at, prompt_tokens=valid.num_prompt_tokens,
        generated_tokens=n, finish_reason=final.finish_reason.value)
    return {
        "x-compute-type": state.info.device_type,
        "x-total-time": ms(now - validated_at),
        "x-validation-time": ms(final.queued_at - validated_at),
        "x-queue-time": ms(final.started_at - final.queued_at),
        "x-inference-time": ms(inference),
        "x-time-per-token": ms(per_token),
        "x-prompt-tokens": str(valid.num_prompt_tokens),
        "x-generated-tokens": str(n),
    }


def sequence_fields(valid: ValidRequest, events: list[InferEvent]) -> dict:
    final = events[-1]
    prefill = events[0].prefill_tokens or []
    return dict(
        generated_text=final.generated_text,
        finish_reason=final.finish_reason,
        generated_tokens=final.num_generated_tokens,
        seed=valid.sampling.seed if valid.sampling.do_sample else None,
        prefill=[p.PrefillToken(id=t.id, text=t.text, logprob=t.logprob) for t in prefill],
        tokens=[token_model(e.token) for e in events],
        top_tokens=[[token_model(t) for t in e.top_tokens] for e in events] if valid.top_n_tokens else [],
    )


def generate_response(valid: ValidRequest, sequences: list[list[InferEvent]]) -> p.GenerateResponse:
    best = sequences[0]
    text = best[-1].generated_text
    if valid.return_full_text:
        text = valid.inputs + text
    if not valid.details:
        return p.GenerateResponse(generated_text=text)
    fields = sequence_fields(valid, best)
    fields.pop("generated_text")
    others = None
    if len(sequences) > 1:
        others = [p.BestOfSequence(**sequence_fields(valid, s)) for s in sequences[1:]]
    return p.GenerateResponse(generated_text=text, details=p.Details(**fields, best_of_sequences=others))


async def until_disconnect(request: Request, coro):
    """Await `coro`, cancelling it if the client goes away first."""
    task = asyncio.ensure_future(coro)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise asyncio.CancelledError("client disconnected")
    return task.result()


# ---- handlers ---------------------------------------------------------------------------------


async def generate_json(request: Request, inputs: str, parameters: p.GenerateParameters) -> Response:
    state = request.app.state.router
    start = time.monotonic()
    valid = await validate(request, inputs, parameters, stream=False)
    try:
        sequences = await until_disconnect(request, run_best_of(state, valid))
    except InferError as e:
        if e.error_type != "overloaded":
            state.metrics.request_failure.inc(err=e.error_type)
        raise
    headers = record_success(state, valid, sequences[0][-1], start)
    return JSONResponse(generate_response(valid, sequences).model_dump(mode="json"), headers=headers)


async def stream_events(request: Request, inputs: str, parameters: p.GenerateParameters,
                        ) -> AsyncIterator[p.StreamResponse]:
    state = request.app.state.router
    start = time.monotonic()
    valid = await validate(request, inputs, parameters, stream=True)
    state.infer.try_acquire()
    try:
        async for event in state.infer.generate(valid):
            yield stream_response(valid, event)
            if event.finish_reason is not None:
                record_success(state, valid, event, start)
    except InferError as e:
        state.metrics.request_failure.inc(err=e.error_type)
        raise
    finally:
        state.infer.release()


def stream_response(valid: ValidRequest, event: InferEvent) -> p.StreamResponse:
    response = p.StreamResponse(
        index=event.num_generated_tokens,
        token=token_model(event.token),
        top_tokens=[token_model(t) for t in event.top_tokens],
    )
    if event.finish_reason is not None:
        text = event.generated_text
        response.generated_text = valid.inputs + text if valid.return_full_text else text
        if valid.details:
            response.details = p.StreamDetails(
                finish_reason=event.finish_reason,
                generated_tokens=event.num_generated_tokens,
                seed=valid.sampling.seed if valid.sampling.do_sample else None,
                input_length=valid.num_prompt_tokens,
            )
    return response


async def generate(request: Request) -> Response:
    body = await parse_body(request, p.GenerateRequest)
    return await generate_json(request, body.inputs, body.parameters)


async def generate_stream(request: Request) -> Response:
    # NOTE: as in TGI, the status is always 200 and every error (422, 429...) arrives in-stream.
    # The body is read before streaming starts: once the response streams, Starlette listens
    # for the client's disconnect on the same receive channel.
    try:
        body = await parse_body(request, p.GenerateRequest)
    except InferError as e:
        return sse_response(failed_stream(e), error_event)
    return sse_response(stream_events(request, body.inputs, body.parameters), error_event)


async def failed_stream(error: InferError) -> AsyncIterator[p.StreamResponse]:
    raise error
    yield  # unreachable: the yield makes this an async generator


async def compat_generate(request: Request) -> Response:
    """`POST /`: TGI's compatibility route; a non-streamed answer is wrapped in a list."""
    body = await parse_body(request, p.CompatGenerateRequest)
    if body.stream:
        return sse_response(stream_events(request, body.inputs, body.parameters), error_event)
    response = await generate_json(request, body.inputs, body.parameters)
    response.body = b"[" + response.body + b"]"
    response.headers["content-length"] = str(len(response.body))
    return response


async def health(request: Request) -> Response:
    state = request.app.state.router
    try:
        await state.client.health()
    except Exception:  # noqa: BLE001 -- any failure means unhealthy
        state.batcher.healthy = False
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
    state.batcher.healthy = True
    return Response(status_code=200)


async def info(request: Request) -> Response:
    state = request.app.state.router
    body = p.Info.from_config(
        state.config,
        max_input_tokens=state.limits.max_input_tokens,
        max_total_tokens=state.limits.max_total_tokens,
        max_batch_total_tokens=state.max_batch_total_tokens,
        version=VERSION,
        model_dtype=state.info.dtype,
        model_device_type=state.info.device_type,
        model_pipeline_tag="text-generation",
    )
    return JSONResponse(body.model_dump(mode="json"))


async def metrics(request: Request) -> Response:
    state = request.app.state.router
    return Response(state.metrics.render(), media_type=METRICS_MEDIA_TYPE)


async def tokenize(request: Request) -> Response:
    state = request.app.state.router
    body = await parse_body(request, p.TokenizeRequest)
    tokens = await state.in_validation_pool(
        state.validator.validate_tokenize, body.inputs, body.add_special_tokens)
    return JSONResponse([t.model_dump() for t in tokens])


def routes() -> list[Route]:
    return [
        Route("/", compat_generate, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/generate_stream", generate_stream, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ping", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
    ]


def exception_handlers() -> dict:
    async def infer_error(request: Request, e: InferError) -> Response:
        return error_response(e)

    return {InferError: infer_error}
