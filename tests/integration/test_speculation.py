"""Through `tgi-launch --speculate 4`: greedy tokens still equal transformers' `generate`, a
repetitive prompt takes fewer decode steps than tokens, and streaming sends one event per token
even when a step yields several."""

import asyncio
import json

import httpx
import pytest

from .test_e2e import (
    LAUNCH_FLAGS,
    MAX_NEW_TOKENS,
    PROMPTS,
    assert_same_or_near_tie,
    generate,
    hf_greedy,
)

# The tiny llama answers this with runs of one token: n-gram drafts get accepted.
REPETITIVE = "0 0 0 0 0 0 0 0 0 0"


@pytest.fixture(scope="module")
def served(model_dir, launch):
    path = model_dir("llama", "tiny")
    with launch(path, *LAUNCH_FLAGS, "--speculate", "4") as url:
        yield path, url


def metric(url: str, series: str) -> float:
    """A series' value in /metrics (0 before it appears)."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def decode_steps(url: str) -> float:
    return metric(url, 'tgi_batch_inference_count{method="decode"}')


def test_a_repetitive_answer_takes_fewer_steps_and_the_same_tokens(served, reference):
    _, url = served
    before = decode_steps(url)
    drafted, accepted = (metric(url, f"tgi_speculation_{k}_tokens") for k in ("draft", "accepted"))
    result = asyncio.run(_generate_one(url, REPETITIVE))
    got = [t["id"] for t in result["details"]["tokens"]]
    assert_same_or_near_tie(reference, REPETITIVE, hf_greedy(reference, REPETITIVE), got)
    assert len(got) == result["details"]["generated_tokens"] == MAX_NEW_TOKENS
    # one token from the prefill, the rest from decode steps of 1 to 5 tokens
    steps = decode_steps(url) - before
    assert 0 < steps < MAX_NEW_TOKENS - 1
    # every token past the prefill's came from a step: one each, plus the accepted drafts
    accepted = metric(url, "tgi_speculation_accepted_tokens") - accepted
    assert accepted == MAX_NEW_TOKENS - 1 - steps
    assert accepted <= metric(url, "tgi_speculation_draft_tokens") - drafted


async def _generate_one(url: str, prompt: str) -> dict:
    async with httpx.AsyncClient(base_url=url) as client:
        return await generate(client, prompt, 0.0)


def test_concurrent_staggered_greedy_equals_transformers(served, reference):
    _, url = served

    async def run():
        async with httpx.AsyncClient(base_url=url) as client:
            return await asyncio.gather(*(generate(client, p, 0.05 * i)
                                          for i, p in enumerate([REPETITIVE, *PROMPTS[:4]])))

    for prompt, result in zip([REPETITIVE, *PROMPTS[:4]], asyncio.run(run())):
        got = [t["id"] for t in result["details"]["tokens"]]
        assert_same_or_near_tie(reference, prompt, hf_greedy(reference, prompt), got)


def test_stream_sends_one_event_per_token(served):
    _, url = served
    body = {"inputs": REPETITIVE, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True}}
    full = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    events = []
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[len("data:"):]))
    assert [e["token"]["id"] for e in events] == [t["id"] for t in full["details"]["tokens"]]
    assert "".join(e["token"]["text"] for e in events) == full["generated_text"]
    assert events[-1]["details"]["generated_tokens"] == MAX_NEW_TOKENS


def test_two_shards_speculate_alike(model_dir, launch, reference):
    """Every rank drafts from the same tokens and accepts from the same gathered logits."""
    with launch(model_dir("llama", "tiny"), *LAUNCH_FLAGS, "--speculate", "4",
                "--num-shard", "2") as url:
        result = asyncio.run(_generate_one(url, REPETITIVE))
        steps = decode_steps(url)
    got = [t["id"] for t in result["details"]["tokens"]]
    assert_same_or_near_tie(reference, REPETITIVE, hf_greedy(reference, REPETITIVE), got)
    assert 0 < steps < MAX_NEW_TOKENS - 1
