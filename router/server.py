"""`tgi-router`: argv → RouterConfig → uvicorn serving `create_app(config)`.

Spawned by the launcher after the shards are ready; can also be started alone against running
shards (`tgi-router --tokenizer MODEL --shard-urls /tmp/tgi-server-0 ...`).
"""

import logging
import sys

import uvicorn

from tgi_server.launcher.argv import from_argv
from tgi_server.router.app import create_app
from tgi_server.router.config import RouterConfig


def main(argv: list[str] | None = None) -> None:
    config = from_argv(RouterConfig, argv, prog="tgi-router")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s router %(name)s: %(message)s")
    uvicorn.run(
        create_app(config),
        host=config.hostname,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=int(config.graceful_timeout),
        # NOTE: a lifespan failure (no shard, warmup OOM) must stop the process, not serve.
        lifespan="on",
    )


if __name__ == "__main__":
    main()
