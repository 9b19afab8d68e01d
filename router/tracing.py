"""Request spans over OpenTelemetry, exported by OTLP (TGI's `--otlp-endpoint`).

Upstream: `server.py` calls `init` when an endpoint is given; `app.py` puts `TracingMiddleware`
in front of the routes. Downstream: an OTLP/gRPC collector. Each generation request is one
server span named after its route (`generate`, `generate_stream`, `chat_completions`,
`completions`), continuing the caller's trace when it sends a W3C `traceparent` header, and
ending when the last byte of the response (the whole stream) is sent. Inside it: `validate`
(tokenization and checks), then `queue` and `infer`, whose times come from the request's own
clock (`record`), and TGI's timings as attributes. Without an endpoint the tracer is the
OpenTelemetry API's no-op one: a span costs a few attribute-free calls.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The routes that generate, and their span names (TGI's handler names).
SPAN_NAMES = {
    "/": "compat_generate",
    "/generate": "generate",
    "/generate_stream": "generate_stream",
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
}

_tracer: trace.Tracer = trace.NoOpTracer()
_propagator = TraceContextTextMapPropagator()


def init(endpoint: str, service_name: str):
    """Export spans to `endpoint` (OTLP/gRPC; `http://` means no TLS) as `service_name`.
    Returns the provider, whose `shutdown()` flushes what is left."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    use(provider)
    return provider


def use(provider) -> None:
    """Spans go to `provider` from now on (`init`, or a test's in-memory exporter)."""
    global _tracer
    _tracer = provider.get_tracer("tgi_server.router")


@contextmanager
def span(name: str) -> Iterator[trace.Span]:
    """A child of the current span (the request's)."""
    with _tracer.start_as_current_span(name) as current:
        yield current


def record(timings: dict[str, float], queued_at: float, started_at: float, **attributes) -> None:
    """On the request's span: TGI's timings as attributes, and `queue` and `infer` spans laid
    out from the request's monotonic clock (`queued_at`, `started_at`, until now)."""
    current = trace.get_current_span()
    if not current.is_recording():
        return
    current.set_attributes({**timings, **attributes})
    now_ns, now = time.time_ns(), time.monotonic()

    def wall(t: float) -> int:
        return now_ns - int((now - t) * 1e9)

    for name, start, end in (("queue", queued_at, started_at), ("infer", started_at, now)):
        child = _tracer.start_span(name, start_time=wall(start))
        child.end(end_time=wall(end))


class TracingMiddleware:
    """One server span per generation request, current while the route runs and streams."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = SPAN_NAMES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if name is None or scope["method"] != "POST" or isinstance(_tracer, trace.NoOpTracer):
            return await self.app(scope, receive, send)
        parent = _propagator.extract(Headers(scope=scope))
        with _tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER) as current:

            async def sending(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    current.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        current.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, sending)
