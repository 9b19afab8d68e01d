"""The OpenAI API through `tgi-launch`, with the real clients: the `openai` SDK,
huggingface_hub's `InferenceClient` and TGI's `text_generation.Client`.

The model is the maker's tiny llama, whose tokenizer has a ChatML template (eos `<|im_end|>`).
"""

import httpx
import openai
import pytest
import torch

MESSAGES = [{"role": "system", "content": "You answer in one line."},
            {"role": "user", "content": "Write a Python function that adds two numbers."}]
MAX_TOKENS = 24
NAME = "tiny-chat"


@pytest.fixture(scope="module")
def served(model_dir, launch):
    path = model_dir("llama", "tiny")
    with launch(path, "--max-batch-total-tokens", "4096", "--max-total-tokens", "512",
                "--max-input-tokens", "256",
                "--max-batch-prefill-tokens", "512", "--served-model-name", NAME) as url:
        yield path, url


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served[1]}/v1", api_key="unused", max_retries=0)


def hf_chat_greedy(reference, messages, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(templated prompt ids, transformers' greedy continuation ids)."""
    tokenizer, model = reference
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return prompt, out[0, len(prompt):].tolist()


def test_greedy_chat_equals_transformers(client, reference):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0,
                                       max_tokens=MAX_TOKENS)
    prompt, expected = hf_chat_greedy(reference, MESSAGES, MAX_TOKENS)
    tokenizer = reference[0]
    assert r.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant"
    stopped = expected[-1] == tokenizer.eos_token_id
    assert r.choices[0].finish_reason == ("stop" if stopped else "length")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(expected)
    assert r.model == NAME


def test_stream_adds_up_to_the_message(client):
    kwargs = dict(model=NAME, messages=MESSAGES, max_tokens=MAX_TOKENS, seed=5, temperature=0.9)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and set(finishes[:-1]) == {None}


def test_logprobs_line_up_with_tokens(client):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8,
                                       logprobs=True, top_logprobs=3, temperature=0)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.logprob <= 0


def test_n_with_a_seed_is_reproducible(client):
    kwargs = dict(model=NAME, messages=MESSAGES, max_tokens=12, n=3, seed=1234, temperature=1.0)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1  # three seeds, three different samples
    assert first.usage.completion_tokens == second.usage.completion_tokens


def test_stop_sequence_is_excluded(client):
    full = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0,
                                          max_tokens=MAX_TOKENS).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0,
                                       max_tokens=MAX_TOKENS, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_completions(client, reference):
    tokenizer, model = reference
    r = client.completions.create(model=NAME, prompt="def fibonacci(n):", max_tokens=10,
                                  temperature=0, logprobs=2)
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:]
    assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens == len(expected)


def test_sdk_raises_its_4xx_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=NAME, messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=MESSAGES, stream=True,
                                       logit_bias={"100000": 5})
    assert [m.id for m in client.models.list()] == [NAME]


def test_huggingface_hub_inference_client(served):
    from huggingface_hub import InferenceClient

    hub = InferenceClient(base_url=served[1])
    r = hub.chat_completion(MESSAGES, max_tokens=6, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
    deltas = [c.choices[0].delta.content or "" for c in
              hub.chat_completion(MESSAGES, max_tokens=6, temperature=0, stream=True)]
    assert "".join(deltas) == r.choices[0].message.content


def test_text_generation_client(served):
    # Installed by `make install` without its huggingface_hub<1 pin (see the Makefile).
    import text_generation

    response = text_generation.Client(served[1]).generate("def main", max_new_tokens=5)
    native = httpx.post(f"{served[1]}/generate", json={
        "inputs": "def main", "parameters": {"max_new_tokens": 5}}, timeout=30).json()
    assert response.generated_text == native["generated_text"]
    assert response.details.generated_tokens == len(response.details.tokens) >= 1
    streamed = [r.token.text for r in
                text_generation.Client(served[1]).generate_stream("def main", max_new_tokens=5)]
    assert len(streamed) == response.details.generated_tokens


def test_openapi_and_docs(served):
    spec = httpx.get(f"{served[1]}/openapi.json").json()
    assert {"/generate", "/v1/chat/completions", "/v1/completions"} <= set(spec["paths"])
    assert httpx.get(f"{served[1]}/docs").status_code == 200
