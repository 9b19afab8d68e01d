"""tgi-make-model: a small random-weight Hugging Face model directory, built offline.

Downstream: the test suite (`tests/conftest.py::model_dir`), `make model`, and the benchmarks
load the result with `transformers.AutoModelForCausalLM` / `AutoTokenizer` or with the shard.
The tokenizer is a real byte-level BPE trained on the local Python standard library (so it
round-trips any UTF-8 text and needs no download); the weights are seeded random.

    tgi-make-model OUT --arch llama|mistral|qwen2 --size tiny|small|medium --seed 0
"""

import argparse
import json
import os
import platform
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Bump whenever the output of make_model changes: test caches are keyed by it.
MAKER_VERSION = 2

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    corpus_bytes: int  # tokenizer training text: more merges need more text


SIZES = {
    "tiny": ModelSize(64, 2, 4, 2, 128, 512, 2048, 1 << 20),
    "small": ModelSize(256, 4, 8, 2, 688, 2048, 2048, 2 << 20),
    "medium": ModelSize(1024, 12, 16, 4, 4096, 32000, 4096, 8 << 20),  # ~200M: the benchmark model
}
ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_SCALINGS = ("none", "llama3", "linear", "yarn")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# ChatML with tools: OpenAI-style `tools` go into the system turn, assistant `tool_calls`
# are rendered as <tool_call> JSON blocks, `tool` results are their own turn.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' %}"
    "{{- messages[0].content + '\\n\\n' }}"
    "{%- endif %}"
    "{{- 'You can call these functions:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nTo call one, answer with "
    "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message.role == 'system') %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- elif message.content %}"
    "{%- for part in message.content %}"
    "{%- if part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' }}"
    "{{- (fn.arguments if fn.arguments is string else fn.arguments | tojson) }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus(max_bytes: int) -> Iterator[str]:
    """The standard library's own .py files, in sorted order, up to `max_bytes` characters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        if path.relative_to(stdlib).parts[0] in ("site-packages", "dist-packages", "test"):
            continue  # installed packages differ between machines
        text = path.read_text(encoding="utf-8", errors="replace")
        yield text
        total += len(text)
        if total >= max_bytes:
            return


def train_tokenizer(vocab_size: int, corpus_bytes: int) -> Tokenizer:
    """Byte-level BPE with the ChatML special tokens at ids 0, 1, 2; deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_corpus(corpus_bytes), trainer=trainer)
    return tokenizer


def cached_tokenizer(size: ModelSize, cache_dir: Path | None = None) -> Tokenizer:
    """`train_tokenizer`, memoized on disk (training is most of a tiny model's build time)."""
    cache_dir = cache_dir or Path(tempfile.gettempdir()) / "tgi-make-model"
    key = f"v{MAKER_VERSION}-{size.vocab_size}-{size.corpus_bytes}-py{platform.python_version()}"
    path = cache_dir / f"tokenizer-{key}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = train_tokenizer(size.vocab_size, size.corpus_bytes)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)  # atomic: concurrent builders never read half a file
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path, max_positions: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_positions,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def rope_scaling_params(kind: str, max_positions: int) -> dict | None:
    """Scalings whose original context is a fraction of max_positions, so they change the rope."""
    if kind == "none":
        return None
    if kind == "llama3":
        return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": max_positions // 8}
    if kind == "linear":
        return {"rope_type": "linear", "factor": 2.0}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": max_positions // 4}
    raise ValueError(f"unknown rope scaling {kind!r}; choose from {', '.join(ROPE_SCALINGS)}")


def build_config(arch: str, size: ModelSize, tokenizer: Tokenizer, rope_scaling: str):
    import transformers

    config_cls = getattr(transformers, ARCHS[arch].replace("ForCausalLM", "Config"))
    extra = {"sliding_window": None} if arch in ("mistral", "qwen2") else {}
    if (scaling := rope_scaling_params(rope_scaling, size.max_positions)) is not None:
        extra["rope_scaling"] = scaling
    return config_cls(
        architectures=[ARCHS[arch]],
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        head_dim=size.hidden_size // size.num_heads,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=arch == "qwen2",
        bos_token_id=None,
        eos_token_id=tokenizer.token_to_id(IM_END),
        pad_token_id=tokenizer.token_to_id(ENDOFTEXT),
        # NOTE: at transformers' default std (0.02), a tiny model with tied embeddings mostly
        # repeats its last token, which makes greedy comparisons weak; wider weights give
        # varied continuations. The benchmark model keeps the default.
        initializer_range=0.2 if size.hidden_size <= 256 else 0.02,
        **extra,
    )


def _randomize_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    # NOTE: transformers initializes norms to 1 and biases to 0, which would hide a loader
    # that drops or swaps them; perturb them, deterministically.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def make_model(
    out: Path, arch: str, size: str, seed: int = 0, rope_scaling: str = "none",
    dtype: str = "float32", tokenizer_cache_dir: Path | None = None,
) -> Path:
    """Writes config, safetensors weights, tokenizer and generation config into `out`."""
    import transformers

    if arch not in ARCHS or size not in SIZES or dtype not in DTYPES:
        raise ValueError(
            f"arch must be one of {list(ARCHS)}, size of {list(SIZES)}, dtype of {list(DTYPES)}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = SIZES[size]
    tokenizer = cached_tokenizer(spec, tokenizer_cache_dir)
    config = build_config(arch, spec, tokenizer, rope_scaling)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[arch])(config)
    _randomize_norms_and_biases(model, seed)
    model.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    eos_ids = [tokenizer.token_to_id(IM_END), tokenizer.token_to_id(ENDOFTEXT)]
    transformers.GenerationConfig(
        bos_token_id=None, eos_token_id=eos_ids, pad_token_id=eos_ids[1]
    ).save_pretrained(out)
    save_tokenizer(tokenizer, out, spec.max_positions)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tgi-make-model", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--arch", choices=list(ARCHS), default="llama")
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rope-scaling", choices=ROPE_SCALINGS, default="none")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = parser.parse_args(argv)
    path = make_model(args.out, args.arch, args.size, args.seed, args.rope_scaling, args.dtype)
    print(path)


if __name__ == "__main__":
    main()
