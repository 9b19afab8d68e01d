"""tgi-make-model: a byte-level tokenizer with a ChatML template, loadable seeded models."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tgi_server.launcher.make_model import main, make_model

TEXTS = [
    "def f(x):\n\treturn x ** 2  # plain ASCII code",
    "Grüße, señor! Ça va? Ωμέγα, Привет, 日本語のテキスト, 한국어, עברית, العربية",
    "emoji 🤖🦀👩‍👩‍👧 flags 🇫🇷 and combining é (e\u0301), zero-width\u200bjoiner",
    "  leading spaces, trailing\n\n\r\n",
]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir("llama"))


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_utf8(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_special_tokens_and_no_bos(tokenizer):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.convert_tokens_to_ids(specials) == [0, 1, 2]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token is None
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer("hi")["input_ids"][0] not in (0, 1, 2)


def test_chat_template_renders(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
        ]},
        {"role": "tool", "content": "sunny"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert '{"name": "weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>tool\nsunny<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    with_tools = tokenizer.apply_chat_template(messages[:2], tools=tools, tokenize=False)
    assert with_tools.count("<|im_start|>system") == 1 and '"name": "weather"' in with_tools
    assert not with_tools.endswith("assistant\n")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_model_loads_in_transformers(model_dir, arch):
    path = model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.architectures[0].lower().startswith(arch)
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(path)) == 512
    assert model.config.tie_word_embeddings == (arch == "qwen2")
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]


def test_same_seed_same_weights(tmp_path):
    make_model(tmp_path / "a", "qwen2", "tiny", seed=1)
    make_model(tmp_path / "b", "qwen2", "tiny", seed=1)
    make_model(tmp_path / "c", "qwen2", "tiny", seed=2)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    tokenizers = [(tmp_path / name / "tokenizer.json").read_bytes() for name in "ac"]
    assert tokenizers[0] == tokenizers[1]


def test_cli_rope_scaling_and_dtype(tmp_path):
    main([str(tmp_path / "m"), "--arch", "llama", "--size", "tiny", "--rope-scaling", "yarn",
          "--dtype", "bfloat16"])
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert config.rope_parameters["rope_type"] == "yarn"
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
