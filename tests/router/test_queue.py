import dataclasses

from tgi_server.router.block_allocator import BlockAllocator
from tgi_server.router.queue import Entry, Queue
from tgi_server.router.types import SamplingParams, StoppingParams, ValidRequest


def make_entry(entry_id: int, num_prompt_tokens: int, max_new_tokens: int) -> Entry:
    request = ValidRequest(
        inputs="x" * num_prompt_tokens,
        input_ids=tuple(range(num_prompt_tokens)),
        sampling=SamplingParams(),
        stopping=StoppingParams(max_new_tokens=max_new_tokens),
        top_n_tokens=0,
        details=False,
        decoder_input_details=False,
        return_full_text=False,
        best_of=1,
        stream=False,
    )
    return Entry(request=request, id=entry_id, queued_at=0.0)


def make_queue(num_blocks: int, block_size: int, *sizes: tuple[int, int]) -> Queue:
    queue = Queue(BlockAllocator(num_blocks, block_size))
    for entry_id, (num_prompt_tokens, max_new_tokens) in enumerate(sizes):
        queue.append(make_entry(entry_id, num_prompt_tokens, max_new_tokens))
    return queue


def ids(entries: list[Entry] | None) -> list[int]:
    assert entries is not None
    return [entry.id for entry in entries]


def front_ids(queue: Queue) -> list[int]:
    return [entry.id for entry in queue._entries]


def test_empty_queue_returns_none():
    queue = make_queue(8, 4)
    assert queue.next_batch(None, None, 100, 100) is None
    assert queue.next_batch(1, None, 100, 100) is None


def test_takes_all_and_allocates_exact_blocks():
    # 5 + 3 = 8 tokens -> 2 blocks of 4; 2 + 7 = 9 tokens -> 3 blocks.
    queue = make_queue(8, 4, (5, 3), (2, 7))
    batch = queue.next_batch(None, None, 100, 100)
    assert ids(batch) == [0, 1]
    assert [entry.block_ids for entry in batch] == [[0, 1], [2, 3, 4]]
    assert queue.allocator.num_free_blocks == 3
    assert len(queue) == 0


def test_prefill_budget_stops_batch_and_keeps_fifo():
    # Prefill budget 10 (already a multiple of 2): 4 + 4 fit, + 4 = 12 does not.
    queue = make_queue(100, 2, (4, 1), (4, 1), (4, 1), (1, 1))
    batch = queue.next_batch(None, None, 10, 1000)
    assert ids(batch) == [0, 1]
    # The head that did not fit stays first; the small entry behind it is not skipped.
    assert front_ids(queue) == [2, 3]
    assert queue.allocator.num_used_blocks == 2 * 3  # 5 tokens -> 3 blocks each


def test_prefill_budget_rounded_up_to_block_size():
    # Budget 9 rounds up to 12 with block_size 4: three 4-token prompts fit.
    queue = make_queue(100, 4, (4, 1), (4, 1), (4, 1))
    assert ids(queue.next_batch(None, None, 9, 1000)) == [0, 1, 2]
    # Without rounding (block_size 1) only two fit in 9.
    queue = make_queue(100, 1, (4, 1), (4, 1), (4, 1))
    assert ids(queue.next_batch(None, None, 9, 1000)) == [0, 1]


def test_token_budget_counts_prompt_plus_max_new_tokens():
    # Costs: 3 + 7 = 10, 2 + 8 = 10, 1 + 1 = 2. Budget 20 takes the first two only.
    queue = make_queue(100, 1, (3, 7), (2, 8), (1, 1))
    batch = queue.next_batch(None, None, 1000, 20)
    assert ids(batch) == [0, 1]
    assert front_ids(queue) == [2]
    # Budget 21 would not take the third either (22 > 21) but 22 does.
    queue = make_queue(100, 1, (3, 7), (2, 8), (1, 1))
    assert ids(queue.next_batch(None, None, 1000, 21)) == [0, 1]
    queue = make_queue(100, 1, (3, 7), (2, 8), (1, 1))
    assert ids(queue.next_batch(None, None, 1000, 22)) == [0, 1, 2]


def test_head_over_budget_returns_none_and_stays():
    queue = make_queue(100, 1, (50, 1), (1, 1))
    assert queue.next_batch(None, None, 10, 1000) is None
    assert front_ids(queue) == [0, 1]
    assert queue.allocator.num_free_blocks == 100


def test_allocator_exhaustion_stops_batch():
    # 4 blocks of 4 tokens: entry 0 needs 2 blocks, entry 1 needs 3 -> does not fit.
    queue = make_queue(4, 4, (6, 2), (9, 3), (1, 1))
    batch = queue.next_batch(None, None, 1000, 1000)
    assert ids(batch) == [0]
    assert batch[0].block_ids == [0, 1]
    assert front_ids(queue) == [1, 2]
    assert queue.allocator.num_free_blocks == 2
    # Once entry 0 finishes and frees its blocks, entry 1 gets the lowest ids.
    queue.allocator.free(batch[0].block_ids)
    batch = queue.next_batch(None, None, 1000, 1000)
    assert ids(batch) == [1, 2]
    assert [entry.block_ids for entry in batch] == [[0, 1, 2], [3]]


def test_max_size_caps_the_batch():
    queue = make_queue(100, 1, (1, 1), (1, 1), (1, 1))
    assert ids(queue.next_batch(None, 2, 1000, 1000)) == [0, 1]
    assert front_ids(queue) == [2]
    assert queue.allocator.num_used_blocks == 4


def test_min_size_rollback_frees_blocks_and_restores_order():
    # Token budget 25 takes entries 0 and 1 (10 + 10), entry 2 (10) does not fit.
    queue = make_queue(16, 4, (6, 4), (6, 4), (6, 4))
    assert queue.next_batch(3, None, 1000, 25) is None
    assert front_ids(queue) == [0, 1, 2]
    assert all(entry.block_ids is None for entry in queue._entries)
    assert queue.allocator.num_free_blocks == 16
    queue.allocator.check_integrity()
    # The same call with min_size 2 succeeds and allocates 3 blocks per entry.
    batch = queue.next_batch(2, None, 1000, 25)
    assert [entry.block_ids for entry in batch] == [[0, 1, 2], [3, 4, 5]]
    assert queue.allocator.num_free_blocks == 10


def test_min_size_larger_than_queue_returns_none_early():
    queue = make_queue(16, 4, (1, 1))
    assert queue.next_batch(2, None, 1000, 1000) is None
    assert front_ids(queue) == [0]
    assert queue.allocator.num_free_blocks == 16


def test_cancelled_entries_are_dropped_and_counted():
    queue = make_queue(100, 1, (1, 1), (1, 1), (1, 1), (1, 1))
    queue._entries[0].cancelled = True
    queue._entries[2].cancelled = True
    batch = queue.next_batch(None, None, 1000, 1000)
    assert ids(batch) == [1, 3]
    assert [entry.block_ids for entry in batch] == [[0, 1], [2, 3]]
    assert queue.num_dropped == 2
    assert len(queue) == 0


def test_only_cancelled_entries_returns_none():
    queue = make_queue(100, 1, (1, 1))
    queue._entries[0].cancelled = True
    assert queue.next_batch(None, None, 1000, 1000) is None
    assert queue.num_dropped == 1
    assert len(queue) == 0


def test_remove_cancelled():
    queue = make_queue(100, 1, (1, 1), (1, 1), (1, 1))
    queue._entries[1].cancelled = True
    removed = queue.remove_cancelled()
    assert ids(removed) == [1]
    assert front_ids(queue) == [0, 2]
    assert queue.num_dropped == 1
    assert queue.remove_cancelled() == []


# ---- prefix caching ----------------------------------------------------------------------


def prompt_entry(entry_id: int, input_ids: list[int], max_new_tokens: int = 4,
                 decoder_input_details: bool = False) -> Entry:
    entry = make_entry(entry_id, len(input_ids), max_new_tokens)
    entry.request = dataclasses.replace(entry.request, input_ids=tuple(input_ids),
                                        decoder_input_details=decoder_input_details)
    return entry


def prefilled(queue: Queue, entry: Entry) -> Entry:
    """`entry` batched alone, its prompt's blocks registered as the batcher does after a prefill."""
    queue.append(entry)
    (taken,) = queue.next_batch(None, None, 1000, 1000)
    if taken.prompt_keys:
        queue.allocator.cache(taken.block_ids, taken.prompt_keys)
    return taken


def test_a_prompt_starts_from_its_cached_prefix_which_costs_no_prefill_budget():
    queue = Queue(BlockAllocator(16, 4), prefix_caching=True)
    system = list(range(100, 112))  # 3 blocks
    first = prefilled(queue, prompt_entry(0, system + [1, 2]))
    assert first.cache_len == 0
    queue.append(prompt_entry(1, system + [3, 4, 5]))
    # 15 tokens, 12 of them cached: 3 to prefill (the budget rounds up to one block)
    (second,) = queue.next_batch(None, None, 4, 1000)
    assert second.cache_len == 12
    assert second.block_ids[:3] == first.block_ids[:3]
    assert not set(second.block_ids[3:]) & set(first.block_ids)
    # another prompt shares the first block only
    queue.append(prompt_entry(2, system[:4] + [7] * 9))
    (third,) = queue.next_batch(None, None, 1000, 1000)
    assert third.cache_len == 4 and third.block_ids[0] == first.block_ids[0]
    for entry in (first, second, third):
        queue.allocator.free(entry.block_ids)
    queue.allocator.check_integrity()
    assert queue.allocator.num_free_blocks == 16


def test_a_fully_cached_prompt_still_prefills_its_last_block():
    queue = Queue(BlockAllocator(16, 4), prefix_caching=True)
    prompt = list(range(8))
    prefilled(queue, prompt_entry(0, prompt))
    queue.append(prompt_entry(1, prompt))
    (again,) = queue.next_batch(None, None, 1000, 1000)
    assert again.cache_len == 4


def test_no_prefix_cache_when_off_or_for_prompt_logprobs():
    prompt = list(range(12))
    off = Queue(BlockAllocator(16, 4))
    prefilled(off, prompt_entry(0, prompt))
    off.append(prompt_entry(1, prompt + [1]))
    assert off.next_batch(None, None, 1000, 1000)[0].cache_len == 0
    assert off.allocator.num_cached_blocks == 0

    queue = Queue(BlockAllocator(16, 4), prefix_caching=True, prefill_logprobs=True)
    prefilled(queue, prompt_entry(0, prompt))
    queue.append(prompt_entry(1, prompt + [1], decoder_input_details=True))
    queue.append(prompt_entry(2, prompt + [1]))
    details, plain = queue.next_batch(None, None, 1000, 1000)
    # the prompt's logprobs need every prompt token computed
    assert details.cache_len == 0 and plain.cache_len == 12


def test_a_rolled_back_batch_returns_its_cached_blocks():
    queue = Queue(BlockAllocator(16, 4), prefix_caching=True)
    prompt = list(range(12))
    first = prefilled(queue, prompt_entry(0, prompt))
    queue.allocator.free(first.block_ids)
    queue.append(prompt_entry(1, prompt + [1]))
    # fewer than min_size fit: rolled back
    assert queue.next_batch(2, None, 1000, 1000) is None
    entry = queue._entries[0]
    assert entry.block_ids is None and entry.cache_len == 0
    queue.allocator.check_integrity()
    assert queue.allocator.num_free_blocks == 16 and queue.allocator.num_cached_blocks == 3


def test_a_prompt_continuing_one_of_the_batch_waits_for_the_next_prefill():
    queue = Queue(BlockAllocator(32, 4), prefix_caching=True)
    system = list(range(100, 112))
    queue.append(prompt_entry(0, system + [1, 2]))
    queue.append(prompt_entry(1, list(range(50, 60))))  # unrelated
    queue.append(prompt_entry(2, system + [3, 4]))  # continues entry 0's prompt
    queue.append(prompt_entry(3, list(range(70, 80))))
    first = queue.next_batch(None, None, 1000, 1000)
    # FIFO: entry 2 stops the batch, and entry 3 waits behind it
    assert ids(first) == [0, 1] and front_ids(queue) == [2, 3]
    for entry in first:
        queue.allocator.cache(entry.block_ids, entry.prompt_keys)
    second = queue.next_batch(None, None, 1000, 1000)
    assert ids(second) == [2, 3]
    assert second[0].cache_len == 12 and second[0].block_ids[:3] == first[0].block_ids[:3]
    # a prompt sharing only what is cached already does not wait
    queue.append(prompt_entry(4, system + [5, 6]))
    queue.append(prompt_entry(5, system + [7, 8]))
    assert [e.cache_len for e in queue.next_batch(None, None, 1000, 1000)] == [12, 12]


# ---- chunked prefill ---------------------------------------------------------------------


def test_a_prompt_over_the_prefill_budget_left_is_cut_at_a_block_and_ends_the_batch():
    queue = Queue(BlockAllocator(64, 4), chunking=True)
    for entry_id, n in enumerate((6, 30, 5)):
        queue.append(prompt_entry(entry_id, list(range(n))))
    # budget 16: 6 tokens, then 10 of the next one's 30 rounded down to 8, and no more
    first, second = queue.next_batch(None, None, 16, 1000)
    assert (first.chunk_len, second.cache_len, second.chunk_len) == (0, 0, 8)
    assert front_ids(queue) == [2]
    # the batcher puts it back after its chunk; it leads the next batch with its blocks
    blocks = second.block_ids
    second.cache_len, second.chunk_len = 8, 0
    queue.push_front(second)
    assert queue.front_is_chunked() and queue.held_blocks() == set(blocks)
    again, = queue.next_batch(None, None, 16, 1000)
    assert again is second and again.block_ids == blocks
    assert (again.cache_len, again.chunk_len) == (8, 16)
    again.cache_len, again.chunk_len = 24, 0
    queue.push_front(again)
    # the last 6 tokens fit, beside the next entry
    last, third = queue.next_batch(None, None, 16, 1000)
    assert last is second and (last.cache_len, last.chunk_len, third.chunk_len) == (24, 0, 0)


def test_no_chunks_without_chunking_or_for_prompt_logprobs():
    queue = Queue(BlockAllocator(64, 4))
    queue.append(prompt_entry(0, list(range(6))))
    queue.append(prompt_entry(1, list(range(30))))
    assert ids(queue.next_batch(None, None, 16, 1000)) == [0]
    queue = Queue(BlockAllocator(64, 4), chunking=True, prefill_logprobs=True)
    queue.append(prompt_entry(0, list(range(6))))
    queue.append(prompt_entry(1, list(range(12)), decoder_input_details=True))
    assert ids(queue.next_batch(None, None, 16, 1000)) == [0]
    assert ids(queue.next_batch(None, None, 16, 1000)) == [1]


def test_a_rolled_back_batch_keeps_the_blocks_of_a_request_between_chunks():
    allocator = BlockAllocator(64, 4)
    queue = Queue(allocator, chunking=True)
    queue.append(prompt_entry(0, list(range(30))))
    (entry,) = queue.next_batch(None, None, 8, 1000)
    entry.cache_len, entry.chunk_len = 8, 0
    queue.push_front(entry)
    queue.append(prompt_entry(1, list(range(6))))
    held = list(entry.block_ids)
    assert queue.next_batch(3, None, 100, 1000) is None  # fewer than 3: rolled back
    assert entry.block_ids == held and entry.cache_len == 8
    assert allocator.num_free_blocks == 64 - len(held)
    assert front_ids(queue) == [0, 1]
    entry.cancelled = True
    queue.remove_cancelled()
    assert allocator.num_free_blocks == 64 and queue.num_dropped == 1
