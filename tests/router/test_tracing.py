"""`--otlp-endpoint`: the spans of a generation request, through an in-memory exporter."""

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_app import PROMPT, serve

from tgi_server.router import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield exporter
    tracing._tracer = trace.NoOpTracer()


def by_name(exporter) -> dict:
    return {s.name: s for s in exporter.get_finished_spans()}


async def test_a_request_is_one_span_continuing_the_callers_trace(tokenizer, spans):
    async with serve(tokenizer) as router:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
        r = await router.http.post("/generate", json=body, headers=TRACEPARENT)
        assert r.status_code == 200
    got = by_name(spans)
    assert set(got) == {"generate", "validate", "queue", "infer"}
    request = got["generate"]
    assert request.kind == trace.SpanKind.SERVER
    assert format(request.context.trace_id, "032x") == TRACE_ID
    assert format(request.parent.span_id, "016x") == PARENT_ID
    for child in ("validate", "queue", "infer"):
        assert got[child].parent.span_id == request.context.span_id, child
    assert got["queue"].end_time <= got["infer"].start_time + 1_000  # laid end to end
    assert got["validate"].end_time <= got["queue"].start_time + 1_000_000
    attributes = request.attributes
    assert (attributes["generated_tokens"], attributes["http.response.status_code"]) == (3, 200)
    assert attributes["prompt_tokens"] > 0 and attributes["inference_time_ms"] >= 0
    assert attributes["finish_reason"] == "length"


async def test_a_stream_span_ends_with_the_stream(tokenizer, spans):
    async with serve(tokenizer) as router:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
        r = await router.http.post("/generate_stream", json=body)
        assert r.status_code == 200 and r.text.count("data:") == 4
        r = await router.http.post("/v1/chat/completions", json={
            "model": "tgi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "stream": True})
        assert r.status_code == 200
    finished = spans.get_finished_spans()
    streams = [s for s in finished if s.name in ("generate_stream", "chat_completions")]
    assert [s.name for s in streams] == ["generate_stream", "chat_completions"]
    for stream in streams:
        inside = [s for s in finished if s.parent and s.parent.span_id == stream.context.span_id]
        assert sorted(s.name for s in inside) == ["infer", "queue", "validate"]
        assert stream.end_time >= max(s.end_time for s in inside)  # open until the last event
        assert stream.parent is None  # no traceparent: a trace of its own


async def test_a_refused_request_has_its_status_and_no_inference(tokenizer, spans):
    async with serve(tokenizer) as router:
        r = await router.http.post("/generate", json={"inputs": ""})
        assert r.status_code == 422
        assert (await router.http.get("/health")).status_code == 200  # not traced
    got = by_name(spans)
    assert set(got) == {"generate", "validate"}
    assert got["generate"].attributes["http.response.status_code"] == 422
