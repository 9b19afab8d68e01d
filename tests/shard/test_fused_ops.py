"""fused_ops.cpp against the eager torch ops it replaces, with the same roundings."""

import pytest
import torch
import torch.nn.functional as F

from tgi_server.shard.layers import cpu_kernels
from tgi_server.shard.layers.activation import SiluAndMul
from tgi_server.shard.layers.norm import RMSNorm
from tgi_server.shard.layers.rotary import _rotate

DTYPES = [torch.float32, torch.bfloat16]


def need_kernels(dtype):
    if not cpu_kernels.available(dtype):
        pytest.skip(f"the CPU kernels do not run {dtype} here")


def assert_same_roundings(got, want, dtype):
    """float32: equal to rounding error; bfloat16: equal but for a few last-bit differences
    where a float32 sum is added up in another order before the rounding."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
    assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_residual_add(dtype):
    need_kernels(dtype)
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(1024, eps=1e-5)
    norm.weight.data = torch.randn(1024, generator=gen).to(dtype)
    x = (torch.randn(33, 1024, generator=gen) * 3).to(dtype)
    residual = torch.randn(33, 1024, generator=gen).to(dtype)

    assert_same_roundings(norm(x), norm._norm(x), dtype)

    want_residual = residual + x
    want = norm._norm(want_residual)
    x_in, residual_in = x.clone(), residual.clone()
    got, got_residual = norm(x_in, residual_in)
    assert got.data_ptr() == x_in.data_ptr() and got_residual.data_ptr() == residual_in.data_ptr()
    assert torch.equal(got_residual, want_residual)  # one rounded add, as torch's
    assert_same_roundings(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    need_kernels(dtype)
    x = (torch.randn(9, 2 * 4096, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    x[0, :8] = torch.tensor([-100.0, -90.0, -20.0, 0.0, 20.0, 90.0, 100.0, -0.0])  # exp's range
    gate, up = x.chunk(2, dim=-1)
    assert_same_roundings(SiluAndMul()(x), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_rotary_in_place_on_qkv_views(dtype, head_dim):
    need_kernels(dtype)
    gen = torch.Generator().manual_seed(2)
    tokens, heads, kv_heads = 7, 4, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    cos_sin = torch.randn(50, head_dim, generator=gen)
    positions = torch.tensor([0, 3, 49, 7, 7, 1, 20])
    cos, sin = cos_sin[positions].unsqueeze(1).to(dtype).chunk(2, dim=-1)
    want_q, want_k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()

    cpu_kernels.rotary_(q, k, cos_sin, positions)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)  # no sums: bit for bit
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched
    with pytest.raises(RuntimeError, match="past the cache"):
        cpu_kernels.rotary_(q, k, cos_sin, torch.full((tokens,), 50))


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_the_slots_index_copy_writes(dtype):
    need_kernels(dtype)
    gen = torch.Generator().manual_seed(3)
    tokens, heads, kv_heads, head_dim = 5, 4, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    _, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)  # strided rows
    k_cache = torch.randn(6, 16, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(6, 16, kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.tensor([95, 0, 17, 16, 40])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k.view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
    want_v.view(-1, kv_heads, head_dim).index_copy_(0, slots, v)

    cpu_kernels.store_kv_(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.store_kv_(k_cache, v_cache, k, v, torch.tensor([0, 1, 2, 3, 96]))
    assert torch.equal(k_cache, want_k)  # checked before any write


@pytest.mark.parametrize("vocab", [1, 15, 16, 1000, 32000])
def test_argmax_logsumexp_matches_argmax_and_log_softmax(vocab):
    need_kernels(torch.float32)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, vocab, generator=gen) * 5
    logits[1, vocab // 2] = float("-inf")  # a masked token (guided output, logit bias)
    logits[2, -1] = logits[2, 0] = logits[2].max() + 1  # a tie: the first index wins
    logits[3] = float("-inf")
    logits[3, vocab - 1] = 2.0  # one allowed token
    ids, maxes, log_sums = cpu_kernels.argmax_logsumexp(logits)
    assert ids.tolist() == logits.argmax(dim=-1).tolist()
    assert torch.equal(maxes, logits.amax(dim=-1))
    got = (logits - maxes[:, None]) - log_sums[:, None]
    want = torch.log_softmax(logits, dim=-1)  # NaN where a row is all -inf (vocab 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_argmax_logsumexp_gives_nan_for_a_row_with_nan():
    need_kernels(torch.float32)
    logits = torch.zeros(2, 40)
    logits[0, 33] = logits[0, 35] = float("nan")
    ids, maxes, log_sums = cpu_kernels.argmax_logsumexp(logits)
    assert ids.tolist() == logits.argmax(dim=-1).tolist() == [33, 0]
    assert maxes[0].isnan() and log_sums[0].isnan()
    torch.testing.assert_close(log_sums[1], torch.logsumexp(logits[1], dim=0))
