"""`--api-key` and `--payload-limit` over the in-process app (fake shard)."""

import pytest
from test_app import PROMPT, serve
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir("llama", "tiny"))


BODY = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}


async def test_api_key_guards_generation_routes_only(tokenizer):
    async with serve(tokenizer, api_key="s3cret") as router:
        http = router.http
        assert (await http.post("/generate", json=BODY)).status_code == 401
        wrong = await http.post("/generate", json=BODY, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error_type"] == "unauthorized"
        assert (await http.post("/v1/completions", json={"prompt": "x"})).status_code == 401
        assert (await http.post("/tokenize", json={"inputs": "x"})).status_code == 401
        ok = await http.post("/generate", json=BODY, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["generated_text"]
        for path in ("/health", "/info", "/metrics"):
            assert (await http.get(path)).status_code == 200, path


async def test_payload_limit_rejects_large_bodies_announced_or_streamed(tokenizer):
    async with serve(tokenizer, payload_limit=200) as router:
        big = {"inputs": "x" * 500}
        r = await router.http.post("/generate", json=big)
        assert r.status_code == 413 and "--payload-limit" in r.json()["error"]

        async def chunks():  # no content-length: chunked transfer
            yield b'{"inputs": "'
            yield b"y" * 500
            yield b'"}'

        r = await router.http.post("/generate", content=chunks())
        assert r.status_code == 413
        ok = await router.http.post("/generate", json=BODY)
        assert ok.status_code == 200
