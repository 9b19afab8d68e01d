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
    with pytest.raises(RuntimeError, match=r"free \(3\) \+ used \(0\) blocks != total \(4\)"):
        allocator.check_integrity()


@pytest.mark.parametrize("num_blocks, block_size", [(-1, 4), (4, 0)])
def test_invalid_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks, block_size)
