"""The OpenAI routes over `FakeShardClient`: shapes, streaming, usage, n, stop, logprobs, errors.

The fake shard's next token is `(last * 31 + 7) % 512`, so every answer is predictable from
the chat-templated prompt's last token.
"""

import asyncio
import json

import pytest
from fake_shard import EOS_TOKEN_ID, chain, logprob
from openai_app import MODEL_ID, RecordingShard, serve

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something."}]


def templated_ids(tokenizer, messages=MESSAGES) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def fake_tokens(last_token: int, max_tokens: int) -> list[int]:
    """What the fake generates: up to max_tokens, ending early on eos."""
    tokens = chain(last_token, max_tokens)
    return tokens[:tokens.index(EOS_TOKEN_ID) + 1] if EOS_TOKEN_ID in tokens else tokens


def sse(body: str) -> list:
    """The `data: ` events of an OpenAI stream, `[DONE]` last."""
    chunks = [c for c in body.split("\n\n") if c]
    assert all(c.startswith("data: ") for c in chunks), body
    assert chunks[-1] == "data: [DONE]"
    return [json.loads(c[len("data: "):]) for c in chunks[:-1]]


async def post(router, path: str, **body):
    return await router.http.post(path, json=body)


# ---- chat --------------------------------------------------------------------------------


async def test_chat_completion(router, tokenizer):
    r = await post(router, "/v1/chat/completions", messages=MESSAGES, max_tokens=6,
                   temperature=0, model=MODEL_ID)
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = templated_ids(tokenizer)
    tokens = fake_tokens(prompt[-1], 6)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL_ID and isinstance(body["created"], int)
    assert body["choices"] == [{
        "index": 0, "logprobs": None,
        "message": {"role": "assistant", "content": tokenizer.decode(tokens, skip_special_tokens=True)},
        "finish_reason": "stop" if tokens[-1] == EOS_TOKEN_ID else "length",
    }]
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                             "total_tokens": len(prompt) + len(tokens),
                             "prompt_tokens_details": {"cached_tokens": 0}}
    # The templated prompt reached the shard as is: no extra special tokens.
    assert list(router.fake.valid_requests[0].input_ids) == prompt
    assert router.fake.valid_requests[0].sampling.do_sample is False


async def test_chat_without_max_tokens_fills_the_context(router, tokenizer):
    r = await post(router, "/v1/chat/completions", messages=MESSAGES)
    assert r.status_code == 200, r.text
    prompt = templated_ids(tokenizer)
    assert router.fake.valid_requests[0].stopping.max_new_tokens == 256 - len(prompt)


async def test_chat_stream_adds_up_to_the_answer(router):
    body = dict(messages=MESSAGES, max_tokens=8, seed=1, stream=True,
                stream_options={"include_usage": True})
    r = await post(router, "/v1/chat/completions", **body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    full = (await post(router, "/v1/chat/completions", **{**body, "stream": False})).json()
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == full["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert all("usage" not in c for c in chunks[:-1])


async def test_n_choices_with_a_seed_are_reproducible(router):
    body = dict(messages=MESSAGES, max_tokens=4, n=3, seed=11, temperature=0.8)
    first = (await post(router, "/v1/chat/completions", **body)).json()
    second = (await post(router, "/v1/chat/completions", **body)).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert first["choices"] == second["choices"]
    seeds = [v.sampling.seed for v in router.fake.valid_requests]
    assert sorted(seeds) == [11, 11, 12, 12, 13, 13]
    # Usage counts every choice's tokens, the prompt once.
    completion_tokens = first["usage"]["completion_tokens"]
    assert completion_tokens == sum(len(fake_tokens(router.fake.valid_requests[0].input_ids[-1], 4))
                                    for _ in range(3))


async def test_n_choices_stream_interleaved(router):
    r = await post(router, "/v1/chat/completions", messages=MESSAGES, max_tokens=5, n=2,
                   stream=True)
    chunks = sse(r.text)
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]
    texts = ["".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                     if c["choices"][0]["index"] == i) for i in range(2)]
    assert texts[0] == texts[1]  # the fake ignores seeds


async def test_stop_sequence_is_cut_from_content_and_stream(router, tokenizer):
    prompt = templated_ids(tokenizer)
    text = tokenizer.decode(fake_tokens(prompt[-1], 10), skip_special_tokens=True)
    stop = text[3:6]
    assert stop and stop not in text[:5]
    full = (await post(router, "/v1/chat/completions", messages=MESSAGES, max_tokens=10,
                       stop=[stop, "never"])).json()
    assert full["choices"][0]["message"]["content"] == text[:text.index(stop)]
    assert full["choices"][0]["finish_reason"] == "stop"
    r = await post(router, "/v1/chat/completions", messages=MESSAGES, max_tokens=10, stop=stop,
                   stream=True)
    deltas = [c["choices"][0]["delta"].get("content", "") for c in sse(r.text)]
    assert "".join(deltas) == text[:text.index(stop)]


async def test_chat_logprobs_one_per_token_with_alternatives(router):
    r = await post(router, "/v1/chat/completions", messages=MESSAGES, max_tokens=5,
                   logprobs=True, top_logprobs=3)
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 3
        assert entry["bytes"] == list(entry["token"].encode())
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # fake: sampled is top
    ids = router.fake.requests[1].generated
    assert [e["logprob"] for e in content] == [logprob(t) for t in ids]
    r = await post(router, "/v1/chat/completions", messages=MESSAGES, max_tokens=3,
                   logprobs=True, stream=True)
    chunks = sse(r.text)[1:]
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks) == 3


async def test_chat_refusals_are_openai_errors(router):
    cases = [
        ({"messages": MESSAGES, "temperature": 3}, 400, "temperature"),
        ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
         400, "tools"),
        ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, 400,
         "response_format"),
        ({"messages": MESSAGES, "max_tokens": 10_000}, 400, None),
        ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 9}, 400, None),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, None),
        ({"messages": MESSAGES, "model": "gpt-4"}, 404, "model"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
        ({}, 400, "messages"),
    ]
    for body, status, param in cases:
        for stream in (False, True):
            r = await post(router, "/v1/chat/completions", **body, stream=stream)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["param"] == param, error
    r = await post(router, "/v1/chat/completions", messages=MESSAGES, model="gpt-4")
    assert r.json()["error"]["code"] == "model_not_found"
    r = await post(router, "/v1/chat/completions", messages=MESSAGES, max_tokens=10_000)
    assert "`max_tokens`" in r.json()["error"]["message"]  # the native name is translated
    r = await router.http.post("/v1/chat/completions", content=b"{nope")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert router.fake.calls_of("prefill") == []


async def test_model_names_and_aliases(tokenizer):
    async with serve(tokenizer, served_model_name=("alpha", "beta")) as router:
        for name in ("alpha", "beta", "tgi", "dummy", None):
            r = await post(router, "/v1/chat/completions", messages=MESSAGES, max_tokens=1,
                           model=name)
            assert r.status_code == 200 and r.json()["model"] == (name if name in (
                "alpha", "beta") else "alpha")
        assert (await post(router, "/v1/chat/completions", messages=MESSAGES,
                           model=MODEL_ID)).status_code == 404
        models = (await router.http.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["alpha", "beta"]
        assert models["object"] == "list" and models["data"][0]["object"] == "model"
        assert (await router.http.get("/v1/models/beta")).json()["id"] == "beta"
        r = await router.http.get("/v1/models/org/other")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_model_without_chat_template_is_a_400(tokenizer, tmp_path):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    async with serve(bare) as router:
        r = await post(router, "/v1/chat/completions", messages=MESSAGES)
        assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"]
        assert (await post(router, "/v1/completions", prompt="hi", max_tokens=1)).status_code == 200
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    async with serve(bare, chat_template=str(template)) as router:
        r = await post(router, "/v1/chat/completions", messages=MESSAGES, max_tokens=1)
        assert r.status_code == 200
        expected = "[system] You are terse.\n[user] Say something.\n[assistant] "
        assert router.fake.valid_requests[0].inputs == expected


@pytest.mark.parametrize("form", ["text", "named", "absent"])
async def test_a_tokenizer_config_gives_the_chat_template(tokenizer, tmp_path, form):
    """TGI's `--tokenizer-config-path`: a tokenizer_config.json whose `chat_template` wins
    (transformers saves several as a list of named ones); without one, the model's own."""
    text = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
    config = {"text": {"chat_template": text},
              "named": {"chat_template": [{"name": "tool_use", "template": "x"},
                                          {"name": "default", "template": text}]},
              "absent": {"model_max_length": 10}}[form]
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps(config))
    async with serve(tokenizer, chat_template=str(path)) as router:
        r = await post(router, "/v1/chat/completions", messages=MESSAGES, max_tokens=1)
        assert r.status_code == 200, r.text
        prompt = router.fake.valid_requests[0].inputs
    if form == "absent":
        assert prompt == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                       tokenize=False)
    else:
        assert prompt == "<system>You are terse.<user>Say something.<assistant>"


async def test_template_errors_are_a_400(tokenizer, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ raise_exception('roles must alternate') }}")
    async with serve(tokenizer, chat_template=str(template)) as router:
        r = await post(router, "/v1/chat/completions", messages=MESSAGES)
        assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]


async def test_overloaded_is_a_429(tokenizer):
    async with serve(tokenizer, max_concurrent_requests=2) as router:
        for stream in (False, True):
            r = await post(router, "/v1/chat/completions", messages=MESSAGES, n=3, stream=stream)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert router.state.infer.num_in_flight == 0
        r = await post(router, "/v1/chat/completions", messages=MESSAGES, n=2, max_tokens=2)
        assert r.status_code == 200


async def test_stream_failing_midway_ends_with_an_error_event(tokenizer):
    fake = RecordingShard()
    async with serve(tokenizer, fake) as router:
        fake.fail_next("decode")
        r = await post(router, "/v1/chat/completions", messages=MESSAGES, max_tokens=5,
                       stream=True)
        assert r.status_code == 200
        events = sse(r.text)
        assert events[-1]["error"]["type"] == "server_error"
        assert "Request failed during generation" in events[-1]["error"]["message"]
        assert router.state.infer.num_in_flight == 0


async def call_until_disconnect(router, path: str, body: dict, disconnect: asyncio.Event):
    """Call the app as an ASGI server would; the client leaves when `disconnect` is set."""
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop()
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")],
             "server": ("router", 80), "client": ("client", 1)}
    try:
        await asyncio.wait_for(router.app(scope, receive, send), 10)
    except asyncio.CancelledError:  # how `routes.until_disconnect` abandons a request
        pass
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_cancels_every_choice(tokenizer, stream):
    disconnect = asyncio.Event()
    fake = RecordingShard(delay=0.001)

    async def leave_at_step(method, step):
        if step == 4:
            disconnect.set()

    fake.before_step = leave_at_step
    async with serve(tokenizer, fake) as router:
        body = dict(messages=MESSAGES, max_tokens=100, n=3, stream=stream, seed=1)
        await call_until_disconnect(router, "/v1/chat/completions", body, disconnect)
        for _ in range(200):
            if not fake.live_request_ids and router.state.infer.num_in_flight == 0:
                break
            await asyncio.sleep(0.005)
        assert router.state.infer.num_in_flight == 0
        assert not fake.live_request_ids and not fake.violations
        assert all(len(r.generated) < 100 for r in fake.requests.values())
        allocator = router.state.batcher.allocator
        assert allocator.num_free_blocks == allocator.num_blocks


# ---- completions -------------------------------------------------------------------------


async def test_completions_with_several_prompts_and_n(router, tokenizer):
    prompts = ["def main", "import os"]
    r = await post(router, "/v1/completions", prompt=prompts, max_tokens=3, n=2, temperature=0)
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for choice in body["choices"]:
        prompt_ids = tokenizer.encode(prompts[choice["index"] // 2])
        tokens = fake_tokens(prompt_ids[-1], 3)
        assert choice["text"] == tokenizer.decode(tokens, skip_special_tokens=True)
        assert choice["logprobs"] is None
    assert body["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(p)) for p in prompts)
    assert body["usage"]["completion_tokens"] == 12
    r = await post(router, "/v1/completions", prompt=["a"] * 5)
    assert r.status_code == 400 and "--max-client-batch-size" in r.json()["error"]["message"]


async def test_completion_logprobs_and_echo(router, tokenizer):
    r = await post(router, "/v1/completions", prompt="def main", max_tokens=3, logprobs=2,
                   echo=True, stream=False)
    assert r.status_code == 400 and "--enable-prefill-logprobs" in r.json()["error"]["message"]
    r = await post(router, "/v1/completions", prompt="def main", max_tokens=3, logprobs=2)
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert all(len(top) <= 3 and top[t] == p
               for t, p, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]))
    r = await post(router, "/v1/completions", prompt="def main", max_tokens=3, echo=True)
    assert r.json()["choices"][0]["text"].startswith("def main")


async def test_echo_with_zero_tokens_gives_prompt_logprobs(tokenizer):
    async with serve(tokenizer, enable_prefill_logprobs=True) as router:
        r = await post(router, "/v1/completions", prompt="def main(x)", max_tokens=0, echo=True,
                       logprobs=1)
        choice = r.json()["choices"][0]
        prompt_ids = tokenizer.encode("def main(x)")
        assert choice["text"] == "def main(x)" and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt_ids)
        assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == [-1.0] * (
            len(prompt_ids) - 1)
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
        assert r.json()["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("fields", [{"echo": True}, {"logprobs": 0}])
async def test_completion_stream(router, fields):
    body = dict(prompt="def main", max_tokens=4, stream=True,
                stream_options={"include_usage": True}, **fields)
    chunks = sse((await post(router, "/v1/completions", **body)).text)
    full = (await post(router, "/v1/completions", **{**body, "stream": False})).json()
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == full["choices"][0]["text"]
    if "logprobs" in fields:
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            streamed = [x for c in chunks[:-1] for x in c["choices"][0]["logprobs"][key]]
            assert streamed == full["choices"][0]["logprobs"][key]
    assert chunks[-1]["usage"] == full["usage"] and chunks[-1]["choices"] == []
    body.update(echo=True, logprobs=1)
    r = await post(router, "/v1/completions", **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


# ---- OpenAPI and docs ----------------------------------------------------------------------


async def test_openapi_describes_both_apis(router):
    spec = (await router.http.get("/openapi.json")).json()
    assert spec == (await router.http.get("/api-doc/openapi.json")).json()
    for path in ("/generate", "/generate_stream", "/", "/info", "/health", "/tokenize",
                 "/metrics", "/v1/chat/completions", "/v1/completions", "/v1/models"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    request = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert request["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionRequest")
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
    assert "max_new_tokens" in schemas["GenerateParameters"]["properties"]
    docs = await router.http.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_method_not_allowed_is_not_a_server_error(router, path):
    assert (await router.http.get(path)).status_code == 405
