"""Spawn the shards and wait until each one serves gRPC.

Upstream: `LaunchConfig.to_shard_config(rank)`; downstream: `tgi-shard` (argv from
`to_argv`). A shard is ready when its socket file `{uds_path}-{rank}` exists and its
`Health` RPC answers.
"""

import asyncio
import os
import socket
import stat
from collections.abc import Callable

import grpc

from tgi_server.launcher.argv import to_argv
from tgi_server.launcher.config import LaunchConfig
from tgi_server.launcher.process import Child, ChildFailed, child_env, spawn
from tgi_server.proto import generate_pb2, generate_pb2_grpc
from tgi_server.shard.sharding import ShardingError, check_num_shard, local_config

# Log keywords -> the state shown in the progress display, first match wins.
SHARD_STATES = (
    ("error", "failing"), ("download", "downloading"), ("warm", "warming up"),
    ("load", "loading weights"), ("ready", "serving"), ("serving", "serving"),
)
_POLL_S = 0.1
_HEALTH_TIMEOUT_S = 2.0


def shard_name(rank: int) -> str:
    return f"shard {rank}"


def check_sharding(config: LaunchConfig) -> None:
    """Refuse an impossible split before spawning anything, when config.json is local.

    (A model still to be downloaded is checked by each shard, before its rendezvous.)
    """
    hf_config = local_config(config.model_id, config.revision)
    if hf_config is not None:
        try:
            check_num_shard(hf_config, config.num_shard)
        except ShardingError as e:
            raise ChildFailed(str(e)) from None


async def spawn_shard(
    config: LaunchConfig, rank: int, on_line: Callable[[Child, str], None]
) -> Child:
    shard = config.to_shard_config(rank)
    # Only the torch.distributed rendezvous travels through the environment.
    env = child_env({
        "MASTER_ADDR": shard.master_addr, "MASTER_PORT": str(shard.master_port),
        "RANK": str(rank), "WORLD_SIZE": str(shard.world_size), **config.child_env(),
    })
    argv = [*config.shard_command, *to_argv(shard)]
    return await spawn(shard_name(rank), argv, env, on_line, SHARD_STATES)


async def wait_shard_ready(child: Child, socket_path: str) -> None:
    """Returns once the shard answers `Health` on its socket; loops forever otherwise."""
    while not (os.path.exists(socket_path) and await health(socket_path)):
        await asyncio.sleep(_POLL_S)
    child.mark_ready()


async def health(socket_path: str) -> bool:
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        stub = generate_pb2_grpc.TextGenerationServiceStub(channel)
        try:
            await stub.Health(generate_pb2.HealthRequest(), timeout=_HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
    return True


def clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse if a live one is listening there.

    Without this, a leftover file would make a shard look ready before it even started.
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise ChildFailed(f"{path} exists and is not a socket; pass another --shard-uds-path")
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise ChildFailed(f"a server is already listening on {path}; pass another --shard-uds-path")


def remove_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
