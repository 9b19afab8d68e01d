"""Graceful termination: on SIGTERM/SIGINT, refuse new requests with 503, finish the others.

Upstream: `server.py` wraps the Starlette app (`app.py`) in `Drain` and runs it under
`DrainingServer`. Downstream: the app, unchanged.

NOTE: uvicorn's own shutdown closes the listening socket at once, so a client arriving during
the drain would get "connection refused", and keep-alive clients a dropped connection. Here the
socket stays open while in-flight requests finish: newcomers get a clean 503 (`Connection:
close`), then uvicorn shuts down with nothing left to wait for.
"""

import asyncio
import json
import logging
import signal
from types import FrameType

import uvicorn

logger = logging.getLogger(__name__)

_UNAVAILABLE = json.dumps(
    {"error": "the server is shutting down", "error_type": "unavailable"}
).encode()


class Drain:
    """ASGI middleware counting in-flight HTTP requests; once draining, new ones get 503."""

    def __init__(self, app) -> None:
        self.app = app
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.draining:
            return await _unavailable(send)
        self.in_flight += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def start(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request is in flight; False if some still are after `timeout_s`."""
        if self.in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


async def _unavailable(send) -> None:
    await send({
        "type": "http.response.start", "status": 503,
        "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                    (b"content-length", str(len(_UNAVAILABLE)).encode())],
    })
    await send({"type": "http.response.body", "body": _UNAVAILABLE})


class DrainingServer(uvicorn.Server):
    """uvicorn, whose first SIGTERM/SIGINT drains `drain` for up to `timeout_s` before exiting;
    a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain, timeout_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self.drain.start()
        logger.info("%s: refusing new requests, draining %d in flight (up to %gs)",
                    signal.Signals(sig).name, self.drain.in_flight, self.timeout_s)
        self._loop.call_soon_threadsafe(self._start_drain_task)

    def _start_drain_task(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        if not await self.drain.wait_idle(self.timeout_s):
            logger.warning("%d request(s) still in flight after %gs: cancelling them",
                           self.drain.in_flight, self.timeout_s)
        self.should_exit = True
