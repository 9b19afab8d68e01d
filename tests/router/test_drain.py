"""The drain middleware: once draining, new requests get 503 while those in flight finish."""

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tgi_server.router.drain import Drain


def slow_app(release: asyncio.Event) -> Starlette:
    async def slow(request):
        await release.wait()
        return PlainTextResponse("done")

    async def fast(request):
        return PlainTextResponse("fast")

    return Starlette(routes=[Route("/slow", slow), Route("/fast", fast)])


async def test_drain_refuses_new_requests_and_waits_for_in_flight():
    release = asyncio.Event()
    drain = Drain(slow_app(release))
    transport = httpx.ASGITransport(app=drain)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        assert (await client.get("/fast")).text == "fast"
        in_flight = asyncio.create_task(client.get("/slow"))
        while drain.in_flight == 0:
            await asyncio.sleep(0.01)

        drain.start()
        refused = await client.get("/fast")
        assert refused.status_code == 503
        assert refused.json() == {"error": "the server is shutting down",
                                  "error_type": "unavailable"}
        assert refused.headers["connection"] == "close"
        assert await drain.wait_idle(0.05) is False  # /slow still runs

        release.set()
        assert (await in_flight).text == "done"
        assert await drain.wait_idle(1.0) is True
        assert drain.in_flight == 0


async def test_idle_server_drains_at_once():
    drain = Drain(slow_app(asyncio.Event()))
    drain.start()
    assert await drain.wait_idle(0.0) is True
