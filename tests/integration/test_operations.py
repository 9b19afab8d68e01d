"""What an operator wires to a running server: spans to an OTLP collector, and the metrics port."""

import time
from concurrent import futures

import grpc
import httpx
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from .conftest import free_port

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps (service name, span name, trace id)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes
                           if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                self.spans += [(service, s.name, s.trace_id.hex()) for s in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_the_collector_and_metrics_their_port(model_dir, launch, monkeypatch):
    collector, server = Collector(), grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    otlp_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export batches every 100 ms
    metrics_port = free_port()
    try:
        with launch(model_dir("llama", "tiny"), "--otlp-endpoint", f"http://127.0.0.1:{otlp_port}",
                    "--otlp-service-name", "tgi-test",
                    "--prometheus-port", str(metrics_port)) as url:
            r = httpx.post(f"{url}/generate", timeout=60, headers={
                "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"},
                json={"inputs": "hello", "parameters": {"max_new_tokens": 3}})
            assert r.status_code == 200
            deadline = time.monotonic() + 20
            want = {("tgi-test", name, TRACE_ID) for name in ("generate", "validate", "queue",
                                                               "infer")}
            while not want <= set(collector.spans) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert want <= set(collector.spans), collector.spans
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            assert metrics.status_code == 200
            assert "tgi_request_success 1.0" in metrics.text.splitlines()
    finally:
        server.stop(0)
