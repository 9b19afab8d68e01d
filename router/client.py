"""gRPC clients of the shards; the only router module that touches protobuf.

Upstream: `batcher.py` and `app.py` (warmup, health). Downstream: every shard's
`TextGenerationService`. `ShardedClient` sends each call to all ranks concurrently, checks
that they agree, and returns rank 0's answer (generations are identical on every rank).
"""

import asyncio
from dataclasses import dataclass

import grpc

from tgi_server.proto import generate_pb2 as pb
from tgi_server.proto import generate_pb2_grpc as pb_grpc
from tgi_server.router.types import FinishReason, ValidRequest

FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_EOS_TOKEN: FinishReason.EOS_TOKEN,
    pb.FINISH_REASON_STOP_SEQUENCE: FinishReason.STOP_SEQUENCE,
}


class ShardError(RuntimeError):
    """A shard failed an RPC or the shards disagree."""


@dataclass(frozen=True, slots=True)
class CachedBatch:
    id: int
    request_ids: tuple[int, ...]
    max_tokens: int
    current_tokens: int
    # The shards already run this batch's next step (see `ShardedClient.decode`).
    ahead: bool = False

    @property
    def size(self) -> int:
        return len(self.request_ids)


@dataclass(frozen=True, slots=True)
class Generation:
    request_id: int
    token_id: int
    logprob: float
    top_tokens: tuple[tuple[int, float], ...]
    finish_reason: FinishReason | None
    # (id, logprob) of each prompt token, on prefill when decoder_input_details was asked.
    prefill_tokens: tuple[tuple[int, float], ...] | None
    # On a step's first token: the drafts the step verified for the request, and how many of
    # them it accepted (the step's other tokens). Speculation only.
    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a Prefill or Decode call returns, with the slowest shard's own timings."""

    generations: list[Generation]
    # None when every request of the batch finished.
    batch: CachedBatch | None
    # The slowest shard's step on its model thread, and its joining of batches (Decode only).
    forward_ns: int = 0
    concat_ns: int = 0


@dataclass(frozen=True, slots=True)
class ShardInfo:
    model_id: str
    model_type: str
    dtype: str
    device_type: str
    block_size: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    world_size: int
    # The shards start a prefill at `Request.cache_len` (prefix caching).
    use_prefix_caching: bool = False
    # The shards stop a prefill at `Request.chunk_len` (chunked prefill).
    support_chunking: bool = False


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One request of a new batch, with the KV blocks the router allocated for it."""

    id: int
    request: ValidRequest
    block_ids: list[int]
    # Prompt tokens whose k/v are already in the first blocks (prefix caching, earlier chunks).
    cache_len: int = 0
    # The prompt tokens after cache_len this prefill computes (0: all the rest).
    chunk_len: int = 0
    prefill_logprobs: bool = False


def request_to_pb(r: BatchRequest) -> pb.Request:
    s, stop = r.request.sampling, r.request.stopping
    return pb.Request(
        id=r.id,
        input_ids=r.request.input_ids,
        sampling=pb.SamplingParameters(
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, typical_p=s.typical_p,
            do_sample=s.do_sample, seed=s.seed, repetition_penalty=s.repetition_penalty,
            frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
            logit_bias=dict(s.logit_bias),
        ),
        stopping=pb.StoppingParameters(
            max_new_tokens=stop.max_new_tokens, ignore_eos_token=stop.ignore_eos_token
        ),
        prefill_logprobs=r.prefill_logprobs,
        top_n_tokens=r.request.top_n_tokens,
        block_ids=r.block_ids,
        cache_len=r.cache_len,
        chunk_len=r.chunk_len,
    )


def cached_batch_from_pb(b: pb.CachedBatch) -> CachedBatch:
    return CachedBatch(b.id, tuple(b.request_ids), b.max_tokens, b.current_tokens, b.ahead)


def cached_batch_to_pb(b: CachedBatch) -> pb.CachedBatch:
    return pb.CachedBatch(id=b.id, request_ids=b.request_ids, size=b.size,
                          max_tokens=b.max_tokens, current_tokens=b.current_tokens, ahead=b.ahead)


def generations_from_pb(g: pb.Generation) -> list[Generation]:
    """One `Generation` per token of the step, in order: several when speculated drafts were
    accepted. The prompt tokens go with the first, the finish reason with the last."""
    prefill = None
    if g.HasField("prefill_tokens"):
        prefill = tuple(zip(g.prefill_tokens.ids, g.prefill_tokens.logprobs))
    last = len(g.tokens.ids) - 1
    return [
        Generation(
            request_id=g.request_id,
            token_id=token_id,
            logprob=logprob,
            top_tokens=tuple(zip(g.top_tokens[i].ids, g.top_tokens[i].logprobs))
            if i < len(g.top_tokens) else (),
            finish_reason=FINISH_REASONS.get(g.finish_reason) if i == last else None,
            prefill_tokens=prefill if i == 0 else None,
            drafted=g.drafted if i == 0 else 0,
            accepted=last if i == 0 else 0,
        )
        for i, (token_id, logprob) in enumerate(zip(g.tokens.ids, g.tokens.logprobs))
    ]


def channel_target(url: str) -> str:
    """A unix socket path (or unix:// URL) or a host:port."""
    if url.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return url
    return f"unix://{url}" if url.startswith("/") else url


class ShardClient:
    """One shard."""

    def __init__(self, url: str):
        self.url = url
        self.channel = grpc.aio.insecure_channel(channel_target(url))
        self.stub = pb_grpc.TextGenerationServiceStub(self.channel)
        self._decodes = None  # the open DecodeStream call, if any

    async def decode(self, request: pb.DecodeRequest) -> pb.GenerateResponse:
        """One Decode over the long-lived DecodeStream (reopened after any failure)."""
        try:
            if self._decodes is None:
                self._decodes = self.stub.DecodeStream()
            await self._decodes.write(request)
            response = await self._decodes.read()
        except grpc.aio.AioRpcError as e:
            self._decodes = None  # the failed call has ended; the next step opens a new one
            raise self._error("Decode", e) from e
        except BaseException:
            # NOTE: a cancelled step leaves the stream out of step: end it.
            if self._decodes is not None:
                self._decodes.cancel()
            self._decodes = None
            raise
        if response is grpc.aio.EOF:
            self._decodes = None
            raise ShardError(f"shard {self.url}: Decode failed: the stream ended")
        return response

    async def call(self, method: str, request, timeout: float | None = None):
        try:
            return await getattr(self.stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(method, e) from e

    def _error(self, method: str, e: grpc.aio.AioRpcError) -> ShardError:
        return ShardError(f"shard {self.url}: {method} failed: {e.details() or e.code().name}")

    async def close(self) -> None:
        if self._decodes is not None:
            self._decodes.cancel()
        await self.channel.close()


class ShardedClient:
    """All shards of one tensor-parallel group, rank 0 first."""

    def __init__(self, urls: list[str] | tuple[str, ...]):
        self.shards = [ShardClient(u) for u in urls]

    async def connect(self) -> None:
        """Complete and check the shard list before first use.

        Given only rank 0's address (TGI's `--master-shard-uds-path`), learn the others from
        its ServiceDiscovery: ranks on other machines serve over TCP (multi-node).
        """
        info = await self.shards[0].call("Info", pb.InfoRequest())
        if len(self.shards) == 1 and info.world_size > 1:
            found = await self.shards[0].call("ServiceDiscovery", pb.ServiceDiscoveryRequest())
            self.shards += [ShardClient(url) for url in found.urls[1:]]
        if len(self.shards) != info.world_size:
            raise ShardError(
                f"{len(self.shards)} shard addresses were given but the shards form a "
                f"tensor-parallel group of {info.world_size}: pass every rank's, or rank 0's only"
            )

    async def _all(self, method: str, request, timeout: float | None = None) -> list:
        return await asyncio.gather(*(s.call(method, request, timeout) for s in self.shards))

    async def info(self) -> ShardInfo:
        responses = await self._all("Info", pb.InfoRequest())
        r = responses[0]
        return ShardInfo(r.model_id, r.model_type, r.dtype, r.device_type, r.block_size,
                         r.vocab_size, r.max_position_embeddings, tuple(r.eos_token_ids),
                         r.world_size, all(s.use_prefix_caching for s in responses),
                         all(s.support_chunking for s in responses))

    async def health(self, timeout: float = 5.0) -> None:
        await self._all("Health", pb.HealthRequest(), timeout)

    async def clear_cache(self, batch_id: int | None = None) -> None:
        await self._all("ClearCache", pb.ClearCacheRequest(id=batch_id))

    async def warmup(self, max_input_tokens: int, max_prefill_tokens: int, max_total_tokens: int,
                     max_batch_total_tokens: int) -> int:
        """Returns the KV blocks every shard can hold (the minimum over ranks)."""
        request = pb.WarmupRequest(
            max_input_tokens=max_input_tokens, max_prefill_tokens=max_prefill_tokens,
            max_total_tokens=max_total_tokens, max_batch_total_tokens=max_batch_total_tokens,
        )
        return min(r.num_blocks for r in await self._all("Warmup", request))

    async def filter_batch(self, batch_id: int, request_ids: list[int]) -> CachedBatch:
        request = pb.FilterBatchRequest(batch_id=batch_id, request_ids=request_ids)
        responses = await self._all("FilterBatch", request)
        return self._agree([cached_batch_from_pb(r.batch) for r in responses])

    async def prefill(self, batch_id: int, requests: list[BatchRequest]):
        batch = pb.Batch(id=batch_id, requests=[request_to_pb(r) for r in requests])
        return self._generated(await self._all("Prefill", pb.PrefillRequest(batch=batch)))

    async def decode(self, batches: list[CachedBatch], lookahead: bool = False):
        """One step of `batches`: either all `ahead` (their step already ran) or none.

        `lookahead`: the shards start the next step of the resulting batch before answering,
        unless a request finished; the returned batch is then `ahead`.
        """
        request = pb.DecodeRequest(batches=[cached_batch_to_pb(b) for b in batches],
                                   lookahead=lookahead)
        # NOTE: every shard's step must end before the next one starts on its stream, so a
        # failure on one rank waits for the others instead of returning at once.
        responses = await asyncio.gather(*(s.decode(request) for s in self.shards),
                                         return_exceptions=True)
        for r in responses:
            if isinstance(r, BaseException):
                raise r
        return self._generated(responses)

    def _generated(self, responses: list) -> StepResult:
        batches = [cached_batch_from_pb(r.batch) if r.HasField("batch") else None for r in responses]
        batch = self._agree(batches)
        return StepResult([one for g in responses[0].generations for one in generations_from_pb(g)],
                          batch,
                          forward_ns=max(r.forward_ns for r in responses),
                          concat_ns=max(r.concat_ns for r in responses))

    @staticmethod
    def _agree(batches: list):
        if any(b != batches[0] for b in batches[1:]):
            raise ShardError(f"shards disagree on the batch state: {batches}")
        return batches[0]

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.shards))
