"""Servers under test as subprocesses: started in their own session, awaited, always stopped.

Upstream: `compare.py` (tgi-launch) and `baselines.py` (llama.cpp's server, vLLM). The
systems of one dtype are up together, but each is paused (every process of it stopped)
while another is measured, so no two systems ever share the cores.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tgi_server.launcher.bench.loadgen import Target
from tgi_server.launcher.bench.stats import descendants, process_table

_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the process; SIGKILL whatever of its tree is left after it exits or in `grace_s`."""
    tree = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} still running {grace_s:.0f}s after SIGTERM: SIGKILL")
            os.killpg(proc.pid, signal.SIGKILL)
    table = process_table()
    for pid, started in tree.items():
        if table.get(pid, (0, None, 0))[1] == started:  # still alive, and not a reused pid
            log(f"SIGKILL left-over child {pid}")
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@dataclass(frozen=True)
class Served:
    """A server under test: where its load goes, and its process, which `pause` stops with
    all of its descendants (SIGSTOP: threads and timers included) while another system runs."""

    target: Target
    pid: int

    def pause(self) -> None:
        signal_tree(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        signal_tree(self.pid, signal.SIGCONT)


def signal_tree(pid: int, signum: int) -> None:
    """`signum` to `pid` and every process under it, parents first (a launcher may start its
    shards in sessions of their own, out of reach of its process group)."""
    for each in [pid, *descendants(pid)]:
        try:
            os.kill(each, signum)
        except ProcessLookupError:
            pass


@contextmanager
def running(cmd: list[str], health_url: str, log_path: Path, env: dict | None = None,
            timeout_s: float = 1200.0) -> Iterator[subprocess.Popen]:
    """Runs `cmd` until the block exits; yields once `health_url` answers 200."""
    log(f"starting: {' '.join(map(str, cmd))} (log: {log_path})")
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while not healthy(health_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{cmd[0]} not healthy (exit code {proc.poll()}):\n{tail}")
            time.sleep(0.5)
        log(f"ready: {health_url}")
        yield proc
    finally:
        signal_tree(proc.pid, signal.SIGCONT)  # a paused server could not act on SIGTERM
        stop(proc)
        log(f"stopped (exit code {proc.returncode})")


def tgi_server_flags(dtype: str, threads: int, max_input_tokens: int, max_new_tokens: int,
                     max_concurrency: int, block_size: int = 16, speculate: int = 0) -> list[str]:
    """tgi-launch flags whose budgets fit `max_concurrency` full requests in one running batch;
    `speculate` > 0 adds n-gram speculation."""
    per_request = max_input_tokens + max_new_tokens + block_size
    max_input = 2 * max_input_tokens
    prefill = max(max_input, max_concurrency * max_input_tokens)
    return ["--dtype", dtype, "--num-threads", str(threads),
            "--max-input-tokens", str(max_input),
            "--max-total-tokens", str(max_input + max_new_tokens),
            "--max-batch-prefill-tokens", str(prefill),
            # NOTE: at least one request of --max-total-tokens, which the router checks.
            "--max-batch-total-tokens", str(max(prefill, max_concurrency * per_request,
                                                max_input + max_new_tokens + block_size)),
            "--graceful-termination-timeout", "10",
            *(["--speculate", str(speculate)] if speculate else [])]


@contextmanager
def tgi_server(model: Path, flags: list[str], log_path: Path) -> Iterator[Served]:
    """`tgi-launch` on a free port."""
    port = free_port()
    cmd = [sys.executable, "-m", "tgi_server.launcher.cli", "--model-id", str(model),
           "--port", str(port), "--hostname", "127.0.0.1", *flags]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, f"{url}/health", log_path) as proc:
        yield Served(Target(url), proc.pid)
