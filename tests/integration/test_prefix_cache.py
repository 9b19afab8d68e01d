"""Prefix caching through `tgi-launch`: a prompt that starts like an earlier prompt, or like an
earlier prompt and its answer, prefills only the rest, and its greedy tokens are still
transformers' own; every block is free again once the server is idle."""

import asyncio
import json
import time

import httpx
import pytest

from tests.integration.test_e2e import assert_same_or_near_tie, hf_greedy, metric

SYSTEM = ("You are a careful assistant. Answer in one short paragraph, cite the license where "
          "it applies, and never invent an API. The project is licensed under the Apache "
          "License, Version 2.0; you may not use this file except in compliance with it.\n")
QUESTIONS = ["def fibonacci(n):", "The quick brown fox", "import os\nimport sys\n", "x = 1"]
MAX_TOTAL_BLOCKS = 2048 // 16
LAUNCH_FLAGS = ("--max-batch-total-tokens", "2048", "--max-total-tokens", "512",
                "--max-input-tokens", "256", "--max-batch-prefill-tokens", "512")


@pytest.fixture(scope="module")
def served(model_dir, launch):
    path = model_dir("llama", "tiny")
    with launch(path, *LAUNCH_FLAGS) as url:
        yield path, url


def generate(url: str, prompt: str) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 32, "details": True}}
    r = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def num_tokens(url: str, text: str) -> int:
    return len(httpx.post(f"{url}/tokenize", json={"inputs": text}).json())


def wait_idle(url: str) -> None:
    for _ in range(100):
        if metric(url, "tgi_batch_current_size") == 0:
            return
        time.sleep(0.1)


def test_a_repeated_prefix_is_not_computed_again(served, reference):
    _, url = served
    prompt = SYSTEM + QUESTIONS[0]
    hits = metric(url, "tgi_prefix_cache_hit_tokens")
    first = generate(url, prompt)
    # an unseen prompt: nothing from the cache
    assert metric(url, "tgi_prefix_cache_hit_tokens") == hits
    assert generate(url, prompt) == first
    n = num_tokens(url, prompt)
    # every full block but the one of the prompt's last token
    assert metric(url, "tgi_prefix_cache_hit_tokens") - hits == (n - 1) // 16 * 16 > 0
    assert_same_or_near_tie(reference, prompt, hf_greedy(reference, prompt), first)


def test_a_next_turn_starts_from_the_earlier_turn(served, reference):
    _, url = served
    tokenizer, _ = reference
    prompt = SYSTEM + QUESTIONS[1]
    prompt_ids = [t["id"] for t in httpx.post(f"{url}/tokenize", json={"inputs": prompt}).json()]
    answer_ids = generate(url, prompt)
    follow_up = prompt + tokenizer.decode(answer_ids) + "\nAnd then?"
    # k/v was computed for all of the earlier turn's tokens but its last generated one, and
    # the next turn shares them as far as its own tokens are the same (a generated text need
    # not tokenize back into the same ids; test_batcher.py covers answers that do)
    earlier = prompt_ids + answer_ids
    ids = [t["id"] for t in httpx.post(f"{url}/tokenize", json={"inputs": follow_up}).json()]
    shared = next((i for i, (a, b) in enumerate(zip(ids, earlier)) if a != b),
                  min(len(ids), len(earlier)))
    hits = metric(url, "tgi_prefix_cache_hit_tokens")
    got = generate(url, follow_up)
    assert metric(url, "tgi_prefix_cache_hit_tokens") - hits == \
        min(shared, len(earlier) - 1, len(ids) - 1) // 16 * 16 > 0
    assert_same_or_near_tie(reference, follow_up, hf_greedy(reference, follow_up), got)


def test_concurrent_requests_share_a_system_prompt(served, reference):
    _, url = served

    async def run():
        async with httpx.AsyncClient(base_url=url) as client:
            async def one(question: str, delay: float) -> list[int]:
                await asyncio.sleep(delay)
                body = {"inputs": SYSTEM + question,
                        "parameters": {"max_new_tokens": 32, "details": True}}
                r = await client.post("/generate", json=body, timeout=120)
                assert r.status_code == 200, r.text
                return [t["id"] for t in r.json()["details"]["tokens"]]
            # the first alone computes the shared blocks; the others join while it decodes
            return await asyncio.gather(*(one(q, 0.2 * (i > 0) + 0.03 * i)
                                          for i, q in enumerate(QUESTIONS)))

    hits = metric(url, "tgi_prefix_cache_hit_tokens")
    results = asyncio.run(run())
    assert metric(url, "tgi_prefix_cache_hit_tokens") > hits
    for question, got in zip(QUESTIONS, results):
        prompt = SYSTEM + question
        assert_same_or_near_tie(reference, prompt, hf_greedy(reference, prompt), got)
    wait_idle(url)
    # cached blocks nobody uses count as free: an idle server has every block to give
    assert metric(url, "tgi_kv_blocks_free") == MAX_TOTAL_BLOCKS
    assert metric(url, "tgi_kv_blocks_cached") > 0


def test_the_cache_gives_way_to_new_prompts(served, reference):
    """Many different long prompts, more than the cache holds: old prefixes are evicted and
    every request is still served, and served right."""
    _, url = served
    prompts = [f"{i} {SYSTEM}" for i in range(16)]  # each ~140 + 32 tokens: 11 blocks of 128
    for prompt in prompts:
        generate(url, prompt)
    wait_idle(url)
    assert metric(url, "tgi_kv_blocks_free") == MAX_TOTAL_BLOCKS
    assert metric(url, "tgi_kv_blocks_cached") <= MAX_TOTAL_BLOCKS
    # the newest prompt is still cached whole, the oldest was evicted (each starts differently)
    for prompt, cached in ((prompts[-1], True), (prompts[0], False)):
        hits = metric(url, "tgi_prefix_cache_hit_tokens")
        got = generate(url, prompt)
        want = (num_tokens(url, prompt) - 1) // 16 * 16 if cached else 0
        assert metric(url, "tgi_prefix_cache_hit_tokens") - hits == want
        assert_same_or_near_tie(reference, prompt, hf_greedy(reference, prompt), got)


def test_openai_usage_reports_the_cached_prompt_tokens(served):
    _, url = served
    body = {"model": "tgi", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": QUESTIONS[3]}]}
    first = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    hits = metric(url, "tgi_prefix_cache_hit_tokens")
    second = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == metric(url, "tgi_prefix_cache_hit_tokens") - hits
    assert cached == (first["usage"]["prompt_tokens"] - 1) // 16 * 16 > 0
    assert second["choices"] == first["choices"]
    # streamed, the last event's usage says the same
    completion = {"model": "tgi", "prompt": "Once more: " + SYSTEM, "max_tokens": 4}
    httpx.post(f"{url}/v1/completions", json=completion, timeout=120)
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
            **completion, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    usage = events[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == (usage["prompt_tokens"] - 1) // 16 * 16
