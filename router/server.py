"""`tgi-router`: argv → RouterConfig → start-up → uvicorn serving `create_app(config)`.

Spawned by the launcher after the shards are ready; can also be started alone against running
shards (`tgi-router --tokenizer MODEL --shard-urls /tmp/tgi-server-0 ...`): it clears their
cache, so a restarted router never reloads weights. Start-up (connect, warmup) runs before the
HTTP server, so a failure is one `ERROR: ` line on stderr and exit code 1.
"""

import asyncio
import logging
import sys

import uvicorn

from tgi_server.launcher.argv import from_argv
from tgi_server.router.app import build_state, create_app
from tgi_server.router.client import ShardedClient
from tgi_server.router.config import RouterConfig

logger = logging.getLogger("tgi_server.router")


async def serve(config: RouterConfig) -> None:
    client = ShardedClient(config.shard_urls)
    try:
        state = await build_state(config, client)
    except Exception as e:  # noqa: BLE001 -- one readable line for the launcher
        logger.debug("start-up failed", exc_info=True)
        print(f"ERROR: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr, flush=True)
        await client.close()
        raise SystemExit(1) from None
    server = uvicorn.Server(uvicorn.Config(
        create_app(config, state=state),
        host=config.hostname,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=int(config.graceful_timeout),
    ))
    await server.serve()


def main(argv: list[str] | None = None) -> None:
    config = from_argv(RouterConfig, argv, prog="tgi-router")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s router %(name)s: %(message)s")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
