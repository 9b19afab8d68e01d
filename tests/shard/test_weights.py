"""Model resolution (local dir, HF cache layout, missing) and checkpoint loading errors."""

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from tgi_server.shard.distributed import ParallelState
from tgi_server.shard.models import UnsupportedModelError, load_model
from tgi_server.shard.weights import ModelNotFoundError, WeightsError, resolve_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CPU = torch.device("cpu")


@pytest.fixture
def offline(monkeypatch):
    """No hub traffic: a cache miss fails at once instead of trying the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def model_copy(model_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(model_dir("llama"), path)
    return path


def fake_hf_cache(root, repo_id: str, source) -> None:
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_resolve_local_directory(model_dir):
    path = model_dir("llama")
    assert resolve_model_dir(str(path)) == path.resolve()


def test_resolve_through_hf_cache_layout(model_dir, tmp_path, offline):
    fake_hf_cache(tmp_path / "hub", "org/tiny-llama", model_dir("llama"))
    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / COMMIT
    assert resolve_model_dir("org/tiny-llama", cache_dir=str(tmp_path / "hub")) == snapshot
    resolved = resolve_model_dir("org/tiny-llama", revision=COMMIT, cache_dir=str(tmp_path / "hub"))
    assert resolved == snapshot
    model = load_model(resolved, torch.float32, CPU, ParallelState())
    assert model.num_layers == 2


@pytest.mark.parametrize("model_id", ["org/not-there", "/no/such/model/dir"])
def test_missing_model_is_one_readable_line(model_id, tmp_path, offline):
    with pytest.raises(ModelNotFoundError, match=model_id) as info:
        resolve_model_dir(model_id, cache_dir=str(tmp_path))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model_dir(str(tmp_path))


def test_unsupported_architecture(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(model_copy, torch.float32, CPU, ParallelState())


def test_sharded_checkpoint_follows_index(model_copy, model_dir):
    tensors = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in halves.items():
        save_file({name: tensors[name] for name in part}, model_copy / file)
    weight_map = {name: file for file, part in halves.items() for name in part}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = load_model(model_copy, torch.float32, CPU, ParallelState())
    whole = load_model(model_dir("llama"), torch.float32, CPU, ParallelState())
    for (name, a), (_, b) in zip(sharded.named_parameters(), whole.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("change", ["missing", "unexpected", "wrong_shape"])
def test_checkpoint_mismatch_is_a_clear_error(model_copy, change):
    tensors = load_file(model_copy / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    if change == "missing":
        del tensors[name]
    elif change == "unexpected":
        tensors["model.layers.7.extra.weight"] = torch.zeros(2)
    else:
        tensors[name] = torch.zeros(3, 64)
    save_file(tensors, model_copy / "model.safetensors")
    expected = {
        "missing": r"qkv_proj.weight\[k\]", "unexpected": "layers.7.extra", "wrong_shape": name,
    }
    with pytest.raises(WeightsError, match=expected[change]):
        load_model(model_copy, torch.float32, CPU, ParallelState())


def test_each_rank_loads_only_its_slice(model_dir):
    """Rank 1 of 2 holds the second half of every split matrix (no process group needed to load)."""
    path = model_dir("qwen2")
    full = load_file(path / "model.safetensors")
    rank1 = load_model(path, torch.float32, CPU, ParallelState(rank=1, world_size=2))
    attn, mlp = rank1.model.layers[0].self_attn, rank1.model.layers[0].mlp
    prefix = "model.layers.0."
    head_dim = 16  # 4 heads, 2 kv heads: rank 1 owns q heads 2-3 and kv head 1
    q, k, v = (full[f"{prefix}self_attn.{n}_proj.weight"] for n in "qkv")
    expected_qkv = torch.cat([q[2 * head_dim:], k[head_dim:], v[head_dim:]])
    assert torch.equal(attn.qkv_proj.weight, expected_qkv)
    qkv_bias = torch.cat([full[f"{prefix}self_attn.{n}_proj.bias"].chunk(2)[1] for n in "qkv"])
    assert torch.equal(attn.qkv_proj.bias, qkv_bias)
    assert torch.equal(attn.o_proj.weight, full[f"{prefix}self_attn.o_proj.weight"][:, 32:])
    gate, up = full[f"{prefix}mlp.gate_proj.weight"], full[f"{prefix}mlp.up_proj.weight"]
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate[64:], up[64:]]))
    assert torch.equal(rank1.model.embed_tokens.weight, full["model.embed_tokens.weight"][256:])
    assert rank1.lm_head.weight is rank1.model.embed_tokens.weight  # tied
    assert rank1.num_kv_heads_per_rank == 1
