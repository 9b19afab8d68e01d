"""Chunked prefill through `tgi-launch`: with a prefill budget of 64 tokens and inputs of up to
256, long prompts are prefilled in chunks between the decode steps of running requests, and
every greedy answer is still transformers' own."""

import asyncio

import httpx
import pytest

from tests.integration.test_e2e import MAX_NEW_TOKENS, assert_same_or_near_tie, hf_greedy, metric

LONG = ("The quick brown fox jumps over the lazy dog while the careful assistant writes "
        "down every step of the proof, line by line, and checks each one twice. ") * 2
LAUNCH_FLAGS = ("--max-batch-total-tokens", "2048", "--max-total-tokens", "320",
                "--max-input-tokens", "256", "--max-batch-prefill-tokens", "64",
                "--no-prefix-caching")


@pytest.fixture(scope="module")
def served(model_dir, launch):
    path = model_dir("llama", "tiny")
    with launch(path, *LAUNCH_FLAGS) as url:
        yield path, url


def chunks(url: str) -> float:
    return metric(url, 'tgi_batch_concat{reason="chunking"}')


def test_long_prompts_in_chunks_beside_running_requests_equal_transformers(served, reference):
    _, url = served
    prompts = ["def fibonacci(n):", LONG, "x = 1", "Once upon a time, " + LONG]
    num_tokens = len(httpx.post(f"{url}/tokenize", json={"inputs": LONG}).json())
    assert 64 < num_tokens <= 256

    async def run():
        async with httpx.AsyncClient(base_url=url) as client:
            async def one(prompt: str, delay: float) -> list[int]:
                await asyncio.sleep(delay)
                body = {"inputs": prompt,
                        "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True}}
                r = await client.post("/generate", json=body, timeout=120)
                assert r.status_code == 200, r.text
                return [t["id"] for t in r.json()["details"]["tokens"]]
            # short requests decode while the long ones arrive and are prefilled in chunks
            return await asyncio.gather(*(one(p, 0.05 * i) for i, p in enumerate(prompts)))

    before = chunks(url)
    results = asyncio.run(run())
    # each long prompt took at least two chunks before its last prefill
    assert chunks(url) - before >= 2 * (num_tokens // 64)
    for prompt, got in zip(prompts, results):
        assert_same_or_near_tie(reference, prompt, hf_greedy(reference, prompt), got)


def test_decoder_input_details_without_prompt_logprobs_is_served_in_chunks(served):
    _, url = served
    body = {"inputs": LONG, "parameters": {"max_new_tokens": 2, "decoder_input_details": True}}
    r = httpx.post(f"{url}/generate", json=body, timeout=60)
    # without --enable-prefill-logprobs the request is served, its prompt chunked
    assert r.status_code == 200, r.text
