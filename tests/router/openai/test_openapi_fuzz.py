"""Fuzz every operation of `/openapi.json` with schemathesis against the in-process app.

The app runs over the fake shard (schemathesis runs its lifespan). No generated request,
valid or not, may produce a 5xx; every answer (JSON or SSE event) must match the documented
status codes and schemas; and the server is left healthy, with no permit or KV block leaked.
"""

import pytest
from hypothesis import HealthCheck, settings
from openai_app import MODEL_ID, RecordingShard

from tgi_server.router.app import create_app
from tgi_server.router.config import RouterConfig

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# NOTE: not schemathesis' default checks: requests that only pydantic's lax parsing accepts
# (`false` as 0) or that the validator refuses on meaning (an empty prompt) are fine here.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]

MAX_EXAMPLES = 25  # per operation


@pytest.fixture(scope="module")
def app(tokenizer):
    # NOTE: small limits keep the fuzzer's requests cheap (at most 64 tokens per choice).
    fake = RecordingShard()
    config = RouterConfig(tokenizer="unused", shard_urls=(), model_id=MODEL_ID,
                          max_total_tokens=64, max_input_tokens=48)
    return create_app(config, client=fake, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_is_a_server_error(case):
    case.call_and_validate(checks=CHECKS)


def test_fuzzing_left_the_server_healthy(app, api_schema):
    """Runs after the fuzzer (same module app): nothing leaked, nothing broke the batcher."""
    state = app.state.router
    assert state.infer.num_in_flight == 0
    assert state.batcher.healthy and not state.batcher.running
    allocator = state.batcher.allocator
    assert allocator.num_free_blocks == allocator.num_blocks
    assert state.client.violations == []
    assert state.metrics.request_success.value() > 0  # some fuzzed requests did generate
