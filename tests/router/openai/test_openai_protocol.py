"""OpenAI request models -> native parameters, and `ChoiceText` (stop sequences, specials)."""

import logging

import pydantic
import pytest

from tgi_server.router.infer import InferEvent, TokenInfo
from tgi_server.router.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    OpenAIError,
)
from tgi_server.router.openai.serving import ChoiceText
from tgi_server.router.types import FinishReason, SamplingParams, StoppingParams, ValidRequest

VOCAB_SIZE = 512
USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def params(**fields):
    return chat(**fields).to_generation_params(VOCAB_SIZE)


def refused(request, **fields) -> OpenAIError:
    with pytest.raises(OpenAIError) as e:
        request.model_validate(fields).to_generation_params(VOCAB_SIZE)
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    return e.value


def valid_request(seed: int = 7, stop: tuple[str, ...] = (), input_ids=(1, 2, 3)) -> ValidRequest:
    return ValidRequest(
        inputs="x", input_ids=tuple(input_ids), sampling=SamplingParams(do_sample=True, seed=seed),
        stopping=StoppingParams(max_new_tokens=10, stop_sequences=stop), top_n_tokens=0,
        details=False, decoder_input_details=False, return_full_text=False, best_of=1,
        stream=False,
    )


# ---- sampling parameters ---------------------------------------------------------------


def test_defaults_sample_as_openai_and_fill_the_context():
    g = params()
    assert g.parameters.do_sample is True
    assert g.parameters.temperature is None and g.parameters.top_p is None
    # No max_tokens: as many tokens as fit (an explicit null for the native validator).
    assert "max_new_tokens" in g.parameters.model_fields_set
    assert g.parameters.max_new_tokens is None
    assert g.parameters.top_n_tokens is None and g.parameters.stop == []
    assert (g.n, g.presence_penalty, dict(g.logit_bias), g.logprobs) == (1, 0.0, {}, False)


def test_temperature_zero_is_greedy_and_drops_top_p():
    g = params(temperature=0, top_p=0.5)
    assert g.parameters.do_sample is False
    assert g.parameters.temperature is None and g.parameters.top_p is None
    assert params(temperature=1e-9).parameters.do_sample is False


def test_sampling_fields_map_to_native_ones():
    g = params(temperature=0.7, top_p=0.9, frequency_penalty=0.5, presence_penalty=-1.5, seed=3,
               max_tokens=12, stop="###")
    p = g.parameters
    assert (p.do_sample, p.temperature, p.top_p, p.frequency_penalty) == (True, 0.7, 0.9, 0.5)
    assert (p.seed, p.max_new_tokens, p.stop) == (3, 12, ["###"])
    assert g.presence_penalty == -1.5
    # top_p 1.0 is "disabled" (the native validator refuses an explicit 1.0).
    assert params(top_p=1.0).parameters.top_p is None
    assert params(stop=["a", "", "b"]).parameters.stop == ["a", "b"]


def test_max_completion_tokens_wins_over_max_tokens():
    assert params(max_tokens=5, max_completion_tokens=9).parameters.max_new_tokens == 9
    assert params(max_tokens=5).parameters.max_new_tokens == 5


def test_negative_seed_wraps_to_unsigned():
    assert params(seed=-1).parameters.seed == 2**64 - 1


def test_choice_requests_get_consecutive_seeds_penalties_and_bias():
    g = params(n=3, presence_penalty=0.25, logit_bias={"5": -100, "7": 2.5})
    choices = [g.choice_request(valid_request(seed=2**64 - 2), i) for i in range(g.n)]
    assert [c.sampling.seed for c in choices] == [2**64 - 2, 2**64 - 1, 0]
    assert all(c.sampling.presence_penalty == 0.25 for c in choices)
    assert all(dict(c.sampling.logit_bias) == {5: -100.0, 7: 2.5} for c in choices)


def test_logprobs_ask_for_top_n_tokens():
    assert params(logprobs=True).parameters.top_n_tokens == 0
    g = params(logprobs=True, top_logprobs=3)
    assert g.logprobs and g.parameters.top_n_tokens == 3
    assert refused(ChatCompletionRequest, messages=USER, top_logprobs=2).param == "top_logprobs"


@pytest.mark.parametrize("bias", [{"512": 1}, {"-1": 1}, {"abc": 1}, {"3": 101}])
def test_bad_logit_bias_is_refused(bias):
    assert refused(ChatCompletionRequest, messages=USER, logit_bias=bias).param == "logit_bias"


@pytest.mark.parametrize("fields", [
    {"tools": [{"type": "function", "function": {"name": "f"}}]},
    {"tool_choice": "required"},
    {"functions": [{"name": "f"}]},
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {}}},
])
def test_guided_generation_features_are_refused(fields):
    assert "guided generation" in refused(ChatCompletionRequest, messages=USER, **fields).message


def test_tools_with_tool_choice_none_and_text_format_are_accepted():
    params(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none")
    params(response_format={"type": "text"}, tool_choice="auto")


@pytest.mark.parametrize("fields", [
    {"temperature": 2.5}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"n": 0},
    {"frequency_penalty": 3}, {"presence_penalty": -2.5}, {"max_tokens": -1},
    {"top_logprobs": 21}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
    {"temperature": float("nan")},
])
def test_out_of_range_fields_fail_validation(fields):
    with pytest.raises(pydantic.ValidationError):
        chat(**fields)


def test_unknown_fields_are_accepted_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="tgi_server.router.openai.protocol"):
        request = chat(best_of_everything=True, metadata={"a": 1}, user="me")
    assert request.user == "me"
    assert "best_of_everything" in caplog.text and "metadata" in caplog.text


# ---- messages --------------------------------------------------------------------------


def test_messages_become_template_dicts():
    messages = chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "1", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "1", "reasoning": "kept"},
    ]).template_messages()
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert messages[1] == {"role": "user", "content": "ab"}
    assert messages[2]["content"] == "" and messages[2]["tool_calls"][0]["id"] == "1"
    assert messages[3] == {"role": "tool", "content": "42", "tool_call_id": "1",
                           "reasoning": "kept"}


def test_non_text_content_parts_are_refused():
    message = ChatMessage.model_validate(
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]})
    with pytest.raises(OpenAIError, match="image_url"):
        message.to_template()


# ---- completions -----------------------------------------------------------------------


def test_completion_defaults_and_prompts():
    request = CompletionRequest.model_validate({"prompt": "hi"})
    g = request.to_generation_params(VOCAB_SIZE)
    assert g.parameters.max_new_tokens == 16  # OpenAI's default for completions
    assert request.prompts() == ["hi"]
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompts() == ["a", "b"]
    g = CompletionRequest.model_validate({"prompt": "hi", "max_tokens": None}).to_generation_params(
        VOCAB_SIZE)
    assert g.parameters.max_new_tokens is None


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2]], []])
def test_token_and_empty_prompts_are_refused(prompt):
    with pytest.raises(OpenAIError) as e:
        CompletionRequest.model_validate({"prompt": prompt}).prompts()
    assert e.value.param == "prompt"


def test_completion_logprobs_echo_and_zero_tokens():
    g = CompletionRequest.model_validate(
        {"prompt": "hi", "echo": True, "logprobs": 2, "max_tokens": 0}).to_generation_params(
        VOCAB_SIZE)
    assert g.echo and g.logprobs and not g.keep_generated
    assert g.parameters.decoder_input_details and g.parameters.top_n_tokens == 2
    assert g.parameters.max_new_tokens == 1  # the engine's minimum; that token is dropped
    g = CompletionRequest.model_validate({"prompt": "hi", "logprobs": 0}).to_generation_params(
        VOCAB_SIZE)
    assert g.logprobs and not g.parameters.decoder_input_details


def test_completion_refusals():
    assert refused(CompletionRequest, prompt="x", suffix="y").param == "suffix"
    assert refused(CompletionRequest, prompt="x", n=2, best_of=3).param == "best_of"
    CompletionRequest.model_validate({"prompt": "x", "n": 2, "best_of": 2}).to_generation_params(
        VOCAB_SIZE)


# ---- ChoiceText --------------------------------------------------------------------------


def events_of(token_ids: list[int], finish=FinishReason.LENGTH) -> list[InferEvent]:
    return [InferEvent(TokenInfo(t, "", -1.0), [], i + 1, finish if i == len(token_ids) - 1 else None)
            for i, t in enumerate(token_ids)]


def push_all(text: ChoiceText, events: list[InferEvent]) -> list[str]:
    return [text.push(e) for e in events]


def test_choice_text_skips_special_tokens_like_decode(tokenizer):
    ids = tokenizer.encode("Hello wörld 🙂") + [1, 2]  # <|im_start|> <|im_end|>
    text = ChoiceText(tokenizer, valid_request())
    deltas = push_all(text, events_of(ids, FinishReason.EOS_TOKEN))
    assert "".join(deltas) == text.text == "Hello wörld 🙂"
    assert text.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_choice_text_cuts_the_stop_sequence_and_holds_back_its_start(tokenizer):
    ids = tokenizer.encode("one two END three")
    stop_at = next(i for i in range(len(ids)) if "END" in tokenizer.decode(ids[:i + 1]))
    ids = ids[:stop_at + 1]
    text = ChoiceText(tokenizer, valid_request(stop=("END",)))
    deltas = push_all(text, events_of(ids, FinishReason.STOP_SEQUENCE))
    assert text.text == "one two "
    # Nothing streamed was later taken back: every delta is a prefix piece of the content.
    assert "".join(deltas) == "one two "
    assert all("E" not in d for d in deltas)


def test_choice_text_releases_a_held_back_tail_at_the_end(tokenizer):
    ids = tokenizer.encode("abc EN")
    text = ChoiceText(tokenizer, valid_request(stop=("END",)))
    deltas = push_all(text, events_of(ids))
    assert "".join(deltas) == text.text == "abc EN"


def test_choice_text_can_drop_everything(tokenizer):
    text = ChoiceText(tokenizer, valid_request(), keep=False)
    assert set(push_all(text, events_of(tokenizer.encode("abc")))) == {""}
    assert text.text == ""
