"""A bag's refund list spread over many pages is read in about one round trip.

A resume (or a read-back after an ambiguous send) reads the whole list, often more
than once, inside the call's deadline. Read one page at a time over a slow link, a
long list could never be read within it: the ask stayed pending however many times it
was resumed (simulator seed 1053467: four refunds on pages of one, up to 2 s a request,
a 15 s deadline). The pages the first page announces are now asked for at once, a few
at a time, and still taken in order with every check of the walk.

Each test scripts its own server on 127.0.0.1 (port 0)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async import VioletClient
from violet_async._requests import PAGES_IN_FLIGHT
from violet_async.testing import FakeClock

ORDER, BAG = 100, 200


def _refund(i: int) -> dict[str, Any]:
    return {
        "id": 5000 + i,
        "order_id": ORDER,
        "bag_id": BAG,
        "amount": 100 + i,
        "status": "COMPLETED",
        "reason": "Customer requested refund.",
        "date_created": "2026-12-01T10:00:00Z",
    }


class PagedServer:
    """Refunds on pages of one. Pages after the first wait (up to ``hold`` real
    seconds) until ``PAGES_IN_FLIGHT`` of them are at the server at once."""

    def __init__(self, count: int, *, hold: float = 1.0) -> None:
        self.refunds = [_refund(i) for i in range(count)]
        self.asked: Counter[int] = Counter()
        self.in_flight = 0
        self.most_in_flight = 0
        self.hold = hold
        self.together = asyncio.Event()
        self.wanted_together = min(PAGES_IN_FLIGHT, count - 1)
        self.answers: dict[int, tuple[int, dict[str, Any]]] = {}
        """Page number -> (status, body) answered instead of the page."""
        self.cut: int | None = None
        """Pages from this one on never answer (the read is cancelled meanwhile)."""
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "tok-" + "x" * 20, "refresh_token": "r" * 20})

    async def _list(self, request: web.Request) -> web.Response:
        page = int(request.query.get("page", "0"))
        self.asked[page] += 1
        if page > 0:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            if self.in_flight >= self.wanted_together:
                self.together.set()
            try:
                if self.cut is not None and page >= self.cut:
                    await self.release.wait()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.together.wait(), self.hold)
            finally:
                self.in_flight -= 1
        if page in self.answers:
            status, body = self.answers[page]
            return web.Response(status=status, body=orjson.dumps(body))
        pages = len(self.refunds)
        data = {
            "content": self.refunds[page : page + 1],
            "number": page,
            "size": 1,
            "total_pages": pages,
            "total_elements": pages,
            "last": page + 1 >= pages,
        }
        return web.Response(body=orjson.dumps(data), content_type="application/json")


@contextlib.asynccontextmanager
async def paged_client(server: PagedServer) -> AsyncIterator[VioletClient]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            10001,
            "paged-secret-0123456789",
            username="paged-user",
            password="paged-password-0123",
            base_url=f"http://127.0.0.1:{port}/v1",
            clock=FakeClock(),
        ) as client:
            yield client
    finally:
        server.release.set()
        await runner.cleanup()


async def test_the_pages_a_list_announces_are_asked_for_together() -> None:
    """Nine refunds on pages of one: the eight pages after the first are asked for
    ``PAGES_IN_FLIGHT`` at a time, each once, and the read holds all nine, in order."""
    server = PagedServer(9)
    async with paged_client(server) as client:
        refunds = await client.list_bag_refunds(ORDER, BAG)
    assert [r.id for r in refunds] == [5000 + i for i in range(9)]
    assert server.most_in_flight == PAGES_IN_FLIGHT  # one at a time before
    assert server.asked == Counter(dict.fromkeys(range(9), 1))


async def test_a_page_asked_ahead_that_fails_fails_the_read() -> None:
    """A page the walk needs answers an error: the whole read fails, as it did when
    pages were read one by one (part of a list is never taken for all of it)."""
    server = PagedServer(5)
    server.answers[3] = (404, {"message": "Page not found", "error_code": 404})
    async with paged_client(server) as client:
        with pytest.raises(Exception, match="404"):
            await client.list_bag_refunds(ORDER, BAG)
    # Every page was asked for once: the failure of page 3 left no task behind asking
    # again, and pages 1 to 4 were asked together.
    assert server.asked == Counter({0: 1, 1: 1, 2: 1, 3: 1, 4: 1})


async def test_a_page_the_walk_never_reaches_does_not_fail_the_read() -> None:
    """The first page announces three pages (and no count of refunds); the second says
    it is the last. The third page, asked for ahead and answered with an error, is not part of
    the walk: the read holds the two refunds, as a page-by-page walk would."""
    server = PagedServer(3)
    server.answers[0] = (
        200,
        {"content": [_refund(0)], "number": 0, "size": 1, "total_pages": 3, "last": False},
    )
    server.answers[1] = (
        200,
        {
            "content": [_refund(1)],
            "number": 1,
            "size": 1,
            "total_pages": 2,
            "total_elements": 2,
            "last": True,
        },
    )
    server.answers[2] = (500, {"message": "boom", "error_code": 500})
    server.wanted_together = 2
    async with paged_client(server) as client:
        refunds = await client.list_bag_refunds(ORDER, BAG)
    assert [r.id for r in refunds] == [5000, 5001]


async def test_a_read_cancelled_with_pages_in_flight_leaves_no_task_behind() -> None:
    """The caller cancels the read while pages are at the server: every page asked for
    ahead is cancelled with it; nothing keeps asking after the call ended."""
    server = PagedServer(6)
    server.cut = 1  # pages after the first never answer until released
    async with paged_client(server) as client:
        before = asyncio.all_tasks()
        read = asyncio.ensure_future(client.list_bag_refunds(ORDER, BAG))
        await asyncio.wait_for(server.together.wait(), 5)  # PAGES_IN_FLIGHT pages at once
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        left = [t for t in asyncio.all_tasks() - before if not t.done()]
        # aiohttp's own server handlers may still be winding down; none of ours is.
        assert not [t for t in left if "_PagesAhead" in repr(t.get_coro())]
    assert server.most_in_flight == PAGES_IN_FLIGHT
    assert max(server.asked.values()) == 1
