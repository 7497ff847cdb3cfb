"""Adversarial review of the key path (issues 25 and 27): each test is a finding,
against a small Violet scripted here (127.0.0.1, port 0, a FakeClock for time)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from email.utils import formatdate
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from aiohttp import web

from violet_async import BagPendingError, RecordStoreError, RetryPolicy, VioletClient
from violet_async.stores import Claim, KeyEntry, MemoryStore, RecordStore, SQLiteStore
from violet_async.testing import FakeClock

ORDER, BAG = 6001, 8001
ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)


@attrs.define
class Violet:
    """One bag of 1000 cents; every POST commits a refund and answers it."""

    clock: FakeClock
    refunds: list[dict[str, Any]] = attrs.Factory(list)
    posts: int = 0
    next_id: int = 700

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._post)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_get("/v1/orders/{o}", self._order)
        return app

    def _date(self) -> str:
        return formatdate(self.clock.time(), usegmt=True)

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "tok-0123456789abcdef", "refresh_token": "r-0123456789"})

    async def _post(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        self.next_id += 1
        record = {
            "id": self.next_id,
            "order_id": ORDER,
            "bag_id": BAG,
            "amount": body.get("amount_refunded") or 1000,
            "status": "COMPLETED",
            "reason": body.get("reason"),
            "date_created": self._date_iso(),
        }
        self.refunds.append(record)
        return web.json_response(record, headers={"Date": self._date()})

    def _date_iso(self) -> str:
        return datetime.fromtimestamp(self.clock.time(), tz=timezone.utc).isoformat()

    async def _list(self, request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps(self.refunds),
            content_type="application/json",
            headers={"Date": self._date()},
        )

    async def _order(self, request: web.Request) -> web.Response:
        refunded = sum(r["amount"] for r in self.refunds)
        status = "REFUNDED" if refunded >= 1000 else "COMPLETED"
        bag = {"id": BAG, "status": status, "total": 1000}
        return web.json_response({"id": ORDER, "bags": [bag]}, headers={"Date": self._date()})


@contextlib.asynccontextmanager
async def serve(server: Violet, **options: Any) -> AsyncIterator[VioletClient]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            1,
            "review-app-secret",
            username="review-user",
            password="review-password-0123",
            base_url=f"http://127.0.0.1:{port}/v1",
            **{"clock": server.clock, "retry": ROOMY, **options},
        ) as client:
            yield client
    finally:
        await runner.cleanup()


@attrs.define
class SlowEnd:
    """A MemoryStore whose write of a key's end (the refund) waits for a gate."""

    inner: MemoryStore = attrs.Factory(MemoryStore)
    gate: asyncio.Event = attrs.Factory(asyncio.Event)
    waiting: bool = False
    fail: bool = False
    """The write of the end fails once the gate opens (a full disk)."""

    @property
    def lease(self) -> float:
        return self.inner.lease

    @property
    def retention(self) -> float:
        return self.inner.retention

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        return await self.inner.claim(fresh, now)

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        if entry.refund is not None and not self.gate.is_set():
            self.waiting = True
            await self.gate.wait()
            if self.fail:
                raise OSError("disk full")
        return await self.inner.save(entry, owner)

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        return await self.inner.renew(key, owner, lease_until)

    async def load(self, key: str) -> KeyEntry | None:
        return await self.inner.load(key)

    async def aclose(self) -> None:
        return None


async def _until(predicate: Any) -> None:
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


@pytest.mark.parametrize("fail", [False, True])
async def test_cancelled_while_the_end_is_recorded_no_second_refund_without_key(
    fail: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The POST applied; the caller cancels while the store records the key's end (a
    slow disk, a wait_for running out; the write may then fail too). The caller either
    gets its refund, or the next call on the bag is refused: never a second refund for
    a caller who was told nothing."""
    server = Violet(FakeClock())
    store = SlowEnd(fail=fail)
    async with serve(server, store=store) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="end")
        )
        await _until(lambda: store.waiting)
        call.cancel()
        try:
            first = await call
        except asyncio.CancelledError:
            first = None
        store.gate.set()
        with contextlib.suppress(BagPendingError):
            await client.refund_bag(ORDER, BAG, amount_refunded=300)
        again = await client.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="end")
    assert first is not None or server.posts == 1, "a second refund for a cancelled caller"
    if first is not None:
        assert first == again
        assert first.id == server.refunds[0]["id"]
    assert ("could not record the refund" in caplog.text) is fail


#: What the clients of ``serve`` scope their keys by (app id 1, host 127.0.0.1).
SCOPE = "1 127.0.0.1"


def _plant(path: Path, key: str, entry: dict[str, Any]) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(
            "INSERT OR REPLACE INTO violet_keys (key, entry, owner, lease_until, finished_at) "
            "VALUES (?, ?, NULL, NULL, ?)",
            (key, orjson.dumps(entry), entry.get("finished_at")),
        )
        conn.commit()
    finally:
        conn.close()


def _ask(phase: str, **more: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "kind": "refund",
        "order_id": ORDER,
        "bag_id": BAG,
        "request": {"amount_refunded": 300},
        "phase": phase,
        "sends": 1,
        "first_sent_at": 1_000.0,
        "last_sent_at": 1_000.0,
        **more,
    }


async def _made(path: Path) -> SQLiteStore:
    store = SQLiteStore(path)
    await store.load("nothing")  # creates the file and its table
    return store


async def test_a_planted_finished_key_with_another_bags_refund_is_not_returned(
    tmp_path: Path,
) -> None:
    """Someone wrote the key's row: the same request, 'applied', with a refund of
    another bag and order. Returning it would tell the caller a refund was made that
    never was: the row is refused (RecordStoreError), nothing sent."""
    path = tmp_path / "keys.db"
    store = await _made(path)
    foreign = {"id": 4242, "order_id": 1, "bag_id": 2, "amount": 300, "status": "COMPLETED"}
    clock = FakeClock()
    _plant(
        path,
        f"{SCOPE} planted",
        {
            "v": 1,
            "key": f"{SCOPE} planted",
            "scope": SCOPE,
            "ask": _ask("applied", refund_id=4242),
            "refund": foreign,
            "owner": None,
            "lease_until": None,
            "finished_at": clock.time(),
        },
    )
    server = Violet(clock)
    try:
        async with serve(server, store=store) as client:
            with pytest.raises(RecordStoreError) as info:
                await client.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="planted")
    finally:
        await store.aclose()
    assert "nothing was sent" in str(info.value)
    assert server.posts == 0


async def test_an_applied_key_without_its_refund_is_read_back_never_sent_blind(
    tmp_path: Path,
) -> None:
    """A row that says the ask applied but lost its refund (edited, or written by an
    older or foreign writer): the ask was sent, so it is read back, never sent again
    blind. Violet holds the refund: it is found, one refund."""
    path = tmp_path / "keys.db"
    store: RecordStore = await _made(path)
    clock = FakeClock()
    server = Violet(clock)
    server.refunds.append(
        {
            "id": 4243,
            "order_id": ORDER,
            "bag_id": BAG,
            "amount": 300,
            "status": "COMPLETED",
            "date_created": "1970-01-01T00:16:40+00:00",
        }
    )
    _plant(
        path,
        f"{SCOPE} lost",
        {
            "v": 1,
            "key": f"{SCOPE} lost",
            "scope": SCOPE,
            "ask": _ask("applied"),
            "refund": None,
            "owner": None,
            "lease_until": None,
            "finished_at": None,
        },
    )
    try:
        async with serve(server, store=store) as client:
            with contextlib.suppress(Exception):
                await client.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="lost")
    finally:
        await store.aclose()
    assert server.posts == 0, "an applied ask was sent again blind"


@attrs.define
class Stalling:
    """A store whose first record of a send returns only after ``during`` ran: the
    owner's process stalled (a GC pause, a frozen container) right after writing it."""

    inner: SQLiteStore
    clock: FakeClock
    during: Any = None
    at: int = 1
    sent_saves: int = 0

    @property
    def lease(self) -> float:
        return self.inner.lease

    @property
    def retention(self) -> float:
        return self.inner.retention

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        return await self.inner.claim(fresh, now)

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        saved = await self.inner.save(entry, owner)
        if entry.ask.phase.value == "sent":
            self.sent_saves += 1
            if self.sent_saves == self.at:
                await self.during()
            elif self.sent_saves < self.at:
                # A slow write: the send is stamped again right before it leaves.
                self.clock.advance(1.0)
        return saved

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        return await self.inner.renew(key, owner, lease_until)

    async def load(self, key: str) -> KeyEntry | None:
        return await self.inner.load(key)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("at", [1, 2])
async def test_an_owner_stalled_past_its_lease_does_not_send_after_a_takeover(
    tmp_path: Path, at: int
) -> None:
    """Process A records its send, then stalls past its lease and the settle window.
    Process B (same file) takes the key over, reads the bag back (nothing: A's POST
    has not left), proves absence and refunds. A wakes: its POST must not leave, its
    ownership is gone. One refund."""
    path = tmp_path / "keys.db"
    clock = FakeClock()
    server = Violet(clock)
    outcomes: list[Any] = []
    async with serve(server, store=Stalling(SQLiteStore(path), clock, at=at)) as first:
        other = SQLiteStore(path)
        async with VioletClient(
            1,
            "review-app-secret",
            username="review-user",
            password="review-password-0123",
            base_url=first.base_url,
            clock=clock,
            retry=ROOMY,
            store=other,
        ) as second:

            async def takeover() -> None:
                clock.advance(200.0)
                outcomes.append(
                    await second.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="s")
                )

            store = first._store
            assert isinstance(store, Stalling)
            store.during = takeover
            try:
                outcomes.append(
                    await first.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="s")
                )
            except Exception as exc:  # noqa: BLE001 - any outcome but a second refund
                outcomes.append(exc)
        await other.aclose()

    assert server.posts == 1, f"{server.posts} refunds: {outcomes}"
    given = [o for o in outcomes if not isinstance(o, Exception)]
    assert given, outcomes
    assert all(o.id == server.refunds[0]["id"] for o in given)


@attrs.define
class Misanswering(Violet):
    """Commits the refund on our bag, but answers the POST with a refund of another
    bag (a proxy that crossed two answers, a server bug)."""

    other: dict[str, Any] = attrs.Factory(dict)

    async def _post(self, request: web.Request) -> web.Response:
        await super()._post(request)
        return web.json_response(self.other, headers={"Date": self._date()})


@pytest.mark.parametrize("field", ["bag_id", "order_id"])
@pytest.mark.parametrize("key", [None, "crossed"])
async def test_a_2xx_naming_another_bag_is_not_returned_as_this_calls_refund(
    field: str, key: str | None
) -> None:
    """A 2xx whose refund names another bag or order is not this call's refund: the
    bag is read back (finding the refund that was made), never the other returned."""
    clock = FakeClock()
    crossed = {"id": 9999, "order_id": ORDER, "bag_id": BAG, "amount": 300}
    crossed[field] = 4
    server = Misanswering(clock, other={**crossed, "status": "COMPLETED"})
    async with serve(server) as client:
        try:
            got = await client.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key=key)
        except Exception as exc:  # noqa: BLE001 - pending is an honest outcome
            got = exc
    assert getattr(got, "id", None) != 9999, got
    assert server.posts == 1
    if not isinstance(got, Exception):
        assert got.id == server.refunds[0]["id"]


@attrs.define
class Lossy(Violet):
    """Commits the refund but answers the POST with a 504; its refund list drops the
    named fields of every record (older records miss fields, EXTERNAL ones carry no
    ids)."""

    drop: tuple[str, ...] = ("amount",)
    extra: list[Any] = attrs.Factory(list)

    async def _post(self, request: web.Request) -> web.Response:
        await super()._post(request)
        return web.Response(status=504, body=b"<html>504 Gateway Time-out</html>")

    async def _list(self, request: web.Request) -> web.Response:
        shown = [{k: v for k, v in r.items() if k not in self.drop} for r in self.refunds]
        return web.Response(
            body=orjson.dumps([*self.extra, *shown]),
            content_type="application/json",
            headers={"Date": self._date()},
        )


@pytest.mark.parametrize(
    ("drop", "extra"),
    [
        (("amount",), []),
        (("id",), []),
        (("date_created",), []),
        (("amount", "id"), []),
        ((), ["not a record"]),
        ((), [{"id": "x", "amount": "lots"}]),
        ((), [{"id": 5, "order_id": ORDER, "bag_id": BAG, "status": "COMPLETED"}]),
    ],
)
async def test_a_refund_listed_without_its_fields_is_never_sent_again(
    drop: tuple[str, ...], extra: list[Any]
) -> None:
    """The refund applied but the POST answered 504, and the bag's list shows it (or a
    neighbour) without some field: absence is never proven, so it is never sent twice;
    whatever the call returns is the refund made."""
    clock = FakeClock()
    server = Lossy(clock, drop=drop, extra=extra)
    async with serve(server) as client:
        try:
            got: Any = await client.refund_bag(ORDER, BAG, amount_refunded=300)
        except Exception as exc:  # noqa: BLE001 - pending is an honest outcome
            got = exc
        clock.advance(3600.0)
        pending = getattr(got, "pending", None)
        if pending is not None:
            try:
                got = await client.resume(pending)
            except Exception as exc:  # noqa: BLE001 - still pending is honest
                got = exc
    assert server.posts == 1, got
    if not isinstance(got, Exception):
        assert got.id in (None, server.refunds[0]["id"])


@attrs.define
class Cancelling(Violet):
    """Cancels the bag (a refund of the whole bag), then answers 202 with ``answer``."""

    answer: dict[str, Any] = attrs.Factory(dict)
    cancel_posts: int = 0

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/orders/{o}/bags/{b}/cancel", self._cancel)
        return app

    async def _cancel(self, request: web.Request) -> web.Response:
        self.cancel_posts += 1
        self.next_id += 1
        self.refunds.append(
            {
                "id": self.next_id,
                "order_id": ORDER,
                "bag_id": BAG,
                "amount": 1000,
                "status": "COMPLETED",
                "date_created": self._date_iso(),
            }
        )
        return web.json_response(self.answer, status=202, headers={"Date": self._date()})

    async def _order(self, request: web.Request) -> web.Response:
        status = "CANCELED" if self.cancel_posts else "COMPLETED"
        bag = {"id": BAG, "status": status, "total": 1000}
        return web.json_response({"id": ORDER, "bags": [bag]}, headers={"Date": self._date()})


async def test_a_failed_cancellation_listing_a_cancelled_bag_is_not_definite() -> None:
    """Overall CANCELLATION_FAILURE, this bag not listed, yet a bag listed as cancelled
    with a refund: the body contradicts itself, so it proves nothing. The bag is read
    back (the cancel's refund is there) instead of telling the caller nothing
    happened."""
    clock = FakeClock()
    other_bag = {
        "order_id": ORDER,
        "bag_id": 4,
        "status": "CANCELED",
        "refund": {"id": 3, "order_id": ORDER, "bag_id": 4, "amount": 10, "status": "COMPLETED"},
    }
    server = Cancelling(
        clock,
        answer={
            "order_id": ORDER,
            "status": "CANCELLATION_FAILURE",
            "cancelled_bags": [other_bag],
            "message": "partially failed",
        },
    )
    async with serve(server) as client:
        try:
            got: Any = await client.cancel_bag(ORDER, BAG)
        except Exception as exc:  # noqa: BLE001 - pending is an honest outcome
            got = exc
    assert type(got).__name__ != "CancellationFailedError", got
    assert server.cancel_posts == 1
    if not isinstance(got, Exception):
        assert got.id == server.refunds[0]["id"]


@attrs.define
class HeldFirst(Violet):
    """The first POST commits 30 s (monotonic) after it arrives and answers only once
    ``gate`` opens; later POSTs as usual."""

    gate: asyncio.Event = attrs.Factory(asyncio.Event)
    arrived: asyncio.Event = attrs.Factory(asyncio.Event)
    held: bool = False

    async def _post(self, request: web.Request) -> web.Response:
        if self.held:
            return await super()._post(request)
        self.held = True
        self.posts += 1
        await request.read()
        self.next_id += 1
        record = {
            "id": self.next_id,
            "order_id": ORDER,
            "bag_id": BAG,
            "amount": 300,
            "status": "COMPLETED",
            "date_created": self._date_iso(),
        }

        def commit() -> None:
            record["date_created"] = self._date_iso()  # dated when it is made
            self.refunds.append(record)

        self.clock.call_later(30.0, commit)
        self.arrived.set()
        await self.gate.wait()
        return web.json_response(record, headers={"Date": self._date()})


async def test_a_wall_clock_step_during_a_post_never_refunds_twice(tmp_path: Path) -> None:
    """Process A's POST is at Violet (it commits 30 s later) when the machine's wall
    clock steps 200 s forward (NTP after a suspend): A's lease reads expired before its
    next renewal. Process B takes the key over: its read-back must not prove absence
    while A's request may still be running, whatever the recorded send time says. One
    refund, and both callers get it."""
    path = tmp_path / "keys.db"
    clock = FakeClock()
    server = HeldFirst(clock)
    outcomes: list[Any] = []
    async with serve(server, store=SQLiteStore(path)) as first:
        other = SQLiteStore(path)
        async with VioletClient(
            1,
            "review-app-secret",
            username="review-user",
            password="review-password-0123",
            base_url=first.base_url,
            clock=clock,
            retry=ROOMY,
            store=other,
        ) as second:
            call = asyncio.ensure_future(
                first.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="k")
            )
            await server.arrived.wait()
            clock.wall_start += 200.0
            try:
                outcomes.append(
                    await second.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="k")
                )
            except Exception as exc:  # noqa: BLE001 - pending is an honest outcome
                outcomes.append(exc)
            server.gate.set()
            outcomes.append(await call)
        await other.aclose()
        store = first._store
        assert store is not None
        await store.aclose()
    assert server.posts == 1, (server.posts, outcomes)
    assert len(server.refunds) == 1
    given = [o for o in outcomes if not isinstance(o, Exception)]
    assert all(o.id == server.refunds[0]["id"] for o in given), outcomes
