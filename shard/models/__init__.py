"""Model registry keyed by Hugging Face architecture, and `load_model`.

Upstream: `model_runner.py` (through `shard/cli.py`'s resolved model directory). Downstream:
the architecture's module (`llama.py`) and `weights.load_weights`.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from ..distributed import ParallelState
from ..layers.rotary import override_rope
from ..weights import load_weights
from .llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not in MODEL_REGISTRY."""


def model_class(model_dir: Path) -> type[nn.Module]:
    """The registered class of `config.json`'s architecture (checked before transformers)."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    architectures = raw.get("architectures") or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    name = ", ".join(architectures) or f"model_type {raw.get('model_type')!r}"
    raise UnsupportedModelError(
        f"unsupported architecture {name}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )


def _eos_token_ids(model_dir: Path, config) -> list[int]:
    ids: list[int] = []
    generation_config = Path(model_dir) / "generation_config.json"
    sources = [config.eos_token_id]
    if generation_config.is_file():
        sources.insert(0, json.loads(generation_config.read_text()).get("eos_token_id"))
    for eos in sources:
        for token_id in [eos] if isinstance(eos, int) else eos or []:
            if token_id not in ids:
                ids.append(token_id)
    return ids


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device, tp: ParallelState,
    rope: tuple[str | None, float | None] = (None, None),
) -> nn.Module:
    """Builds this rank's slice of the model on `device` in `dtype` and loads its weights.
    `rope`: TGI's (`--rope-scaling`, `--rope-factor`) override of the config's rope scaling."""
    cls = model_class(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    override_rope(config, *rope)
    with _default_dtype(dtype), torch.device(device):
        model = cls(config, tp)
    load_weights(model, Path(model_dir))
    model.eos_token_ids = _eos_token_ids(model_dir, config)
    return model.eval()
