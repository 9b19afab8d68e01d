"""Tensor parallelism over real gloo process groups of 2 and 4 ranks against unsplit layers.

Each `rank_*` function runs in every rank of a `TPGroup` (one process per rank) and loads its
weights the way the shard does: lazily, through safetensors slices and the parameters'
`weight_loader`s. The test process computes the unsplit result and compares.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from test_model import Paged, prompts
from tp_group import TPGroup

from tgi_server.shard.distributed import ParallelState, all_gather
from tgi_server.shard.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgi_server.shard.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tgi_server.shard.models import load_model
from tgi_server.shard.sharding import ShardingError, check_num_shard, valid_num_shards

HIDDEN, OUT, NUM_TOKENS = 32, 48, 5
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
VOCAB = 10  # not divisible by 4: the last rank of 4 holds one real row and two padding rows
ATOL = RTOL = 1e-5
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def group(request):
    tp_group = TPGroup(request.param)
    yield tp_group
    tp_group.close()


@pytest.fixture(scope="module")
def tensors(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A checkpoint of random weights (and inputs) that every rank reads its slice of."""
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "x": [NUM_TOKENS, HIDDEN], "w": [OUT, HIDDEN], "b": [OUT],
        "row_w": [HIDDEN, OUT], "row_b": [HIDDEN],
        "q": [HEADS * HEAD_DIM, HIDDEN], "k": [KV_HEADS * HEAD_DIM, HIDDEN],
        "v": [KV_HEADS * HEAD_DIM, HIDDEN], "gate": [OUT, HIDDEN], "up": [OUT, HIDDEN],
        "embed": [VOCAB, HIDDEN],
    }
    full = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    path = tmp_path_factory.mktemp("tp") / "weights.safetensors"
    save_file(full, path)
    return str(path), full


def _load(layer, path: str, **names: str) -> None:
    """Fill `layer`'s parameters through their weight_loaders from lazy checkpoint slices."""
    with safe_open(path, framework="pt") as f:
        for param_name, spec in names.items():
            tensor_name, _, shard_id = spec.partition(":")
            param = getattr(layer, param_name)
            shard = int(shard_id) if shard_id.isdigit() else (shard_id or None)
            param.weight_loader(param, f.get_slice(tensor_name), shard)


def _x(path: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as f:
        return f.get_tensor("x")


# ---- functions run on every rank ------------------------------------------------------


def rank_column(tp: ParallelState, path: str):
    layer = ColumnParallelLinear(HIDDEN, OUT, True, tp)
    _load(layer, path, weight="w", bias="b")
    out = layer(_x(path))  # [num_tokens, OUT / world]
    return tuple(layer.weight.shape), all_gather(out, tp)


def rank_row(tp: ParallelState, path: str):
    layer = RowParallelLinear(OUT, HIDDEN, True, tp)
    _load(layer, path, weight="row_w", bias="row_b")
    cols = OUT // tp.world_size
    h = torch.arange(NUM_TOKENS * OUT, dtype=torch.float32).reshape(NUM_TOKENS, OUT) / 100
    return tuple(layer.weight.shape), layer(h[:, tp.rank * cols:(tp.rank + 1) * cols])


def rank_qkv_and_merged(tp: ParallelState, path: str):
    qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, False, tp)
    _load(qkv, path, weight="q:q")
    _load(qkv, path, weight="k:k")
    _load(qkv, path, weight="v:v")
    merged = MergedColumnParallelLinear(HIDDEN, [OUT, OUT], False, tp)
    _load(merged, path, weight="gate:0")
    _load(merged, path, weight="up:1")
    x = _x(path)
    q, k, v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
    gate, up = merged(x).chunk(2, dim=-1)
    return q, k, v, all_gather(gate, tp), all_gather(up, tp)


def rank_vocab(tp: ParallelState, path: str):
    embed = VocabParallelEmbedding(VOCAB, HIDDEN, tp)
    _load(embed, path, weight="embed")
    head = ParallelLMHead(VOCAB, HIDDEN, tp)
    _load(head, path, weight="embed")
    ids = torch.tensor([0, 9, 3, 3, 7, 5, 1, 8, 2, 6, 4])
    return embed.weight.shape[0], embed(ids), head(_x(path))


def rank_model_logits(tp: ParallelState, model_path: str):
    model = load_model(model_path, torch.float32, CPU, tp)
    return _prefill_and_decode(model)


def _prefill_and_decode(model) -> list[torch.Tensor]:
    """Logits of a packed 3-prompt prefill over shuffled blocks, then 3 batched decodes."""
    seqs = prompts(model.config.vocab_size, [5, 11, 8])
    paged = Paged(model, num_seqs=3)
    logits = paged.step([0, 1, 2], seqs)
    for _ in range(3):
        tokens = [torch.tensor([int(lg[-1].argmax())]) for lg in logits[-3:]]
        logits += paged.step([0, 1, 2], tokens)
    return logits


# ---- the unsplit reference ------------------------------------------------------------


def test_column_parallel(group, tensors):
    path, full = tensors
    expected = F.linear(full["x"], full["w"], full["b"])
    for shape, out in group.run(rank_column, path):
        assert shape == (OUT // group.world_size, HIDDEN)  # only this rank's rows exist
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def test_row_parallel_sums_partials_and_adds_the_bias_once(group, tensors):
    path, full = tensors
    h = torch.arange(NUM_TOKENS * OUT, dtype=torch.float32).reshape(NUM_TOKENS, OUT) / 100
    expected = F.linear(h, full["row_w"], full["row_b"])
    for shape, out in group.run(rank_row, path):
        assert shape == (HIDDEN, OUT // group.world_size)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=RTOL)


def test_qkv_heads_split_and_kv_heads_replicated(group, tensors):
    path, full = tensors
    x, n = full["x"], group.world_size
    q_full, k_full, v_full = (x @ full[name].T for name in "qkv")
    for rank, (q, k, v, gate, up) in enumerate(group.run(rank_qkv_and_merged, path)):
        heads = slice(rank * HEADS // n * HEAD_DIM, (rank + 1) * HEADS // n * HEAD_DIM)
        torch.testing.assert_close(q, q_full[:, heads], atol=ATOL, rtol=RTOL)
        # 2 kv heads: split over 2 ranks, each replicated on 2 consecutive ranks of 4.
        kv_head = rank * KV_HEADS // n
        kv = slice(kv_head * HEAD_DIM, (kv_head + 1) * HEAD_DIM)
        assert k.shape == (NUM_TOKENS, HEAD_DIM)
        torch.testing.assert_close(k, k_full[:, kv], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(v, v_full[:, kv], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(gate, x @ full["gate"].T, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(up, x @ full["up"].T, atol=ATOL, rtol=RTOL)


def test_vocab_parallel_embedding_and_lm_head(group, tensors):
    path, full = tensors
    ids = torch.tensor([0, 9, 3, 3, 7, 5, 1, 8, 2, 6, 4])
    logits = (full["x"] @ full["embed"].T).float()
    for rows, embedded, head_logits in group.run(rank_vocab, path):
        assert rows == -(-VOCAB // group.world_size)  # ceil: padded, never the full vocab
        torch.testing.assert_close(embedded, F.embedding(ids, full["embed"]), atol=0, rtol=0)
        assert head_logits.shape == (NUM_TOKENS, VOCAB)
        torch.testing.assert_close(head_logits, logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_whole_model_logits_equal_world_size_1(group, model_dir, arch):
    """4 heads, 2 kv heads: world 2 splits the kv heads, world 4 replicates each on 2 ranks."""
    path = model_dir(arch)
    expected = _prefill_and_decode(load_model(path, torch.float32, CPU, ParallelState()))
    for logits in group.run(rank_model_logits, str(path)):
        for got, want in zip(logits, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- splits that cannot work ----------------------------------------------------------


def test_unsupported_split_names_the_numbers_and_the_valid_values():
    tiny = {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    assert valid_num_shards(tiny) == [1, 2, 4]
    with pytest.raises(ShardingError) as err:
        check_num_shard(tiny, 3)
    assert str(err.value) == (
        "cannot split the model over 3 shards: 4 attention heads are not divisible by 3; "
        "2 key/value heads neither divide 3 nor are divisible by it; intermediate size 128 is "
        "not divisible by 3. Valid --num-shard values for this model: 1, 2, 4")
    gqa = {"num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 11008}
    assert valid_num_shards(gqa) == [1, 2, 4, 8, 16, 32]
    twelve = {"num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 48}
    assert valid_num_shards(twelve) == [1, 2, 4, 12]  # 12: each kv head on 3 ranks
    with pytest.raises(ShardingError, match="4 key/value heads neither divide 6"):
        check_num_shard(twelve, 6)


def test_shard_refuses_an_unsupported_split_before_the_rendezvous(model_dir):
    """Rank 0 of 3 exits at once with one line (it would otherwise wait for ranks 1 and 2)."""
    cmd = [sys.executable, "-m", "tgi_server.shard.cli", "--model-id", str(model_dir("llama")),
           "--rank", "0", "--world-size", "3", "--uds-path", "/tmp/tgi-test-unsupported"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors == [
        "ERROR: ShardingError: cannot split the model over 3 shards: 4 attention heads are not "
        "divisible by 3; 2 key/value heads neither divide 3 nor are divisible by it; "
        "intermediate size 128 is not divisible by 3. Valid --num-shard values for this "
        "model: 1, 2, 4"]


# ---- each rank reads only its slice ---------------------------------------------------


class _CountingSlice:
    def __init__(self, inner, reads: list[int]) -> None:
        self.inner, self.reads = inner, reads

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        tensor = self.inner[index]
        self.reads.append(tensor.numel() * tensor.element_size())
        return tensor


class _CountingOpen:
    """`safe_open` whose slices count the bytes they hand out."""

    reads: list[int] = []

    def __init__(self, *args, **kwargs) -> None:
        self.inner = safe_open(*args, **kwargs)

    def __enter__(self):
        self.file = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_slice(self, name: str):
        return _CountingSlice(self.file.get_slice(name), self.reads)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_rank_reads_only_its_slice(model_dir, monkeypatch, arch, world_size):
    """Every byte read from the checkpoint lands in this rank's parameters, which hold
    1/world_size of the split matrices; no rank reads (hence materializes) a whole one."""
    import tgi_server.shard.weights as weights

    path = model_dir(arch)
    monkeypatch.setattr(weights, "safe_open", _CountingOpen)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        checkpoint_bytes = sum(f.get_slice(n)[:].nbytes for n in f.keys())  # noqa: SIM118
    for rank in range(world_size):
        _CountingOpen.reads = reads = []
        model = load_model(path, torch.float32, CPU, ParallelState(rank, world_size))
        params = {id(p): p for p in model.parameters()}.values()
        assert sum(reads) == sum(p.numel() * p.element_size() for p in params)
        # Replicated: the norms, and at world 4 each of the 2 kv heads on 2 ranks.
        replicated = 0.005 if world_size < 4 else 0.03
        assert sum(reads) <= checkpoint_bytes * (1 / world_size + replicated)


def test_shard_threads_are_its_share_of_the_cores():
    code = ("import os, torch; from tgi_server.shard.cli import set_cpu_threads; "
            "n = set_cpu_threads(None, 2); "
            "print(n, torch.get_num_threads(), torch.get_num_interop_threads(), "
            "len(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    threads, intra, interop, cores = map(int, out)
    assert threads == intra == max(1, cores // 2)
    assert interop == 1  # no idle inter-op pool per shard competing for the same cores
