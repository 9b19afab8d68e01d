"""The router's HTTP API end to end over `FakeShardClient`: TGI's shapes, statuses and metrics.

`create_app(config, client=fake, tokenizer=tok)` runs in-process through
`httpx.ASGITransport`; the lifespan (warmup, batcher start) runs through
`app.router.lifespan_context`, since the transport does not run it.
"""

import asyncio
import contextlib
import json
import re
import threading
from dataclasses import dataclass, replace

import httpx
import pytest
from fake_shard import FakeShardClient, chain, logprob

from tgi_server.launcher.config import free_port
from tgi_server.router.app import RouterState, create_app
from tgi_server.router.client import ShardError
from tgi_server.router.config import RouterConfig
from tgi_server.router.server import serve_metrics_port
from tgi_server.router.validation import Validator

MODEL_ID = "fake-org/fake-model"
PROMPT = "def main"
NUM_BLOCKS, BLOCK_SIZE, MAX_POSITIONS = 64, 4, 128


@dataclass
class Router:
    http: httpx.AsyncClient
    fake: FakeShardClient
    state: RouterState


@contextlib.asynccontextmanager
async def serve(tokenizer, fake: FakeShardClient | None = None, **config):
    fake = fake or FakeShardClient(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
                                   max_position_embeddings=MAX_POSITIONS)
    app = create_app(RouterConfig(tokenizer="unused", shard_urls=(), model_id=MODEL_ID, **config),
                     client=fake, tokenizer=tokenizer)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
            yield Router(http, fake, app.state.router)


@pytest.fixture
async def router(tokenizer):
    async with serve(tokenizer) as router:
        yield router


def expected(tokenizer, max_new_tokens: int, inputs: str = PROMPT) -> tuple[list[int], str]:
    """The fake's tokens for `inputs`, and their text (special tokens skipped)."""
    tokens = chain(tokenizer.encode(inputs)[-1], max_new_tokens)
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True)


def sse_events(body: str) -> list[dict]:
    chunks = [c for c in body.split("\n\n") if c]
    assert all(c.startswith("data:") for c in chunks), body
    return [json.loads(c[len("data:"):]) for c in chunks]


def metric(text: str, name: str) -> float:
    """The value of one sample, e.g. `tgi_request_failure{err="validation"}` (0 if absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def until(condition, what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never reached: {what}")


# ---- start-up and /info -----------------------------------------------------------------


async def test_startup_clears_reads_info_and_warms_up(router):
    # max_total = the model's 128 positions, max_input = 127, prefill = max(127, 4096).
    assert router.fake.calls[:3] == [("clear", None), ("info",), ("warmup", 127, 4096, 128, 0)]
    assert router.state.batcher.allocator.num_blocks == NUM_BLOCKS


async def test_info(router):
    response = await router.http.get("/info")
    assert response.status_code == 200
    info = response.json()
    assert info["model_id"] == MODEL_ID
    assert info["model_dtype"] == "float32"
    assert info["model_device_type"] == "cpu"
    assert info["model_pipeline_tag"] == "text-generation"
    assert info["router"] == "text-generation-router"
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (127, 128)
    assert info["max_batch_total_tokens"] == NUM_BLOCKS * BLOCK_SIZE
    assert info["max_concurrent_requests"] == 128
    assert (info["max_best_of"], info["max_stop_sequences"]) == (2, 4)
    assert info["max_client_batch_size"] == 4
    assert info["waiting_served_ratio"] == 0.3
    assert info["max_waiting_tokens"] == 20
    assert isinstance(info["version"], str) and info["version"]


# ---- /generate --------------------------------------------------------------------------


async def test_generate(router, tokenizer):
    response = await router.http.post(
        "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert response.status_code == 200
    assert response.json() == {"generated_text": expected(tokenizer, 3)[1]}
    num_prompt_tokens = len(tokenizer.encode(PROMPT))
    assert response.headers["x-prompt-tokens"] == str(num_prompt_tokens)
    assert response.headers["x-generated-tokens"] == "3"
    assert response.headers["x-compute-type"] == "cpu"
    for header in ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time",
                   "x-time-per-token"):
        assert int(response.headers[header]) >= 0
    prefill = router.fake.calls_of("prefill")[0]
    assert router.fake.requests[prefill[2][0]].input_ids == tokenizer.encode(PROMPT)


@pytest.mark.parametrize("disable_lookahead", [False, True])
async def test_decode_lookahead_follows_the_flag(tokenizer, disable_lookahead):
    async with serve(tokenizer, disable_lookahead=disable_lookahead) as router:
        response = await router.http.post("/generate", json={
            "inputs": PROMPT, "parameters": {"max_new_tokens": 5}})
        assert response.status_code == 200
        assert response.json()["generated_text"] == expected(tokenizer, 5)[1]
        # Decodes 2-4 collect the step the one before ran ahead, unless the flag is set.
        assert router.fake.num_collected == (0 if disable_lookahead else 3)


async def test_generate_details(tokenizer):
    # NOTE: as TGI, prompt logprobs are only computed with --enable-prefill-logprobs.
    async with serve(tokenizer, enable_prefill_logprobs=True) as router:
        response = await router.http.post("/generate", json={
            "inputs": PROMPT,
            "parameters": {"max_new_tokens": 3, "details": True, "decoder_input_details": True,
                           "top_n_tokens": 2, "return_full_text": True},
        })
    assert response.status_code == 200
    body = response.json()
    tokens, text = expected(tokenizer, 3)
    assert body["generated_text"] == PROMPT + text
    details = body["details"]
    assert set(details) == {"finish_reason", "generated_tokens", "seed", "prefill", "tokens",
                            "top_tokens"}
    assert (details["finish_reason"], details["generated_tokens"]) == ("length", 3)
    assert details["seed"] is None  # greedy
    assert [t["id"] for t in details["tokens"]] == tokens
    assert [t["logprob"] for t in details["tokens"]] == pytest.approx([logprob(t) for t in tokens])
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in details["tokens"])
    # Prompt tokens: the first has no logprob (null, not NaN).
    prompt_ids = tokenizer.encode(PROMPT)
    assert [t["id"] for t in details["prefill"]] == prompt_ids
    assert [t["logprob"] for t in details["prefill"]] == [None] + [-1.0] * (len(prompt_ids) - 1)
    assert [[t["id"] for t in top] for top in details["top_tokens"]] == [[t, t + 1] for t in tokens]


async def test_compat_route_wraps_in_a_list(router, tokenizer):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    response = await router.http.post("/", json=body)
    assert response.status_code == 200
    assert response.json() == [{"generated_text": expected(tokenizer, 2)[1]}]

    response = await router.http.post(
        "/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert [e["token"]["id"] for e in events] == expected(tokenizer, 2)[0]
    assert events[-1]["generated_text"] == expected(tokenizer, 2)[1]


# ---- /generate_stream -------------------------------------------------------------------


async def test_generate_stream(router, tokenizer):
    response = await router.http.post("/generate_stream", json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-accel-buffering"] == "no"
    assert response.text.startswith("data:{")
    events = sse_events(response.text)
    tokens, text = expected(tokenizer, 3)
    assert len(events) == 3
    for i, event in enumerate(events):
        assert set(event) == {"index", "token", "generated_text", "details"}
        assert event["index"] == i + 1
        assert event["token"]["id"] == tokens[i]
        assert event["token"]["logprob"] == pytest.approx(logprob(tokens[i]))
        assert event["token"]["special"] is False
    assert [e["generated_text"] for e in events] == [None, None, text]
    assert [e["details"] for e in events[:-1]] == [None, None]
    assert events[-1]["details"] == {
        "finish_reason": "length", "generated_tokens": 3, "seed": None,
        "input_length": len(tokenizer.encode(PROMPT)),
    }


async def test_generate_stream_without_details(router, tokenizer):
    response = await router.http.post("/generate_stream", json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
    events = sse_events(response.text)
    assert [e["details"] for e in events] == [None, None]
    assert events[-1]["generated_text"] == expected(tokenizer, 2)[1]


# ---- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("body, message", [
    ({"inputs": ""}, "`inputs` cannot be empty"),
    ({"inputs": PROMPT, "parameters": {"temperature": 0}},
     "`temperature` must be strictly positive"),
    ({"inputs": PROMPT, "parameters": {"max_new_tokens": 200}},
     "`inputs` tokens + `max_new_tokens` must be <= 128"),
    ({"parameters": {}}, "Failed to deserialize the JSON body: inputs"),
])
async def test_validation_error_is_422(router, body, message):
    response = await router.http.post("/generate", json=body)
    assert response.status_code == 422
    assert set(response.json()) == {"error", "error_type"}
    assert response.json()["error_type"] == "validation"
    assert response.json()["error"].startswith(message)
    assert router.fake.calls_of("prefill") == []


async def test_invalid_json_is_422(router):
    response = await router.http.post("/generate", content=b"{not json")
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"


async def test_stream_validation_error_arrives_in_stream(router):
    response = await router.http.post("/generate_stream", json={"inputs": ""})
    assert response.status_code == 200
    assert sse_events(response.text) == [
        {"error": "`inputs` cannot be empty", "error_type": "validation"}]


async def test_overloaded_is_429_past_max_concurrent_requests(tokenizer):
    async with serve(tokenizer, max_concurrent_requests=2) as router:
        gate = asyncio.Event()

        async def hold(method: str, step: int) -> None:
            await gate.wait()

        router.fake.before_step = hold
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
        held = [asyncio.create_task(router.http.post("/generate", json=body)) for _ in range(2)]
        await until(lambda: router.state.infer.num_in_flight == 2, "two requests in flight")

        response = await router.http.post("/generate", json=body)
        assert response.status_code == 429
        assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        response = await router.http.post("/generate_stream", json=body)
        assert response.status_code == 200
        assert sse_events(response.text) == [
            {"error": "Model is overloaded", "error_type": "overloaded"}]

        gate.set()
        for task in held:
            assert (await task).status_code == 200
        metrics = (await router.http.get("/metrics")).text
        assert metric(metrics, 'tgi_request_failure{err="overloaded"}') == 2
        # The permits came back.
        assert (await router.http.post("/generate", json=body)).status_code == 200
        assert router.state.infer.num_in_flight == 0


async def test_shard_failure_is_424_and_later_requests_work(router, tokenizer):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    router.fake.fail_next("decode")
    response = await router.http.post("/generate", json=body)
    assert response.status_code == 424
    assert response.json() == {
        "error": "Request failed during generation: fake shard: decode failed: CUDA out of memory",
        "error_type": "generation",
    }

    router.fake.fail_next("decode")
    response = await router.http.post("/generate_stream", json=body)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert [e["token"]["id"] for e in events[:-1]] == expected(tokenizer, 1)[0]
    assert events[-1]["error_type"] == "generation"

    response = await router.http.post("/generate", json=body)
    assert response.status_code == 200
    assert response.json() == {"generated_text": expected(tokenizer, 3)[1]}
    metrics = (await router.http.get("/metrics")).text
    assert metric(metrics, 'tgi_request_failure{err="generation"}') == 2
    assert metric(metrics, 'tgi_batch_inference_failure{method="decode"}') == 2
    allocator = router.state.batcher.allocator
    assert allocator.num_free_blocks == allocator.num_blocks
    assert router.fake.violations == []


async def test_concurrent_requests_all_succeed(router, tokenizer):
    bodies = [{"inputs": PROMPT, "parameters": {"max_new_tokens": n}} for n in (1, 4, 2, 6)]
    responses = await asyncio.gather(*(router.http.post("/generate", json=b) for b in bodies))
    for body, response in zip(bodies, responses):
        assert response.json() == {"generated_text": expected(
            tokenizer, body["parameters"]["max_new_tokens"])[1]}
    assert router.fake.violations == []


# ---- /health and /metrics ---------------------------------------------------------------


async def test_health(router):
    response = await router.http.get("/health")
    assert response.status_code == 200
    assert router.fake.calls[-1] == ("health",)

    router.fake.health_error = ShardError("shard 0: Health failed: UNAVAILABLE")
    response = await router.http.get("/health")
    assert response.status_code == 503
    assert response.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    assert router.state.batcher.healthy is False

    router.fake.health_error = None
    assert (await router.http.get("/health")).status_code == 200
    assert router.state.batcher.healthy is True


async def test_metrics_are_served_on_the_prometheus_port_too(router, caplog):
    port = free_port()
    config = RouterConfig(tokenizer="unused", shard_urls=(), hostname="127.0.0.1",
                          prometheus_port=port)
    server = await serve_metrics_port(config, router.state.metrics)
    try:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
        assert (await router.http.post("/generate", json=body)).status_code == 200
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            served = await http.get("/metrics")
            assert (await http.post("/metrics")).status_code == 405
        assert served.status_code == 200
        assert served.headers["content-type"] == "text/plain; version=0.0.4"
        assert served.text == (await router.http.get("/metrics")).text
        assert metric(served.text, "tgi_request_success") == 1
        # the port taken (here by the server above): logged, and the router starts anyway
        assert await serve_metrics_port(config, router.state.metrics) is None
        assert f"metrics not served on --prometheus-port {port}" in caplog.text
    finally:
        server.close()
        await server.wait_closed()
    assert await serve_metrics_port(replace(config, prometheus_port=0), router.state.metrics) is None


async def test_requests_are_validated_on_the_validation_workers(tokenizer, monkeypatch):
    threads = set()
    validate = Validator.validate

    def recording(self, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return validate(self, *args, **kwargs)

    monkeypatch.setattr(Validator, "validate", recording)
    async with serve(tokenizer, validation_workers=1) as router:
        assert router.state.validation_pool._max_workers == 1
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
        assert (await router.http.post("/generate", json=body)).status_code == 200
        info = (await router.http.get("/info")).json()
    assert info["validation_workers"] == 1
    assert len(threads) == 1 and threads.pop().startswith("validation")


async def test_cors_allows_any_origin_unless_origins_are_listed(tokenizer):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    async with serve(tokenizer) as router:  # TGI's default: any origin
        r = await router.http.options("/generate", headers={"Origin": "https://ui.example",
                                                            **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        r = await router.http.get("/info", headers={"Origin": "https://ui.example"})
        assert r.headers["access-control-allow-origin"] == "*"
    async with serve(tokenizer, cors_allow_origin=("https://ui.example",)) as router:
        r = await router.http.options("/generate", headers={"Origin": "https://ui.example",
                                                            **preflight})
        assert r.headers["access-control-allow-origin"] == "https://ui.example"
        r = await router.http.options("/generate", headers={"Origin": "https://evil.example",
                                                            **preflight})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = await router.http.get("/info", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


async def test_metrics(router):
    before = (await router.http.get("/metrics")).text
    for name in ("tgi_request_count", "tgi_request_success", "tgi_request_failure",
                 "tgi_batch_inference_count", "tgi_batch_inference_success", "tgi_queue_size",
                 "tgi_batch_current_size", "tgi_batch_current_max_tokens",
                 "tgi_batch_max_total_tokens", "tgi_request_duration",
                 "tgi_request_validation_duration", "tgi_request_queue_duration",
                 "tgi_request_inference_duration", "tgi_request_mean_time_per_token_duration",
                 "tgi_request_generated_tokens", "tgi_request_input_length",
                 "tgi_request_max_new_tokens", "tgi_batch_inference_duration",
                 "tgi_batch_forward_duration", "tgi_batch_next_size", "tgi_batch_decode_duration",
                 "tgi_request_skipped_tokens", "tgi_batch_filter_duration",
                 "tgi_batch_concat_duration"):
        assert f"# TYPE {name} " in before, name
    assert "# TYPE tgi_request_count counter" in before
    assert metric(before, "tgi_batch_max_total_tokens") == NUM_BLOCKS * BLOCK_SIZE

    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
    assert (await router.http.post("/generate", json=body)).status_code == 200
    assert (await router.http.post("/generate_stream", json=body)).status_code == 200
    assert (await router.http.post("/generate", json={"inputs": ""})).status_code == 422
    after = (await router.http.get("/metrics")).text

    def moved(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert moved("tgi_request_count") == 3
    assert moved("tgi_request_success") == 2
    assert moved('tgi_request_failure{err="validation"}') == 1
    assert moved('tgi_batch_inference_count{method="prefill"}') == 2
    assert moved('tgi_batch_inference_count{method="decode"}') == 4
    assert moved('tgi_batch_inference_success{method="decode"}') == 4
    assert moved("tgi_request_duration_count") == 2
    assert moved("tgi_request_generated_tokens_sum") == 6
    # The shard's own step time, per call (the fake reports 1 µs for each).
    assert moved('tgi_batch_forward_duration_count{method="decode"}') == 4
    assert moved('tgi_batch_forward_duration_sum{method="decode"}') == pytest.approx(4e-6)
    assert moved('tgi_batch_concat_duration_count{method="decode"}') == 4
    assert moved('tgi_batch_decode_duration_count{method="decode"}') == 4
    assert moved('tgi_batch_decode_duration_count{method="prefill"}') == 2
    # one observation per request per step (6: 2 prefills + 4 decodes), none speculated
    assert (moved("tgi_request_skipped_tokens_count"), moved("tgi_request_skipped_tokens_sum")) == (6, 0)
    assert metric(after, "tgi_batch_current_size") == 0
    assert metric(after, "tgi_queue_size") == 0


def test_a_prefill_budget_below_the_input_limit_needs_chunking():
    from tgi_server.router.app import StartupError, resolve_limits
    from tgi_server.router.client import ShardInfo
    from tgi_server.router.config import RouterConfig

    config = RouterConfig(tokenizer="t", shard_urls=("u",), max_input_tokens=100,
                          max_total_tokens=200, max_batch_prefill_tokens=32)
    info = ShardInfo("m", "llama", "float32", "cpu", 16, 512, 4096, (2,), 1,
                     use_prefix_caching=True, support_chunking=True)
    assert resolve_limits(config, info).max_batch_prefill_tokens == 32
    with pytest.raises(StartupError, match="must be >= --max-input-tokens"):
        resolve_limits(replace(config, prefill_chunking=False), info)
    with pytest.raises(StartupError):  # shards that cannot stop a prefill early
        resolve_limits(config, replace(info, support_chunking=False))
