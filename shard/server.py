"""The shard's gRPC service: protobuf in and out, batches kept by id, work done by the runner.

Upstream: the router's `client.py`, over a unix socket (or TCP). Downstream: `model_runner.py`.
Model work runs on one worker thread, so the event loop keeps answering Health while a step
runs, and steps never overlap. A Decode asked to look ahead queues the batch's next step on that
thread before it answers; the step's tokens wait in `ahead` for the next call on the batch. A
Decode that collects such a step and looks ahead again queues the next one behind it at once, so
in the steady state the thread goes from step to step without waiting for the event loop.
"""

import asyncio
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import grpc
import torch

from tgi_server.proto import generate_pb2 as pb
from tgi_server.proto import generate_pb2_grpc as pb_grpc
from tgi_server.shard.batch import Batch
from tgi_server.shard.config import ShardConfig
from tgi_server.shard.model_runner import ModelRunner, StepOutput

logger = logging.getLogger(__name__)


def generation_to_pb(out: StepOutput) -> pb.Generation:
    gen = pb.Generation(
        request_id=out.request_id,
        tokens=pb.Tokens(ids=out.token_ids, logprobs=out.logprobs),
        finish_reason=out.finish_reason,
        drafted=out.drafted,
    )
    for ids, logprobs in zip(out.top_token_ids, out.top_logprobs):
        if ids:
            gen.top_tokens.append(pb.Tokens(ids=ids, logprobs=logprobs))
    if out.prefill_token_ids is not None:
        gen.prefill_tokens.CopyFrom(pb.Tokens(ids=out.prefill_token_ids, logprobs=out.prefill_logprobs))
    return gen


class AheadStep(NamedTuple):
    """A decode step that ran ahead, as the model thread left it."""

    outputs: list[StepOutput]
    forward_ns: int
    state: pb.CachedBatch | None  # the batch after the step; None when no request is left
    ended: bool  # a request finished in the step: the router filters before the next one


class TextGenerationService(pb_grpc.TextGenerationServiceServicer):
    def __init__(self, config: ShardConfig, runner: ModelRunner, urls: list[str],
                 info: pb.InfoResponse, executor: ThreadPoolExecutor | None = None):
        self.config = config
        self.runner = runner
        self.urls = urls
        self.info = info
        self.cache: dict[int, Batch] = {}
        # Batch id -> its next decode step, queued or running on the model thread (lookahead).
        # While it is there the step owns the cached Batch: every call on it awaits it first.
        self.ahead: dict[int, asyncio.Future] = {}
        # The one thread that runs the model (cli.py loads the model on it too).
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def _run(self, fn, *args):
        return await self._guard(
            asyncio.get_running_loop().run_in_executor(self.executor, fn, *args))

    async def _guard(self, work: asyncio.Future):
        try:
            return await work
        except Exception as e:
            if self.config.world_size > 1:
                exit_broken_group(e)
            raise

    async def Info(self, request, context):
        return self.info

    async def Health(self, request, context):
        await self._run(lambda: torch.zeros(2, device=self.runner.device).sum().item())
        return pb.HealthResponse()

    async def ServiceDiscovery(self, request, context):
        return pb.ServiceDiscoveryResponse(urls=self.urls)

    async def ClearCache(self, request, context):
        ids = [request.id] if request.HasField("id") else list(self.cache)
        for batch_id in ids:
            self.cache.pop(batch_id, None)
            ahead = self.ahead.pop(batch_id, None)
            if ahead is not None:
                # The dropped batch's step must end before its KV blocks are handed out again.
                await asyncio.gather(ahead, return_exceptions=True)
        return pb.ClearCacheResponse()

    async def FilterBatch(self, request, context):
        batch, ran = await self._take(request.batch_id)
        keep = list(request.request_ids)
        batch = batch.filter(keep)
        self.cache[batch.batch_id] = batch
        cached = batch.to_pb()
        if ran is not None:
            kept = set(keep)
            outputs = [o for o in ran.outputs if o.request_id in kept]
            done = asyncio.get_running_loop().create_future()
            done.set_result(AheadStep(outputs, ran.forward_ns, _state(batch), bool(batch.finished)))
            self.ahead[batch.batch_id] = done
            cached.ahead = True
        return pb.FilterBatchResponse(batch=cached)

    async def Warmup(self, request, context):
        if self.cache:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "warmup with batches in flight")
        num_blocks = await self._run(
            self.runner.warmup,
            request.max_input_tokens,
            request.max_prefill_tokens,
            request.max_batch_total_tokens,
            self.config.memory_fraction,
            self.config.world_size,
        )
        return pb.WarmupResponse(
            num_blocks=num_blocks,
            block_size=self.config.block_size,
            max_prefill_tokens=request.max_prefill_tokens,
        )

    async def Prefill(self, request, context):
        start = time.perf_counter_ns()
        batch = Batch.from_pb(request.batch, self.runner.vocab_size, self.runner.device)
        outputs, forward_ns = await self._step(self.runner.prefill, batch)
        if batch.chunked:
            # NOTE: their k/v is in the cache now; the token sampled after a chunk is no
            # generation, and the router sends the rest of the prompt in a later Prefill.
            outputs = [o for o in outputs if o.request_id not in batch.chunked]
            batch = batch.filter([rid for rid in batch.request_ids if rid not in batch.chunked])
        return self._respond(self._keep(batch) if len(batch) else None, outputs, start,
                             forward_ns)

    async def Decode(self, request, context):
        return await self._decode(request, context)

    async def DecodeStream(self, request_iterator, context):
        async for request in request_iterator:
            yield await self._decode(request, context)

    async def _decode(self, request, context) -> pb.GenerateResponse:
        start = time.perf_counter_ns()
        if (request.lookahead and len(request.batches) == 1 and request.batches[0].ahead
                and request.batches[0].id in self.ahead):
            response = await self._decode_chained(request.batches[0].id, start)
            if response is not None:
                return response
        taken = [await self._take(b.id) for b in request.batches]
        ran = [r for _, r in taken if r is not None]
        if ran and len(ran) < len(taken):
            raise ValueError("Decode mixes batches whose next step already ran (lookahead) "
                             "with batches whose step did not")
        batch = Batch.concatenate([b for b, _ in taken])
        concat_ns = time.perf_counter_ns() - start
        if ran:
            outputs = [o for r in ran for o in r.outputs]
            forward_ns = sum(r.forward_ns for r in ran)
        else:
            outputs, forward_ns = await self._step(self.runner.decode, batch)
        cached = self._keep(batch)
        ahead = request.lookahead and cached is not None and not batch.finished
        if ahead:
            # NOTE: the response reads only `cached` and the outputs, taken before the step
            # queued here can change the batch.
            self.ahead[batch.batch_id] = self._queue_ahead(batch)
        response = self._respond(cached, outputs, start, forward_ns)
        response.concat_ns = concat_ns
        if ahead:
            response.batch.ahead = True
        return response

    async def _decode_chained(self, batch_id: int, start: int) -> pb.GenerateResponse | None:
        """The steady state of lookahead: the router collects the step that ran ahead on its
        one batch and asks for the next. That next step is queued behind the running one right
        away, so the model thread goes from one step to the next without waiting for this
        loop (a wake-up and this response, ~1 ms a step on 2 cores: NOTES 33); it skips
        itself if a request finishes in the step before, as the router then filters first.
        None (the batch back in the cache) when the step collected here did not run."""
        batch = self._pop(batch_id)
        running = self.ahead.pop(batch_id)
        self.ahead[batch_id] = self._queue_ahead(batch)
        try:
            ran = await running
        except Exception:
            # The batch is dropped, as any batch whose step failed; its next step ends first.
            await asyncio.gather(self.ahead.pop(batch_id), return_exceptions=True)
            raise
        if ran is None:  # a request had finished: not reached when the router filters first
            await self.ahead.pop(batch_id)  # it found the same request and did not run either
            self.cache[batch_id] = batch
            return None
        if ran.state is None:  # every request finished: the step queued above skips itself
            await self.ahead.pop(batch_id)
        else:
            self.cache[batch_id] = batch
        response = self._respond(ran.state, ran.outputs, start, ran.forward_ns)
        if ran.state is not None and not ran.ended:
            response.batch.ahead = True
        return response

    def _queue_ahead(self, batch: Batch) -> asyncio.Future:
        """The batch's next decode step on the model thread, after whatever is queued there;
        it gives an `AheadStep`, or None when it found a finished request and did not run."""
        def step() -> AheadStep | None:
            if batch.finished:
                return None
            outputs, forward_ns = _timed(self.runner.decode, batch)
            return AheadStep(outputs, forward_ns, _state(batch), bool(batch.finished))
        return asyncio.ensure_future(self._guard(
            asyncio.get_running_loop().run_in_executor(self.executor, step)))

    async def _take(self, batch_id: int) -> tuple[Batch, "AheadStep | None"]:
        """Pops a cached batch, and its step that ran ahead, if one did."""
        batch = self._pop(batch_id)
        ahead = self.ahead.pop(batch_id, None)
        return batch, (await ahead if ahead is not None else None)

    async def _step(self, fn, batch: Batch) -> tuple[list[StepOutput], int]:
        """Runs a step on the model thread; also returns the time it took there."""
        return await self._run(_timed, fn, batch)

    def _pop(self, batch_id: int) -> Batch:
        batch = self.cache.pop(batch_id, None)
        if batch is None:
            # NOTE: an unknown id is a router bug or a router talking to a restarted shard.
            raise KeyError(f"batch {batch_id} not found in the shard's cache")
        return batch

    def _keep(self, batch: Batch) -> pb.CachedBatch | None:
        """Caches `batch` while any of its requests is unfinished; its state for the router."""
        state = _state(batch)
        if state is not None:
            self.cache[batch.batch_id] = batch
        return state

    def _respond(self, cached: pb.CachedBatch | None, outputs: list[StepOutput], start_ns: int,
                 forward_ns: int) -> pb.GenerateResponse:
        response = pb.GenerateResponse(generations=[generation_to_pb(o) for o in outputs])
        if cached is not None:
            response.batch.CopyFrom(cached)
        response.forward_ns = forward_ns
        response.total_ns = time.perf_counter_ns() - start_ns
        return response


def _timed(fn, batch: Batch) -> tuple[list[StepOutput], int]:
    """fn(batch), and the nanoseconds it took."""
    start = time.perf_counter_ns()
    outputs = fn(batch)
    return outputs, time.perf_counter_ns() - start


def _state(batch: Batch) -> pb.CachedBatch | None:
    """The batch as the router tracks it; None when none of its requests is unfinished."""
    return batch.to_pb() if len(batch.finished) < len(batch) else None


def exit_broken_group(error: Exception) -> None:
    """A failed step leaves the ranks out of step in their collectives (or a peer is gone):
    the group cannot recover, so the shard exits and its launcher stops the whole server."""
    logger.error("model step failed", exc_info=error)
    reason = f"{type(error).__name__}: {error}".replace("\n", " ")
    print(f"ERROR: tensor-parallel step failed, stopping this shard: {reason}",
          file=sys.stderr, flush=True)
    os._exit(1)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turn exceptions in handlers into INTERNAL errors carrying the exception's text."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def wrapper(request, context):
            try:
                return await inner(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as e:  # noqa: BLE001 -- reported to the router, logged here
                logger.exception("%s failed", handler_call_details.method)
                await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

        return grpc.unary_unary_rpc_method_handler(
            wrapper,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def serve(service: TextGenerationService, addresses: list[str]) -> None:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    pb_grpc.add_TextGenerationServiceServicer_to_server(service, server)
    for address in addresses:
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind to address ..."
            bound = 0
        if not bound:
            raise OSError(f"cannot serve gRPC on {address}: address in use or not available")
    await server.start()
    logger.info("serving on %s", ", ".join(addresses))
    await server.wait_for_termination()
