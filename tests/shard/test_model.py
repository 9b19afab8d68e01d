"""The shard's own forward over a paged KV cache against transformers' forward, in float32.

Every test packs several sequences in one token dimension and gives them shuffled,
non-contiguous blocks, the way the router hands them out.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tgi_server.shard.attention import AttentionMetadata, forward_context, get_forward_context
from tgi_server.shard.batch import Batch
from tgi_server.shard.distributed import ParallelState
from tgi_server.shard.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
from tgi_server.shard.layers import cpu_kernels
from tgi_server.shard.layers.linear import pack_linear_weights
from tgi_server.shard.layers.rotary import get_rope, override_rope
from tgi_server.shard.model_runner import ModelRunner
from tgi_server.shard.models import llama, load_model

BLOCK_SIZE = 4
NUM_BLOCKS = 48
ATOL = RTOL = 1e-4
VARIANTS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "llama-llama3-rope": ("llama", {"rope_scaling": "llama3"}),
}


class Paged:
    """A model, its KV cache, and per-sequence shuffled block tables (what the router does)."""

    def __init__(self, model, num_seqs: int, blocks_per_seq: int = 8, seed: int = 0) -> None:
        self.model = model
        self.cache = allocate_kv_cache(model, NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu")
        ids = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables = [ids[i * blocks_per_seq:(i + 1) * blocks_per_seq] for i in range(num_seqs)]
        self.lens = [0] * num_seqs  # tokens of each sequence already in the cache

    def step(self, seq_ids: list[int], chunks: list[torch.Tensor],
             last_only: bool = False) -> list[torch.Tensor]:
        """Runs the new tokens `chunks[i]` of sequences `seq_ids[i]` as one packed batch; the
        logits of every row, or (`last_only`) of each chunk's last row, computed alone."""
        query_lens = [len(chunk) for chunk in chunks]
        context_lens = [self.lens[s] + n for s, n in zip(seq_ids, query_lens)]
        tables = [self.tables[s] for s in seq_ids]
        meta = AttentionMetadata.from_lists(query_lens, context_lens, tables, BLOCK_SIZE)
        positions = torch.cat([torch.arange(c - q, c) for q, c in zip(query_lens, context_lens)])
        rows = meta.cu_seqlens_q[1:] - 1 if last_only else None
        with torch.inference_mode(), forward_context(meta):
            logits = self.model.compute_logits(self.model(torch.cat(chunks), positions, rows))
        for s, c in zip(seq_ids, context_lens):
            self.lens[s] = c
        return list(logits.split([1] * len(chunks) if last_only else query_lens))


@pytest.fixture(scope="module", params=[*VARIANTS, *(f"{v}-onednn" for v in VARIANTS)])
def models(request, model_dir):
    """(ours, transformers'); `-onednn`: ours with the linear weights packed as the shard does."""
    name = request.param.removesuffix("-onednn")
    arch, kw = VARIANTS[name]
    path = model_dir(arch, **kw)
    ours = load_model(path, torch.float32, torch.device("cpu"), ParallelState())
    if request.param != name and pack_linear_weights(ours) == 0:
        pytest.skip("oneDNN cannot pack float32 weights in this torch build")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, ref


def reference_logits(ref, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return ref(tokens[None]).logits[0].float()  # [len, vocab]


def prompts(vocab: int, lens: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator) for n in lens]


def test_packed_prefill_then_batched_decode(models):
    ours, ref = models
    seqs = prompts(ours.config.vocab_size, [5, 11, 8])
    paged = Paged(ours, num_seqs=3)
    for seq, logits in zip(seqs, paged.step([0, 1, 2], seqs)):
        torch.testing.assert_close(logits, reference_logits(ref, seq), atol=ATOL, rtol=RTOL)
    for step in range(4):
        next_tokens = [torch.tensor([(7 * step + 13 * i) % 500 + 3]) for i in range(3)]
        seqs = [torch.cat([s, t]) for s, t in zip(seqs, next_tokens)]
        decoded = paged.step([0, 1, 2], next_tokens)
        for seq, logits in zip(seqs, decoded):
            want = reference_logits(ref, seq)[-1]
            torch.testing.assert_close(logits[0], want, atol=ATOL, rtol=RTOL)


def test_prefill_with_cached_prefix(models):
    """A prompt whose first tokens are cached runs as a query shorter than its context."""
    ours, ref = models
    long, other = prompts(ours.config.vocab_size, [14, 6], seed=1)
    paged = Paged(ours, num_seqs=2, seed=1)
    paged.step([0], [long[:5]])
    rest, fresh = paged.step([0, 1], [long[5:], other])
    torch.testing.assert_close(rest, reference_logits(ref, long)[5:], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(fresh, reference_logits(ref, other), atol=ATOL, rtol=RTOL)


def test_prompt_rows_past_the_last_layers_kv_are_only_those_asked_for(models):
    """Logits for each prompt's last row alone (what a prefill samples from): the same as
    every row's, and the last layer's k/v of every row cached, so decoding goes on right."""
    ours, ref = models
    seqs = prompts(ours.config.vocab_size, [6, 30, 9], seed=4)  # tails past FUSED_MAX_PREFILL_ROWS
    paged = Paged(ours, num_seqs=3, seed=4)
    cached = paged.step([0, 1], [seqs[0][:2], seqs[1][:4]], last_only=True)
    tails = paged.step([0, 1, 2], [seqs[0][2:], seqs[1][4:], seqs[2]], last_only=True)
    for seq, logits in zip(seqs, tails):
        torch.testing.assert_close(logits[0], reference_logits(ref, seq)[-1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cached[1][0], reference_logits(ref, seqs[1][:4])[-1],
                               atol=ATOL, rtol=RTOL)
    next_tokens = [torch.tensor([17 + i]) for i in range(3)]
    for i, logits in enumerate(paged.step([0, 1, 2], next_tokens)):
        want = reference_logits(ref, torch.cat([seqs[i], next_tokens[i]]))[-1]
        torch.testing.assert_close(logits[0], want, atol=ATOL, rtol=RTOL)


def test_a_prefill_runs_its_last_layer_past_the_kv_on_the_sampled_rows_only(model_dir, monkeypatch):
    """The runner asks for each prompt's last row (all rows when prompt logprobs are wanted),
    and the token it samples is the same either way."""
    model = load_model(model_dir("llama"), torch.float32, torch.device("cpu"), ParallelState())
    last_mlp = model.model.layers[-1].mlp
    rows_seen = []
    monkeypatch.setattr(last_mlp, "forward",
                        lambda h, inner=last_mlp.forward: rows_seen.append(h.shape[0]) or inner(h))
    seqs = [p.tolist() for p in prompts(model.config.vocab_size, [5, 11], seed=6)]
    tokens = {}
    for logprobs in (False, True):
        runner = ModelRunner(model, torch.device("cpu"), torch.float32, BLOCK_SIZE)
        runner.kv_cache = allocate_kv_cache(model, NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu")
        batch = Batch.of_prompts(0, [list(s) for s in seqs], [[0, 1], [2, 3, 4]], 4,
                                 model.config.vocab_size, torch.device("cpu"),
                                 prefill_logprobs=[logprobs, False])
        tokens[logprobs] = [out.token_ids for out in runner.prefill(batch)]
    assert rows_seen == [2, 16]
    assert tokens[False] == tokens[True]


def test_profile_run_without_kv_cache(models):
    """No cache bound (the memory-profiling forward): prefill attends over its own k/v."""
    ours, ref = models
    seqs = prompts(ours.config.vocab_size, [3, 9], seed=2)
    for layer in ours.model.layers:
        layer.self_attn.attn.k_cache = layer.self_attn.attn.v_cache = None
    meta = AttentionMetadata.from_lists([3, 9], [3, 9], [[0, 1, 2]] * 2, BLOCK_SIZE)
    positions = torch.cat([torch.arange(3), torch.arange(9)])
    with torch.inference_mode(), forward_context(meta):
        logits = ours.compute_logits(ours(torch.cat(seqs), positions)).split([3, 9])
    for seq, got in zip(seqs, logits):
        torch.testing.assert_close(got, reference_logits(ref, seq), atol=ATOL, rtol=RTOL)


def test_greedy_generation_matches_generate(models):
    ours, ref = models
    (prompt,) = prompts(ours.config.vocab_size, [6], seed=3)
    with torch.inference_mode():
        expected = ref.generate(prompt[None], max_new_tokens=20, do_sample=False)[0, len(prompt):]
    paged = Paged(ours, num_seqs=1, seed=3)
    logits = paged.step([0], [prompt])[0][-1]
    generated = []
    for _ in range(len(expected)):
        generated.append(int(logits.argmax()))
        logits = paged.step([0], [torch.tensor(generated[-1:])])[0][-1]
    assert generated == expected.tolist()


def test_long_prefill_mlp_runs_in_chunks_with_the_same_logits(model_dir, monkeypatch):
    """On CPU the MLP of a prefill longer than MLP_CHUNK_BYTES allows runs in token chunks."""
    path = model_dir("llama")
    ours = load_model(path, torch.float32, torch.device("cpu"), ParallelState())
    pack_linear_weights(ours)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    width = ours.model.layers[0].mlp.gate_up_per_rank
    monkeypatch.setattr(llama, "MLP_CHUNK_BYTES", 5 * width * 4)  # 5 float32 rows a chunk
    rows, forward = [], llama.LlamaMLP._forward
    monkeypatch.setattr(llama.LlamaMLP, "_forward",
                        lambda self, x: rows.append(x.shape[0]) or forward(self, x))
    seqs = prompts(ours.config.vocab_size, [11, 13], seed=4)
    for seq, logits in zip(seqs, Paged(ours, num_seqs=2).step([0, 1], seqs)):
        torch.testing.assert_close(logits, reference_logits(ref, seq), atol=ATOL, rtol=RTOL)
    assert rows == [5, 5, 5, 5, 4] * ours.num_layers


def test_sliding_window_matches_transformers(model_dir, tmp_path):
    path = tmp_path / "mistral-window"
    shutil.copytree(model_dir("mistral"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "sliding_window": 4}))
    ours = load_model(path, torch.float32, torch.device("cpu"), ParallelState())
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqs = prompts(ours.config.vocab_size, [9, 6], seed=4)
    paged = Paged(ours, num_seqs=2, seed=4)
    for seq, logits in zip(seqs, paged.step([0, 1], seqs)):
        torch.testing.assert_close(logits, reference_logits(ref, seq), atol=ATOL, rtol=RTOL)
    seqs = [torch.cat([s, torch.tensor([42])]) for s in seqs]
    for seq, logits in zip(seqs, paged.step([0, 1], [torch.tensor([42])] * 2)):
        torch.testing.assert_close(logits[0], reference_logits(ref, seq)[-1], atol=ATOL, rtol=RTOL)
    # a prompt's last row alone past the window (the last layer's one-token query)
    longer = prompts(ours.config.vocab_size, [10], seed=5)[0]
    paged = Paged(ours, num_seqs=1, seed=5)
    last = paged.step([0], [longer], last_only=True)[0][0]
    torch.testing.assert_close(last, reference_logits(ref, longer)[-1], atol=ATOL, rtol=RTOL)


ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rotary_matches_transformers(case):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    kw = {"rope_scaling": ROPE_CASES[case]} if ROPE_CASES[case] else {}
    config = AutoConfig.for_model(
        "llama", hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=128, **kw,
    )
    # Positions past max_position_embeddings exercise dynamic NTK's rescaling.
    positions = torch.arange(200) if case == "dynamic" else torch.arange(128)
    q, k = torch.randn(len(positions), 2, 32), torch.randn(len(positions), 1, 32)
    got_q, got_k = get_rope(config, 32)(positions, q.clone(), k.clone())  # CPU: in place
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    heads_first = (q.transpose(0, 1)[None], k.transpose(0, 1)[None])  # [1, heads, len, D]
    want_q, want_k = apply_rotary_pos_emb(*heads_first, cos, sin)
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("override, want", [
    (("linear", 2.0), {"rope_type": "linear", "factor": 2.0}),
    ((None, 2.0), {"rope_type": "linear", "factor": 2.0}),  # --rope-factor alone: linear
    (("dynamic", None), {"rope_type": "dynamic", "factor": 1.0}),  # alone: factor 1
])
def test_rope_override_matches_the_same_scaling_in_the_config(model_dir, tmp_path, override, want):
    """TGI's --rope-scaling / --rope-factor: the model computes what it computes with that
    scaling written in its config.json (itself checked against transformers above)."""
    plain = model_dir("llama")
    path = tmp_path / "scaled"
    shutil.copytree(plain, path)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    theta = AutoConfig.from_pretrained(plain).rope_parameters.get("rope_theta", 10000.0)
    (path / "config.json").write_text(json.dumps({**config, "rope_scaling": want,
                                                  "rope_theta": theta}))
    overridden = load_model(plain, torch.float32, torch.device("cpu"), ParallelState(), override)
    written = load_model(path, torch.float32, torch.device("cpu"), ParallelState())
    untouched = load_model(plain, torch.float32, torch.device("cpu"), ParallelState())
    positions = max(want["factor"], 1) * untouched.config.max_position_embeddings
    assert overridden.config.max_position_embeddings == positions  # linear x2 covers 2x
    seqs = prompts(untouched.config.vocab_size, [20, 13], seed=5)
    got = Paged(overridden, num_seqs=2, seed=5).step([0, 1], seqs)
    expected = Paged(written, num_seqs=2, seed=5).step([0, 1], seqs)
    before = Paged(untouched, num_seqs=2, seed=5).step([0, 1], seqs)
    for g, e, b in zip(got, expected, before):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
        if want["rope_type"] == "linear":
            assert not torch.allclose(g, b, atol=1e-3)  # the override did change the model


def test_rope_override_refuses_other_types():
    config = AutoConfig.for_model("llama", max_position_embeddings=64)
    with pytest.raises(ValueError, match="linear or dynamic"):
        override_rope(config, "yarn", 2.0)
    override_rope(config, None, None)  # nothing asked: nothing changed
    assert config.max_position_embeddings == 64


def test_forward_context_does_not_nest():
    meta = AttentionMetadata.from_lists([2], [2], [[0]], BLOCK_SIZE)
    with forward_context(meta):
        assert get_forward_context() is meta
        with pytest.raises(RuntimeError, match="does not nest"), forward_context(meta):
            pass
    with pytest.raises(RuntimeError):
        get_forward_context()


def test_metadata_slots_follow_block_tables():
    meta = AttentionMetadata.from_lists([3, 1], [5, 6], [[7, 2], [4, 9]], BLOCK_SIZE)
    # seq 0: positions 2..4 -> block 7 slots 30, 31 then block 2 slot 8; seq 1: position 5 -> 37
    assert meta.slot_mapping.tolist() == [30, 31, 8, 37]
    assert meta.cu_seqlens_q.tolist() == [0, 3, 4]
    assert (meta.max_query_len, meta.max_context_len) == (3, 6)


def test_kv_cache_layout(model_dir):
    model = load_model(model_dir("llama"), torch.float32, torch.device("cpu"), ParallelState())
    cache = allocate_kv_cache(model, 5, BLOCK_SIZE, torch.float32, "cpu")
    assert cache.shape == (2, 2, 5, BLOCK_SIZE, 2, 16)
    assert kv_cache_bytes_per_block(model, BLOCK_SIZE, torch.float32) == cache.nbytes // 5
    attn = model.model.layers[1].self_attn.attn
    assert attn.k_cache.data_ptr() == cache[0, 1].data_ptr()
    assert attn.v_cache.data_ptr() == cache[1, 1].data_ptr()
    assert model.eos_token_ids == [2, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_keeps_dense_weights_only_where_they_are_read(model_dir, dtype):
    for arch, tied in (("llama", False), ("qwen2", True)):
        model = load_model(model_dir(arch), dtype, torch.device("cpu"), ParallelState())
        tokens = torch.tensor([5, 6, 7])
        meta = AttentionMetadata.from_lists([3], [3], [[0]], BLOCK_SIZE)
        with torch.inference_mode(), forward_context(meta):
            want = model.compute_logits(model(tokens, torch.arange(3)))
        if pack_linear_weights(model) == 0:
            pytest.skip(f"neither kernel can pack {dtype} weights here")
        # the packed copy replaces the dense weight, which stays only for a tied embedding
        assert model.model.layers[0].mlp.gate_up_proj.weight.numel() == 0
        assert (model.lm_head.weight.numel() > 0) == tied
        kind = cpu_kernels.PackedWeight if cpu_kernels.available(dtype) else torch.Tensor
        assert isinstance(model.model.layers[0].mlp.gate_up_proj.packed_weight, kind)
        with torch.inference_mode(), forward_context(meta):
            got = model.compute_logits(model(tokens, torch.arange(3)))
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 1-4 rows: tiles of 4 blocks; 5+: tiles of 2 in chunks of 8 rows (13: a partial chunk);
# 300: past the 256-row blocks.
@pytest.mark.parametrize("rows", [1, 3, 5, 13, 300])
# n: a partial last block (70) and fewer features than one tile (10); k = 201: odd, padded to
# bfloat16 pairs; 1040: tiles shared out over the threads, a row block's last tile taking the
# tail block;
# (80, 8192): whole blocks packed in place through a buffer of 2-4 of them, in 2-3 passes.
@pytest.mark.parametrize("n, k", [(70, 200), (10, 201), (1040, 64), (80, 8192)])
def test_packed_linear_matches_f_linear(dtype, rows, n, k):
    if not cpu_kernels.available(dtype):
        pytest.skip(f"the packed linear kernel does not run {dtype} here")
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=generator).to(dtype)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    want = torch.nn.functional.linear(x.double(), weight.double(), bias.double()).float()
    packed = cpu_kernels.pack_linear_weight(weight)
    got = cpu_kernels.packed_linear(x, packed, bias)
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: one rounding of the output
    atol = tol * 10 * max(1, k / 200) ** 0.5  # float32 sums of k products: error ~ sqrt(k)
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=tol)
    no_bias = cpu_kernels.packed_linear(x.view(1, rows, k), packed, None)  # leading dims kept
    assert no_bias.shape == (1, rows, n)
    torch.testing.assert_close(no_bias[0].float(), want - bias.float(), atol=atol, rtol=tol)
    # in place: the same layout in the weight's own storage (padded shapes are copied)
    dense = weight.clone()
    in_place = cpu_kernels.pack_linear_weight(dense, in_place=True)
    assert torch.equal(in_place.data, packed.data)
    padded = n % 16 or (dtype == torch.bfloat16 and k % 2)
    assert (in_place.data.data_ptr() == dense.data_ptr()) == (not padded)


@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("rows", [6, 300])  # 300: two blocks of rows, each with a tail block
def test_packed_linear_gives_the_same_bits_on_any_number_of_threads(threads, rows):
    """Each output is one thread's sum, in one order: which thread takes which tiles as they
    come free (and the blocks past the last whole tile) changes nothing."""
    if not cpu_kernels.available(torch.bfloat16):
        pytest.skip("the packed linear kernel does not run bfloat16 here")
    generator = torch.Generator().manual_seed(threads)
    weight = torch.randn(1040, 64, generator=generator).to(torch.bfloat16)  # 65 blocks
    packed = cpu_kernels.pack_linear_weight(weight)
    x = torch.randn(rows, 64, generator=generator).to(torch.bfloat16)
    want = cpu_kernels.packed_linear(x, packed, None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.packed_linear(x, packed, None)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got, want)


def test_packed_linear_rejects_a_weight_of_another_shape():
    if not cpu_kernels.available(torch.float32):
        pytest.skip("the packed linear kernel does not build here")
    packed = cpu_kernels.pack_linear_weight(torch.randn(40, 32))
    with pytest.raises(RuntimeError, match="x has 16 features, w 32"):
        cpu_kernels.packed_linear(torch.randn(2, 16), packed, None)
    with pytest.raises(RuntimeError, match="not packed for 50 output features"):
        torch.ops.tgi_cpu.packed_linear(torch.randn(2, 32), packed.data, None, 50)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
# 32 / 64 / 128: the kernel's register-resident variants; 48: its generic one.
@pytest.mark.parametrize("head_dim", [32, 48, 64, 128])
# Query heads per KV head: 8 fills the kernel's passes of 8 / 4 / 2 heads (head_dim 32 / 64 /
# 128); 3 leaves a remainder.
@pytest.mark.parametrize("group", [3, 8])
def test_decode_kernel_matches_the_torch_path(dtype, window, head_dim, group):
    from tgi_server.shard.attention import _torch_paged_attention

    if not cpu_kernels.available(dtype):
        pytest.skip(f"the CPU kernels do not run {dtype} here")
    generator = torch.Generator().manual_seed(0)
    k_cache = torch.randn(100, BLOCK_SIZE, 2, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(100, BLOCK_SIZE, 2, head_dim, generator=generator).to(dtype)
    q = torch.randn(4, 2 * group, head_dim, generator=generator).to(dtype)
    # Contexts: one token, within the first 16, several groups of 16 with a tail.
    tables = torch.randperm(100, generator=generator)[:96].view(4, 24).tolist()
    meta = AttentionMetadata.from_lists([1, 1, 1, 1], [1, 13, 30, 93], tables, BLOCK_SIZE)
    scale = head_dim ** -0.5
    want = _torch_paged_attention(q, k_cache, v_cache, meta, scale, window)
    got = cpu_kernels.decode_attention(q, k_cache, v_cache, meta.block_tables,
                                       meta.context_lens, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def _long_contexts(dtype, lens, block_size, kv_heads=4, group=4, head_dim=64, seed=0,
                   query_lens=None):
    """q and caches for contexts of `lens` tokens in scattered blocks, and their metadata: the
    last `query_lens` tokens of each are queries (default one)."""
    query_lens = query_lens or [1] * len(lens)
    generator = torch.Generator().manual_seed(seed)
    per_seq = -(-max(lens) // block_size)
    num_blocks = per_seq * len(lens) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    q = torch.randn(sum(query_lens), kv_heads * group, head_dim, generator=generator).to(dtype)
    tables = torch.randperm(num_blocks, generator=generator)[:per_seq * len(lens)]
    meta = AttentionMetadata.from_lists(query_lens, lens, tables.view(len(lens), per_seq).tolist(),
                                        block_size)
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 300])
@pytest.mark.parametrize("block_size", [BLOCK_SIZE, 16])
def test_decode_kernel_combines_the_partitions_of_long_contexts(dtype, window, block_size):
    """Contexts past the kernel's 256-token partitions: one partition, exactly two, a third
    begun, several; a sliding window starting inside a partition and inside a block."""
    from tgi_server.shard.attention import _torch_paged_attention

    if not cpu_kernels.available(dtype):
        pytest.skip(f"the CPU kernels do not run {dtype} here")
    q, k_cache, v_cache, meta = _long_contexts(dtype, [255, 256, 257, 513, 1100], block_size)
    want = _torch_paged_attention(q, k_cache, v_cache, meta, 64 ** -0.5, window)
    got = cpu_kernels.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                       64 ** -0.5, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_gives_a_row_the_same_bits_alone_in_any_batch_on_any_threads(dtype):
    """A sequence's attention depends on its own context only: the kernel splits work by the
    batch and the thread count (partitions, KV heads), never a row's arithmetic."""
    if not cpu_kernels.available(dtype):
        pytest.skip(f"the CPU kernels do not run {dtype} here")
    q, k_cache, v_cache, meta = _long_contexts(dtype, [700, 40, 300, 1, 256, 90], 16, seed=3)
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(cpu_kernels.decode_attention(q, k_cache, v_cache, meta.block_tables,
                                                     meta.context_lens, 0.125, 0))
            for row in (0, 3):  # alone: a long context, then a one-token one
                alone = cpu_kernels.decode_attention(q[row:row + 1], k_cache, v_cache,
                                                     meta.block_tables[row:row + 1],
                                                     meta.context_lens[row:row + 1], 0.125, 0)
                assert torch.equal(alone[0], outs[-1][row])
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_rows_attend_through_the_cpu_kernels(dtype, window, monkeypatch):
    """A fresh prompt, one with a cached prefix, and a decode row in one batch, as the torch
    path computes them, through the decode kernel, each row a one-token query
    (`rows_as_decode`, as the fused decode layers take a speculative step's rows); fresh
    prompts alone, and a prefill's prompts after a cached prefix, through the prefill kernel."""
    from tgi_server.shard.attention import Attention, _torch_paged_attention

    if not cpu_kernels.available(dtype):
        pytest.skip(f"the CPU kernels do not run {dtype} here")
    generator = torch.Generator().manual_seed(1)
    layer = Attention(8, 2, 32, scale=32 ** -0.5, sliding_window=window)
    layer.k_cache = torch.randn(40, BLOCK_SIZE, 2, 32, generator=generator).to(dtype)
    layer.v_cache = torch.randn(40, BLOCK_SIZE, 2, 32, generator=generator).to(dtype)
    tables = torch.randperm(40, generator=generator)[:24].view(3, 8).tolist()
    meta = AttentionMetadata.from_lists([5, 7, 1], [5, 30, 13], tables, BLOCK_SIZE)
    q = torch.randn(13, 8, 32, generator=generator).to(dtype)
    calls = []
    for name in ("decode_attention", "prefill_attention"):
        kernel = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name,
                            lambda *a, name=name, kernel=kernel: calls.append(name) or kernel(*a))
    want = _torch_paged_attention(q, layer.k_cache, layer.v_cache, meta, layer.scale, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer._attend_paged(q, meta).float(), want.float(), atol=tol, rtol=tol)
    assert calls == ["decode_attention"]
    fresh = AttentionMetadata.from_lists([5, 7], [5, 7], tables[:2], BLOCK_SIZE)
    want = _torch_paged_attention(q[:12], layer.k_cache, layer.v_cache, fresh, layer.scale, window)
    torch.testing.assert_close(layer._attend_paged(q[:12], fresh).float(), want.float(),
                               atol=tol, rtol=tol)
    assert calls == ["decode_attention", "prefill_attention"]
    cached = AttentionMetadata.from_lists([5, 7], [5, 30], tables[:2], BLOCK_SIZE)
    cached.prefill = True  # a prefill after 23 prefix-cached tokens
    want = _torch_paged_attention(q[:12], layer.k_cache, layer.v_cache, cached, layer.scale, window)
    torch.testing.assert_close(layer._attend_paged(q[:12], cached).float(), want.float(),
                               atol=tol, rtol=tol)
    assert calls == ["decode_attention", "prefill_attention", "prefill_attention"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5, 300])
@pytest.mark.parametrize("head_dim", [32, 48, 64, 128])
# Query heads per KV head: 3 leaves a block of rows short of the kernel's 32 vectors, 40 is
# more than a block holds (one row at a time).
@pytest.mark.parametrize("group", [3, 4, 40])
def test_prefill_kernel_matches_the_torch_path(dtype, window, head_dim, group):
    """Prefills as the torch path computes them: fresh prompts (short, past 16 tokens, past a
    block of vectors, long), one with a cached prefix, a decode row, in one batch."""
    from tgi_server.shard.attention import _torch_paged_attention

    if not cpu_kernels.available(dtype):
        pytest.skip(f"the CPU kernels do not run {dtype} here")
    q, k_cache, v_cache, meta = _long_contexts(dtype, [5, 30, 13, 40, 600], BLOCK_SIZE,
                                               kv_heads=2, group=group, head_dim=head_dim, seed=2,
                                               query_lens=[5, 17, 1, 40, 600])
    scale = head_dim ** -0.5
    want = _torch_paged_attention(q, k_cache, v_cache, meta, scale, window)
    got = cpu_kernels.prefill_attention(q, k_cache, v_cache, meta.block_tables,
                                        meta.cu_seqlens_q, meta.context_lens, scale, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_a_large_cpu_cache_is_zero_and_not_resident_until_written(model_dir):
    from tgi_server.shard import kv_cache

    model = load_model(model_dir("llama"), torch.float32, torch.device("cpu"), ParallelState())
    per_block = kv_cache.kv_cache_bytes_per_block(model, BLOCK_SIZE, torch.float32)
    num_blocks = 2 * kv_cache._LAZY_ZEROS_BYTES // per_block  # 128 MiB

    def resident_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident_bytes()
    cache = kv_cache.allocate_kv_cache(model, num_blocks, BLOCK_SIZE, torch.float32, "cpu")
    assert resident_bytes() - before < cache.nbytes // 4  # torch.zeros would write it all
    attn = model.model.layers[1].self_attn.attn
    assert attn.k_cache.data_ptr() == cache[0, 1].data_ptr()
    assert not cache[:, :, :: num_blocks // 7].any()  # reads as zeros
    attn.v_cache[3].fill_(1.0)
    assert cache[1, 1, 3].eq(1.0).all() and cache.sum() == attn.v_cache[3].numel()


def test_a_large_cpu_cache_asks_for_huge_pages():
    """Where transparent huge pages are on for madvise, a written block of a large cache lies
    in 2 MiB pages (fewer faults as decode moves into fresh blocks, fewer TLB misses)."""
    from tgi_server.shard import kv_cache

    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        pytest.skip("no transparent huge pages on this kernel")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are off on this machine")
    cache = kv_cache._zeros((2, 4, 512, 16, 4, 64), torch.float32, torch.device("cpu"))
    written = cache[0, 1, :256]  # 4 MiB
    written.fill_(1.0)
    start = cache.data_ptr()

    def huge_kib() -> int:  # AnonHugePages of the mapping that holds the cache
        lines, inside = Path("/proc/self/smaps").read_text().splitlines(), False
        for line in lines:
            if "-" in line.split()[0] and not line.endswith(":"):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                inside = lo <= start < hi
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
        return 0

    assert huge_kib() << 10 >= written.nbytes // 2  # at least half of what was written


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(model_dir, arch):
    """The shard's bfloat16 path (packed weights, CPU kernels where built) errs from the
    float32 reference no more than transformers' own bfloat16 forward does."""
    path = model_dir(arch)
    ours = load_model(path, torch.bfloat16, torch.device("cpu"), ParallelState())
    pack_linear_weights(ours)
    ref32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    seqs = prompts(ours.config.vocab_size, [7, 19], seed=4)
    paged = Paged(ours, num_seqs=2, seed=4)
    paged.cache = allocate_kv_cache(ours, NUM_BLOCKS, BLOCK_SIZE, torch.bfloat16, "cpu")
    got = paged.step([0, 1], seqs)
    for step in range(3):  # then decode steps through the paged decode path
        new = [torch.tensor([(5 * step + 11 * i) % 400 + 3]) for i in range(2)]
        seqs = [torch.cat([s, t]) for s, t in zip(seqs, new)]
        got = [torch.cat([g, d]) for g, d in zip(got, paged.step([0, 1], new))]
    for seq, ours_logits in zip(seqs, got):
        want = reference_logits(ref32, seq)
        ours_err = (ours_logits.float() - want).abs().max()
        ref_err = (reference_logits(ref16, seq) - want).abs().max()
        assert ours_err <= 2 * ref_err + 1e-3, (float(ours_err), float(ref_err))


def test_disabled_custom_kernels_hold_each_weight_once(model_dir, monkeypatch):
    """--disable-custom-kernels: no C++ kernel is called and the dense copies are freed."""
    if not cpu_kernels.available(torch.float32):
        pytest.skip("the CPU kernels do not build here")
    model = load_model(model_dir("llama"), torch.float32, torch.device("cpu"), ParallelState())
    tokens = torch.tensor([5, 6, 7])
    meta = AttentionMetadata.from_lists([3], [3], [[0]], BLOCK_SIZE)
    with torch.inference_mode(), forward_context(meta):
        want = model.compute_logits(model(tokens, torch.arange(3)))
    monkeypatch.setattr(cpu_kernels, "_disabled", True)
    for op in ("packed_linear", "decode_attention", "rms_norm", "add_rms_norm_",
               "silu_and_mul", "rotary_", "decode_layer"):
        monkeypatch.setattr(cpu_kernels, op, None)  # any call fails
    if pack_linear_weights(model) == 0:
        pytest.skip("oneDNN cannot pack float32 weights here")
    assert model.model.layers[0].mlp.gate_up_proj.weight.numel() == 0
    assert model.lm_head.weight.numel() == 0
    with torch.inference_mode(), forward_context(meta):
        got = model.compute_logits(model(tokens, torch.arange(3)))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fused_decode_layers_give_the_bits_of_the_modules(model_dir, tmp_path, monkeypatch,
                                                           dtype, arch):
    """A CPU decode step runs each layer as one decode_layer call: same logits, bit for bit,
    as the modules; qwen2 has q/k/v biases, and the mistral here a sliding window of 4."""
    if not cpu_kernels.available(dtype):
        pytest.skip(f"the CPU kernels do not run {dtype} here")
    # The tiny models' heads are 16 wide, narrower than the rotary kernel takes: the same
    # weights as 2 heads of 32 (and 1 KV head) run every op of the layer in C++.
    path = tmp_path / arch
    shutil.copytree(model_dir(arch), path)
    config = json.loads((path / "config.json").read_text())
    window = {"sliding_window": 4} if arch == "mistral" else {}
    (path / "config.json").write_text(json.dumps(
        {**config, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, **window}))
    model = load_model(path, dtype, torch.device("cpu"), ParallelState())
    allocate_kv_cache(model, NUM_BLOCKS, BLOCK_SIZE, dtype, "cpu")
    layer = model.model.layers[0]
    assert layer.fused_decode_args(dtype) is None  # weights not packed yet
    pack_linear_weights(model)
    assert layer.fused_decode_args(dtype) is not None
    calls, fused = [], cpu_kernels.decode_layer
    monkeypatch.setattr(cpu_kernels, "decode_layer", lambda *a: calls.append(1) or fused(*a))
    tables = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    seqs = prompts(model.config.vocab_size, [5, 9, 2], seed=5)

    def forward(tokens, query_lens, context_lens, positions):
        meta = AttentionMetadata.from_lists(query_lens, context_lens, tables, BLOCK_SIZE)
        with torch.inference_mode(), forward_context(meta):
            return model.compute_logits(model(tokens, positions))

    lens = [len(s) for s in seqs]
    logits = forward(torch.cat(seqs), lens, lens, torch.cat([torch.arange(n) for n in lens]))
    rows = torch.tensor(lens).cumsum(0) - 1
    assert not calls  # a prefill runs the modules
    for _ in range(4):
        tokens = logits[rows].argmax(-1)
        rows = torch.arange(len(seqs))
        lens = [n + 1 for n in lens]
        positions = torch.tensor(lens) - 1
        # The modules, then the fused layers, on the same step: the second writes the same
        # keys and values into the same slots when they agree.
        monkeypatch.setattr(model.model, "fused_decode", False)
        want = forward(tokens, [1] * len(seqs), lens, positions)
        monkeypatch.setattr(model.model, "fused_decode", True)
        logits = forward(tokens, [1] * len(seqs), lens, positions)
        assert torch.equal(logits, want)
    assert len(calls) == 4 * model.num_layers
    # A speculative step: a few rows per sequence after its cached tokens (a decode token and
    # its drafts), each row attending up to its own position.
    query_lens = [3, 1, 2]
    tokens = prompts(model.config.vocab_size, query_lens, seed=6)
    positions = torch.cat([torch.arange(n, n + q) for n, q in zip(lens, query_lens)])
    lens = [n + q for n, q in zip(lens, query_lens)]
    monkeypatch.setattr(model.model, "fused_decode", False)
    want = forward(torch.cat(tokens), query_lens, lens, positions)
    monkeypatch.setattr(model.model, "fused_decode", True)
    assert torch.equal(forward(torch.cat(tokens), query_lens, lens, positions), want)
    assert len(calls) == 5 * model.num_layers
