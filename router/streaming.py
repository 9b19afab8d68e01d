"""Server-sent events: TGI's `data:{json}` framing for the native and OpenAI streams.

Upstream: `routes.py` hands an async iterator of pydantic models. A failure midway ends the
stream with an error event instead of cutting the connection.
"""

from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel
from starlette.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# Line breaks to `str.splitlines` (and so to httpx's `iter_lines` and many SSE clients) that JSON
# leaves raw: a model that emits one would cut its event in two. Escaped, they decode the same.
_SPLITLINES_ONLY = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def sse_event(payload: BaseModel | str, prefix: str = "data:") -> bytes:
    data = payload if isinstance(payload, str) else payload.model_dump_json()
    if not data.isascii():
        for char, escape in _SPLITLINES_ONLY.items():
            data = data.replace(char, escape)
    return f"{prefix}{data}\n\n".encode()


def sse_response(events: AsyncIterator[BaseModel], on_error: Callable[[Exception], BaseModel],
                 done_marker: str | None = None, prefix: str = "data:") -> StreamingResponse:
    """Stream `events`; an exception becomes a final `on_error(e)` event, then `done_marker`.

    `prefix`: TGI's native streams write `data:{json}`, OpenAI's `data: {json}` (both valid SSE).
    """

    async def body():
        try:
            async for event in events:
                yield sse_event(event, prefix)
        except Exception as e:  # noqa: BLE001 -- reported in-stream, as TGI does
            yield sse_event(on_error(e), prefix)
        if done_marker is not None:
            yield sse_event(done_marker, prefix)

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
