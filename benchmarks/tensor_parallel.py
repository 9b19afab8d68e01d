"""Tensor-parallel figures of `tgi-launch --num-shard N` on one machine.

For each N: seconds from starting `tgi-launch` to `/health` answering 200, total output
tokens/s of C concurrent requests (a distinct prompt of exactly P tokens each, exactly T new
tokens: eos is banned through `logit_bias`, so no request stops early), and each shard's peak
resident memory (VmHWM of /proc/<pid>/status) after that load.

    python benchmarks/tensor_parallel.py --model .cache/bench-models/llama-medium-seed0-v1 \\
        --num-shard 1 2 4 --throughput-shards 1 2
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

SERVER_FLAGS = ["--max-input-tokens", "256", "--max-total-tokens", "512",
                "--max-batch-prefill-tokens", "4096", "--max-batch-total-tokens", "16384"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prompts(model: Path, count: int, num_tokens: int) -> list[str]:
    """`count` distinct texts of exactly `num_tokens` tokens (cut from the stdlib's source)."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    hf_logging.set_verbosity_error()  # the whole file is longer than the model's context
    source = Path(os.__file__).read_text()
    ids = tokenizer(source, add_special_tokens=False).input_ids
    found, start = [], 0
    while len(found) < count:
        text = tokenizer.decode(ids[start:start + num_tokens])
        if len(tokenizer(text, add_special_tokens=False).input_ids) == num_tokens:
            found.append(text)
        start += num_tokens // 2 + 1
    return found


def shard_pids(launcher_pid: int) -> list[int]:
    uds = f"/tmp/tgi-server-{launcher_pid}"
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "tgi_server.shard.cli" in argv and uds in argv:
            pids.append((int(argv[argv.index("--rank") + 1]) if "--rank" in argv else 0,
                         int(entry)))
    return [pid for _, pid in sorted(pids)]


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


async def load(url: str, texts: list[str], new_tokens: int, eos: list[int]) -> tuple[int, float]:
    """(output tokens, seconds) of every text sent at once."""
    bias = {str(t): -100 for t in eos}

    async def one(client: httpx.AsyncClient, text: str) -> int:
        r = await client.post("/v1/completions", json={
            "model": "tgi", "prompt": text, "max_tokens": new_tokens, "temperature": 0,
            "logit_bias": bias})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=len(texts))
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(client, t) for t in texts))
        return sum(counts), time.perf_counter() - start


def run(model: Path, num_shard: int, texts: list[str] | None, new_tokens: int) -> dict:
    """One launch; `texts[0]` warms the server up, `texts[1:]` are the measured load."""
    port = free_port()
    cmd = [sys.executable, "-m", "tgi_server.launcher.cli", "--model-id", str(model),
           "--num-shard", str(num_shard), "--hostname", "127.0.0.1", "--port", str(port),
           *SERVER_FLAGS]
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tgi-launch exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        result = {"num_shard": num_shard, "healthy_s": round(time.perf_counter() - start, 1)}
        if texts:
            eos = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
            eos = [eos] if isinstance(eos, int) else eos
            asyncio.run(load(url, texts[:1], 4, eos))  # first-request costs out of the timing
            tokens, seconds = asyncio.run(load(url, texts[1:], new_tokens, eos))
            result.update(output_tokens=tokens, seconds=round(seconds, 1),
                          tokens_per_s=round(tokens / seconds, 1))
        result["peak_rss_mib"] = [round(vm_hwm_mib(p)) for p in shard_pids(proc.pid)]
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--num-shard", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--throughput-shards", type=int, nargs="*", default=[1, 2],
                        help="shard counts that also get the load (the others: memory only)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    texts = prompts(args.model, args.concurrency + 1, args.prompt_tokens)
    for n in args.num_shard:
        load_texts = texts if n in args.throughput_shards else None
        print(json.dumps(run(args.model, n, load_texts, args.new_tokens)), flush=True)


if __name__ == "__main__":
    main()
