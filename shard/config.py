"""Per-process configuration of one shard, built by the launcher and passed as argv."""

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardConfig:
    """Configuration of one tensor-parallel shard process."""

    model_id: str
    revision: str | None = None
    # float32 | bfloat16 | float16 | auto (bfloat16 on CUDA and on CPUs with AVX512-BF16 or
    # AMX, else float32)
    dtype: str = "auto"
    # cpu | cuda | auto
    device: str = "auto"
    rank: int = 0
    world_size: int = 1
    # The shard serves gRPC on unix://{uds_path}-{rank}.
    uds_path: str = "/tmp/tgi-server"
    master_addr: str = "localhost"
    master_port: int = 29500
    block_size: int = 16
    # Share of the memory left after loading the model that the KV cache may take.
    memory_fraction: float = 0.8
    # CPU threads for torch; None: the machine's cores divided by world_size.
    num_threads: int | None = None
    trust_remote_code: bool = False
    # No C++ CPU kernels (cpu_kernels.py): oneDNN, SDPA and torch ops, weights held once.
    disable_custom_kernels: bool = False
    # Draft tokens a decode step may verify per request, copied from the request's own earlier
    # tokens (n-gram speculation, shard/speculation.py); 0: none.
    speculate: int = 0
    # TGI's rope override, replacing the config's rope scaling: linear or dynamic, and its
    # factor (`--rope-factor` alone: linear; `--rope-scaling` alone: factor 1).
    rope_scaling: str | None = None
    rope_factor: float | None = None
    # Also serve gRPC over TCP on grpc_host:grpc_port (None: the unix socket only), so a router
    # on another machine can reach this shard (multi-node, `tgi-router --shard-urls host:port`).
    grpc_port: int | None = None
    grpc_host: str = "0.0.0.0"

    @property
    def socket_path(self) -> str:
        return f"{self.uds_path}-{self.rank}"

    @property
    def listen_addresses(self) -> list[str]:
        """gRPC addresses to serve on: the unix socket, and host:port when `grpc_port` is set."""
        addresses = [f"unix://{self.socket_path}"]
        if self.grpc_port is not None:
            addresses.append(host_port(self.grpc_host, self.grpc_port))
        return addresses


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def for_rank(self, rank: int) -> "ShardConfig":
        return dataclasses.replace(self, rank=rank)
