"""One supervised child process (a shard or the router).

Upstream: `shards.py` / `router.py` call `spawn`; downstream: `supervisor.py` waits on
`Child.exited` and calls `Child.stop`. Each child runs in its own session, hence its own
process group, so stopping it also reaches anything it spawned, and a Ctrl-C in the
launcher's terminal reaches the launcher only (which then stops the children in order).
"""

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

# Longest line read from a child before it is cut (asyncio's default is 64 KiB).
_LINE_LIMIT_BYTES = 1 << 20
# How long to wait for a dead child's pipes to drain (a grandchild may still hold them).
_DRAIN_TIMEOUT_S = 1.0


# What usually sends a signal that kills a child, for the one-line report.
_SIGNAL_HINTS = {
    signal.SIGKILL: "the kernel's out-of-memory killer, or kill -9",
    signal.SIGSEGV: "crashed in native code",
    signal.SIGABRT: "aborted in native code",
}


class ChildFailed(Exception):
    """A child could not start or died: the message is one readable line."""


class Child:
    """A running child: its output is forwarded line by line and its last lines kept."""

    def __init__(
        self, name: str, transport: asyncio.SubprocessTransport, protocol: "_Protocol",
        on_line: Callable[["Child", str], None], states: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.name = name
        self.pid = transport.get_pid()
        self._transport = transport
        self._exit_code = protocol.exit_code
        self.started_at = time.monotonic()
        self.ready_at: float | None = None
        # What the child is doing, guessed from its log lines (keyword -> state).
        self.state = "starting"
        self.last_line = ""
        self.last_stderr_line = ""
        self.error_line = ""
        self._on_line = on_line
        self._states = states
        self._readers = [
            asyncio.create_task(self._forward(protocol.stdout, is_stderr=False)),
            asyncio.create_task(self._forward(protocol.stderr, is_stderr=True)),
        ]
        self.exited = asyncio.create_task(self._wait())

    @property
    def returncode(self) -> int | None:
        return self._exit_code.result() if self._exit_code.done() else None

    def mark_ready(self) -> None:
        self.ready_at = time.monotonic()
        self.state = "ready"

    def elapsed_s(self) -> float:
        return (self.ready_at or time.monotonic()) - self.started_at

    def reason(self) -> str:
        """Why it died, in its own words: its last `ERROR:` line, else its last stderr line."""
        return self.error_line or self.last_stderr_line

    def failure(self) -> str:
        """How it ended and why, e.g. `exit code 3: ERROR: ...`. A child killed by a signal
        had no say: its last line is only what it was doing."""
        reason = self.reason()
        if not reason:
            return self.exit_description()
        killed = (self.returncode or 0) < 0 and not self.error_line
        return f"{self.exit_description()}{'; its last output' if killed else ''}: {reason}"

    def exit_description(self) -> str:
        code = self.returncode
        if code is None:
            return "still running"
        if code >= 0:
            return f"exit code {code}"
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return f"signal {-code}"
        return f"signal {sig.name}" + (f" ({_SIGNAL_HINTS[sig]})" if sig in _SIGNAL_HINTS else "")

    async def stop(self, timeout_s: float) -> bool:
        """SIGTERM its process group, SIGKILL it after `timeout_s`; True if it had to be killed.

        Whatever the leader left behind in its group (workers, compilers) is killed too.
        """
        killed = False
        if self.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._exit_code), timeout_s)
            except TimeoutError:
                killed = True
        self.signal(signal.SIGKILL)
        await self.exited
        self._transport.close()
        return killed

    def signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def _wait(self) -> int:
        code = await self._exit_code
        await asyncio.wait(self._readers, timeout=_DRAIN_TIMEOUT_S)
        for reader in self._readers:
            reader.cancel()
        self.state = f"exited ({self.exit_description()})"
        return code

    async def _forward(self, stream: Any, is_stderr: bool) -> None:
        async for line in _lines(stream):
            self._observe(line, is_stderr)
            self._on_line(self, line)

    def _observe(self, line: str, is_stderr: bool) -> None:
        if not line.strip():
            return
        self.last_line = line
        if is_stderr:
            self.last_stderr_line = line
        if line.startswith("ERROR:"):
            self.error_line = line
        if self.ready_at is None:
            lowered = line.lower()
            self.state = next((s for word, s in self._states if word in lowered), self.state)


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[str]:
    """Decoded lines; of a `\\r`-updated progress bar only the last state is kept."""
    while True:
        try:
            raw = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as eof:
            if eof.partial:
                yield _decode(eof.partial)
            return
        except asyncio.LimitOverrunError as long_line:
            raw = await stream.readexactly(long_line.consumed)
        yield _decode(raw)


def _decode(raw: bytes) -> str:
    text = raw.decode(errors="replace").rstrip("\r\n")
    parts = [part for part in text.split("\r") if part.strip()]
    return parts[-1] if parts else ""


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's stream protocol, plus a future resolved as soon as the process exits.

    NOTE: `Process.wait()` only returns once the child's pipes are closed too, which never
    happens while a grandchild (a torch compile worker, say) still holds them open.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=_LINE_LIMIT_BYTES, loop=loop)
        self.exit_code: asyncio.Future[int] = loop.create_future()

    def process_exited(self) -> None:
        code = self._transport.get_returncode()  # the base class may drop the transport
        super().process_exited()
        if not self.exit_code.done():
            self.exit_code.set_result(code)


# Prefixed to every child's command on Linux: the child dies with the launcher even when the
# launcher is SIGKILLed (PR_SET_PDEATHSIG survives exec), so no orphan keeps a GPU or a port.
_ORPHAN_GUARD = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):  # the launcher died before prctl
    sys.exit(1)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as err:
    print(f"ERROR: cannot run {sys.argv[2]!r}: {err.strerror}", file=sys.stderr)
    sys.exit(127)
"""


def _guarded(argv: list[str]) -> list[str]:
    if sys.platform.startswith("linux") and sys.executable:
        return [sys.executable, "-c", _ORPHAN_GUARD, str(os.getpid()), *argv]
    return argv


async def spawn(
    name: str, argv: list[str], env: dict[str, str],
    on_line: Callable[[Child, str], None], states: tuple[tuple[str, str], ...] = (),
) -> Child:
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(loop), *_guarded(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, start_new_session=True,
        )
    except OSError as err:
        raise ChildFailed(
            f"{name} failed to start: cannot run {argv[0]!r}: {err.strerror}"
        ) from None
    return Child(name, transport, protocol, on_line, states)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The launcher's environment for a child, plus `extra`.

    NOTE: PYTHONUNBUFFERED so a child's stdout reaches us line by line through the pipe.
    """
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
