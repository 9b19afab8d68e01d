"""In-process pieces of the launcher: line decoding, stale sockets, the progress display."""

import asyncio
import io
import json
import os
import socket
import sys

import pytest
from rich.console import Console

from tgi_server.launcher.config import LaunchConfig
from tgi_server.launcher.output import Output, StartupProgress, progress_table
from tgi_server.launcher.process import ChildFailed, _decode, spawn
from tgi_server.launcher.router import check_port_free, health_url, public_url
from tgi_server.launcher.shards import SHARD_STATES, clear_stale_socket


def test_decode_keeps_the_last_state_of_a_progress_bar():
    assert _decode(b"weights  10%\rweights  55%\rweights 100%\r\n") == "weights 100%"
    assert _decode(b"plain line\n") == "plain line"
    assert _decode(b"\xff bad utf8\n") == "\ufffd bad utf8"


def test_stale_socket_is_removed_a_live_one_refused(tmp_path):
    path = str(tmp_path / "s-0")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        with pytest.raises(ChildFailed, match="already listening"):
            clear_stale_socket(path)
    clear_stale_socket(path)  # nobody listens any more: removed
    assert not os.path.exists(path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ChildFailed, match="not a socket"):
        clear_stale_socket(str(tmp_path / "file"))


def test_busy_port_is_refused():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ChildFailed, match="already in use"):
            check_port_free("127.0.0.1", busy.getsockname()[1])


def test_urls():
    config = LaunchConfig(model_id="m", hostname="0.0.0.0", port=3000)
    assert (health_url(config), public_url(config)) == (
        "http://127.0.0.1:3000/health", "http://0.0.0.0:3000")
    config = LaunchConfig(model_id="m", hostname="::", port=80)
    assert (health_url(config), public_url(config)) == ("http://[::1]:80/health", "http://[::]:80")


def run_child(code: str, output: Output):
    """Spawn `python -c code` as a shard would be, wait for it, return the Child."""
    async def main():
        child = await spawn("shard 0", [sys.executable, "-c", code], dict(os.environ),
                            output.child_line, SHARD_STATES)
        await child.exited
        return child
    return asyncio.run(main())


def test_child_keeps_its_error_line_and_state():
    stream = io.StringIO()
    child = run_child(
        "import sys; print('Loading weights'); print('ERROR: bad', file=sys.stderr);"
        "print('Traceback...', file=sys.stderr); sys.exit(1)", Output(stream=stream))
    assert child.reason() == "ERROR: bad"
    assert child.exit_description() == "exit code 1"
    assert child.state == "exited (exit code 1)"
    assert "[shard 0] Loading weights" in stream.getvalue().splitlines()


def test_child_without_error_line_reports_its_last_stderr_line():
    child = run_child("import os, sys; print('boom', file=sys.stderr); os.kill(os.getpid(), 9)",
                      Output(stream=io.StringIO()))
    assert (child.reason(), child.exit_description()) == (
        "boom", "signal SIGKILL (the kernel's out-of-memory killer, or kill -9)")
    assert child.failure() == (
        "signal SIGKILL (the kernel's out-of-memory killer, or kill -9); its last output: boom")


def test_json_output_lines():
    stream = io.StringIO()
    run_child("print('hello')", Output(json_output=True, stream=stream))
    event = json.loads(stream.getvalue().splitlines()[0])
    assert (event["target"], event["message"], event["level"]) == ("shard 0", "hello", "INFO")


def test_progress_table_and_plain_progress():
    stream = io.StringIO()
    output = Output(stream=stream)

    async def main():
        children = []
        async with StartupProgress(output, children) as progress:
            child = await spawn("shard 0", [sys.executable, "-c", "print('loading weights')"],
                                dict(os.environ), output.child_line, SHARD_STATES)
            children.append(child)
            await child.exited
            progress.report_changes()
        return children

    children = asyncio.run(main())
    assert "shard 0: exited (exit code 0)" in stream.getvalue()
    console = Console(file=io.StringIO(), width=120, record=True)
    console.print(progress_table(children))
    text = console.export_text()
    assert "shard 0" in text and "exited (exit code 0)" in text and "loading weights" in text
