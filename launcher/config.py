"""`LaunchConfig`: the one source of configuration, built by `cli.py` from TGI's flags.

Downstream, the launcher derives every child's config from it: `to_shard_config(rank)` and
`to_router_config()`, which `argv.to_argv` turns into the children's command lines.
"""

import dataclasses
import os
import socket
import sys
from dataclasses import dataclass

from tgi_server.router.config import RouterConfig
from tgi_server.shard.config import ShardConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")

# NOTE: `sys.executable -m ...` rather than the `tgi-shard` / `tgi-router` scripts, so the
# children run in the launcher's own interpreter whatever PATH holds.
SHARD_COMMAND = (sys.executable, "-m", "tgi_server.shard.cli")
ROUTER_COMMAND = (sys.executable, "-m", "tgi_server.router.server")


@dataclass(frozen=True)
class LaunchConfig:
    """Everything `tgi-launch` was asked for. `None` means "decided later" (see `resolved`)."""

    model_id: str
    revision: str | None = None
    num_shard: int = 1
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    disable_custom_kernels: bool = False
    # Network. None: a unique socket path / a free port, picked by `resolved()`.
    hostname: str = "0.0.0.0"
    port: int = 3000
    shard_uds_path: str | None = None
    master_addr: str = "localhost"
    master_port: int | None = None
    # Multi-node: this machine runs ranks [node_rank * k, (node_rank + 1) * k) of the
    # num_shard ranks, k = num_shard / nnodes; only node 0 runs the router.
    nnodes: int = 1
    node_rank: int = 0
    # Shards also serve gRPC over TCP on port shard_grpc_port + rank (default: master_port + 1
    # when nnodes > 1, else unix sockets only), so node 0's router reaches the other nodes.
    shard_grpc_port: int | None = None
    # Request limits (TGI's names and defaults).
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000
    # Continuous batching budgets.
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_batch_size: int | None = None
    max_waiting_tokens: int = 20
    waiting_served_ratio: float = 0.3
    enable_prefill_logprobs: bool = False
    disable_lookahead: bool = False
    prefix_caching: bool = True
    prefill_chunking: bool = True
    # N-gram speculation: draft tokens per request and step (TGI's `--speculate`); None: none.
    speculate: int | None = None
    # TGI's rope override (replaces the config's rope scaling): linear or dynamic, and a factor.
    rope_scaling: str | None = None
    rope_factor: float | None = None
    api_key: str | None = None
    # OpenAI API: chat template file override; names clients may ask for (default: model id).
    chat_template: str | None = None
    served_model_name: tuple[str, ...] = ()
    # Shard runtime.
    block_size: int = 16
    memory_fraction: float = 0.8
    num_threads: int | None = None
    # Operations.
    graceful_termination_timeout: float = 90.0
    json_output: bool = False
    validation_workers: int = 2
    prometheus_port: int = 9000
    huggingface_hub_cache: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    otlp_endpoint: str | None = None
    otlp_service_name: str = "text-generation-inference.router"
    # TGI's tokenizer config file: its `chat_template` is the chat template (`chat_template`).
    tokenizer_config_path: str | None = None
    show_env: bool = False
    # TGI flags accepted for drop-in compatibility that change nothing here (`ignored_flags`).
    sharded: bool | None = None
    cuda_graphs: str | None = None
    disable_grammar_support: bool = False
    usage_stats: str = "on"
    watermark_gamma: float | None = None
    watermark_delta: float | None = None
    # TGI features not built yet: setting one is a usage error, not a silent difference.
    quantize: str | None = None
    kv_cache_dtype: str | None = None
    lora_adapters: str | None = None
    weights_cache_override: str | None = None
    ngrok: bool = False
    ngrok_authtoken: str | None = None
    ngrok_edge: str | None = None
    # What to run for each child; the child's config argv is appended. Tests put fakes here.
    shard_command: tuple[str, ...] = SHARD_COMMAND
    router_command: tuple[str, ...] = ROUTER_COMMAND

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    def child_env(self) -> dict[str, str]:
        """Environment every child gets on top of the launcher's."""
        cache = self.huggingface_hub_cache
        return {"HF_HUB_CACHE": cache, "HUGGINGFACE_HUB_CACHE": cache} if cache else {}

    def ignored_flags(self) -> list[str]:
        """What the launcher logs at start for the TGI flags given that change nothing here."""
        notes = []
        if self.cuda_graphs is not None:
            notes.append("--cuda-graphs: tgi-server captures no CUDA graphs; ignored")
        if self.watermark_gamma is not None or self.watermark_delta is not None:
            notes.append("--watermark-gamma/--watermark-delta: watermarking is not built yet; "
                         "requests asking for it are refused (HTTP 422)")
        return notes

    def resolved(self) -> "LaunchConfig":
        """A copy with the per-launch defaults filled in: socket path and rendezvous port."""
        return dataclasses.replace(
            self,
            shard_uds_path=self.shard_uds_path or default_uds_path(),
            master_port=self.master_port or free_port(),
        )

    def to_shard_config(self, rank: int) -> ShardConfig:
        if self.shard_uds_path is None or self.master_port is None:
            raise ValueError("to_shard_config needs a resolved() LaunchConfig")
        return ShardConfig(
            model_id=self.model_id, revision=self.revision, dtype=self.dtype,
            device=self.device, rank=rank, world_size=self.num_shard,
            uds_path=self.shard_uds_path, master_addr=self.master_addr,
            master_port=self.master_port, block_size=self.block_size,
            memory_fraction=self.memory_fraction,
            num_threads=self.num_threads or default_num_threads(len(self.local_ranks)),
            trust_remote_code=self.trust_remote_code,
            disable_custom_kernels=self.disable_custom_kernels,
            speculate=self.speculate or 0,
            rope_scaling=self.rope_scaling, rope_factor=self.rope_factor,
            grpc_port=None if self.grpc_port_base is None else self.grpc_port_base + rank,
        )

    @property
    def local_ranks(self) -> range:
        """The ranks this machine runs (all of them on a single node)."""
        per_node = self.num_shard // self.nnodes
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)

    @property
    def grpc_port_base(self) -> int | None:
        if self.shard_grpc_port is None and self.nnodes > 1 and self.master_port is not None:
            return self.master_port + 1
        return self.shard_grpc_port

    def socket_paths(self) -> tuple[str, ...]:
        """The gRPC socket of every shard on this machine, lowest rank first."""
        return tuple(self.to_shard_config(rank).socket_path for rank in self.local_ranks)

    def to_router_config(self) -> RouterConfig:
        # NOTE: across nodes the router is given rank 0 only and asks it for the others'
        # TCP addresses (ServiceDiscovery), as TGI's router does.
        shard_urls = self.socket_paths() if self.nnodes == 1 else self.socket_paths()[:1]
        return RouterConfig(
            tokenizer=self.model_id, shard_urls=shard_urls,
            model_id=self.model_id, revision=self.revision,
            hostname=self.hostname, port=self.port,
            **{name: getattr(self, name) for name in _SHARED_ROUTER_FIELDS},
            graceful_timeout=self.graceful_termination_timeout,
            chat_template=self.chat_template or self.tokenizer_config_path,
        )


# Fields that LaunchConfig hands to RouterConfig unchanged (same name, same meaning).
_SHARED_ROUTER_FIELDS = (
    "max_concurrent_requests", "max_best_of", "max_stop_sequences", "max_top_n_tokens",
    "max_input_tokens", "max_total_tokens", "max_client_batch_size", "payload_limit",
    "max_batch_prefill_tokens", "max_batch_total_tokens", "max_batch_size",
    "max_waiting_tokens", "waiting_served_ratio", "enable_prefill_logprobs", "disable_lookahead",
    "prefix_caching", "prefill_chunking",
    "api_key", "served_model_name", "validation_workers", "prometheus_port", "cors_allow_origin",
    "otlp_endpoint", "otlp_service_name",
)

USAGE_STATS = ("on", "off", "no-stack")
# TGI flag -> why it is refused: each would change what is served (memory, numerics, outputs).
NOT_YET = {
    "quantize": "quantized weights are not supported yet; serve the unquantized model",
    "kv_cache_dtype": "an fp8 KV cache is not supported yet; the cache takes the model's dtype",
    "lora_adapters": "LoRA adapters are not supported yet",
    "weights_cache_override": "not supported; pass the weights' directory as `--model-id`",
    "ngrok_authtoken": "ngrok tunnelling is not supported",
    "ngrok_edge": "ngrok tunnelling is not supported",
}


def _problems(c: LaunchConfig) -> list[str]:
    """Human-readable violations, in TGI's wording where TGI checks the same thing."""
    checks = [
        (c.num_shard >= 1, "`num_shard` must be >= 1"),
        (c.dtype in DTYPES, f"`dtype` must be one of {', '.join(DTYPES)}"),
        (c.device in DEVICES, f"`device` must be one of {', '.join(DEVICES)}"),
        (0 <= c.port <= 65535, "`port` must be between 0 and 65535"),
        (0.0 < c.memory_fraction <= 1.0, "`memory_fraction` must be in (0, 1]"),
        (c.waiting_served_ratio >= 0.0, "`waiting_served_ratio` must be >= 0"),
        (c.graceful_termination_timeout >= 0, "`graceful_termination_timeout` must be >= 0"),
        (c.block_size >= 1, "`block_size` must be >= 1"),
        (c.speculate is None or c.speculate >= 0, "`speculate` must be >= 0"),
        (bool(c.shard_command) and bool(c.router_command), "empty shard or router command"),
        (c.nnodes >= 1 and 0 <= c.node_rank < c.nnodes,
         "`node_rank` must be in [0, `nnodes`)"),
        (c.num_shard % max(c.nnodes, 1) == 0,
         f"`num_shard` ({c.num_shard}, all nodes together) must be divisible by `nnodes` "
         f"({c.nnodes})"),
        (c.nnodes == 1 or c.master_port is not None,
         "`nnodes` > 1 needs an explicit `master_port`, the same on every node"),
        (c.chat_template is None or os.path.isfile(c.chat_template),
         f"`chat_template` {c.chat_template!r} is not a file"),
        (c.tokenizer_config_path is None or os.path.isfile(c.tokenizer_config_path),
         f"`tokenizer_config_path` {c.tokenizer_config_path!r} is not a file"),
        (c.chat_template is None or c.tokenizer_config_path is None,
         "`chat_template` and `tokenizer_config_path` both give the chat template: pass one"),
        (not c.ngrok, "`ngrok`: ngrok tunnelling is not supported"),
        (all(c.cors_allow_origin), "`cors_allow_origin` must not be empty"),
        (all(c.served_model_name), "`served_model_name` must not be empty"),
        (c.validation_workers > 0, "`validation_workers` must be > 0"),
        (c.rope_scaling in (None, "linear", "dynamic"), "`rope_scaling` must be linear or dynamic"),
        (c.rope_factor is None or c.rope_factor > 0, "`rope_factor` must be > 0"),
        (0 <= c.prometheus_port <= 65535, "`prometheus_port` must be between 0 and 65535"),
        (c.usage_stats in USAGE_STATS, f"`usage_stats` must be one of {', '.join(USAGE_STATS)}"),
        (c.sharded is not True or c.num_shard > 1,
         "`sharded` is true but `num_shard` is 1: pass `--num-shard N` with N > 1"),
        (c.sharded is not False or c.num_shard == 1,
         f"`sharded` is false but `num_shard` is {c.num_shard}"),
    ]
    checks += [(getattr(c, name) is None, f"`{name}` {getattr(c, name)}: {why}")
               for name, why in NOT_YET.items()]
    inp, total, prefill = c.max_input_tokens, c.max_total_tokens, c.max_batch_prefill_tokens
    if inp is not None and total is not None:
        checks.append((inp < total, "`max_input_tokens` must be < `max_total_tokens`"))
    if inp is not None and prefill is not None:
        checks.append((
            prefill >= inp or c.prefill_chunking,
            "`max_batch_prefill_tokens` must be >= `max_input_tokens` (or prefill chunking on)"
        ))
    if prefill is not None and c.max_batch_total_tokens is not None:
        checks.append((
            prefill <= c.max_batch_total_tokens,
            "`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`",
        ))
    return [message for ok, message in checks if not ok]


def default_uds_path() -> str:
    """Unique per launcher process, so parallel launches on one machine don't collide."""
    return f"/tmp/tgi-server-{os.getpid()}"


def default_num_threads(num_local_shards: int) -> int:
    """This machine's cores shared among its shards (at least one thread each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(num_local_shards, 1))


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
