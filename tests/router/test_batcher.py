"""The continuous-batching loop against `FakeShardClient`: exact call sequences, as TGI's.

`Batcher` + `Infer` + the real `Queue` / `BlockAllocator`, with the tiny test tokenizer. The
fake predicts every token (`chain`), records every call and flags every protocol violation
(e.g. a Decode of a finished request). Requests are submitted at exact steps through the
fake's `before_step` hook, so no test depends on timing.
"""

import asyncio
import contextlib
import dataclasses

import pytest
from fake_shard import EOS_TOKEN_ID, VOCAB_SIZE, FakeShardClient, chain, next_token
from transformers import AutoTokenizer

from tgi_server.router.batcher import Batcher, BatchingConfig
from tgi_server.router.block_allocator import BlockAllocator
from tgi_server.router.infer import Infer, InferError, InferEvent
from tgi_server.router.metrics import Metrics
from tgi_server.router.queue import Queue
from tgi_server.router.types import FinishReason, SamplingParams, StoppingParams, ValidRequest

# Prompts (their last token) whose generations are plain text without eos for 8+ tokens.
P1, P2, P3, P4 = 12, 28, 5, 7


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir("llama", "tiny"))


def request(last_token: int = P1, max_new_tokens: int = 4, stop: tuple[str, ...] = (),
            ignore_eos: bool = False, prompt_len: int = 1) -> ValidRequest:
    input_ids = (1,) * (prompt_len - 1) + (last_token,)
    return ValidRequest(
        inputs="", input_ids=input_ids, sampling=SamplingParams(),
        stopping=StoppingParams(max_new_tokens, stop, ignore_eos), top_n_tokens=0,
        details=True, decoder_input_details=False, return_full_text=False, best_of=1,
        stream=True,
    )


async def until(condition, what: str = "condition") -> None:
    """Let the other tasks run until `condition()` holds (a step bound, not a timeout)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never reached: {what}")


class Server:
    """One batcher over a fake shard, with the queue and allocator the app would build."""

    def __init__(self, tokenizer, fake: FakeShardClient, num_blocks: int = 64,
                 max_batch_total_tokens: int | None = None, prefix_caching: bool = False,
                 chunking: bool = False, **batching):
        self.fake = fake
        self.allocator = BlockAllocator(num_blocks, fake.block_size)
        self.queue = Queue(self.allocator, prefix_caching=prefix_caching, chunking=chunking)
        self.metrics = Metrics()
        self.config = BatchingConfig(**{
            "max_batch_prefill_tokens": 4096,
            "max_batch_total_tokens": max_batch_total_tokens or num_blocks * fake.block_size,
            "max_batch_size": None,
            "max_waiting_tokens": 20,
            "waiting_served_ratio": 0.3,
            **batching,
        })
        self.batcher = Batcher(fake, self.queue, self.allocator, tokenizer, self.config,
                               self.metrics)
        self.infer = Infer(self.queue, self.batcher, self.metrics, max_concurrent_requests=64)
        self.task: asyncio.Task | None = None
        self.submitted: list[asyncio.Task] = []

    def start(self) -> None:
        self.task = asyncio.create_task(self.batcher.run())

    async def stop(self) -> None:
        for task in [*self.submitted, self.task]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, InferError):
                    await task

    def submit(self, req: ValidRequest) -> asyncio.Task:
        task = asyncio.create_task(collect(self.infer.generate(req)))
        self.submitted.append(task)
        return task

    async def submit_queued(self, *reqs: ValidRequest) -> list[asyncio.Task]:
        """Submit and wait until every request is in the queue (ids in submission order)."""
        tasks = []
        for req in reqs:
            n = self.queue_len_with_running()
            tasks.append(self.submit(req))
            await until(lambda n=n: self.queue_len_with_running() > n, "request queued")
        return tasks

    def queue_len_with_running(self) -> int:
        return len(self.queue) + self.batcher.num_prefilled_requests

    async def settle(self) -> None:
        """Wait until nothing runs, nothing waits and the shard holds no batch."""
        await until(lambda: not self.batcher.running and not len(self.queue)
                    and not self.fake.batches,
                    f"idle (running={list(self.batcher.running)}, queue={len(self.queue)}, "
                    f"shard batches={list(self.fake.batches)})")

    async def check_done(self) -> None:
        await self.settle()
        assert self.fake.violations == []
        assert self.allocator.num_free_blocks == self.allocator.num_blocks
        self.allocator.check_integrity()


async def collect(events) -> list[InferEvent]:
    return [event async for event in events]


@pytest.fixture
async def make_server(tokenizer):
    servers: list[Server] = []

    def make(fake: FakeShardClient | None = None, start: bool = True, **kw) -> Server:
        server = Server(tokenizer, fake or FakeShardClient(), **kw)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        await server.stop()


def at_step(fake: FakeShardClient, step: int, action) -> None:
    """Run `await action()` at the start of the fake's `step`-th Prefill/Decode."""
    previous = fake.before_step

    async def hook(method: str, index: int) -> None:
        if previous is not None:
            await previous(method, index)
        if index == step:
            await action()

    fake.before_step = hook


def prefill(batch_id: int, *request_ids: int) -> tuple:
    return ("prefill", batch_id, request_ids)


def decode(*batches: tuple[int, tuple[int, ...]]) -> tuple:
    return ("decode", batches)


def filter_(batch_id: int, *request_ids: int) -> tuple:
    return ("filter", batch_id, request_ids)


def assert_generation(tokenizer, events: list[InferEvent], last_token: int, n: int,
                      finish: FinishReason = FinishReason.LENGTH) -> None:
    expected = chain(last_token, n)
    assert [e.token.id for e in events] == expected
    assert [e.num_generated_tokens for e in events] == list(range(1, n + 1))
    assert [e.finish_reason for e in events] == [None] * (n - 1) + [finish]
    assert [e.generated_text for e in events[:-1]] == [None] * (n - 1)
    assert events[-1].generated_text == tokenizer.decode(expected, skip_special_tokens=True)


# ---- one request ------------------------------------------------------------------------


async def test_single_request_gets_max_new_tokens_events(make_server, tokenizer):
    server = make_server()
    events = await collect(server.infer.generate(request(P1, max_new_tokens=4)))

    assert_generation(tokenizer, events, P1, 4)
    # Plain text: the streamed deltas add up to the final text.
    assert "".join(e.token.text for e in events) == events[-1].generated_text
    assert server.fake.calls == [prefill(1, 1)] + [decode((1, (1,)))] * 3
    await server.check_done()


def predecessor(token: int) -> int:
    """The token the fake follows with `token`."""
    return next(t for t in range(VOCAB_SIZE) if next_token(t) == token)


async def test_eos_finishes_early_unless_ignored(make_server, tokenizer):
    # The prompt's chain reaches eos as its third generated token.
    prompt = predecessor(predecessor(predecessor(EOS_TOKEN_ID)))
    assert chain(prompt, 3)[-1] == EOS_TOKEN_ID
    server = make_server(start=False)
    eos, ignoring = await server.submit_queued(
        request(prompt, max_new_tokens=10), request(prompt, max_new_tokens=5, ignore_eos=True))
    server.start()

    eos_events, ignoring_events = await eos, await ignoring
    assert_generation(tokenizer, eos_events, prompt, 3, FinishReason.EOS_TOKEN)
    assert eos_events[-1].token.special
    assert EOS_TOKEN_ID not in tokenizer.encode(eos_events[-1].generated_text)
    assert_generation(tokenizer, ignoring_events, prompt, 5)
    assert server.fake.calls == [
        prefill(1, 1, 2),
        decode((1, (1, 2))),
        decode((1, (1, 2))),
        filter_(1, 2),
        decode((1, (2,))),
        decode((1, (2,))),
    ]
    await server.check_done()


def stop_sequence_of_third_token(tokenizer, last_token: int) -> str:
    tokens = chain(last_token, 3)
    before, text = tokenizer.decode(tokens[:2]), tokenizer.decode(tokens)
    stop = text[len(before):]
    assert stop and stop not in before and "\ufffd" not in text
    return stop


async def stopped_beside_another(server, tokenizer, other_max_new_tokens: int) -> list[InferEvent]:
    """Starts `server` with request 1 (P1), which stops on its third token's text, queued
    beside request 2 (P2), which runs to its length; checks both. Request 1's events."""
    stop = stop_sequence_of_third_token(tokenizer, P1)
    stopped, other = await server.submit_queued(
        request(P1, max_new_tokens=10, stop=(stop,)),
        request(P2, max_new_tokens=other_max_new_tokens))
    server.start()

    events = await stopped
    assert_generation(tokenizer, events, P1, 3, FinishReason.STOP_SEQUENCE)
    assert events[-1].generated_text.endswith(stop)
    assert_generation(tokenizer, await other, P2, other_max_new_tokens)
    return events


async def test_stop_sequence_finishes_and_is_filtered_out(make_server, tokenizer):
    server = make_server(start=False)
    await stopped_beside_another(server, tokenizer, 5)
    # The shard finished nothing: the router filters the stopped request out itself.
    assert server.fake.requests[1].finish_reason is None
    assert server.fake.calls == [
        prefill(1, 1, 2),
        decode((1, (1, 2))),
        decode((1, (1, 2))),
        filter_(1, 2),
        decode((1, (2,))),
        decode((1, (2,))),
    ]
    # Each decode after the first collected a step run ahead, request 1's in it until the
    # filter dropped it.
    assert server.fake.num_collected == 3
    await server.check_done()


async def test_last_request_stopped_by_the_router_clears_its_batch(make_server, tokenizer):
    stop = stop_sequence_of_third_token(tokenizer, P1)
    server = make_server()
    events = await collect(server.infer.generate(request(P1, max_new_tokens=10, stop=(stop,))))

    assert events[-1].finish_reason == FinishReason.STOP_SEQUENCE
    await server.settle()
    assert server.fake.calls == [prefill(1, 1), decode((1, (1,))), decode((1, (1,))), ("clear", 1)]
    await server.check_done()


async def test_several_tokens_a_step_stream_one_event_each_and_stop_mid_step(
        make_server, tokenizer):
    # A speculating shard: 4 tokens per request and decode step. The stop sequence is the
    # third token, inside the first decode step: the tokens after it are dropped. Request 2
    # gets 1 token from the prefill, then 4 and 2 (max_new_tokens) from two decodes.
    server = make_server(FakeShardClient(tokens_per_step=4), start=False)
    events = await stopped_beside_another(server, tokenizer, 7)
    assert "".join(e.token.text for e in events) == events[-1].generated_text
    assert server.fake.calls[:2] == [prefill(1, 1, 2), decode((1, (1, 2)))]
    assert filter_(1, 2) in server.fake.calls
    assert len([c for c in server.fake.calls if c[0] == "decode"]) == 2
    # TGI's tgi_request_skipped_tokens: per request and step, the tokens beyond the first
    # (2 prefills: 0 and 0; decode 1: 3 and 3, request 1's cut by its stop sequence after;
    # decode 2: 1)
    skipped = server.metrics.request_skipped_tokens.collect()[0].samples
    values = {s.name.removeprefix("tgi_request_skipped_tokens"): s.value for s in skipped}
    assert (values["_count"], values["_sum"]) == (5, 7)
    await server.check_done()


# ---- joining waiting requests -----------------------------------------------------------


async def test_request_arriving_during_decode_joins_the_batch(make_server, tokenizer):
    server = make_server()
    joined: list[asyncio.Task] = []

    async def arrive() -> None:
        joined.extend(await server.submit_queued(request(P2, max_new_tokens=2)))

    at_step(server.fake, 0, arrive)
    first = server.submit(request(P1, max_new_tokens=4))

    assert_generation(tokenizer, await first, P1, 4)
    assert_generation(tokenizer, await joined[0], P2, 2)
    assert server.fake.calls == [
        prefill(1, 1),
        prefill(2, 2),
        decode((1, (1,)), (2, (2,))),
        filter_(1, 1),
        decode((1, (1,))),
        decode((1, (1,))),
    ]
    # floor(1 * 0.3) = 0 requests had to wait: joined by "backpressure", as TGI labels it.
    assert server.metrics.batch_concat.value(reason="backpressure") == 1
    await server.check_done()


@pytest.mark.parametrize("num_arriving", [1, 2])
async def test_waiting_served_ratio(make_server, tokenizer, num_arriving):
    # ratio 1.0 over a running batch of 2: two waiting requests are needed to join.
    server = make_server(start=False, waiting_served_ratio=1.0, max_waiting_tokens=100)
    arriving: list[asyncio.Task] = []

    async def arrive() -> None:
        reqs = [request(P3 + i, max_new_tokens=2) for i in range(num_arriving)]
        arriving.extend(await server.submit_queued(*reqs))

    at_step(server.fake, 0, arrive)
    running = await server.submit_queued(request(P1, max_new_tokens=6),
                                         request(P2, max_new_tokens=6))
    server.start()
    await until(lambda: len(arriving) == num_arriving, "arrivals")
    await asyncio.gather(*running, *arriving)

    if num_arriving == 1:
        # floor(2 * 1.0) = 2 > 1 waiting: served after the running batch ends.
        assert server.fake.calls == (
            [prefill(1, 1, 2)] + [decode((1, (1, 2)))] * 5 + [prefill(2, 3), decode((2, (3,)))]
        )
        assert server.metrics.batch_concat.value(reason="backpressure") == 0
    else:
        assert server.fake.calls == [
            prefill(1, 1, 2),
            prefill(2, 3, 4),
            decode((1, (1, 2)), (2, (3, 4))),
            filter_(1, 1, 2),
        ] + [decode((1, (1, 2)))] * 4
        assert server.metrics.batch_concat.value(reason="backpressure") == 1
    await server.check_done()


@pytest.mark.parametrize("lookahead", [True, False])
async def test_max_waiting_tokens_forces_a_join(make_server, tokenizer, lookahead):
    # As TGI: the counter starts at 1 after a prefill and counts decodes, so with
    # max_waiting_tokens 3 a too-small batch joins before the third decode.
    server = make_server(start=False, waiting_served_ratio=1.0, max_waiting_tokens=3,
                         lookahead=lookahead)
    late: list[asyncio.Task] = []

    async def arrive() -> None:
        late.extend(await server.submit_queued(request(P3, max_new_tokens=2)))

    at_step(server.fake, 0, arrive)  # during the first prefill
    at_step(server.fake, 3, arrive)  # during the prefill of the first joined request
    running = await server.submit_queued(request(P1, max_new_tokens=8),
                                         request(P2, max_new_tokens=8))
    server.start()
    await until(lambda: len(late) == 2, "arrivals")
    await asyncio.gather(*running, *late)

    if lookahead:
        # Before a join, the step that already ran ahead is collected alone.
        assert server.fake.calls == [
            prefill(1, 1, 2),                  # step 0
            decode((1, (1, 2))),               # 1
            decode((1, (1, 2))),               # 2
            prefill(2, 3),                     # 3: waited 3 >= max_waiting_tokens
            decode((1, (1, 2))),               # 4: collects step 2's lookahead
            decode((1, (1, 2)), (2, (3,))),    # 5: request 3 finishes, no lookahead
            filter_(1, 1, 2),
            decode((1, (1, 2))),               # 6: request 4 waits (counter reset to 1)
            prefill(3, 4),                     # 7
            decode((1, (1, 2))),               # 8: collects
            decode((1, (1, 2)), (3, (4,))),    # 9: every request finishes
        ]
    else:
        assert server.fake.calls == [
            prefill(1, 1, 2),                  # step 0
            decode((1, (1, 2))),               # 1
            decode((1, (1, 2))),               # 2
            prefill(2, 3),                     # 3: waited 3 >= max_waiting_tokens
            decode((1, (1, 2)), (2, (3,))),    # 4
            filter_(1, 1, 2),
            decode((1, (1, 2))),               # 5: request 4 waits (counter reset to 1)
            prefill(3, 4),                     # 6
            decode((1, (1, 2)), (3, (4,))),    # 7
            filter_(1, 1, 2),
            decode((1, (1, 2))),               # 8
            decode((1, (1, 2))),               # 9
        ]
    assert server.fake.num_collected == (3 if lookahead else 0)
    assert server.metrics.batch_concat.value(reason="wait_exceeded") == 2
    assert server.metrics.batch_concat.value(reason="backpressure") == 0
    for task in [*running, *late]:
        events = task.result()
        assert events[-1].finish_reason == FinishReason.LENGTH
    await server.check_done()


async def test_max_batch_size_is_respected(make_server, tokenizer):
    server = make_server(max_batch_size=2, waiting_served_ratio=0.0)
    arriving: list[asyncio.Task] = []

    async def arrive() -> None:
        arriving.extend(await server.submit_queued(request(P2, max_new_tokens=3),
                                                   request(P3, max_new_tokens=2)))

    at_step(server.fake, 0, arrive)
    first = server.submit(request(P1, max_new_tokens=3))
    await until(lambda: len(arriving) == 2, "arrivals")
    await asyncio.gather(first, *arriving)

    assert server.fake.calls == [
        prefill(1, 1),
        prefill(2, 2),                    # one free slot: only the first waiting request
        decode((1, (1,)), (2, (2,))),
        decode((1, (1, 2))),              # full: request 3 keeps waiting
        prefill(3, 3),
        decode((3, (3,))),
    ]
    assert_generation(tokenizer, arriving[1].result(), P3, 2)
    await server.check_done()


async def test_queued_requests_beyond_max_batch_size_form_the_next_batch(make_server, tokenizer):
    server = make_server(start=False, max_batch_size=2)
    tasks = await server.submit_queued(*(request(P1 + i, max_new_tokens=2) for i in range(3)))
    server.start()
    await asyncio.gather(*tasks)

    assert server.fake.calls == [
        prefill(1, 1, 2), decode((1, (1, 2))), prefill(2, 3), decode((2, (3,))),
    ]
    await server.check_done()


# ---- KV blocks --------------------------------------------------------------------------


async def test_request_waits_for_blocks_then_completes(make_server, tokenizer):
    # 4 blocks of 4 tokens; the token budget is left wide so that only blocks limit.
    server = make_server(start=False, num_blocks=4, max_batch_total_tokens=1000)
    first, second = await server.submit_queued(
        request(P1, max_new_tokens=7),    # 8 tokens: blocks 0, 1
        request(P2, max_new_tokens=10),   # 11 tokens: 3 blocks, only 2 free
    )
    server.start()
    await until(lambda: server.fake.num_steps >= 2, "first decode")
    assert len(server.queue) == 1
    assert server.allocator.num_free_blocks == 2

    assert_generation(tokenizer, await first, P1, 7)
    assert_generation(tokenizer, await second, P2, 10)
    assert server.fake.calls[:8] == [prefill(1, 1)] + [decode((1, (1,)))] * 6 + [prefill(2, 2)]
    assert server.fake.requests[1].block_ids == [0, 1]
    assert server.fake.requests[2].block_ids == [0, 1, 2]
    await server.check_done()


async def test_cancel_mid_stream_frees_blocks_and_filters(make_server, tokenizer):
    server = make_server(start=False)
    cancelled = asyncio.Event()
    at_step(server.fake, 2, cancelled.wait)
    other = await server.submit_queued(request(P2, max_new_tokens=6))
    server.start()
    stream = server.infer.generate(request(P1, max_new_tokens=6))
    received = [await anext(stream), await anext(stream)]
    await stream.aclose()
    cancelled.set()

    assert [e.token.id for e in received] == chain(P1, 2)
    assert_generation(tokenizer, await other[0], P2, 6)
    assert server.fake.calls == [
        prefill(1, 1, 2),
        decode((1, (1, 2))),
        decode((1, (1, 2))),   # already sent when the client left
        filter_(1, 1),
        decode((1, (1,))),
        decode((1, (1,))),
        decode((1, (1,))),
    ]
    await server.check_done()


async def test_cancel_during_the_last_step_frees_blocks(make_server, tokenizer):
    # The request finishes in the very step during which its client leaves: the shard
    # returns no batch, and nothing is left to filter.
    server = make_server()
    cancelled = asyncio.Event()
    at_step(server.fake, 2, cancelled.wait)
    stream = server.infer.generate(request(P1, max_new_tokens=3))
    received = [await anext(stream), await anext(stream)]
    await stream.aclose()
    cancelled.set()

    assert [e.token.id for e in received] == chain(P1, 2)
    await until(lambda: server.fake.num_steps == 3, "last decode")
    await server.check_done()
    assert server.fake.calls == [prefill(1, 1), decode((1, (1,))), decode((1, (1,)))]
    assert_generation(tokenizer, await collect(server.infer.generate(request(P2, 2))), P2, 2)
    await server.check_done()


async def test_cancelled_generate_all_frees_blocks(make_server, tokenizer):
    # /generate awaits `generate_all` in a task it cancels when the client disconnects.
    server = make_server()
    cancelled = asyncio.Event()
    at_step(server.fake, 2, cancelled.wait)
    task = asyncio.create_task(server.infer.generate_all(request(P1, max_new_tokens=6)))
    await until(lambda: server.fake.num_steps == 3, "second decode")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    cancelled.set()

    await server.check_done()
    assert server.fake.calls == [prefill(1, 1)] + [decode((1, (1,)))] * 2 + [("clear", 1)]


async def test_cancel_while_queued_never_reaches_the_shard(make_server, tokenizer):
    server = make_server()
    release = asyncio.Event()
    at_step(server.fake, 0, release.wait)
    first = server.submit(request(P1, max_new_tokens=2))
    await until(lambda: server.fake.num_steps == 1, "first prefill")
    stream = server.infer.generate(request(P2, max_new_tokens=2))
    waiting = asyncio.ensure_future(anext(stream))
    await until(lambda: len(server.queue) == 1, "second request queued")
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await stream.aclose()
    release.set()

    assert_generation(tokenizer, await first, P1, 2)
    await server.check_done()
    assert server.fake.calls_of("prefill") == [prefill(1, 1)]
    assert server.queue.num_dropped == 1


# ---- shard failures ---------------------------------------------------------------------


async def test_decode_error_fails_every_request_in_flight(make_server, tokenizer):
    server = make_server(start=False)
    server.fake.fail_next("decode")
    tasks = await server.submit_queued(request(P1, max_new_tokens=4), request(P2, max_new_tokens=4))
    server.start()

    for task in tasks:
        with pytest.raises(InferError) as error:
            await task
        assert (error.value.status, error.value.error_type) == (424, "generation")
        assert "CUDA out of memory" in error.value.message
    await server.check_done()
    assert server.fake.calls == [prefill(1, 1, 2), decode((1, (1, 2))), ("clear", 1)]
    assert server.metrics.batch_inference_failure.value(method="decode") == 1

    # The next request is served normally.
    assert_generation(tokenizer, await collect(server.infer.generate(request(P3, 2))), P3, 2)
    assert server.fake.calls[3:] == [prefill(2, 3), decode((2, (3,)))]
    await server.check_done()


async def test_prefill_error_fails_the_new_requests_only(make_server, tokenizer):
    # As TGI: a failed prefill of joining requests clears that batch; the running one goes on.
    server = make_server()
    joining: list[asyncio.Task] = []

    async def arrive() -> None:
        joining.extend(await server.submit_queued(request(P2, max_new_tokens=4)))

    async def fail() -> None:
        server.fake.fail_next("prefill")

    at_step(server.fake, 0, arrive)
    at_step(server.fake, 1, fail)
    running = server.submit(request(P1, max_new_tokens=4))
    await until(lambda: joining, "arrival")

    with pytest.raises(InferError) as error:
        await joining[0]
    assert error.value.status == 424
    assert_generation(tokenizer, await running, P1, 4)
    assert server.fake.calls == [
        prefill(1, 1), prefill(2, 2), ("clear", 2),
    ] + [decode((1, (1,)))] * 3
    await server.check_done()


async def test_first_prefill_error_then_next_request_served(make_server, tokenizer):
    server = make_server()
    server.fake.fail_next("prefill")
    with pytest.raises(InferError) as error:
        await collect(server.infer.generate(request(P1, max_new_tokens=3)))
    assert error.value.status == 424
    await server.check_done()

    assert_generation(tokenizer, await collect(server.infer.generate(request(P1, 3))), P1, 3)
    assert server.fake.calls == [
        prefill(1, 1), ("clear", 1), prefill(2, 2), decode((2, (2,))), decode((2, (2,))),
    ]
    await server.check_done()


# ---- everything at once -----------------------------------------------------------------


async def test_many_requests_with_arrivals_cancels_and_few_blocks(make_server, tokenizer):
    """Staggered arrivals, mixed lengths, a stop sequence, eos, a cancel, a tight KV pool."""
    stop = stop_sequence_of_third_token(tokenizer, P1)
    eos_prompt = predecessor(predecessor(EOS_TOKEN_ID))
    server = make_server(num_blocks=12, max_batch_size=4, max_waiting_tokens=2,
                         waiting_served_ratio=0.5)
    cancel_after_one: list = []
    tasks: list[asyncio.Task] = []
    specs = [
        (request(P1, 5), 5, FinishReason.LENGTH),
        (request(P1, 9, stop=(stop,)), 3, FinishReason.STOP_SEQUENCE),
        (request(eos_prompt, 6), 2, FinishReason.EOS_TOKEN),
        (request(P2, 12, prompt_len=5), 12, FinishReason.LENGTH),
        (request(P3, 1), 1, FinishReason.LENGTH),
        (request(P4, 7, prompt_len=9), 7, FinishReason.LENGTH),
        (request(P2, 3), 3, FinishReason.LENGTH),
        (request(P1 + 1, 4), 4, FinishReason.LENGTH),
    ]

    def arrive(*indices: int):
        async def action() -> None:
            tasks.extend(await server.submit_queued(*(specs[i][0] for i in indices)))
        return action

    at_step(server.fake, 0, arrive(1, 2))
    at_step(server.fake, 2, arrive(3, 4, 5))
    at_step(server.fake, 5, arrive(6, 7))

    async def leave_after_one() -> None:
        stream = server.infer.generate(request(P2 + 1, 20))
        cancel_after_one.append((await anext(stream)).token.id)
        await stream.aclose()

    async def start_leaving() -> None:
        tasks.append(asyncio.create_task(leave_after_one()))

    at_step(server.fake, 4, start_leaving)
    tasks.insert(0, server.submit(specs[0][0]))
    await until(lambda: len(tasks) == len(specs) + 1, "all submitted")
    results = await asyncio.gather(*tasks)

    results = [r for r in results if r is not None]
    for (req, n, finish), events in zip(specs, results, strict=True):
        assert_generation(tokenizer, events, req.input_ids[-1], n, finish)
    assert cancel_after_one == chain(P2 + 1, 1)
    for call in server.fake.calls_of("decode"):
        assert sum(len(ids) for _, ids in call[1]) <= 4
    await server.check_done()


# ---- prefix caching ----------------------------------------------------------------------


def prefix_keys(server: Server, tokens: tuple[int, ...] | list[int]) -> list[bytes]:
    return server.allocator.block_keys(tuple(tokens), len(tokens))


async def test_a_prompt_is_cached_once_prefilled_and_its_answer_once_finished(
        make_server, tokenizer):
    server = make_server(prefix_caching=True)
    first = request(P1, max_new_tokens=6, prompt_len=9)  # 2 full blocks of 4, then 1 token
    seen: dict[str, int] = {}

    async def during_decode() -> None:
        # the prompt's full blocks are cached while the request still runs
        seen["prompt"] = server.allocator.match(prefix_keys(server, first.input_ids))
        seen["answer"] = server.allocator.match(
            prefix_keys(server, first.input_ids + tuple(chain(P1, 6))))

    at_step(server.fake, 1, during_decode)
    assert_generation(tokenizer, await server.submit(first), P1, 6)
    await server.check_done()
    assert seen == {"prompt": 2, "answer": 2}
    # finished: its 9 + 6 tokens had k/v for all but the last, 3 full blocks
    answer = first.input_ids + tuple(chain(P1, 6))
    assert server.allocator.match(prefix_keys(server, answer)) == 3

    # a next turn: the earlier prompt and answer, then a new question
    follow_up = request(P2, max_new_tokens=3, prompt_len=len(answer) + 4)
    follow_up = dataclasses.replace(follow_up, input_ids=answer + follow_up.input_ids[-4:])
    assert_generation(tokenizer, await server.submit(follow_up), P2, 3)
    (rid,) = server.fake.calls_of("prefill")[-1][2]
    assert server.fake.requests[rid].cache_len == 12
    assert server.metrics.prefix_cache_hit_tokens.value() == 12
    await server.check_done()


async def test_a_request_arriving_during_decode_shares_the_running_prompt(make_server, tokenizer):
    server = make_server(prefix_caching=True)
    joining: list[asyncio.Task] = []
    prompt = request(P1, max_new_tokens=4, prompt_len=10)

    async def arrive() -> None:
        same_start = dataclasses.replace(request(P2, max_new_tokens=4, prompt_len=10),
                                         input_ids=prompt.input_ids[:8] + (5, P2))
        joining.extend(await server.submit_queued(same_start))

    at_step(server.fake, 1, arrive)
    running = server.submit(prompt)
    await until(lambda: joining, "arrival")
    assert_generation(tokenizer, await joining[0], P2, 4)
    assert_generation(tokenizer, await running, P1, 4)
    first, second = (server.fake.requests[rid] for rid in (1, 2))
    assert (first.cache_len, second.cache_len) == (0, 8)
    assert second.block_ids[:2] == first.block_ids[:2]
    await server.check_done()  # the fake checked the shared blocks; every block free again


async def test_a_failed_prefill_caches_nothing(make_server, tokenizer):
    server = make_server(prefix_caching=True)
    server.fake.fail_next("prefill")
    with pytest.raises(InferError):
        await server.submit(request(P1, max_new_tokens=4, prompt_len=9))
    await server.check_done()
    assert server.allocator.num_cached_blocks == 0


async def test_requests_arriving_together_with_one_prompt_compute_it_once(make_server, tokenizer):
    server = make_server(prefix_caching=True, start=False)
    same = [dataclasses.replace(request(last, max_new_tokens=3, prompt_len=10),
                                input_ids=(9,) * 8 + (4, last)) for last in (P1, P2, P3)]
    tasks = await server.submit_queued(*same)
    server.start()
    for task, last in zip(tasks, (P1, P2, P3)):
        assert_generation(tokenizer, await task, last, 3)
    prefills = server.fake.calls_of("prefill")
    # the first alone; the others once its prompt's blocks are cached, from them
    assert [c[2] for c in prefills] == [(1,), (2, 3)]
    assert [server.fake.requests[rid].cache_len for rid in (1, 2, 3)] == [0, 8, 8]
    await server.check_done()


async def test_a_shard_failure_forgets_the_prefix_cache(make_server, tokenizer):
    server = make_server(prefix_caching=True)
    assert_generation(tokenizer, await server.submit(request(P1, max_new_tokens=3, prompt_len=9)),
                      P1, 3)
    assert server.allocator.num_cached_blocks == 2  # 9 + 3 tokens, k/v for 11
    server.fake.fail_next("decode")
    with pytest.raises(InferError):
        await server.submit(request(P2, max_new_tokens=4, prompt_len=9))
    await server.check_done()
    # the next request with the first one's prompt computes it again
    assert server.allocator.num_cached_blocks == 0
    assert_generation(tokenizer, await server.submit(request(P1, max_new_tokens=3, prompt_len=9)),
                      P1, 3)
    (rid,) = server.fake.calls_of("prefill")[-1][2]
    assert server.fake.requests[rid].cache_len == 0
    await server.check_done()


# ---- chunked prefill ---------------------------------------------------------------------


async def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(make_server, tokenizer):
    server = make_server(chunking=True, max_batch_prefill_tokens=8)
    joining: list[asyncio.Task] = []

    async def arrive() -> None:
        joining.extend(await server.submit_queued(request(P2, max_new_tokens=3, prompt_len=19)))

    at_step(server.fake, 1, arrive)
    running = server.submit(request(P1, max_new_tokens=8))
    await until(lambda: joining, "arrival")
    assert_generation(tokenizer, await joining[0], P2, 3)
    assert_generation(tokenizer, await running, P1, 8)
    # 19 tokens in chunks of 8, 8, then the last 3 with the first token; the running request
    # decodes a step between each (lookahead collects its step alone before the join)
    assert server.fake.chunks == {2: [(0, 8), (8, 8)]}
    calls = [c for c in server.fake.calls if c[0] in ("prefill", "decode")]
    prefills = [i for i, c in enumerate(calls) if c[0] == "prefill" and c[2] == (2,)]
    assert len(prefills) == 3
    assert all(calls[i + 1][0] == "decode" for i in prefills[:-1])
    assert server.fake.requests[2].cache_len == 16 and server.fake.requests[2].chunk_len == 0
    await server.check_done()


async def test_a_request_cancelled_between_chunks_frees_its_blocks(make_server, tokenizer):
    server = make_server(chunking=True, max_batch_prefill_tokens=8, start=False)
    (task,) = await server.submit_queued(request(P1, max_new_tokens=3, prompt_len=30))

    async def cancel() -> None:
        task.cancel()

    at_step(server.fake, 1, cancel)  # during its second chunk
    server.start()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await server.settle()
    assert server.fake.chunks == {1: [(0, 8), (8, 8)]} and 1 not in server.fake.requests
    assert server.allocator.num_free_blocks == server.allocator.num_blocks
    assert server.metrics.request_failure.value(err="dropped") == 1
    # the server goes on
    assert_generation(tokenizer, await server.submit(request(P2, max_new_tokens=3)), P2, 3)
    await server.check_done()


async def test_chunks_of_a_cached_prefix_continue_from_it(make_server, tokenizer):
    server = make_server(chunking=True, prefix_caching=True, max_batch_prefill_tokens=8)
    first = request(P1, max_new_tokens=2, prompt_len=26)
    assert_generation(tokenizer, await server.submit(first), P1, 2)
    assert server.fake.chunks[1] == [(0, 8), (8, 8), (16, 8)]
    # its blocks were cached chunk by chunk: the same prompt again is one prefill of its tail
    again = dataclasses.replace(request(P1, max_new_tokens=2, prompt_len=26),
                                input_ids=first.input_ids)
    assert_generation(tokenizer, await server.submit(again), P1, 2)
    assert 2 not in server.fake.chunks and server.fake.requests[2].cache_len == 24
    await server.check_done()
