"""A small Violet of our own, scripted to behave like the real world at its worst.

Independent of FakeViolet on purpose: the faults that hid the first release's double
refunds were the ones FakeViolet did not have. One order with one bag; every POST
takes the next step of a script (commit now, later or never; answer what), the refund
list can lag, page, drop offsets from dates or trim reasons, and time is a FakeClock
shared with the client, so "commits 2.5 s after the 504" costs no real time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from email.utils import formatdate
from typing import Any

import attrs
import orjson
from aiohttp import web

from violet_async import VioletClient
from violet_async.testing import FakeClock

ORDER_ID = 5001
BAG_ID = 7001
APP_ID = 11
SECRET = "hostile-app-secret"
VIOLET_500 = orjson.dumps({"status": 500, "message": "Internal error", "error_code": 5000})
GATEWAY_504 = b"<html><body><h1>504 Gateway Time-out</h1></body></html>"
GATEWAY_502 = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
ENVOY_503 = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
CLOUDFLARE_524 = b"<html><body>Error 524: A timeout occurred</body></html>"


@attrs.define
class Step:
    """What one POST does: commit after ``commit_after`` seconds (None: never; 0: before
    answering), then answer ``status`` with ``body`` (200: the refund record)."""

    status: int = 200
    body: bytes | None = None
    commit_after: float | None = 0.0
    hang: bool = False
    """Never answer at all (the connection stays open until the client gives up)."""
    answer: dict[str, Any] | None = None
    """For a 200: keys to overwrite in the refund record answered (another bag, order
    or amount), or the whole answer when nothing committed."""
    garbled: bool = False
    """For a 200: a body that cannot be read as a refund."""
    wall_step: float = 0.0
    """Step the client's wall clock by this many seconds as the POST arrives (NTP)."""
    headers: dict[str, str] | None = None
    """Headers of a non-2xx answer (``Retry-After`` on a 429)."""


@attrs.define
class Hostile:
    clock: FakeClock
    total: int = 1000
    script: list[Step] = attrs.Factory(list)
    list_lag: float = 0.0
    naive_dates: bool = False
    """Dates in server-local time (UTC-5) without an offset."""
    null_dates: bool = False
    trim_reasons: bool = False
    page_size: int | None = None
    server_skew: float = 0.0
    """Seconds the server's clock is ahead of the shared clock's wall time."""
    status: str = "COMPLETED"
    status_lag: float | None = None
    """Seconds after a commit before the bag's status moves (the commerce platform
    reports it later; None: at once)."""
    header_skew: float = 0.0
    """Seconds the ``Date`` header is off from the server's own clock (a CDN or load
    balancer stamping its own)."""
    day_dates: bool = False
    """Refund dates carry the day only (``...T00:00:00Z``)."""
    replica_behind: float = 0.0
    """The refund list comes from a replica this many seconds behind the primary."""
    flap: bool = False
    """Reads alternate between the primary and the replica ``replica_behind`` behind."""
    garbage: int = 0
    """Refund records in the list that cannot be read (an amount that is not a number)."""
    hang_reads: bool = False
    """Read-backs never answer either."""
    login_delay: float = 0.0
    """Seconds (shared clock) a login takes, as a slow or retried login would."""
    post_arrived: asyncio.Event = attrs.Factory(asyncio.Event)
    """Set when a POST reaches the server."""
    on_answer: Callable[[], Awaitable[None]] | None = None
    """Awaited after a POST's step ran (its commit, if any, done) and before its answer
    leaves: a fault elsewhere (Redis going away) timed with the answer."""
    refunds: list[dict[str, Any]] = attrs.Factory(list)
    ours: list[int] = attrs.Factory(list)
    """Ids of refunds committed from POSTs (not seeded by another actor)."""
    posts: int = 0
    reads: int = 0
    _next_id: int = 9000
    _stopping: asyncio.Event = attrs.Factory(asyncio.Event)
    _wall0: float = attrs.field(init=False)
    _moves: list[tuple[float, str]] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        # The server's own wall clock, which a step of the client's clock leaves alone.
        self._wall0 = self.clock.time() - self.clock.monotonic()

    # -- state ------------------------------------------------------------------

    @property
    def refunded(self) -> int:
        return sum(r["amount"] for r in self.refunds)

    def server_now(self) -> float:
        return self._wall0 + self.clock.monotonic() + self.server_skew

    def _date(self, when: float | None) -> str | None:
        if when is None or self.null_dates:
            return None
        if self.day_dates:
            return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT00:00:00Z")
        if self.naive_dates:
            local = datetime.fromtimestamp(when, timezone(timedelta(hours=-5)))
            return local.replace(tzinfo=None).strftime("%Y-%m-%dT%H:%M:%S")
        return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def add_refund(
        self, amount: int, *, reason: str | None = None, age: float = 0.0, ours: bool = False
    ) -> dict[str, Any]:
        """Commit a refund now (back-dated by ``age``): another actor's, unless ``ours``."""
        self._next_id += 1
        created = self.server_now() - age
        record: dict[str, Any] = {
            "id": self._next_id,
            "order_id": ORDER_ID,
            "bag_id": BAG_ID,
            "merchant_id": 1,
            "app_id": APP_ID,
            "transaction_id": 1,
            "gateway_transaction_id": "pi_1",
            "amount": amount,
            "status": "COMPLETED",
            "reason": reason,
            "date_created": self._date(created),
            "_visible_at": self.clock.monotonic() + (self.list_lag if ours else 0.0),
            "_at": self.clock.monotonic(),
        }
        self.refunds.append(record)
        if ours:
            self.ours.append(record["id"])
        self._move("REFUNDED" if self.refunded >= self.total else "PARTIALLY_REFUNDED")
        return record

    def _move(self, status: str) -> None:
        """The bag's status moves now, or ``status_lag`` later."""
        if self.status_lag is None:
            self.status = status
        else:
            self._moves.append((self.clock.monotonic() + self.status_lag, status))

    def bag_status(self) -> str:
        while self._moves and self._moves[0][0] <= self.clock.monotonic():
            self.status = self._moves.pop(0)[1]
        return self.status

    @property
    def closed(self) -> bool:
        """The bag is refunded or cancelled (whatever its lagging status says)."""
        final = self._moves[-1][1] if self._moves else self.status
        return final in ("REFUNDED", "CANCELED") or self.refunded >= self.total

    def _commit(self, body: dict[str, Any], *, cancel: bool) -> dict[str, Any] | str:
        if self.closed:
            return f"Bag {BAG_ID} is {self.status} and cannot be refunded"
        left = self.total - self.refunded
        amount = left if cancel or body.get("amount_refunded") is None else body["amount_refunded"]
        if amount > left:
            return f"Refund of {amount} exceeds the {left} left on bag {BAG_ID}"
        reason = body.get("reason")
        if isinstance(reason, str) and self.trim_reasons:
            reason = reason.strip()
        record = self.add_refund(amount, reason=reason, ours=True)
        if cancel:
            self._move("CANCELED")
        return record

    # -- the app ----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._date_header])
        app.router.add_post("/v1/login", self._login)
        app.router.add_get("/v1/auth/token", self._refresh)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_post("/v1/orders/{o}/bags/{b}/cancel", self._cancel)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_get("/v1/orders/{o}", self._order)
        return app

    @web.middleware
    async def _date_header(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Date"] = formatdate(self.server_now() + self.header_skew, usegmt=True)
        return response

    async def _login(self, request: web.Request) -> web.Response:
        await self.clock.sleep(self.login_delay)
        # Realistic token lengths: the client redacts its tokens from every error.
        return web.json_response(
            {
                "token": "hostile-access-token-0123456789",
                "refresh_token": "hostile-refresh-0123456789",
            }
        )

    async def _refresh(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "hostile-access-token-9876543210"})

    async def _refund(self, request: web.Request) -> web.StreamResponse:
        return await self._post(request, cancel=False)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        return await self._post(request, cancel=True)

    async def _post(self, request: web.Request, *, cancel: bool) -> web.StreamResponse:
        self.posts += 1
        self.post_arrived.set()
        body = await request.json()
        step = self.script.pop(0) if self.script else Step()
        if step.wall_step:
            self.clock.step_wall(step.wall_step)
        result: dict[str, Any] | str | None = None
        if step.commit_after == 0.0:
            result = self._commit(body, cancel=cancel)
        elif step.commit_after is not None:
            self.clock.call_later(step.commit_after, lambda: self._commit(body, cancel=cancel))
        if step.hang:
            await self._stopping.wait()  # long after the client gave up
        if self.on_answer is not None:
            await self.on_answer()
        if step.status in (200, 202):
            if step.garbled:
                return web.Response(
                    status=step.status, body=b'{"refund": "ok"', content_type="application/json"
                )
            if isinstance(result, str):
                return web.json_response(
                    {"status": 400, "message": result, "error_code": 4006}, status=400
                )
            answer = {**_public(result), **(step.answer or {})} if result else step.answer
            assert answer is not None
            return web.Response(
                status=step.status, body=orjson.dumps(answer), content_type="application/json"
            )
        return web.Response(status=step.status, body=step.body or b"", headers=step.headers)

    async def _list(self, request: web.Request) -> web.Response:
        self.reads += 1
        if self.hang_reads:
            await self._stopping.wait()
        now = self.clock.monotonic()
        behind = self.replica_behind if not self.flap or self.reads % 2 == 0 else 0.0
        visible = [
            _public(r) for r in self.refunds if r["_visible_at"] <= now and r["_at"] <= now - behind
        ]
        visible += [{"id": 1 + i, "bag_id": BAG_ID, "amount": "n/a"} for i in range(self.garbage)]
        if self.page_size is None:
            return web.Response(body=orjson.dumps(visible), content_type="application/json")
        page = int(request.query.get("page", "0"))
        size = self.page_size
        chunk = visible[page * size : (page + 1) * size]
        pages = max(1, -(-len(visible) // size))
        data = {
            "content": chunk,
            "number": page,
            "size": size,
            "total_pages": pages,
            "total_elements": len(visible),
            "last": page + 1 >= pages,
        }
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    async def _order(self, request: web.Request) -> web.Response:
        bag = {"id": BAG_ID, "status": self.bag_status(), "total": self.total}
        return web.json_response({"id": ORDER_ID, "bags": [bag]})


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not k.startswith("_")}


@contextlib.asynccontextmanager
async def hostile_client(server: Hostile, **options: Any) -> AsyncIterator[VioletClient]:
    """Serve ``server`` on 127.0.0.1 (port 0) and yield a client on the same clock."""
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            APP_ID,
            SECRET,
            username="hostile-user",
            password="hostile-password-0123",
            base_url=f"http://127.0.0.1:{port}/v1",
            **{"clock": server.clock, **options},
        ) as client:
            yield client
    finally:
        server._stopping.set()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def serve(server: Hostile) -> AsyncIterator[str]:
    """Serve ``server`` on 127.0.0.1 (port 0) and yield its base URL (for a client in
    another process, on the real clock)."""
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server._stopping.set()
        await runner.cleanup()
