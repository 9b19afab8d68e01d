import json

import pydantic
import pytest

from tgi_server.router.config import RouterConfig
from tgi_server.router.protocol import (
    BestOfSequence,
    CompatGenerateRequest,
    Details,
    ErrorResponse,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Info,
    PrefillToken,
    SimpleToken,
    StreamDetails,
    StreamResponse,
    Token,
    TokenizeRequest,
)
from tgi_server.router.types import FinishReason


def dumps(model: pydantic.BaseModel) -> dict:
    # Through the JSON text, as the client sees it.
    return json.loads(model.model_dump_json())


TOKEN = Token(id=5, text="hi", logprob=-0.25, special=False)


def test_stream_response_intermediate_event():
    event = StreamResponse(index=1, token=TOKEN)
    assert dumps(event) == {
        "index": 1,
        "token": {"id": 5, "text": "hi", "logprob": -0.25, "special": False},
        "generated_text": None,
        "details": None,
    }


def test_stream_response_last_event_with_top_tokens():
    event = StreamResponse(
        index=3,
        token=TOKEN,
        top_tokens=[TOKEN, Token(id=6, text="ho", logprob=-1.5, special=False)],
        generated_text="hi hi hi",
        details=StreamDetails(
            finish_reason=FinishReason.EOS_TOKEN, generated_tokens=3, seed=None, input_length=7
        ),
    )
    assert dumps(event) == {
        "index": 3,
        "token": {"id": 5, "text": "hi", "logprob": -0.25, "special": False},
        "top_tokens": [
            {"id": 5, "text": "hi", "logprob": -0.25, "special": False},
            {"id": 6, "text": "ho", "logprob": -1.5, "special": False},
        ],
        "generated_text": "hi hi hi",
        "details": {
            "finish_reason": "eos_token",
            "generated_tokens": 3,
            "seed": None,
            "input_length": 7,
        },
    }


def test_generate_response_without_details_omits_the_key():
    assert dumps(GenerateResponse(generated_text="abc")) == {"generated_text": "abc"}


def test_generate_response_with_details():
    details = Details(
        finish_reason=FinishReason.LENGTH,
        generated_tokens=1,
        seed=42,
        # The first prompt token has no logprob: NaN from the shard serializes as null.
        prefill=[
            PrefillToken(id=1, text="<s>", logprob=float("nan")),
            PrefillToken(id=9, text="a", logprob=-2.0),
        ],
        tokens=[TOKEN],
    )
    assert dumps(GenerateResponse(generated_text="hi", details=details)) == {
        "generated_text": "hi",
        "details": {
            "finish_reason": "length",
            "generated_tokens": 1,
            "seed": 42,
            "prefill": [
                {"id": 1, "text": "<s>", "logprob": None},
                {"id": 9, "text": "a", "logprob": -2.0},
            ],
            "tokens": [{"id": 5, "text": "hi", "logprob": -0.25, "special": False}],
        },
    }


def test_details_with_best_of_sequences_and_top_tokens():
    sequence = BestOfSequence(
        generated_text="yo",
        finish_reason=FinishReason.STOP_SEQUENCE,
        generated_tokens=1,
        seed=7,
        prefill=[],
        tokens=[TOKEN],
    )
    details = Details(
        finish_reason=FinishReason.LENGTH,
        generated_tokens=1,
        seed=3,
        tokens=[TOKEN],
        best_of_sequences=[sequence],
        top_tokens=[[TOKEN]],
    )
    body = dumps(details)
    assert body["best_of_sequences"] == [
        {
            "generated_text": "yo",
            "finish_reason": "stop_sequence",
            "generated_tokens": 1,
            "seed": 7,
            "prefill": [],
            "tokens": [{"id": 5, "text": "hi", "logprob": -0.25, "special": False}],
        }
    ]
    assert body["top_tokens"] == [[{"id": 5, "text": "hi", "logprob": -0.25, "special": False}]]
    assert list(body) == [
        "finish_reason",
        "generated_tokens",
        "seed",
        "prefill",
        "tokens",
        "best_of_sequences",
        "top_tokens",
    ]


def test_error_response():
    body = ErrorResponse(error="`inputs` cannot be empty", error_type="validation")
    assert dumps(body) == {"error": "`inputs` cannot be empty", "error_type": "validation"}


def test_generate_request_all_parameters():
    body = {
        "inputs": "Hello",
        "parameters": {
            "best_of": 2,
            "temperature": 0.5,
            "repetition_penalty": 1.1,
            "frequency_penalty": 0.2,
            "top_k": 10,
            "top_p": 0.9,
            "typical_p": 0.8,
            "do_sample": True,
            "max_new_tokens": 20,
            "return_full_text": True,
            "stop": ["\n"],
            "truncate": 5,
            "watermark": False,
            "details": True,
            "decoder_input_details": True,
            "seed": 18446744073709551615,
            "top_n_tokens": 3,
            "grammar": {"type": "json", "value": {"properties": {}}},
            "adapter_id": None,
            "unknown_field": "ignored",
        },
    }
    request = GenerateRequest.model_validate(body)
    expected = dict(body["parameters"])
    del expected["unknown_field"]
    assert request.parameters.model_dump() == expected


def test_nulls_mean_unset():
    request = GenerateRequest.model_validate(
        {
            "inputs": "x",
            "parameters": {
                "do_sample": None,
                "stop": None,
                "details": None,
                "max_new_tokens": None,
                "temperature": None,
            },
        }
    )
    p = request.parameters
    assert (p.do_sample, p.stop, p.details, p.temperature) == (False, [], False, None)
    # An explicit null asks for as many tokens as fit (resolved by the validator).
    assert p.max_new_tokens is None


def test_absent_parameters_get_tgi_defaults():
    for body in ({"inputs": "x"}, {"inputs": "x", "parameters": None}):
        p = GenerateRequest.model_validate(body).parameters
        assert p == GenerateParameters()
        assert (p.max_new_tokens, p.do_sample, p.stop, p.best_of) == (100, False, [], None)


def test_compat_request_stream_flag():
    assert CompatGenerateRequest.model_validate({"inputs": "x"}).stream is False
    assert CompatGenerateRequest.model_validate({"inputs": "x", "stream": True}).stream is True


def test_single_stop_string_is_one_sequence():
    assert GenerateParameters.model_validate({"stop": "###"}).stop == ["###"]


@pytest.mark.parametrize(
    "parameters",
    [
        {"seed": -1},
        {"seed": 2**64},
        {"max_new_tokens": -1},
        {"top_n_tokens": -1},
        {"truncate": -1},
        {"temperature": "hot"},
        {"stop": [1, 2]},
        {"grammar": {"type": "xml", "value": ""}},
    ],
)
def test_malformed_parameters_rejected(parameters):
    with pytest.raises(pydantic.ValidationError):
        GenerateParameters.model_validate(parameters)


def test_non_finite_floats_rejected():
    with pytest.raises(pydantic.ValidationError):
        GenerateParameters.model_validate_json('{"temperature": NaN}')


def test_tokenize_request_and_simple_token():
    request = TokenizeRequest.model_validate({"inputs": "ab", "parameters": {"truncate": 1}})
    assert request.add_special_tokens is True
    token = SimpleToken(id=3, text="ab", start=0, stop=2)
    assert dumps(token) == {"id": 3, "text": "ab", "start": 0, "stop": 2}


def test_info_from_config():
    config = RouterConfig(
        tokenizer="org/model", shard_urls=("unix:///tmp/s-0",), model_id="org/model"
    )
    info = Info.from_config(
        config,
        max_input_tokens=4095,
        max_total_tokens=4096,
        max_batch_total_tokens=100_000,
        version="0.1.0",
        model_dtype="torch.bfloat16",
        model_device_type="cuda",
    )
    assert dumps(info) == {
        "model_id": "org/model",
        "model_sha": None,
        "model_dtype": "torch.bfloat16",
        "model_device_type": "cuda",
        "model_pipeline_tag": None,
        "max_concurrent_requests": 128,
        "max_best_of": 2,
        "max_stop_sequences": 4,
        "max_input_tokens": 4095,
        "max_total_tokens": 4096,
        "validation_workers": 2,
        "max_client_batch_size": 4,
        "router": "text-generation-router",
        "version": "0.1.0",
        "sha": None,
        "docker_label": None,
        "max_input_length": 4095,
        "waiting_served_ratio": 0.3,
        "max_batch_total_tokens": 100_000,
        "max_waiting_tokens": 20,
        "max_batch_size": None,
    }
