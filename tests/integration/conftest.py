"""End-to-end fixtures: a real `tgi-launch` (shards + router processes) on a tiny local model."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(served):
    """(tokenizer, transformers' float32 model) of the module's `served` (path, url) model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = served
    return (AutoTokenizer.from_pretrained(path),
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())


@pytest.fixture(scope="session")
def launch():
    """`launch(model, *flags)`: a context manager running `tgi-launch`, yielding its URL."""
    return launch_server


@contextmanager
def launch_server(model: Path, *flags: str, timeout: float = 180.0) -> Iterator[str]:
    """Run `tgi-launch` on `model`; yields its base URL once /health answers 200.

    float32 unless `flags` pick a dtype: the tests compare with transformers in float32.
    """
    if "--dtype" not in flags:
        flags = ("--dtype", "float32", *flags)
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"tgi-launch-{port}.log", "w+")
    cmd = [sys.executable, "-m", "tgi_server.launcher.cli", "--model-id", str(model),
           "--port", str(port), "--hostname", "127.0.0.1", *flags]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"tgi-launch exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"tgi-launch not healthy after {timeout}s:\n{log.read()[-4000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
