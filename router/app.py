"""`create_app(config)`: the router's Starlette app and its start-up.

Start-up (lifespan): connect to the shards, clear their cache (a restarted router never
reloads weights), read their info, resolve the token limits, warm them up (which sizes the KV
cache), then build the allocator, queue, batcher and `Infer` and start the batching loop.
Upstream: `server.py` (uvicorn). Downstream: `routes.py` handlers read `app.state.router`.
"""

import asyncio
import contextlib
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from tgi_server.router.batcher import Batcher, BatchingConfig
from tgi_server.router.block_allocator import BlockAllocator
from tgi_server.router.client import ShardedClient, ShardInfo
from tgi_server.router.config import RouterConfig
from tgi_server.router.guard import RequestGuard
from tgi_server.router.infer import Infer
from tgi_server.router.metrics import Metrics
from tgi_server.router.queue import Queue
from tgi_server.router.tokenizer import load_tokenizer
from tgi_server.router.tracing import TracingMiddleware
from tgi_server.router.validation import Validator

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_PREFILL_TOKENS = 4096


class StartupError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Limits:
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int


@dataclass
class RouterState:
    """Everything the handlers need, built once at start-up."""

    config: RouterConfig
    client: ShardedClient
    info: ShardInfo
    tokenizer: object
    limits: Limits
    max_batch_total_tokens: int
    validator: Validator
    batcher: Batcher
    infer: Infer
    metrics: Metrics
    # Tokenization and validation run here, off the event loop (`--validation-workers`).
    validation_pool: ThreadPoolExecutor

    async def in_validation_pool(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(
            self.validation_pool, functools.partial(fn, *args, **kwargs))


def chunking(config: RouterConfig, info: ShardInfo) -> bool:
    return config.prefill_chunking and info.support_chunking


def resolve_limits(config: RouterConfig, info: ShardInfo) -> Limits:
    """TGI's rules: total defaults to the model's context, input to total - 1."""
    max_total = config.max_total_tokens or info.max_position_embeddings
    max_input = config.max_input_tokens or max_total - 1
    if max_input >= max_total:
        raise StartupError(f"--max-input-tokens ({max_input}) must be < --max-total-tokens ({max_total})")
    if max_total > info.max_position_embeddings:
        logger.warning("--max-total-tokens %d exceeds the model's max_position_embeddings %d",
                       max_total, info.max_position_embeddings)
    max_prefill = config.max_batch_prefill_tokens or max(max_input, DEFAULT_MAX_BATCH_PREFILL_TOKENS)
    if max_prefill < max_input and not chunking(config, info):
        raise StartupError(
            f"--max-batch-prefill-tokens ({max_prefill}) must be >= --max-input-tokens ({max_input})"
        )
    return Limits(max_input, max_total, max_prefill)


async def warm_up(config: RouterConfig, client: ShardedClient, info: ShardInfo,
                  limits: Limits) -> tuple[Limits, int]:
    """Warm the shards up; returns the limits fitted to the KV cache and its block count."""
    num_blocks = await client.warmup(
        limits.max_input_tokens, limits.max_batch_prefill_tokens, limits.max_total_tokens,
        config.max_batch_total_tokens or 0,
    )
    capacity = num_blocks * info.block_size
    if capacity < limits.max_total_tokens:
        if config.max_total_tokens:
            raise StartupError(
                f"The KV cache holds {capacity} tokens, fewer than --max-total-tokens "
                f"({limits.max_total_tokens}): lower it or give the cache more memory"
            )
        limits = Limits(min(limits.max_input_tokens, capacity - 1), capacity,
                        limits.max_batch_prefill_tokens)
    logger.info("warmed up: %d KV blocks (%d tokens), max input %d, max total %d",
                num_blocks, capacity, limits.max_input_tokens, limits.max_total_tokens)
    return limits, num_blocks


async def build_state(config: RouterConfig, client: ShardedClient, tokenizer=None) -> RouterState:
    await client.clear_cache()
    info = await client.info()
    tokenizer = tokenizer or await asyncio.to_thread(load_tokenizer, config.tokenizer, config.revision)
    limits, num_blocks = await warm_up(config, client, info, resolve_limits(config, info))
    metrics = Metrics()
    allocator = BlockAllocator(num_blocks, info.block_size)
    queue = Queue(allocator, prefix_caching=config.prefix_caching and info.use_prefix_caching,
                  prefill_logprobs=config.enable_prefill_logprobs,
                  chunking=chunking(config, info))
    max_batch_total_tokens = num_blocks * info.block_size
    metrics.batch_max_total_tokens.set(max_batch_total_tokens)
    batching = BatchingConfig(
        max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
        max_batch_total_tokens=max_batch_total_tokens,
        max_batch_size=config.max_batch_size,
        max_waiting_tokens=config.max_waiting_tokens,
        waiting_served_ratio=config.waiting_served_ratio,
        enable_prefill_logprobs=config.enable_prefill_logprobs,
        lookahead=not config.disable_lookahead,
    )
    batcher = Batcher(client, queue, allocator, tokenizer, batching, metrics)
    return RouterState(
        config=config, client=client, info=info, tokenizer=tokenizer, limits=limits,
        max_batch_total_tokens=max_batch_total_tokens,
        validator=Validator(config, tokenizer, limits.max_input_tokens, limits.max_total_tokens,
                            max_prefill_tokens=limits.max_batch_prefill_tokens),
        batcher=batcher,
        infer=Infer(queue, batcher, metrics, config.max_concurrent_requests),
        metrics=metrics,
        validation_pool=ThreadPoolExecutor(config.validation_workers,
                                           thread_name_prefix="validation"),
    )


def create_app(config: RouterConfig, client: ShardedClient | None = None, tokenizer=None,
               state: RouterState | None = None) -> Starlette:
    """The app; start-up happens in its lifespan unless a built `state` is given."""
    from tgi_server.router import openapi
    from tgi_server.router.openai import routes as openai
    from tgi_server.router.openai.serving import OpenAIServing
    from tgi_server.router.routes import exception_handlers, routes

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        shards = client or ShardedClient(config.shard_urls)
        app.state.router = state or await build_state(config, shards, tokenizer)
        app.state.openai = OpenAIServing.build(app.state.router)
        task = asyncio.create_task(app.state.router.batcher.run(), name="batcher")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if client is None:
                await app.state.router.client.close()
            app.state.router.validation_pool.shutdown(wait=False)

    # NOTE: TGI's CORS: any origin unless `--cors-allow-origin` lists them, GET and POST, the
    # content-type header (and authorization here, so that browsers can send an API key).
    cors = Middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origin) or ["*"],
                      allow_methods=["GET", "POST"], allow_headers=["content-type", "authorization"])
    guard = Middleware(RequestGuard, api_key=config.api_key, payload_limit=config.payload_limit)
    return Starlette(routes=routes() + openai.routes() + openapi.routes(),
                     middleware=[cors, Middleware(TracingMiddleware), guard],
                     exception_handlers=exception_handlers(), lifespan=lifespan)
