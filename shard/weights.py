"""Finding a model's files and loading its safetensors into a model built for one TP rank.

Upstream: `models.load_model` (and `shard/cli.py` through `resolve_model_dir`, which turns
the launcher's `--model-id` into a directory). Downstream: each parameter's `weight_loader`
(`layers/`), which copies only this rank's slice of the lazily opened checkpoint tensor.
"""

import contextlib
import json
from pathlib import Path

from safetensors import safe_open
from torch import nn


class ModelNotFoundError(ValueError):
    """The model id is neither a local directory, nor in the HF cache, nor downloadable."""


class WeightsError(ValueError):
    """The checkpoint does not fit the model: missing, unexpected or mis-shaped tensors."""


_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or model_id.count("/") > 1


def resolve_model_dir(
    model_id: str, revision: str | None = None, cache_dir: str | None = None
) -> Path:
    """A directory with `config.json`: the path itself, the HF cache's snapshot, or a download."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json")
        return path.resolve()
    if _looks_like_path(model_id):
        raise ModelNotFoundError(f"model directory {model_id} does not exist")
    from huggingface_hub import snapshot_download

    # huggingface_hub raises OSError subclasses for missing/unreachable, ValueError for bad ids.
    with contextlib.suppress(OSError, ValueError):  # not in the cache: try the hub below
        return Path(snapshot_download(
            model_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
        ))
    try:
        return Path(snapshot_download(
            model_id, revision=revision, cache_dir=cache_dir, allow_patterns=_HUB_FILES,
        ))
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__  # one line
        raise ModelNotFoundError(
            f"model {model_id!r} (revision {revision or 'main'}) is not a local directory, not in "
            f"the Hugging Face cache, and could not be downloaded: {reason}"
        ) from None


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint files, in the order `model.safetensors.index.json` lists them if present."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        files = [model_dir / name for name in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors files in {model_dir}")
    return files


def _target(name: str, mapping: dict[str, tuple[str, object]]) -> tuple[str, object]:
    """HF tensor name -> (our parameter name, shard id), e.g. q_proj -> (qkv_proj, "q")."""
    for hf_module, (module, shard_id) in mapping.items():
        if f".{hf_module}." in name:
            return name.replace(f".{hf_module}.", f".{module}."), shard_id
    return name, None


def _expected_shards(params: dict, mapping: dict) -> set[tuple[str, object]]:
    """(parameter name, shard id) of every checkpoint tensor the model needs."""
    shards_of: dict[str, list] = {}
    for module, shard_id in mapping.values():
        shards_of.setdefault(module, []).append(shard_id)
    expected = set()
    for name in params:
        module = name.split(".")[-2] if "." in name else ""
        expected.update((name, shard_id) for shard_id in shards_of.get(module, [None]))
    return expected


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copies every checkpoint tensor into the model through the parameters' `weight_loader`s."""
    mapping = getattr(model, "packed_modules_mapping", {})
    ignored = tuple(getattr(model, "ignored_weight_suffixes", ()))
    params = dict(model.named_parameters())
    loaded: set[tuple[str, object]] = set()
    unexpected: list[str] = []
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
        for hf_name in names:
            if hf_name.endswith(ignored):
                continue
            name, shard_id = _target(hf_name, mapping)
            param = params.get(name)
            if param is None:
                unexpected.append(hf_name)
                continue
            # NOTE: one mapping per tensor. safetensors reads through an mmap, and every page
            # read stays resident in this process until the file is unmapped: with the file
            # kept open, a rank's peak memory would include every page it touched (whole rows
            # of row-parallel weights) on top of its slice.
            with safe_open(path, framework="pt", device="cpu") as f:
                try:
                    param.weight_loader(param, f.get_slice(hf_name), shard_id)
                except ValueError as e:
                    raise WeightsError(f"{path.name}: {hf_name}: {e}") from None
            loaded.add((name, shard_id))
    missing = sorted(
        name if shard_id is None else f"{name}[{shard_id}]"
        for name, shard_id in _expected_shards(params, mapping) - loaded
    )
    if unexpected or missing:
        raise WeightsError(
            f"checkpoint in {model_dir} does not match {type(model).__name__}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
