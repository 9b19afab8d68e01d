"""The shard's gRPC service in process (handlers called directly, no sockets): Decode with
`lookahead` runs the batch's next step before it is asked for, and every call on the batch
(Decode, FilterBatch, ClearCache) sees the same tokens as steps run one at a time."""

import asyncio
import threading
import time

import pytest
import torch

from tgi_server.proto import generate_pb2 as pb
from tgi_server.shard.config import ShardConfig
from tgi_server.shard.distributed import ParallelState
from tgi_server.shard.model_runner import ModelRunner
from tgi_server.shard.models import load_model
from tgi_server.shard.server import TextGenerationService

BLOCK_SIZE = 16
BLOCKS_PER_REQUEST = 4  # 64 tokens: prompt + max_new_tokens below


@pytest.fixture(scope="module")
def service(model_dir):
    path = model_dir("llama")
    model = load_model(path, torch.float32, torch.device("cpu"), ParallelState())
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, BLOCK_SIZE)
    runner.warmup(32, 64, 64 * BLOCK_SIZE, 0.5, 1)
    return TextGenerationService(ShardConfig(model_id=str(path), block_size=BLOCK_SIZE), runner,
                                 [], pb.InfoResponse())


def new_batch(batch_id: int, first_request_id: int, num: int, max_new_tokens: int = 12,
              seed: bool = False) -> pb.Batch:
    requests = []
    for i in range(num):
        rid = first_request_id + i
        sampling = (pb.SamplingParameters(do_sample=True, temperature=0.9, top_k=20, seed=rid)
                    if seed and i % 2 else pb.SamplingParameters())
        requests.append(pb.Request(
            id=rid, input_ids=[(7 * rid + k) % 200 + 3 for k in range(5 + i)],
            sampling=sampling,
            stopping=pb.StoppingParameters(max_new_tokens=max_new_tokens, ignore_eos_token=True),
            block_ids=[rid * BLOCKS_PER_REQUEST + b for b in range(BLOCKS_PER_REQUEST)],
        ))
    return pb.Batch(id=batch_id, requests=requests)


def tokens(response: pb.GenerateResponse) -> dict[int, int]:
    return {g.request_id: g.tokens.ids[0] for g in response.generations}


async def decode(service, batches, lookahead=False) -> pb.GenerateResponse:
    return await service.Decode(pb.DecodeRequest(batches=batches, lookahead=lookahead), None)


async def generate(service, batch: pb.Batch, lookahead: bool) -> dict[int, list[int]]:
    """Every token of `batch`, its finished requests filtered out after each step."""
    out: dict[int, list[int]] = {r.id: [] for r in batch.requests}
    response = await service.Prefill(pb.PrefillRequest(batch=batch), None)
    while True:
        for rid, token in tokens(response).items():
            out[rid].append(token)
        if not response.HasField("batch"):
            break
        cached = response.batch
        finished = {g.request_id for g in response.generations if g.finish_reason}
        if finished:
            assert not cached.ahead  # a batch with finished requests is never run ahead
            keep = [rid for rid in cached.request_ids if rid not in finished]
            filtered = await service.FilterBatch(
                pb.FilterBatchRequest(batch_id=cached.id, request_ids=keep), None)
            cached = filtered.batch
        response = await decode(service, [cached], lookahead)
        assert response.batch.ahead == (lookahead and response.HasField("batch")
                                        and not any(g.finish_reason for g in response.generations))
    assert not service.cache and not service.ahead
    return out


async def test_lookahead_generates_the_same_tokens(service):
    # Greedy and seeded sampling, requests finishing at different steps.
    for lookahead in (False, True):
        batch = new_batch(1, 1, 3, seed=True)
        batch.requests[2].stopping.max_new_tokens = 5
        result = await generate(service, batch, lookahead)
        if not lookahead:
            reference = result
    assert result == reference
    assert [len(t) for t in result.values()] == [12, 12, 5]


async def test_filtering_a_batch_that_ran_ahead_keeps_its_step(service):
    reference = await generate(service, new_batch(1, 1, 3), lookahead=False)

    response = await service.Prefill(pb.PrefillRequest(batch=new_batch(2, 1, 3)), None)
    response = await decode(service, [response.batch], lookahead=True)
    assert response.batch.ahead and 2 in service.ahead
    # Request 2 stopped on the router's side (a stop sequence): its ahead token is dropped.
    filtered = await service.FilterBatch(
        pb.FilterBatchRequest(batch_id=2, request_ids=[1, 3]), None)
    assert filtered.batch.ahead and list(filtered.batch.request_ids) == [1, 3]
    collected = await decode(service, [filtered.batch])
    assert tokens(collected) == {1: reference[1][2], 3: reference[3][2]}
    assert not collected.batch.ahead and not service.ahead
    nxt = await decode(service, [collected.batch])
    assert tokens(nxt) == {1: reference[1][3], 3: reference[3][3]}
    await service.ClearCache(pb.ClearCacheRequest(), None)
    assert not service.cache


async def test_a_decode_mixing_ahead_and_other_batches_is_rejected(service):
    running = await service.Prefill(pb.PrefillRequest(batch=new_batch(3, 1, 1)), None)
    running = await decode(service, [running.batch], lookahead=True)
    joining = await service.Prefill(pb.PrefillRequest(batch=new_batch(4, 2, 1)), None)
    with pytest.raises(ValueError, match="mixes batches"):
        await decode(service, [running.batch, joining.batch])
    assert not service.ahead
    await service.ClearCache(pb.ClearCacheRequest(), None)


async def test_clear_cache_waits_for_the_step_running_ahead(service):
    response = await service.Prefill(pb.PrefillRequest(batch=new_batch(5, 1, 2)), None)
    response = await decode(service, [response.batch], lookahead=True)
    step = service.ahead[5]
    await service.ClearCache(pb.ClearCacheRequest(id=5), None)
    # Its KV blocks go back to the router's allocator: nothing may still write them.
    assert step.done() and not service.ahead and not service.cache
    # The same blocks serve a new batch, with the tokens of a fresh run.
    again = await generate(service, new_batch(6, 1, 2), lookahead=True)
    assert again == await generate(service, new_batch(7, 1, 2), lookahead=False)


async def test_a_failed_step_ahead_is_raised_when_collected(service, monkeypatch):
    response = await service.Prefill(pb.PrefillRequest(batch=new_batch(8, 1, 1)), None)
    real, calls = service.runner.decode, []

    def decode_once_then_fail(batch):
        calls.append(batch)
        if len(calls) > 1:
            raise RuntimeError("out of memory")
        return real(batch)

    monkeypatch.setattr(service.runner, "decode", decode_once_then_fail)
    response = await decode(service, [response.batch], lookahead=True)
    assert response.batch.ahead
    with pytest.raises(RuntimeError, match="out of memory"):
        await decode(service, [response.batch])
    assert not service.cache and not service.ahead


async def test_the_model_thread_goes_on_to_the_next_step_while_the_loop_is_busy(
        service, monkeypatch):
    """Collecting a step that runs ahead queues the next one behind it at once: the model
    thread starts it as soon as the collected step ends, without waiting for the event loop."""
    reference = await generate(service, new_batch(9, 1, 2), lookahead=False)
    real, calls, gate = service.runner.decode, [], threading.Event()

    def gated(batch):
        calls.append(len(batch))
        if len(calls) == 2:  # the first step run ahead waits until the gate opens
            assert gate.wait(10)
        return real(batch)

    monkeypatch.setattr(service.runner, "decode", gated)
    response = await service.Prefill(pb.PrefillRequest(batch=new_batch(10, 1, 2)), None)
    response = await decode(service, [response.batch], lookahead=True)  # step 1, 2 queued
    collect = asyncio.create_task(decode(service, [response.batch], lookahead=True))
    await asyncio.sleep(0.05)  # the collecting call waits for step 2
    threading.Timer(0.05, gate.set).start()
    time.sleep(0.5)  # the loop is busy; only the model thread moves
    assert len(calls) == 3  # step 2 ended and step 3 began meanwhile
    collected = await collect
    assert collected.batch.ahead
    assert tokens(collected) == {1: reference[1][2], 2: reference[2][2]}
    await service.ClearCache(pb.ClearCacheRequest(), None)
    assert not service.cache and not service.ahead


async def test_a_decode_on_a_batch_with_a_finished_request_runs_step_by_step(service):
    """A router that decodes a batch marked ahead without filtering out the request that
    finished (not ours: it filters) gets the step run then, as without lookahead."""
    batch = new_batch(11, 1, 2)
    batch.requests[1].stopping.max_new_tokens = 3
    response = await service.Prefill(pb.PrefillRequest(batch=batch), None)
    while not any(g.finish_reason for g in response.generations):
        response = await decode(service, [response.batch], lookahead=True)
    assert not response.batch.ahead and 11 in service.ahead  # queued, and it skips itself
    stale = pb.CachedBatch()
    stale.CopyFrom(response.batch)
    stale.ahead = True
    nxt = await decode(service, [stale], lookahead=True)
    assert set(tokens(nxt)) == {1, 2} and nxt.batch.id == 11
    await service.ClearCache(pb.ClearCacheRequest(), None)
    assert not service.cache and not service.ahead
