import dataclasses
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tgi_server.router.config import RouterConfig
from tgi_server.router.protocol import GenerateParameters, SimpleToken
from tgi_server.router.types import SamplingParams, StoppingParams, ValidRequest
from tgi_server.router.validation import ValidationError, Validator

MAX_INPUT_TOKENS = 8
MAX_TOTAL_TOKENS = 12
CONFIG = RouterConfig(tokenizer="unused", shard_urls=("unix:///tmp/unused",), model_id="base")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # One token per word "w1".."w20" (id = i + 1), and a "<s>" (id 1) added in front.
    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i + 1 for i in range(1, 21)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", unk_token="<unk>")


@pytest.fixture
def validator(tokenizer) -> Validator:
    return make_validator(tokenizer)


def make_validator(tokenizer, config=CONFIG, max_input_tokens=MAX_INPUT_TOKENS):
    return Validator(config, tokenizer, max_input_tokens, MAX_TOTAL_TOKENS, rng=random.Random(0))


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(1, n + 1))


def test_defaults_resolved(validator):
    valid = validator.validate("w1 w2 w3", GenerateParameters(max_new_tokens=None), stream=False)
    assert valid == ValidRequest(
        inputs="w1 w2 w3",
        input_ids=(1, 2, 3, 4),
        sampling=SamplingParams(seed=random.Random(0).getrandbits(64)),
        # Unset max_new_tokens: max_total_tokens 12 - 4 input tokens.
        stopping=StoppingParams(max_new_tokens=8),
        top_n_tokens=0,
        details=False,
        decoder_input_details=False,
        return_full_text=False,
        best_of=1,
        stream=False,
    )
    assert valid.num_prompt_tokens == 4
    assert valid.max_num_tokens == 12


def test_absent_max_new_tokens_is_tgi_default_100(validator):
    assert GenerateParameters().max_new_tokens == 100
    with pytest.raises(ValidationError, match="Given: 4 `inputs` tokens and 100 `max_new_tokens`"):
        validator.validate("w1 w2 w3", GenerateParameters(), stream=False)


def test_explicit_values_pass_through(validator):
    parameters = GenerateParameters(
        temperature=0.5,
        repetition_penalty=1.2,
        frequency_penalty=-0.5,
        top_k=10,
        top_p=0.9,
        typical_p=0.95,
        max_new_tokens=3,
        stop=["w9", "w10"],
        seed=42,
        top_n_tokens=5,
        details=True,
        decoder_input_details=True,
        return_full_text=True,
    )
    valid = validator.validate("w1 w2", parameters, stream=False)
    assert valid.sampling == SamplingParams(
        temperature=0.5,
        top_k=10,
        top_p=0.9,
        typical_p=0.95,
        do_sample=True,
        seed=42,
        repetition_penalty=1.2,
        frequency_penalty=-0.5,
    )
    assert valid.stopping == StoppingParams(max_new_tokens=3, stop_sequences=("w9", "w10"))
    assert (valid.top_n_tokens, valid.details, valid.decoder_input_details) == (5, True, True)
    assert valid.return_full_text is True


@pytest.mark.parametrize(
    "parameters, expected_do_sample",
    [
        ({}, False),
        ({"do_sample": True}, True),
        ({"temperature": 0.7}, True),
        ({"temperature": 1.0}, False),
        ({"top_k": 5}, True),
        ({"top_p": 0.9}, True),
        ({"typical_p": 0.9}, True),
        ({"repetition_penalty": 1.3}, False),
    ],
)
def test_do_sample_effective_with_any_warper(validator, parameters, expected_do_sample):
    valid = validator.validate("w1", GenerateParameters(max_new_tokens=1, **parameters), False)
    assert valid.sampling.do_sample is expected_do_sample


@pytest.mark.parametrize(
    "parameters, stream, message",
    [
        ({"temperature": 0.0}, False, "`temperature` must be strictly positive"),
        ({"temperature": -1.0}, False, "`temperature` must be strictly positive"),
        ({"repetition_penalty": 0.0}, False, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, False, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"frequency_penalty": -2.1}, False, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 1.0}, False, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 0.0}, False, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 1.0}, False, "`typical_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0.0}, False, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, False, "`top_k` must be strictly positive"),
        ({"top_k": -3}, False, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, False, "`max_new_tokens` must be strictly positive"),
        (
            {"stop": ["a", "b", "c", "d", "e"]},
            False,
            "`stop` supports up to 4 stop sequences (`--max-stop-sequences`). Given: 5",
        ),
        (
            {"top_n_tokens": 6},
            False,
            "`top_n_tokens` must be >= 0 and <= 5 (`--max-top-n-tokens`). Given: 6",
        ),
        ({"best_of": 2}, False, "you must use sampling when `best_of` is > 1"),
        (
            {"best_of": 2, "do_sample": True, "seed": 1},
            False,
            "`seed` must not be set when `best_of` > 1",
        ),
        (
            {"best_of": 3, "do_sample": True},
            False,
            "`best_of` must be > 0 and <= 2 (`--max-best-of`). Given: 3",
        ),
        (
            {"best_of": 0, "do_sample": True},
            False,
            "`best_of` must be > 0 and <= 2 (`--max-best-of`). Given: 0",
        ),
        (
            {"best_of": 2, "do_sample": True},
            True,
            "`best_of` != 1 is not supported when streaming tokens",
        ),
        (
            {"decoder_input_details": True},
            True,
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
        (
            {"truncate": 0},
            False,
            "`truncate` must be strictly positive and at most 8 (`--max-input-tokens`). Given: 0",
        ),
        (
            {"truncate": 9},
            False,
            "`truncate` must be strictly positive and at most 8 (`--max-input-tokens`). Given: 9",
        ),
        (
            {"grammar": {"type": "regex", "value": "[0-9]+"}},
            False,
            "`grammar` is not supported yet by this server",
        ),
        ({"watermark": True}, False, "`watermark` is not supported yet by this server"),
        (
            {"adapter_id": "my-lora"},
            False,
            "`adapter_id` is not supported yet by this server (LoRA adapters). Given: 'my-lora'",
        ),
    ],
)
def test_rule(validator, parameters, stream, message):
    parameters = GenerateParameters(**{"max_new_tokens": 1, **parameters})
    with pytest.raises(ValidationError) as error:
        validator.validate("w1 w2", parameters, stream=stream)
    assert str(error.value) == message


def test_empty_inputs(validator):
    with pytest.raises(ValidationError, match="^`inputs` cannot be empty$"):
        validator.validate("", GenerateParameters(max_new_tokens=1), stream=False)


def test_inputs_without_tokens_are_empty(validator):
    with pytest.raises(ValidationError, match="^`inputs` cannot be empty$"):
        validator.validate(
            "   ", GenerateParameters(max_new_tokens=1), False, add_special_tokens=False
        )


def test_input_length_message_names_numbers_and_flags(validator):
    with pytest.raises(ValidationError) as error:
        validator.validate(words(9), GenerateParameters(max_new_tokens=1), stream=False)
    assert str(error.value) == (
        "`inputs` must have at most 8 tokens (`--max-input-tokens`). Given: 10 tokens. "
        "Shorten the input, set `truncate` to at most 8 to keep only its last tokens, "
        "or restart the server with a larger `--max-input-tokens`."
    )


def test_total_tokens_message_names_numbers_and_flags(validator):
    with pytest.raises(ValidationError) as error:
        validator.validate(words(3), GenerateParameters(max_new_tokens=9), stream=False)
    assert str(error.value) == (
        "`inputs` tokens + `max_new_tokens` must be <= 12 (`--max-total-tokens`). "
        "Given: 4 `inputs` tokens and 9 `max_new_tokens` (13 in total). "
        "Set `max_new_tokens` to at most 8, shorten the input, "
        "or restart the server with a larger `--max-total-tokens`."
    )


def test_total_tokens_exactly_at_the_limit(validator):
    valid = validator.validate(words(3), GenerateParameters(max_new_tokens=8), stream=False)
    assert valid.max_num_tokens == 12


def test_unset_max_new_tokens_without_room(tokenizer):
    validator = make_validator(tokenizer, max_input_tokens=12)
    with pytest.raises(ValidationError) as error:
        validator.validate(words(11), GenerateParameters(max_new_tokens=None), stream=False)
    assert str(error.value) == (
        "`inputs` tokens + `max_new_tokens` must be <= 12 (`--max-total-tokens`). "
        "Given: 12 `inputs` tokens and 1 `max_new_tokens` (13 in total). "
        "The input alone leaves no room for a new token: shorten it (or set `truncate`), "
        "or restart the server with a larger `--max-total-tokens`."
    )


def test_truncate_keeps_last_tokens(validator):
    # 10 tokens ("<s>" + 9 words) exceed max_input_tokens 8, but truncation comes first.
    valid = validator.validate(words(9), GenerateParameters(truncate=3, max_new_tokens=None), False)
    assert valid.input_ids == (8, 9, 10)
    assert valid.inputs == "w7 w8 w9"
    assert valid.stopping.max_new_tokens == 9


def test_truncate_longer_than_input_changes_nothing(validator):
    valid = validator.validate("w1 w2", GenerateParameters(truncate=8, max_new_tokens=1), False)
    assert (valid.inputs, valid.input_ids) == ("w1 w2", (1, 2, 3))


def test_add_special_tokens_false(validator):
    valid = validator.validate(
        "w1 w2", GenerateParameters(max_new_tokens=1), False, add_special_tokens=False
    )
    assert valid.input_ids == (2, 3)


def test_best_of_accepted_with_sampling(validator):
    parameters = GenerateParameters(best_of=2, temperature=1.0, max_new_tokens=1)
    valid = validator.validate("w1", parameters, stream=False)
    # TGI accepts any warper set (even a neutral one); sampling is then forced on.
    assert (valid.best_of, valid.sampling.do_sample) == (2, True)


def test_best_of_disabled_by_config(tokenizer):
    validator = make_validator(tokenizer, config=dataclasses.replace(CONFIG, max_best_of=1))
    parameters = GenerateParameters(best_of=2, do_sample=True, max_new_tokens=1)
    with pytest.raises(ValidationError) as error:
        validator.validate("w1", parameters, stream=False)
    assert str(error.value) == (
        "`best_of` != 1 is not allowed for this endpoint "
        "(the server was started with `--max-best-of 1`)"
    )


def test_top_n_tokens_disabled_by_config(tokenizer):
    validator = make_validator(tokenizer, config=dataclasses.replace(CONFIG, max_top_n_tokens=0))
    with pytest.raises(ValidationError, match="^`top_n_tokens` != 0 is not allowed"):
        validator.validate("w1", GenerateParameters(top_n_tokens=1, max_new_tokens=1), False)
    valid = validator.validate("w1", GenerateParameters(top_n_tokens=0, max_new_tokens=1), False)
    assert valid.top_n_tokens == 0


def test_adapter_id_of_the_base_model_is_accepted(validator):
    valid = validator.validate("w1", GenerateParameters(adapter_id="base", max_new_tokens=1), False)
    assert valid.num_prompt_tokens == 2


def test_random_seeds_differ_per_request(validator):
    parameters = GenerateParameters(max_new_tokens=1)
    seeds = [validator.validate("w1", parameters, False).sampling.seed for _ in range(2)]
    expected = random.Random(0)
    assert seeds == [expected.getrandbits(64), expected.getrandbits(64)]


def test_validate_tokenize_offsets(validator):
    assert validator.validate_tokenize("w1  w12") == [
        SimpleToken(id=1, text="", start=0, stop=0),
        SimpleToken(id=2, text="w1", start=0, stop=2),
        SimpleToken(id=13, text="w12", start=4, stop=7),
    ]
    assert [t.id for t in validator.validate_tokenize("w1", add_special_tokens=False)] == [2]


class CharTokenizer:
    """A tokenizer without offsets (like a slow one): one id per character."""

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    def encode(self, text, add_special_tokens=True):
        if "\0" in text:
            raise ValueError("NUL byte")
        return [ord(c) for c in text]

    def decode(self, ids, **kwargs):
        return "".join(chr(i) for i in ids)


def test_validate_tokenize_without_offsets():
    validator = make_validator(CharTokenizer())
    assert validator.validate_tokenize("ab") == [
        SimpleToken(id=97, text="a", start=0, stop=1),
        SimpleToken(id=98, text="b", start=1, stop=2),
    ]


def test_tokenizer_failure_is_a_validation_error():
    validator = make_validator(CharTokenizer())
    with pytest.raises(ValidationError, match="^tokenizer error NUL byte$") as error:
        validator.validate("a\0", GenerateParameters(max_new_tokens=1), stream=False)
    assert (error.value.error_type, error.value.message) == (
        "validation",
        "tokenizer error NUL byte",
    )


def test_prompt_logprobs_need_the_prompt_in_one_prefill(tokenizer):
    """With chunked prefill a prompt may be longer than one prefill; its logprobs may not."""
    config = dataclasses.replace(CONFIG, enable_prefill_logprobs=True)
    validator = Validator(config, tokenizer, 10, MAX_TOTAL_TOKENS, max_prefill_tokens=5)
    details = GenerateParameters(max_new_tokens=2, decoder_input_details=True)
    with pytest.raises(ValidationError, match="at most 5 tokens .`--max-batch-prefill-tokens`."):
        validator.validate(words(6), details, stream=False)
    assert validator.validate(words(4), details, stream=False).num_prompt_tokens == 5
    # without details, or without prompt logprobs, the input limit is the only one
    assert validator.validate(words(8), GenerateParameters(max_new_tokens=2), stream=False)
    plain = Validator(CONFIG, tokenizer, 10, MAX_TOTAL_TOKENS, max_prefill_tokens=5)
    assert plain.validate(words(8), details, stream=False)
