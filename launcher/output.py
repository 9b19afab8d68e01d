"""What the launcher prints: its own messages, its children's lines, the startup progress.

Everything goes to one stream (stderr by default): plain lines (`[shard 0] ...` for a
child's output), JSON lines with `--json-output`, and while the shards load, a live table on
a terminal or a periodic one-line summary otherwise.
"""

import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from typing import Self, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tgi_server.launcher.process import Child

# Plain (non-terminal) progress: how often to check for state changes / print a summary.
_POLL_S = 0.25
_SUMMARY_EVERY_S = 15.0


class Output:
    def __init__(self, json_output: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.json_output = json_output
        self.tty = not json_output and self.stream.isatty()
        self.console = Console(file=self.stream, highlight=False, soft_wrap=True)
        self.live: Live | None = None

    def info(self, message: str) -> None:
        self._emit("INFO", "launcher", message)

    def warning(self, message: str) -> None:
        self._emit("WARN", "launcher", message)

    def error(self, message: str) -> None:
        self._emit("ERROR", "launcher", message)

    def child_line(self, child: Child, line: str) -> None:
        self._emit("INFO", child.name, line)

    def _emit(self, level: str, source: str, message: str) -> None:
        if self.json_output:
            text = json.dumps({
                "timestamp": datetime.now(UTC).isoformat(), "level": level,
                "target": source, "message": message,
            })
        else:
            text = message if source == "launcher" else f"[{source}] {message}"
        try:
            if self.live is not None:
                self.live.console.print(Text(text))
            else:
                print(text, file=self.stream, flush=True)
        except OSError:
            # NOTE: a closed stream (`tgi-launch | head`) must not stop us draining the
            # children's pipes, or they would block on their next write.
            pass


class StartupProgress:
    """Shows which child is starting / loading / warming / ready while the launcher waits.

    `children` is the supervisor's own list: children appended later (the router) show up.
    """

    def __init__(self, output: Output, children: list[Child]) -> None:
        self.output = output
        self.children = children
        self._task: asyncio.Task | None = None
        self._seen: dict[str, str] = {}

    async def __aenter__(self) -> Self:
        if self.output.tty:
            self.output.live = Live(
                get_renderable=lambda: progress_table(self.children),
                console=self.output.console, refresh_per_second=4, transient=True,
            )
            self.output.live.start()
        else:
            self._task = asyncio.create_task(self._plain())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.output.live is not None:
            self.output.live.stop()
            self.output.live = None
        if self._task is not None:
            self._task.cancel()

    def report_changes(self) -> None:
        """Without a live table: one line per state change since the last call."""
        if self.output.live is not None:
            return
        for child in list(self.children):
            if self._seen.get(child.name) != child.state:
                self._seen[child.name] = child.state
                self.output.info(f"{child.name}: {child.state} ({child.elapsed_s():.1f}s)")

    async def _plain(self) -> None:
        last_summary = time.monotonic()
        while True:
            self.report_changes()
            if time.monotonic() - last_summary >= _SUMMARY_EVERY_S:
                last_summary = time.monotonic()
                self.output.info("waiting for " + waiting_summary(self.children))
            await asyncio.sleep(_POLL_S)


def waiting_summary(children: list[Child]) -> str:
    pending = [c for c in children if c.ready_at is None]
    return ", ".join(f"{c.name} ({c.state}, {c.elapsed_s():.0f}s)" for c in pending) or "nothing"


def progress_table(children: list[Child]) -> Table:
    table = Table(title="starting tgi-server", title_justify="left", expand=False)
    for column in ("process", "state", "elapsed", "last output"):
        table.add_column(column, no_wrap=column != "last output", overflow="ellipsis")
    for child in children:
        style = "green" if child.ready_at else ("red" if child.returncode is not None else "")
        table.add_row(
            child.name, Text(child.state, style=style), f"{child.elapsed_s():.1f}s",
            Text(child.last_line[:120]),
        )
    return table
