"""Which tensor-parallel world sizes a checkpoint can be split over, checked before loading.

Upstream: `shard/cli.py` (before joining the process group) and the launcher's
`supervisor.py` (before spawning any shard, when config.json is already on this machine).
The rules mirror the layer classes (`layers/linear.py`, `layers/embedding.py`):

- attention heads and the MLP's intermediate size are split evenly over the ranks;
- key/value heads are split evenly, or, when there are fewer than ranks, each one is
  replicated on `world_size // num_kv_heads` ranks (so one must divide the other);
- the vocabulary never blocks a split: each rank holds `ceil(vocab / world_size)` rows,
  the last rank's tail is zero padding.

No torch here: the launcher imports this module.
"""

import json
from pathlib import Path


class ShardingError(ValueError):
    """The model cannot be split over the asked number of shards; the message is one line."""


def split_problems(hf_config: dict, world_size: int) -> list[str]:
    """Why `hf_config` (config.json as a dict) cannot be split over `world_size` ranks."""
    heads = hf_config.get("num_attention_heads")
    intermediate = hf_config.get("intermediate_size")
    if not isinstance(heads, int) or not isinstance(intermediate, int):
        return []  # not a layout we know: the model registry reports the architecture
    kv_heads = hf_config.get("num_key_value_heads") or heads
    n = world_size
    problems = []
    if heads % n:
        problems.append(f"{heads} attention heads are not divisible by {n}")
    if kv_heads % n and n % kv_heads:
        problems.append(f"{kv_heads} key/value heads neither divide {n} nor are divisible by it")
    if intermediate % n:
        problems.append(f"intermediate size {intermediate} is not divisible by {n}")
    return problems


def valid_num_shards(hf_config: dict) -> list[int]:
    """Every world size the checkpoint can be split over (at most one attention head each)."""
    heads = hf_config.get("num_attention_heads")
    if not isinstance(heads, int):
        return []
    return [n for n in range(1, heads + 1) if not split_problems(hf_config, n)]


def check_num_shard(hf_config: dict, num_shard: int) -> None:
    """Raises `ShardingError` naming the numbers and the valid `--num-shard` values."""
    problems = split_problems(hf_config, num_shard)
    if problems:
        valid = ", ".join(map(str, valid_num_shards(hf_config)))
        raise ShardingError(
            f"cannot split the model over {num_shard} shards: {'; '.join(problems)}. "
            f"Valid --num-shard values for this model: {valid}"
        )


def read_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def local_config(model_id: str, revision: str | None = None) -> dict | None:
    """config.json of a local directory or of the Hugging Face cache; None if not here yet.

    Never touches the network: a model still to be downloaded is checked by the shards.
    """
    path = Path(model_id).expanduser()
    if (path / "config.json").is_file():
        return read_config(path)
    if path.is_absolute() or model_id.startswith("."):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return None
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    return None
