"""`/openapi.json` (and TGI's `/api-doc/openapi.json`) and a Swagger UI page at `/docs`.

The spec is built from the same pydantic models the handlers parse and answer with
(`protocol.py` for the native API, `openai/protocol.py` for the OpenAI one), so it cannot
drift from them. Upstream: `app.py` registers `routes()`.
"""

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tgi_server.router import protocol as native
from tgi_server.router.openai import protocol as openai
from tgi_server.router.routes import VERSION

_REF = "#/components/schemas/{model}"
_MODELS: tuple[type[BaseModel], ...] = (
    native.GenerateRequest, native.CompatGenerateRequest, native.TokenizeRequest,
    native.GenerateResponse, native.StreamResponse, native.SimpleToken, native.Info,
    native.ErrorResponse,
    openai.ChatCompletionRequest, openai.CompletionRequest, openai.ChatCompletion,
    openai.ChatCompletionChunk, openai.Completion, openai.ModelList, openai.Model,
    openai.OpenAIErrorResponse,
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _array(model: type[BaseModel]) -> dict[str, Any]:
    return {"type": "array", "items": _ref(model)}


def _json(schema: dict, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _sse(events: list[type[BaseModel]], description: str, done: str | None = None
         ) -> dict[str, Any]:
    """An event stream: `schema` describes one event, whose `data` is JSON of `events`."""
    data: dict[str, Any] = {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": {"anyOf": [_ref(m) for m in events]}}
    if done is not None:
        data = {"anyOf": [{"const": done}, data]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {"description": description, "content": {"text/event-stream": {"schema": event}}}


def _errors(model: type[BaseModel], *statuses: int) -> dict[str, Any]:
    meaning = {400: "Invalid request", 404: "Unknown model", 422: "Invalid request",
               424: "Generation failed", 429: "Overloaded", 503: "Unhealthy"}
    return {str(s): _json(_ref(model), meaning[s]) for s in statuses}


def _post(summary: str, tag: str, body: type[BaseModel], responses: dict) -> dict[str, Any]:
    return {"post": {"summary": summary, "tags": [tag], "responses": responses,
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": _ref(body)}}}}}


def _get(summary: str, tag: str, responses: dict, **extra: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, "tags": [tag], "responses": responses, **extra}}


def _native_paths() -> dict[str, Any]:
    errors = _errors(native.ErrorResponse, 422, 424, 429)
    generated = _json(_ref(native.GenerateResponse), "Generated text")
    stream = _sse([native.StreamResponse, native.ErrorResponse],
                  "One `data:{StreamResponse}` event per token; errors arrive in-stream")
    compat = {"description": "A list of one GenerateResponse, or an event stream",
              "content": {**_json(_array(native.GenerateResponse))["content"],
                          **stream["content"]}}
    return {
        "/": _post("/generate, or /generate_stream with `stream: true`", "TGI",
                   native.CompatGenerateRequest, {"200": compat, **errors}),
        "/generate": _post("Generate text", "TGI", native.GenerateRequest,
                           {"200": generated, **errors}),
        "/generate_stream": _post("Generate text, streamed as server-sent events", "TGI",
                                  native.GenerateRequest, {"200": stream}),
        "/tokenize": _post("Tokenize the inputs", "TGI", native.TokenizeRequest,
                           {"200": _json(_array(native.SimpleToken)),
                            **_errors(native.ErrorResponse, 422)}),
        "/info": _get("Model and router information", "TGI", {"200": _json(_ref(native.Info))}),
        "/health": _get("Health of the shards", "TGI", {"200": {"description": "Healthy"},
                        **_errors(native.ErrorResponse, 503)}),
        "/ping": _get("Health of the shards (SageMaker's name)", "TGI", {
            "200": {"description": "Healthy"}, **_errors(native.ErrorResponse, 503)}),
        "/metrics": _get("Prometheus metrics", "TGI", {"200": {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}}}}),
    }


def _openai_paths() -> dict[str, Any]:
    errors = _errors(openai.OpenAIErrorResponse, 400, 404, 429)

    def answer(model: type[BaseModel], chunk: type[BaseModel]) -> dict[str, Any]:
        stream = _sse([chunk, openai.OpenAIErrorResponse],
                      "With `stream: true`: `data: {chunk}` events (an error one if generation "
                      "fails midway), then `data: [DONE]`", done="[DONE]")
        return {"200": {"description": "The answer, or an event stream",
                        "content": {**_json(_ref(model))["content"], **stream["content"]}},
                **errors}

    model_param = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/v1/chat/completions": _post("Chat completion (OpenAI)", "OpenAI",
                                      openai.ChatCompletionRequest,
                                      answer(openai.ChatCompletion, openai.ChatCompletionChunk)),
        "/v1/completions": _post("Text completion (OpenAI)", "OpenAI", openai.CompletionRequest,
                                 answer(openai.Completion, openai.Completion)),
        "/v1/models": _get("The served model names", "OpenAI",
                           {"200": _json(_ref(openai.ModelList))}),
        "/v1/models/{model}": _get("One served model", "OpenAI",
                                   {"200": _json(_ref(openai.Model)),
                                    **_errors(openai.OpenAIErrorResponse, 404)},
                                   parameters=[model_param]),
    }


@functools.cache
def openapi_spec() -> dict[str, Any]:
    _, schemas = models_json_schema([(m, "validation") for m in _MODELS], ref_template=_REF)
    defs = schemas.get("$defs", {})
    # NOTE: pydantic qualifies clashing model names with their module (`a__b__Name`), which
    # would break the `$ref`s built by `_ref`: every model needs a unique class name.
    clashes = [name for name in defs if "__" in name]
    if clashes:
        raise AssertionError(f"models with clashing names in the OpenAPI spec: {clashes}")
    spec = {
        "openapi": "3.1.0",
        "info": {"title": "tgi-server", "version": VERSION,
                 "description": "TGI's native API and an OpenAI-compatible API."},
        "paths": {**_native_paths(), **_openai_paths()},
        "components": {"schemas": defs},
    }
    return spec


_DOCS_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>tgi-server API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="swagger-ui"><noscript>The API is described in
<a href="/openapi.json">/openapi.json</a>.</noscript></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi_spec())


async def docs(request: Request) -> Response:
    return HTMLResponse(_DOCS_HTML)


def routes() -> list[Route]:
    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/api-doc/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]

