"""Request guard: TGI's `--api-key` and `--payload-limit`, before any handler runs.

Upstream: the HTTP server. Downstream: the app (`app.py`). With an API key, every POST (the
generation and tokenize routes, native and OpenAI) needs `Authorization: Bearer <key>`, else
401; health, info, metrics and the docs stay open, as in TGI. A body larger than the payload
limit gets 413 whether or not it announces its length.
"""

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def _reply(send: Send, status: int, message: str, error_type: str) -> None:
    body = json.dumps({"error": message, "error_type": error_type}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(self, app: ASGIApp, api_key: str | None, payload_limit: int):
        self.app = app
        self.api_key = api_key
        self.payload_limit = payload_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and not self._authorized(headers.get(b"authorization", b"")):
            return await _reply(send, 401, "Unauthorized: a valid `Authorization: Bearer <api key>` "
                                "header is required", "unauthorized")
        announced = headers.get(b"content-length")
        if announced is not None and announced.isdigit() and int(announced) > self.payload_limit:
            return await self._too_large(send)
        body = await self._read_body(receive)
        if body is None:
            return await self._too_large(send)
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.payload_limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _too_large(self, send: Send) -> None:
        await _reply(send, 413, f"Payload too large: the body exceeds {self.payload_limit} bytes "
                     "(--payload-limit)", "validation")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that yields the buffered body once, then the client's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
