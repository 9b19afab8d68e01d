"""Helpers to run the real `tgi-launch` CLI and check on the processes it started."""

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    """Running, and not a zombie (nobody may reap orphans in a container)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def wait_dead(pids: list[int], timeout: float = 3.0) -> list[int]:
    """The pids still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


class Launched:
    """A `tgi-launch` process; its merged stdout/stderr lines are collected by a thread."""

    def __init__(self, argv: list[str], records: Path, port: int) -> None:
        self.records = records
        self.port = port
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for_line(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [line for line in self.lines if text in line]
                if found:
                    return found[0]
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"no line with {text!r} in:\n" + self.output())

    def wait(self, timeout: float = 15.0) -> int:
        code = self.proc.wait(timeout)
        time.sleep(0.1)  # let the reader thread take the last lines
        return code

    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def record(self, name: str) -> dict:
        return json.loads((self.records / f"{name}.json").read_text())

    def recorded_pids(self) -> list[int]:
        pids = []
        for path in self.records.glob("*.json"):
            data = json.loads(path.read_text())
            pids += [data[key] for key in ("pid", "grandchild") if key in data]
        return pids

    def term_time(self, name: str) -> float | None:
        path = self.records / f"{name}.term"
        return float(path.read_text()) if path.exists() else None
