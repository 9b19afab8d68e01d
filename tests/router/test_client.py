"""`ShardedClient` over real gRPC (unix sockets and TCP) against scripted shard servicers:
every RPC reaches all ranks concurrently, their batch states must agree, generations come
from rank 0, and rank 0's ServiceDiscovery completes a partial address list."""

import asyncio
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from tgi_server.proto import generate_pb2 as pb
from tgi_server.proto import generate_pb2_grpc as pb_grpc
from tgi_server.router.client import CachedBatch, ShardedClient, ShardError, generations_from_pb
from tgi_server.router.types import FinishReason


class ScriptedShard(pb_grpc.TextGenerationServiceServicer):
    """Rank `rank` of `world_size`: answers with its rank in the token ids it generates."""

    def __init__(self, rank: int, world_size: int, barrier: asyncio.Barrier) -> None:
        self.rank, self.world_size, self.barrier = rank, world_size, barrier
        self.urls: list[str] = []
        self.current_tokens = 7  # what Decode reports; a test makes one rank disagree
        self.calls: list[str] = []
        self.streams = 0  # DecodeStream calls opened

    async def Info(self, request, context):
        return pb.InfoResponse(model_id="m", world_size=self.world_size, block_size=16)

    async def ServiceDiscovery(self, request, context):
        return pb.ServiceDiscoveryResponse(urls=self.urls)

    async def ClearCache(self, request, context):
        self.calls.append("ClearCache")
        return pb.ClearCacheResponse()

    async def DecodeStream(self, request_iterator, context):
        self.streams += 1
        async for request in request_iterator:
            yield await self.Decode(request, context)

    async def Decode(self, request, context):
        self.calls.append("Decode")
        if request.batches[0].id == 99:
            await context.abort(grpc.StatusCode.NOT_FOUND, "batch 99 not found")
        # Every rank must be inside Decode at the same time (as in a real collective), or
        # this wait never ends: a client calling the ranks one after another would hang.
        await asyncio.wait_for(self.barrier.wait(), 5)
        batch = pb.CachedBatch(id=1, request_ids=[3], size=1, max_tokens=32,
                               current_tokens=self.current_tokens)
        generation = pb.Generation(request_id=3, tokens=pb.Tokens(ids=[100 + self.rank],
                                                                   logprobs=[-0.5]))
        return pb.GenerateResponse(generations=[generation], batch=batch)


@pytest.fixture
async def shards():
    """Two ranks: rank 0 on a unix socket, rank 1 over TCP on 127.0.0.1."""
    barrier = asyncio.Barrier(2)
    servicers = [ScriptedShard(rank, 2, barrier) for rank in range(2)]
    tmp = Path(tempfile.mkdtemp(prefix="tgi-client-", dir="/tmp"))
    servers, urls = [], [str(tmp / "s-0")]
    for rank, servicer in enumerate(servicers):
        server = grpc.aio.server()
        pb_grpc.add_TextGenerationServiceServicer_to_server(servicer, server)
        if rank == 0:
            server.add_insecure_port(f"unix://{urls[0]}")
        else:
            urls.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        servers.append(server)
    for servicer in servicers:
        servicer.urls = urls
    yield servicers, urls
    for server in servers:
        await server.stop(0)
    shutil.rmtree(tmp, ignore_errors=True)


async def test_fan_out_is_concurrent_and_generations_come_from_rank_0(shards):
    servicers, urls = shards
    client = ShardedClient(urls)
    await client.connect()
    batch = CachedBatch(1, (3,), 32, 6)
    result = await client.decode([batch])
    assert [g.token_id for g in result.generations] == [100]  # rank 0's, not rank 1's 101
    assert result.batch == CachedBatch(1, (3,), 32, 7)
    await client.clear_cache()
    assert [s.calls for s in servicers] == [["Decode", "ClearCache"]] * 2
    await client.close()


async def test_disagreeing_ranks_are_an_error(shards):
    servicers, urls = shards
    servicers[1].current_tokens = 8
    client = ShardedClient(urls)
    with pytest.raises(ShardError, match="shards disagree on the batch state"):
        await client.decode([CachedBatch(1, (3,), 32, 6)])
    await client.close()


async def test_rank_0_address_alone_finds_the_others(shards):
    servicers, urls = shards
    client = ShardedClient(urls[:1])
    await client.connect()
    assert [s.url for s in client.shards] == urls  # rank 1 over TCP, from ServiceDiscovery
    result = await client.decode([CachedBatch(1, (3,), 32, 6)])
    assert [g.token_id for g in result.generations] == [100]
    await client.close()


async def test_wrong_number_of_addresses_is_a_clear_error(shards):
    _, urls = shards
    client = ShardedClient([*urls, urls[1]])
    with pytest.raises(ShardError, match="3 shard addresses were given but the shards form a "
                                         "tensor-parallel group of 2"):
        await client.connect()
    await client.close()


async def test_decodes_share_one_stream_until_a_step_fails(shards):
    servicers, urls = shards
    client = ShardedClient(urls)
    await client.connect()
    for _ in range(3):
        result = await client.decode([CachedBatch(1, (3,), 32, 6)])
        assert [g.token_id for g in result.generations] == [100]
    assert [s.streams for s in servicers] == [1, 1]
    with pytest.raises(ShardError, match="batch 99 not found"):
        await client.decode([CachedBatch(99, (3,), 32, 6)])
    result = await client.decode([CachedBatch(1, (3,), 32, 6)])  # on a new stream
    assert [g.token_id for g in result.generations] == [100]
    assert [s.streams for s in servicers] == [2, 2]
    await client.close()


def test_a_generation_of_several_tokens_becomes_one_per_token():
    g = pb.Generation(
        request_id=4,
        prefill_tokens=pb.Tokens(ids=[1, 2], logprobs=[float("nan"), -0.5]),
        tokens=pb.Tokens(ids=[7, 8, 9], logprobs=[-0.1, -0.2, -0.3]),
        top_tokens=[pb.Tokens(ids=[7, 3], logprobs=[-0.1, -2.0]),
                    pb.Tokens(ids=[8, 3], logprobs=[-0.2, -2.5]),
                    pb.Tokens(ids=[9, 4], logprobs=[-0.3, -3.0])],
        finish_reason=pb.FINISH_REASON_LENGTH,
        drafted=4,
    )
    ones = generations_from_pb(g)
    assert [(o.drafted, o.accepted) for o in ones] == [(4, 2), (0, 0), (0, 0)]
    assert [(o.request_id, o.token_id) for o in ones] == [(4, 7), (4, 8), (4, 9)]
    assert [o.logprob for o in ones] == pytest.approx([-0.1, -0.2, -0.3])
    assert [[t for t, _ in o.top_tokens] for o in ones] == [[7, 3], [8, 3], [9, 4]]
    assert [o.finish_reason for o in ones] == [None, None, FinishReason.LENGTH]
    assert ones[0].prefill_tokens[1] == (2, -0.5) and ones[1].prefill_tokens is None
