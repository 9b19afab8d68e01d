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
from tgi_server.router import tracing
from tgi_server.router.app import build_state, create_app
from tgi_server.router.client import ShardedClient
from tgi_server.router.config import RouterConfig
from tgi_server.router.drain import Drain, DrainingServer
from tgi_server.router.metrics import METRICS_MEDIA_TYPE, Metrics

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
    metrics_server = await serve_metrics_port(config, state.metrics)
    spans = tracing.init(config.otlp_endpoint, config.otlp_service_name) \
        if config.otlp_endpoint else None
    server = DrainingServer(uvicorn.Config(
        app,
        host=config.hostname,
        port=config.port,
        log_level="warning",
        # The drain already waited for the requests in flight; this bounds the last bytes.
        timeout_graceful_shutdown=_FINAL_SHUTDOWN_S,
    ), app, config.graceful_timeout)
    try:
        await server.serve()
    finally:
        if metrics_server is not None:
            metrics_server.close()
        if spans is not None:
            spans.shutdown()  # flushes the spans still batched


async def serve_metrics_port(config: RouterConfig, metrics: Metrics) -> asyncio.Server | None:
    """`/metrics` again on `--prometheus-port`, as TGI serves it (any path answers there).

    A port already taken is a warning, not a failed start: /metrics on the API port stays.
    """
    if not config.prometheus_port:
        return None

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            if request.startswith((b"GET ", b"HEAD ")):
                body = metrics.render()
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: {METRICS_MEDIA_TYPE}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
                writer.write(head.encode() + (b"" if request.startswith(b"HEAD ") else body))
            else:
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_server(answer, config.hostname, config.prometheus_port)
    except OSError as e:
        logger.warning("metrics not served on --prometheus-port %d (%s); /metrics on port %d "
                       "still answers", config.prometheus_port, e.strerror, config.port)
        return None


def main(argv: list[str] | None = None) -> None:
    config = from_argv(RouterConfig, argv, prog="tgi-router")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s router %(name)s: %(message)s")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
