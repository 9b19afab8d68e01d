"""Through `tgi-launch`: greedy tokens equal transformers' `generate`, streaming equals
non-streaming, bad parameters get 422 while the server keeps serving."""

import asyncio
import json
import time

import httpx
import pytest
import torch
from transformers import AutoTokenizer

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n",
    "The quick brown fox",
    "class Queue:\n    \"\"\"A FIFO queue.\"\"\"\n\n    def __init__(self):\n        self.items = []",
    "x = 1",
    "# Licensed under the Apache License, Version 2.0 (the \"License\");\n# you may not use this file",
    "for i in range(10):\n    print(i)",
    "Ünïcödé → 文字 🙂 and more text after it, to make this prompt the longest one of all of them",
]
MAX_NEW_TOKENS = 32
# NOTE: float32, as transformers' reference (--dtype auto is bfloat16 on CPUs with BF16 units).
LAUNCH_FLAGS = ("--dtype", "float32", "--max-batch-total-tokens", "2048",
                "--max-total-tokens", "512", "--max-input-tokens", "256",
                "--max-batch-prefill-tokens", "512")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def served(request, model_dir, launch):
    path = model_dir(request.param, "tiny")
    with launch(path, *LAUNCH_FLAGS) as url:
        yield path, url


def hf_greedy(reference, prompt: str) -> list[int]:
    tokenizer, model = reference
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def assert_same_or_near_tie(reference, prompt: str, expected: list[int], got: list[int]) -> None:
    """Equal, or diverging only where transformers' top two logits are within fp32 noise."""
    if got == expected:
        return
    step = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b) if any(
        a != b for a, b in zip(expected, got)) else min(len(expected), len(got))
    assert step < min(len(expected), len(got)), f"lengths differ: {expected} vs {got}"
    tokenizer, model = reference
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    prefix = torch.tensor([ids[0].tolist() + expected[:step]])
    with torch.no_grad():
        logits = model(prefix).logits[0, -1]
    gap = (logits[expected[step]] - logits[got[step]]).abs().item()
    assert gap < 1e-4 * max(1.0, logits.abs().max().item()), (
        f"divergence at step {step} is not a near-tie (gap {gap}): {expected} vs {got}")


def metric(url: str, name: str) -> float:
    """The value of the sample `name` (labels included) in the server's /metrics; 0 if none."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(name + " ")), 0.0)


def batch_concat_count(url: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("tgi_batch_concat{"))


async def generate(client: httpx.AsyncClient, prompt: str, delay: float, **params) -> dict:
    await asyncio.sleep(delay)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True, **params}}
    r = await client.post("/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_concurrent_staggered_greedy_equals_transformers(served, reference):
    _, url = served

    async def run():
        async with httpx.AsyncClient(base_url=url) as client:
            # Staggered arrivals: later requests join a batch that is already decoding.
            return await asyncio.gather(*(generate(client, p, 0.03 * i) for i, p in enumerate(PROMPTS)))

    concat_before = batch_concat_count(url)
    results = asyncio.run(run())
    # Later arrivals were prefilled and joined a batch that was already decoding.
    assert batch_concat_count(url) > concat_before
    for prompt, result in zip(PROMPTS, results):
        got = [t["id"] for t in result["details"]["tokens"]]
        assert result["details"]["generated_tokens"] == len(got)
        assert_same_or_near_tie(reference, prompt, hf_greedy(reference, prompt), got)


def test_stream_equals_non_stream(served):
    _, url = served
    prompt = PROMPTS[3]
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True}}
    full = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    events = []
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[len("data:"):]))
    assert [e["token"]["id"] for e in events] == [t["id"] for t in full["details"]["tokens"]]
    assert events[-1]["generated_text"] == full["generated_text"]
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["details"]["finish_reason"] == full["details"]["finish_reason"]
    # The per-token texts add up to the decoded tokens (special ones included).
    tokenizer = AutoTokenizer.from_pretrained(served[0])
    ids = [e["token"]["id"] for e in events]
    assert "".join(e["token"]["text"] for e in events) == tokenizer.decode(ids)


BAD_PARAMETERS = [
    {"temperature": 0},
    {"temperature": -1},
    {"top_p": 1.5},
    {"top_p": 0},
    {"top_k": 0},
    {"typical_p": 1.0},
    {"repetition_penalty": 0},
    {"frequency_penalty": 3},
    {"max_new_tokens": 0},
    {"max_new_tokens": 10_000},
    {"stop": ["a", "b", "c", "d", "e"]},
    {"top_n_tokens": 50},
    {"truncate": 0},
    {"best_of": 2, "do_sample": False},
    {"best_of": 5, "do_sample": True},
    {"grammar": {"type": "regex", "value": "[0-9]+"}},
    {"watermark": True},
    {"adapter_id": "some/adapter"},
]


@pytest.mark.parametrize("parameters", BAD_PARAMETERS, ids=lambda p: ",".join(p))
def test_invalid_parameters_get_422(served, parameters):
    _, url = served
    r = httpx.post(f"{url}/generate", json={"inputs": "hello", "parameters": parameters}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    assert r.json()["error"]


def test_bad_bodies_and_server_keeps_serving(served):
    _, url = served
    assert httpx.post(f"{url}/generate", content=b"{not json", timeout=10).status_code == 422
    assert httpx.post(f"{url}/generate", json={"inputs": ""}, timeout=10).status_code == 422
    assert httpx.post(f"{url}/generate", json={"inputs": " ".join(str(i) for i in range(600))}, timeout=10).status_code == 422
    # A stream with bad parameters answers 200 with an error event, as TGI does.
    with httpx.stream("POST", f"{url}/generate_stream",
                      json={"inputs": "hi", "parameters": {"temperature": -1}}, timeout=10) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert json.loads(lines[-1][5:])["error_type"] == "validation"
    body = {"inputs": "still alive?", "parameters": {"max_new_tokens": 3, "details": True}}
    r = httpx.post(f"{url}/generate", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] >= 1


def test_compat_route_info_metrics_tokenize(served):
    _, url = served
    r = httpx.post(f"{url}/", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert r.status_code == 200 and isinstance(r.json(), list) and "generated_text" in r.json()[0]
    info = httpx.get(f"{url}/info").json()
    assert info["max_input_tokens"] == 256 and info["max_total_tokens"] == 512
    tokens = httpx.post(f"{url}/tokenize", json={"inputs": "hello world"}).json()
    assert "".join(t["text"] for t in tokens) == "hello world"
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("tgi_request_count", "tgi_request_success", "tgi_queue_size",
                 "tgi_batch_current_size", "tgi_request_duration_bucket",
                 "tgi_request_generated_tokens_bucket", "tgi_batch_inference_duration_bucket"):
        assert f"\n{name}" in metrics, name


def test_sampling_with_seed_reproduces(served):
    _, url = served
    params = {"do_sample": True, "temperature": 0.9, "top_k": 50, "seed": 42, "max_new_tokens": 12}
    body = {"inputs": PROMPTS[0], "parameters": {**params, "details": True}}
    a = httpx.post(f"{url}/generate", json=body, timeout=30).json()
    b = httpx.post(f"{url}/generate", json=body, timeout=30).json()
    assert a["generated_text"] == b["generated_text"]
    assert a["details"]["seed"] == 42


def test_client_disconnect_cancels_and_frees_blocks(served):
    _, url = served

    def gauge(name: str) -> float:
        return metric(url, name)

    total_blocks = 2048 // 16
    successes = gauge("tgi_request_success")
    dropped = gauge('tgi_request_failure{err="dropped"}')
    body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 400}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=30) as r:
        received = 0
        for line in r.iter_lines():
            received += line.startswith("data:")
            if received == 3:
                break  # leave mid-stream: the connection closes with the context
    for _ in range(100):
        if gauge("tgi_batch_current_size") == 0 and gauge("tgi_kv_blocks_free") == total_blocks:
            break
        time.sleep(0.1)
    assert gauge("tgi_batch_current_size") == 0
    assert gauge("tgi_kv_blocks_free") == total_blocks
    # Cancelled, not run to the end.
    assert gauge('tgi_request_failure{err="dropped"}') == dropped + 1
    assert gauge("tgi_request_success") == successes
