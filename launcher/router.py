"""Spawn the router once every shard is ready, and wait until `GET /health` answers 200.

Upstream: `LaunchConfig.to_router_config()`; downstream: `tgi-router` (argv from `to_argv`),
which connects to the shards, warms them up, then serves HTTP.
"""

import asyncio
import errno
import socket
import urllib.error
import urllib.request
from collections.abc import Callable

from tgi_server.launcher.argv import to_argv
from tgi_server.launcher.config import LaunchConfig
from tgi_server.launcher.process import Child, ChildFailed, child_env, spawn

ROUTER_NAME = "router"
ROUTER_STATES = (("warm", "warming up shards"), ("uvicorn running", "serving"))
_POLL_S = 0.25
_HEALTH_TIMEOUT_S = 2.0


async def spawn_router(config: LaunchConfig, on_line: Callable[[Child, str], None]) -> Child:
    argv = [*config.router_command, *to_argv(config.to_router_config())]
    return await spawn(ROUTER_NAME, argv, child_env(config.child_env()), on_line, ROUTER_STATES)


async def wait_router_ready(child: Child, config: LaunchConfig) -> None:
    """Returns once `/health` answers 200; loops forever otherwise."""
    while not await asyncio.to_thread(_healthy, health_url(config), config.api_key):
        await asyncio.sleep(_POLL_S)
    child.mark_ready()


def _healthy(url: str, api_key: str | None) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=_HEALTH_TIMEOUT_S
        ) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _local_host(hostname: str) -> str:
    """Where to reach a server bound to `hostname` from this machine, URL-ready."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(hostname, hostname)
    return f"[{host}]" if ":" in host else host


def health_url(config: LaunchConfig) -> str:
    return f"http://{_local_host(config.hostname)}:{config.port}/health"


def public_url(config: LaunchConfig) -> str:
    host = f"[{config.hostname}]" if ":" in config.hostname else config.hostname
    return f"http://{host}:{config.port}"


def check_port_free(hostname: str, port: int) -> None:
    """Fail before loading any weights if the router could not bind its port anyway."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option as the router's server: a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((hostname, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ChildFailed(
                    f"port {port} is already in use on {hostname}; pass another --port"
                ) from None
            if err.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
                raise ChildFailed(f"cannot listen on {hostname}:{port}: {err.strerror}") from None
