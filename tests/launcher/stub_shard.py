"""A stand-in for `tgi-shard`, spawned by the launcher in tests.

argv: RECORD_DIR SPEC SHARD_ARGV... where SPEC is `MODE` or `MODE@RANK` (other ranks: ok).
Modes: ok | error (one `ERROR:` line, exit 1) | die=SECONDS (serve, then exit 3) |
ignore-term (serve, ignore SIGTERM) | hang (never serve).
Writes RECORD_DIR/shard-RANK.json (pid, grandchild pid, env) and, on SIGTERM, shard-RANK.term.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc

from tgi_server.launcher.argv import from_argv
from tgi_server.proto import generate_pb2, generate_pb2_grpc
from tgi_server.shard.config import ShardConfig


class Servicer(generate_pb2_grpc.TextGenerationServiceServicer):
    async def Health(self, request, context):
        return generate_pb2.HealthResponse()


def record(path: str, config: ShardConfig) -> None:
    # A grandchild in the shard's process group: the launcher must not leave it behind.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    with open(path, "w") as f:
        json.dump({"pid": os.getpid(), "grandchild": sleeper.pid, "env": env,
                   "hub_cache": os.environ.get("HF_HUB_CACHE"),
                   "config": config.__dict__}, f)


async def serve(config: ShardConfig, mode: str, term_path: str) -> None:
    stopped = asyncio.Event()

    def on_term() -> None:
        with open(term_path, "w") as f:
            f.write(str(time.time()))
        if mode != "ignore-term":
            stopped.set()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
    print("loading weights...", file=sys.stderr, flush=True)
    if mode == "hang":
        await asyncio.sleep(3600)
    server = grpc.aio.server()
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"unix:{config.socket_path}")
    await server.start()
    print("ready", file=sys.stderr, flush=True)
    if mode.startswith("die="):
        await asyncio.sleep(float(mode.split("=")[1]))
        print("ERROR: simulated crash", file=sys.stderr, flush=True)
        os._exit(3)
    await stopped.wait()
    await server.stop(0)


def main() -> None:
    record_dir, spec, *argv = sys.argv[1:]
    config = from_argv(ShardConfig, argv)
    mode, _, rank = spec.partition("@")
    if rank and int(rank) != config.rank:
        mode = "ok"
    record(os.path.join(record_dir, f"shard-{config.rank}.json"), config)
    if mode == "error":
        print("loading weights...", file=sys.stderr, flush=True)
        print(f"ERROR: no such model: {config.model_id}", file=sys.stderr, flush=True)
        sys.exit(1)
    asyncio.run(serve(config, mode, os.path.join(record_dir, f"shard-{config.rank}.term")))


if __name__ == "__main__":
    main()
