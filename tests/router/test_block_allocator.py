import pytest

from tgi_server.router.block_allocator import BlockAllocator


def test_num_blocks_for_is_ceil():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    assert [allocator.num_blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_lowest_ids_first():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    assert allocator.allocate(5) == [0, 1]
    assert allocator.allocate(4) == [2]
    assert allocator.allocate(12) == [3, 4, 5]
    assert allocator.num_free_blocks == 2
    assert allocator.num_used_blocks == 6
    allocator.check_integrity()


def test_allocate_zero_tokens_takes_no_block():
    allocator = BlockAllocator(num_blocks=2, block_size=4)
    assert allocator.allocate(0) == []
    assert allocator.num_free_blocks == 2


def test_exhaustion_returns_none_and_takes_nothing():
    allocator = BlockAllocator(num_blocks=3, block_size=4)
    assert allocator.allocate(8) == [0, 1]
    assert allocator.can_allocate(5) is False
    assert allocator.allocate(5) is None
    assert allocator.num_free_blocks == 1
    assert allocator.allocate(4) == [2]
    assert allocator.allocate(1) is None
    allocator.check_integrity()


def test_free_then_reuse_lowest_first():
    allocator = BlockAllocator(num_blocks=6, block_size=2)
    first = allocator.allocate(4)
    second = allocator.allocate(4)
    assert (first, second) == ([0, 1], [2, 3])
    allocator.free(first)
    assert allocator.num_free_blocks == 4
    assert allocator.allocate(6) == [0, 1, 4]
    allocator.free([3, 2])
    assert allocator.allocate(2) == [2]
    allocator.check_integrity()


def test_double_free_raises_and_changes_nothing():
    allocator = BlockAllocator(num_blocks=4, block_size=1)
    block_ids = allocator.allocate(2)
    allocator.free(block_ids)
    with pytest.raises(ValueError, match="double free"):
        allocator.free([1])
    with pytest.raises(ValueError, match="double free"):
        allocator.free([7])
    with pytest.raises(ValueError, match="duplicate"):
        allocator.free([allocator.allocate(1)[0]] * 2)
    assert allocator.num_free_blocks == 3
    allocator.check_integrity()


def test_check_integrity_detects_corruption():
    allocator = BlockAllocator(num_blocks=4, block_size=1)
    allocator.allocate(2)
    allocator._free_block_ids.append(0)  # a used block also on the free list
    with pytest.raises(RuntimeError):
        allocator.check_integrity()


def test_check_integrity_detects_lost_block():
    allocator = BlockAllocator(num_blocks=4, block_size=1)
    allocator._free_block_ids.remove(3)
    with pytest.raises(RuntimeError, match=r"free \(3\) \+ used \(0\) \+ cached \(0\) blocks != total \(4\)"):
        allocator.check_integrity()


@pytest.mark.parametrize("num_blocks, block_size", [(-1, 4), (4, 0)])
def test_invalid_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks, block_size)


# ---- prefix caching ----------------------------------------------------------------------


def _prompt_blocks(allocator: BlockAllocator, tokens: list[int]) -> tuple[list[bytes], int]:
    """The keys a request with prompt `tokens` can start from, and the tokens they hold."""
    keys = allocator.block_keys(tokens, len(tokens))
    usable = keys[:(len(tokens) - 1) // allocator.block_size]
    hits = allocator.match(usable)
    return usable[:hits], hits * allocator.block_size


def test_block_keys_name_the_whole_prefix():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    a = allocator.block_keys(list(range(10)), 10)
    assert len(a) == 2  # the last 2 tokens are no full block
    # the same second block after a different first block is another key
    b = allocator.block_keys([9, 9, 9, 9, 4, 5, 6, 7], 8)
    assert a[0] != b[0] and a[1] != b[1]
    # keys computed before are extended, not recomputed
    tokens = list(range(13))
    assert allocator.block_keys(tokens, 13, known=a) == allocator.block_keys(tokens, 13)
    assert allocator.block_keys(tokens, 5, known=a) == a[:1]


def test_a_cached_prefix_is_shared_until_its_last_reference_is_freed():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    prompt = list(range(10))
    first = allocator.allocate(12)
    assert first == [0, 1, 2]
    allocator.cache(first, allocator.block_keys(prompt, len(prompt)))
    assert allocator.num_cached_blocks == 2

    cached, cache_len = _prompt_blocks(allocator, prompt + [99, 98])
    assert cache_len == 8
    second = allocator.allocate(14, cached)
    assert second == [0, 1, 3, 4]  # the shared blocks first, then fresh ones
    allocator.check_integrity()

    allocator.free(first)
    # blocks 0 and 1 are still referenced by the second request; block 2 was never cached
    assert allocator.num_used_blocks == 4 and allocator.num_free_blocks == 4
    allocator.free(second)
    allocator.check_integrity()
    assert allocator.num_free_blocks == 8 and allocator.num_cached_blocks == 2
    # unreferenced, they still hold the prefix
    assert _prompt_blocks(allocator, prompt)[1] == 8


def test_a_prompt_never_shares_the_block_of_its_last_token():
    allocator = BlockAllocator(num_blocks=8, block_size=4)
    prompt = list(range(8))
    blocks = allocator.allocate(10)
    allocator.cache(blocks, allocator.block_keys(prompt, 8))
    assert allocator.num_cached_blocks == 2
    # the same 8 tokens again: their last token needs its logits, so only the first block
    assert _prompt_blocks(allocator, prompt)[1] == 4
    assert _prompt_blocks(allocator, prompt + [1])[1] == 8


def test_the_same_prefix_cached_twice_keeps_the_first_block():
    allocator = BlockAllocator(num_blocks=4, block_size=2)
    keys = allocator.block_keys([1, 2], 2)
    a, b = allocator.allocate(2), allocator.allocate(2)
    allocator.cache(a, keys)
    allocator.cache(b, keys)  # computed twice by two requests of one prefill
    allocator.free(a)
    allocator.free(b)
    allocator.check_integrity()
    assert allocator.num_cached_blocks == 1
    assert allocator.allocate(4, keys) == [a[0], b[0]]  # b went back to the free list


def test_cached_blocks_are_evicted_only_when_no_free_block_is_left_oldest_first():
    allocator = BlockAllocator(num_blocks=4, block_size=2)
    old, new = [1, 2, 3, 4], [5, 6, 7, 8]
    for tokens in (old, new):
        blocks = allocator.allocate(4)
        allocator.cache(blocks, allocator.block_keys(tokens, 4))
        allocator.free(blocks)
    assert allocator.num_free_blocks == 4 and allocator.num_cached_blocks == 4
    # a request sharing `new`'s prefix takes 1 more block: the oldest released, `old`'s
    # second block (released before its first, so a prefix loses its end first)
    cached, _ = _prompt_blocks(allocator, new + [9])
    assert len(cached) == 2
    blocks = allocator.allocate(6, cached)
    assert blocks == [2, 3, 1]
    allocator.check_integrity()
    assert _prompt_blocks(allocator, old + [9])[1] == 2
    assert allocator.num_cached_blocks == 3
    # referenced blocks are never evicted: only 1 block is left to take
    assert allocator.allocate(4) is None
    assert allocator.allocate(2) == [0]
    allocator.check_integrity()


def test_an_allocation_that_does_not_fit_takes_no_reference():
    allocator = BlockAllocator(num_blocks=3, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    blocks = allocator.allocate(6)
    allocator.cache(blocks, allocator.block_keys(prompt, 5))
    allocator.free(blocks)
    cached, _ = _prompt_blocks(allocator, prompt)
    assert len(cached) == 2
    # 2 shared + 2 fresh of 3 blocks: does not fit, and changes nothing
    assert allocator.allocate(8, cached) is None
    allocator.check_integrity()
    assert allocator.num_free_blocks == 3 and allocator.num_cached_blocks == 2
    assert allocator.allocate(6, cached) == [0, 1, 2]


def test_caching_a_block_not_in_use_raises():
    allocator = BlockAllocator(num_blocks=2, block_size=2)
    with pytest.raises(ValueError, match="not in use"):
        allocator.cache([0], allocator.block_keys([1, 2], 2))


def test_check_integrity_detects_an_unreferenced_block_without_a_key():
    allocator = BlockAllocator(num_blocks=2, block_size=2)
    allocator._evictable[allocator.allocate(2)[0]] = None
    with pytest.raises(RuntimeError):
        allocator.check_integrity()


def test_forget_cached_frees_unreferenced_blocks_and_unshares_the_rest():
    allocator = BlockAllocator(num_blocks=4, block_size=2)
    keys = allocator.block_keys([1, 2, 3, 4], 4)
    kept, released = allocator.allocate(2), allocator.allocate(2)
    allocator.cache(kept, keys[:1])
    allocator.cache(released, allocator.block_keys([5, 6], 2))
    allocator.free(released)
    allocator.forget_cached()
    allocator.check_integrity()
    assert allocator.num_cached_blocks == 0 and allocator.match(keys) == 0
    assert allocator.num_free_blocks == 3
    allocator.free(kept)  # no longer cached: straight back to the free list
    assert allocator.num_free_blocks == 4 and allocator.allocate(8) == [0, 1, 2, 3]
