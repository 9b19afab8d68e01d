"""`tgi-router`: argv → RouterConfig → start-up → uvicorn serving `create_app(config)`.

Spawned by the launcher after the shards are ready; can also be started alone against running
shards (`tgi-router --tokenizer MODEL --shard-urls /tmp/tgi-server-0 ...`): it clears their
cache, so a restarted router never reloads weights. Given rank 0's address only, it finds the
others through ServiceDiscovery. Start-up (connect, warmup) runs before the HTTP server, so a
failure is one `ERROR: ` line on stderr and exit code 1. SIGTERM/SIGINT: new requests get 503
while those in flight finish (up to `--graceful-timeout`), then exit 0 (`drain.py`).
"""

import asyncio
import logging
import sys

import uvicorn

from tgi_server.launcher.argv import from_argv
from tgi_server.router.app import build_state, create_app
from tgi_server.router.client import ShardedClient
from tgi_server.router.config import RouterConfig
from tgi_server.router.drain import Drain, DrainingServer

logger = logging.getLogger("tgi_server.router")
_FINAL_SHUTDOWN_S = 1


async def serve(config: RouterConfig) -> None:
    client = ShardedClient(config.shard_urls)
    try:
        await client.connect()
        state = await build_state(config, client)
    except Exception as e:  # noqa: BLE001 -- one readable line for the launcher
        logger.debug("start-up failed", exc_info=True)
        print(f"ERROR: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr, flush=True)
        await client.close()
        raise SystemExit(1) from None
    app = Drain(create_app(config, state=state))
    server = DrainingServer(uvicorn.Config(
        app,
        host=config.hostname,
        port=config.port,
        log_level="warning",
        # The drain already waited for the requests in flight; this bounds the last bytes.
        timeout_graceful_shutdown=_FINAL_SHUTDOWN_S,
    ), app, config.graceful_timeout)
    await server.serve()


def main(argv: list[str] | None = None) -> None:
    config = from_argv(RouterConfig, argv, prog="tgi-router")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s router %(name)s: %(message)s")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
