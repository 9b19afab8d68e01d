"""The router app over a recording `FakeShardClient`, in-process (httpx.ASGITransport)."""

import contextlib
from dataclasses import dataclass

import httpx
from fake_shard import FakeShardClient
from starlette.applications import Starlette

from tgi_server.router.app import RouterState, create_app
from tgi_server.router.config import RouterConfig

MODEL_ID = "fake-org/fake-model"


class RecordingShard(FakeShardClient):
    """The fake shard, also keeping every prefilled `ValidRequest` (sampling, stopping)."""

    def __init__(self, **kw):
        super().__init__(block_size=4, num_blocks=256, max_position_embeddings=256, **kw)
        self.valid_requests = []

    async def prefill(self, batch_id, requests):
        self.valid_requests += [r.request for r in requests]
        return await super().prefill(batch_id, requests)


@dataclass
class Router:
    http: httpx.AsyncClient
    fake: RecordingShard
    state: RouterState
    app: Starlette


@contextlib.asynccontextmanager
async def serve(tokenizer, fake: RecordingShard | None = None, **config):
    fake = fake or RecordingShard()
    app = create_app(RouterConfig(tokenizer="unused", shard_urls=(), model_id=MODEL_ID, **config),
                     client=fake, tokenizer=tokenizer)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
            yield Router(http, fake, app.state.router, app)
