"""Run the real `tgi-launch` CLI with stub children (`stub_shard.py`, `stub_router.py`).

The stubs are injected through the launcher's `--shard-command` / `--router-command`; they
record their pids, env and config, and the time they got SIGTERM, under a records dir.
"""

import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
from launch_harness import Launched, free_port

STUBS = Path(__file__).parent


@pytest.fixture
def records():
    # NOTE: short, so `{dir}/s-{rank}` stays under the 107-byte limit of a unix socket path.
    path = Path(tempfile.mkdtemp(prefix="tgi-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def launcher(records):
    """`launcher(shard="ok", router="ok", *flags)` starts tgi-launch with the stubs."""
    started: list[Launched] = []

    def start(shard: str = "ok", router: str = "ok", *flags: str, port: int | None = None,
              shard_command: str | None = None, model_id: str = "stub-model") -> Launched:
        port = port or free_port()
        python = shlex.quote(sys.executable)
        shard_command = shard_command or (
            f"{python} {shlex.quote(str(STUBS / 'stub_shard.py'))} {records} {shard}")
        router_command = f"{python} {shlex.quote(str(STUBS / 'stub_router.py'))} {records} {router}"
        argv = [
            sys.executable, "-m", "tgi_server.launcher.cli", "--model-id", model_id,
            "--hostname", "127.0.0.1", "--port", str(port),
            "--shard-uds-path", str(records / "s"), "--graceful-termination-timeout", "3",
            "--shard-command", shard_command, "--router-command", router_command, *flags,
        ]
        started.append(Launched(argv, records, port))
        return started[-1]

    yield start
    for launched in started:
        if launched.proc.poll() is None:
            os.killpg(launched.proc.pid, signal.SIGKILL)
            launched.proc.wait()
