"""`tgi-shard`: one tensor-parallel rank. argv → ShardConfig → load the model → serve gRPC.

Spawned by the launcher (`launcher/`), which passes a `ShardConfig` as argv and watches this
process's stderr: progress lines while loading, and on a startup failure exactly one line
starting `ERROR: ` before exiting 1.
"""

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from tgi_server.launcher.argv import from_argv
from tgi_server.proto import generate_pb2 as pb
from tgi_server.shard.config import ShardConfig, host_port
from tgi_server.shard.distributed import all_gather_object, init_distributed
from tgi_server.shard.layers import cpu_kernels
from tgi_server.shard.layers.linear import pack_linear_weights
from tgi_server.shard.model_runner import ModelRunner
from tgi_server.shard.models import load_model
from tgi_server.shard.server import TextGenerationService, serve
from tgi_server.shard.sharding import check_num_shard, read_config
from tgi_server.shard.weights import resolve_model_dir

logger = logging.getLogger("tgi_server.shard")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available on this machine")
    return torch.device(name)


def cpu_prefers_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) through oneDNN.

    There a bfloat16 decode step reads half the bytes and runs ~1.3-2x faster than float32
    (benchmarks/NOTES.md); elsewhere bfloat16 is emulated and float32 is the safer default.
    """
    native = any(getattr(torch.cpu, probe, lambda: False)()
                 for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return native and torch.backends.mkldnn.is_available()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" or cpu_prefers_bfloat16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unsupported --dtype {name!r}; choose one of {', '.join(DTYPES)} or auto")
    return DTYPES[name]


def keep_freed_memory() -> bool:
    """glibc: serve allocations up to 32 MiB from the heap and keep freed memory for reuse.

    NOTE: by default every tensor over 128 KiB is a fresh mmap, so each step page-faults its
    activations in again (a batch-32 KV gather spent most of its time faulting); glibc only
    raises that threshold after a large block happens to be freed. True if glibc took it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30))


def set_cpu_threads(num_threads: int | None, world_size: int) -> int:
    """Give this shard its share of the cores, so N shards on one machine don't oversubscribe.

    The default share is the cores this process may run on divided by `world_size`.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = num_threads or max(1, (cores or 1) // world_size)
    torch.set_num_threads(threads)
    # NOTE: a step runs its ops one after another, so an inter-op pool per shard would only
    # add idle threads competing for the same cores. Settable once, before any parallel work.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return threads


def _load_model(model_dir, dtype: torch.dtype, device: torch.device, tp, rope):
    model = load_model(model_dir, dtype, device, tp, rope)
    if device.type == "cpu":
        pack_linear_weights(model)
    return model


def build_service(config: ShardConfig) -> TextGenerationService:
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", config.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu":
        keep_freed_memory()
    if config.disable_custom_kernels:
        cpu_kernels.disable()
    threads = set_cpu_threads(config.num_threads, config.world_size)
    model_dir = resolve_model_dir(config.model_id, config.revision)
    # Before the rendezvous: a split that cannot work fails every rank at once, in one line.
    check_num_shard(read_config(model_dir), config.world_size)
    tp = init_distributed(config.rank, config.world_size, config.master_addr, config.master_port,
                          device.type)
    logger.info("loading %s (%s, %s, rank %d/%d, %d threads)", model_dir, dtype, device,
                config.rank, config.world_size, threads)
    # NOTE: every torch op of the shard runs on this one thread (loading, packing, each step):
    # a second thread's OpenMP team leaves its workers spinning against the first team's on
    # the same cores (batch-1 steps measured 1.3-1.5x slower, the CPU ~140% busy, not 200%).
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    model = executor.submit(_load_model, model_dir, dtype, device, tp,
                            (config.rope_scaling, config.rope_factor)).result()
    runner = ModelRunner(model, device, dtype, config.block_size, speculate=config.speculate)
    hf = model.config
    info = pb.InfoResponse(
        model_id=config.model_id,
        model_type=hf.model_type,
        dtype=str(dtype).removeprefix("torch."),
        device_type=device.type,
        block_size=config.block_size,
        vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings,
        eos_token_ids=sorted(model.eos_token_ids),
        attention_impl="paged",
        world_size=config.world_size,
        speculate=config.speculate,
        # Prefills start at Request.cache_len (model_runner.prepare_prefill) and stop at its
        # chunk_len (batch.py).
        use_prefix_caching=True,
        support_chunking=True,
    )
    # NOTE: ranks may run on other machines with their own socket paths, so each one tells the
    # others where it serves; rank 0's ServiceDiscovery hands the list to a router (as TGI).
    urls = all_gather_object(advertised_url(config), tp)
    return TextGenerationService(config, runner, urls, info, executor)


def advertised_url(config: ShardConfig) -> str:
    """Where a router reaches this shard: host:port when serving TCP, else the socket path."""
    if config.grpc_port is None:
        return config.socket_path
    host = config.grpc_host
    if host in ("0.0.0.0", "::", ""):
        host = route_address(config.master_addr)
    return host_port(host, config.grpc_port)


def route_address(peer: str) -> str:
    """This machine's address on the route to `peer` (no packet is sent: UDP connect only)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((peer, 9))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()


def main(argv: list[str] | None = None) -> None:
    config = from_argv(ShardConfig, argv, prog="tgi-shard")
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s shard-{config.rank} %(name)s: %(message)s",
    )
    try:
        service = build_service(config)
    except Exception as e:  # noqa: BLE001 -- one readable line for the launcher
        logger.debug("startup failed", exc_info=True)
        print(f"ERROR: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr, flush=True)
        sys.exit(1)
    if os.path.exists(config.socket_path):
        os.unlink(config.socket_path)
    logger.info("ready")
    try:
        asyncio.run(serve(service, config.listen_addresses))
    except OSError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
