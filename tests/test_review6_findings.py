"""Review 6: issue 24's rows attacked again, in variations, against a Violet scripted
here (not FakeViolet, not the simulator, not tests/hostile.py). Refunds are counted
from this server's own record. A failing test here is an open finding."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    BagPendingError,
    PendingRefund,
    RetryPolicy,
    VioletClient,
)
from violet_async.batch import BatchItem, BatchResult, run_batch
from violet_async.models import RefundBagRequest
from violet_async.testing import FakeClock

ORDER = 8101
BAG = 9101
BAG2 = 9102
APP = 17
SECRET = "review6-secret-value"
GW_504 = b"<html><body>504 Gateway Time-out</body></html>"

ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)


class Violet6:
    """One order, one bag. Every POST runs ``on_post`` (default: commit now, answer 200).
    ``made`` is this server's own record of every refund it committed from a POST."""

    def __init__(self, clock: FakeClock, total: int = 1000) -> None:
        self.clock = clock
        self.total = total
        self.refunds: list[dict[str, Any]] = []
        self.made: list[int] = []
        self.posts = 0
        self.post_seen = asyncio.Event()
        self.release = asyncio.Event()
        self.next_id = 60_000
        # Seconds the Date header is off from this server's own clock.
        self.date_skew = 0.0
        # Seconds a refund stays out of the list after it commits (replica lag).
        self.list_lag = 0.0
        self.scripts: list[Callable[[dict[str, Any]], Awaitable[web.StreamResponse]]] = []
        self.token_exp: float | None = None
        self.cancelled: set[int] = set()
        self.post_tokens: list[str] = []
        # Seconds added to the Date of GET answers only (reads through another edge).
        self.read_skew = 0.0
        self.reads = 0
        self.read_gate: tuple[int, asyncio.Event] | None = None
        # Paged answers of this size (None: a bare list); ``bare_after`` makes every page
        # after the first a bare list (an older server behind the balancer ignoring it).
        self.page_size: int | None = None
        self.bare_after = False
        self._wall0 = clock.time() - clock.monotonic()

    # the server's own clock: a step of the client's wall clock leaves it alone
    def now(self) -> float:
        return self._wall0 + self.clock.monotonic()

    def left(self, bag: int = BAG) -> int:
        return self.total - sum(r["amount"] for r in self.refunds if r["bag_id"] == bag)

    def commit(
        self,
        amount: int | None,
        reason: str | None = None,
        *,
        ours: bool = True,
        age: float = 0.0,
        bag: int = BAG,
    ) -> dict[str, Any]:
        self.next_id += 1
        amount = self.left(bag) if amount is None else amount
        record = {
            "id": self.next_id,
            "order_id": ORDER,
            "bag_id": bag,
            "merchant_id": 3,
            "app_id": APP,
            "transaction_id": 4,
            "gateway_transaction_id": "pi_r6",
            "amount": amount,
            "status": "COMPLETED",
            "reason": reason,
            "date_created": datetime.fromtimestamp(self.now() - age, timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
            "_visible": self.clock.monotonic() + (self.list_lag if ours else 0.0),
        }
        self.refunds.append(record)
        if ours:
            self.made.append(record["id"])
        return record

    @staticmethod
    def public(record: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if not k.startswith("_")}

    # -- scripted steps ------------------------------------------------------------
    def commit_then(self, status: int, body: bytes = b"", *, hang: bool = False):  # type: ignore[no-untyped-def]
        async def step(req: dict[str, Any]) -> web.StreamResponse:
            self.commit(req.get("amount_refunded"), req.get("reason"), bag=req["_bag"])
            if hang:
                await self.release.wait()
            return web.Response(status=status, body=body)

        return step

    def late_commit(self, after: float, status: int = 504, body: bytes = GW_504):  # type: ignore[no-untyped-def]
        async def step(req: dict[str, Any]) -> web.StreamResponse:
            self.clock.call_later(
                after,
                lambda: self.commit(req.get("amount_refunded"), req.get("reason"), bag=req["_bag"]),
            )
            return web.Response(status=status, body=body)

        return step

    def no_commit(self, status: int = 504, body: bytes = GW_504):  # type: ignore[no-untyped-def]
        async def step(req: dict[str, Any]) -> web.StreamResponse:
            return web.Response(status=status, body=body)

        return step

    def cancel_answer(  # type: ignore[no-untyped-def]
        self, status: int, shape: Callable[[dict[str, Any] | None], Any], *, commit: bool = True
    ):
        """A cancel: commit it (the bag's rest refunded, the bag CANCELED) or not, and
        answer ``shape(refund or None)`` with ``status``."""

        async def step(req: dict[str, Any]) -> web.StreamResponse:
            record = None
            if commit:
                record = self.commit(None, req.get("reason"), bag=req["_bag"])
                self.cancelled.add(req["_bag"])
            return web.Response(
                status=status,
                body=orjson.dumps(shape(None if record is None else self.public(record))),
                content_type="application/json",
            )

        return step

    # -- the app -------------------------------------------------------------------
    def app(self) -> web.Application:
        @web.middleware
        async def date(request: web.Request, handler: Any) -> web.StreamResponse:
            response: web.StreamResponse = await handler(request)
            skew = self.date_skew + (self.read_skew if request.method == "GET" else 0.0)
            response.headers["Date"] = formatdate(self.now() + skew, usegmt=True)
            return response

        app = web.Application(middlewares=[date])
        app.router.add_post("/v1/login", self._login)
        app.router.add_get("/v1/auth/token", self._refresh)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._post)
        app.router.add_post("/v1/orders/{o}/bags/{b}/cancel", self._post)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_get("/v1/orders/{o}", self._order)
        return app

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": jwt(time.time() + 86_400), "refresh_token": "r6-r"})

    async def _refresh(self, request: web.Request) -> web.Response:
        return web.json_response({"token": jwt(time.time() + 86_400)})

    async def _post(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        self.post_tokens.append(request.headers.get("X-Violet-Token", ""))
        self.post_seen.set()
        body = await request.json()
        body["_bag"] = int(request.match_info["b"])
        if self.scripts:
            return await self.scripts.pop(0)(body)
        record = self.commit(body.get("amount_refunded"), body.get("reason"), bag=body["_bag"])
        return web.json_response(self.public(record))

    async def _list(self, request: web.Request) -> web.Response:
        self.reads += 1
        if self.read_gate is not None and self.reads >= self.read_gate[0]:
            self.read_gate[1].set()
        now = self.clock.monotonic()
        bag = int(request.match_info["b"])
        shown = [
            self.public(r) for r in self.refunds if r["_visible"] <= now and r["bag_id"] == bag
        ]
        page = int(request.query.get("page", "0"))
        if self.page_size is None:
            return web.Response(body=orjson.dumps(shown), content_type="application/json")
        if self.bare_after and page > 0:  # the first page again, as a bare list
            first = shown[: self.page_size]
            return web.Response(body=orjson.dumps(first), content_type="application/json")
        size = self.page_size
        pages = max(1, -(-len(shown) // size))
        data = {
            "content": shown[page * size : (page + 1) * size],
            "number": page,
            "size": size,
            "total_pages": pages,
            "total_elements": len(shown),
            "last": page + 1 >= pages,
        }
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    async def _order(self, request: web.Request) -> web.Response:
        bags = [
            {
                "id": b,
                "status": "CANCELED"
                if b in self.cancelled
                else "REFUNDED"
                if self.left(b) <= 0
                else "COMPLETED",
                "total": self.total,
            }
            for b in (BAG, BAG2)
        ]
        return web.json_response({"id": ORDER, "bags": bags})


def jwt(exp: float) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'sub': 'r6', 'exp': exp})}.c2ln"


@contextlib.asynccontextmanager
async def running(server: Violet6, **options: Any) -> AsyncIterator[VioletClient]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    auth: dict[str, Any] = {"username": "r6-user", "password": "r6-password-xyz"}
    if "token" in options:
        auth = {}
    try:
        async with VioletClient(
            APP,
            SECRET,
            base_url=f"http://127.0.0.1:{port}/v1",
            **{"clock": server.clock, "retry": ROOMY, **auth, **options},
        ) as client:
            yield client
    finally:
        server.release.set()
        await runner.cleanup()


async def pending_of(call: Awaitable[Any]) -> PendingRefund:
    with pytest.raises(AmbiguousOutcomeError) as info:
        await call
    assert info.value.pending is not None
    return info.value.pending


# -- a resume job delivered again, carrying the record it was first given --------------


async def test_resume_redelivered_with_its_first_record_after_a_resend_went_pending() -> None:
    """The call ends pending (its POST never applied). Resume 1 proves it absent and
    re-sends; that re-send's answer is a 504 and it commits 30 s later, so resume 1 ends
    pending again (a fresher record). The queue delivers the job again with the record
    it was first given (at-least-once delivery re-sends the job's payload, not the
    fresher record): it must not prove the ask absent while resume 1's send still runs."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit(), server.late_commit(30.0)]
    async with running(server, retry=RetryPolicy(deadline=20.0)) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        again = await pending_of(client.resume(first))
        assert again.sends == 2
        with contextlib.suppress(AmbiguousOutcomeError):
            await client.resume(PendingRefund.from_json(first.to_json()))
        clock.advance(120.0)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


async def test_resume_redelivered_after_its_first_delivery_was_cancelled_mid_resend() -> None:
    """Resume 1 re-sends after proving absence; its caller (a job timeout) cancels it
    while that POST is in flight (it commits). The job is delivered again with the
    record it was first given: the cancelled re-send may have applied (its refund shows
    in the list 10 s after it commits)."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit(), server.commit_then(200, hang=True)]
    async with running(server, retry=RetryPolicy(deadline=20.0)) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        server.list_lag = 10.0  # the re-send's refund shows in the list 10 s after it commits
        server.post_seen.clear()
        job = asyncio.ensure_future(client.resume(first))
        await server.post_seen.wait()
        await asyncio.sleep(0.05)
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        with contextlib.suppress(AmbiguousOutcomeError, BagPendingError):
            await client.resume(PendingRefund.from_json(first.to_json()))
        clock.advance(120.0)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


# -- a caller's cancel while the token reaches its renewal time -------------------------


async def test_cancel_after_the_token_reached_its_renewal_time_keeps_the_bag_pending() -> None:
    """The POST leaves with a token that is still good; while it is in flight (it has
    committed) the token reaches its renewal time, and the caller cancels the call. The
    request left: the bag must be pending (the next call gets BagPendingError), never
    free for a second POST. (Real time here: the token's renewal runs on time.time.)"""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.commit_then(200, hang=True)]
    born = time.time()
    token = jwt(born + 2.0)  # renewed half-way through its 2 s life
    async with running(server, token=token, refresh_token="r6-refresh") as client:
        call = asyncio.ensure_future(client.refund_bag(ORDER, BAG, amount_refunded=300))
        await server.post_seen.wait()
        assert server.post_tokens == [token]  # it left with the token still good
        await asyncio.sleep(max(0.0, born + 1.3 - time.time()))  # now past its renewal time
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        with contextlib.suppress(BagPendingError):
            await client.refund_bag(ORDER, BAG, amount_refunded=300)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


# -- a Date header minutes off (inside the trusted 15 minutes) ---------------------------


@pytest.mark.parametrize("skew", [-600.0, -840.0])
async def test_date_header_minutes_behind_never_claims_an_older_refund(skew: float) -> None:
    """No baseline. A load balancer stamps a Date 10 (or 14) minutes behind Violet's own
    clock, which dates the refunds; this machine's clock is right. Another system
    refunded the same amount on the bag 5 minutes before our POST, which never applies
    (a 504). That refund is minutes older than our send by this machine's clock and by
    Violet's dates: it is not ours, and must never be returned as this call's."""
    clock = FakeClock()
    server = Violet6(clock)
    server.date_skew = skew
    server.commit(300, ours=False, age=300.0)
    server.scripts = [server.no_commit()]
    async with running(server) as client:
        try:
            refund = await client.refund_bag(ORDER, BAG, amount_refunded=300)
        except AmbiguousOutcomeError:
            refund = None
    assert server.made == []
    assert refund is None, f"refund {refund.id} of another system returned as this call's"


# -- the batch: a row edited after a kill ---------------------------------------------------


async def _killed_mid_post(
    client: VioletClient, item: BatchItem, journal: Any, server: Violet6
) -> None:
    """Run 1: the row's POST commits and hangs; the run is killed (its task cancelled)
    while the POST is in flight, leaving the journal's entry open."""

    async def consume() -> None:
        async for _ in run_batch(client, [item], journal=journal):
            pass

    run = asyncio.ensure_future(consume())
    await server.post_seen.wait()
    await asyncio.sleep(0.05)
    run.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await run


async def _results(client: VioletClient, items: list[BatchItem], journal: Any) -> list[BatchResult]:
    return [r async for r in run_batch(client, items, journal=journal)]


@pytest.mark.parametrize("lag", [0.0, 10.0])
async def test_batch_row_amount_edited_after_a_kill_is_not_a_second_refund(
    tmp_path: Any, lag: float
) -> None:
    """Run 1 is killed with its row's POST in flight (it applied: 300 refunded). The
    operator 'fixes' the row's amount to 350 and runs again: the bag's open entry is
    read back first and the edited row must not be sent (one refund)."""
    clock = FakeClock()
    server = Violet6(clock)
    server.list_lag = lag
    server.scripts = [server.commit_then(200, hang=True)]
    journal = tmp_path / "rows.journal.jsonl"
    async with running(server) as client:
        first = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=300))
        await _killed_mid_post(client, first, journal, server)
    async with running(server) as client:
        edited = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=350))
        results = await _results(client, [edited], journal)
    assert [r.outcome for r in results] != ["succeeded"]
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


async def test_batch_row_bag_edited_after_a_kill_keeps_track_of_the_first(
    tmp_path: Any,
) -> None:
    """Run 1 is killed with its row's POST in flight on bag BAG (it applied). The
    operator corrects the row's bag to BAG2 and runs again: the refund made on BAG must
    not be lost track of (the run's results, or the journal, must settle it)."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.commit_then(200, hang=True)]
    journal = tmp_path / "rows.journal.jsonl"
    first = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=300))
    async with running(server) as client:
        await _killed_mid_post(client, first, journal, server)
    async with running(server) as client:
        edited = BatchItem.refund(1, ORDER, BAG2, RefundBagRequest(amount_refunded=300))
        results = await _results(client, [edited], journal)
    from violet_async._journal import Journal

    log = await Journal.open(journal, input_id=None)
    try:
        entry = log.entry(f"{first.key}:0")
    finally:
        await log.aclose()
    told = any(r.item.bag_id == BAG for r in results)
    assert len(server.made) == 2  # one on each bag, as asked
    assert told or (entry is not None and entry.state == "done"), (
        f"bag {BAG}'s refund {server.made[0]} is left '{entry and entry.state}' in the journal "
        "and in no result of the run"
    )


# -- a refund dated in the future (a wrongly labelled offset, the other way) -----------


async def test_a_refund_dated_after_the_read_is_never_claimed_by_its_date() -> None:
    """No baseline. Another system refunded the same amount 30 minutes before our POST,
    and its platform labels local time (UTC+2) as UTC: its date reads 1.5 h after our
    send, and after the read itself (Violet's own Date says so). Our POST never applies
    (a 504). A date later than the server's own clock cannot be right: it places the
    refund nowhere, and must not make it ours."""
    clock = FakeClock()
    server = Violet6(clock)
    server.commit(300, ours=False, age=1800.0 - 7200.0)
    server.scripts = [server.no_commit()]
    async with running(server) as client:
        try:
            refund = await client.refund_bag(ORDER, BAG, amount_refunded=300)
        except AmbiguousOutcomeError:
            refund = None
    assert server.made == []
    assert refund is None, f"refund {refund.id} of another system returned as this call's"


# -- the same resume in two workers (a job delivered to two processes) -----------------


# Two clients with nothing shared cannot know of each other's re-send: this case holds
# only when they share a record store, and is tested so in tests/test_resume_redelivery.py
# (test_one_pending_record_resumed_by_two_workers_sharing_a_store, one SQLite file too);
# without a store it is remaining risk (d) in docs/remaining-risk.md.


async def test_resume_delivered_twice_at_once_while_the_first_re_sends() -> None:
    """The same resume delivered twice at the same moment: the first proves the ask
    absent and re-sends (a 504, commits 30 s later: it ends pending); the second waits
    for the bag, then must not prove absence from the record it was given."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit(), server.late_commit(30.0)]
    async with running(server, retry=RetryPolicy(deadline=20.0)) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        await asyncio.gather(
            client.resume(first),
            client.resume(PendingRefund.from_json(first.to_json())),
            return_exceptions=True,
        )
        clock.advance(120.0)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


# -- keyed calls: the caller cancels mid-POST, then repeats --------------------------------


@pytest.mark.parametrize("repeat_with_key", [True, False])
@pytest.mark.parametrize("lag", [0.0, 10.0])
async def test_keyed_call_cancelled_mid_post_then_repeated(
    repeat_with_key: bool, lag: float
) -> None:
    """A keyed refund's POST commits and hangs; the caller cancels. The repeat (with the
    key, or without it) must never make a second refund; the refund shows in the list
    ``lag`` seconds after it commits."""
    clock = FakeClock()
    server = Violet6(clock)
    server.list_lag = lag
    server.scripts = [server.commit_then(200, hang=True)]
    async with running(server, retry=RetryPolicy(deadline=20.0)) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="rma-1")
        )
        await server.post_seen.wait()
        await asyncio.sleep(0.05)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        key = {"idempotency_key": "rma-1"} if repeat_with_key else {}
        with contextlib.suppress(AmbiguousOutcomeError, BagPendingError):
            await client.refund_bag(ORDER, BAG, amount_refunded=300, **key)
        clock.advance(200.0)
        with contextlib.suppress(AmbiguousOutcomeError, BagPendingError):
            await client.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="rma-1")
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


async def test_keyed_call_cancelled_after_its_token_passed_renewal() -> None:
    """As the token test above, with an idempotency key: the repeat with the key must
    resume, never send blind."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.commit_then(200, hang=True)]
    born = time.time()
    token = jwt(born + 2.0)
    async with running(server, token=token, refresh_token="r6-refresh") as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="rma-2")
        )
        await server.post_seen.wait()
        assert server.post_tokens == [token]
        await asyncio.sleep(max(0.0, born + 1.3 - time.time()))
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        with contextlib.suppress(AmbiguousOutcomeError, BagPendingError):
            await client.refund_bag(ORDER, BAG, amount_refunded=300)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


# -- Violet's documented 202 cancel bodies ---------------------------------------------------


def _cancellation(status: str, bags: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "order_id": ORDER,
        "app_id": APP,
        "status": status,
        "cancelled_bags": bags,
        "message": None,
    }


def _bag_entry(bag: int, status: str, refund: dict[str, Any] | None) -> dict[str, Any]:
    if refund is not None:
        refund = {k: v for k, v in refund.items() if k != "gateway_transaction_id"}
    return {
        "order_id": ORDER,
        "bag_id": bag,
        "merchant_id": 3,
        "external_order_id": "x-1",
        "status": status,
        "originated_by": "APP",
        "date_cancelled": "2026-01-01T00:00:00Z",
        "refund": refund,
    }


CANCEL_SHAPES: dict[str, tuple[bool, Callable[[dict[str, Any] | None], Any]]] = {
    # name: (applied?, body)
    "our-bag-canceled": (
        True,
        lambda r: _cancellation("CANCELED", [_bag_entry(BAG, "CANCELED", r)]),
    ),
    "canceled-empty-list": (True, lambda r: _cancellation("CANCELED", [])),
    "partially-other-bag-listed": (
        True,
        lambda r: _cancellation("PARTIALLY_CANCELED", [_bag_entry(BAG2, "CANCELED", None)]),
    ),
    "our-bag-failure-with-refund": (
        True,
        lambda r: _cancellation(
            "CANCELLATION_FAILURE", [_bag_entry(BAG, "CANCELLATION_FAILURE", r)]
        ),
    ),
    "our-bag-canceled-no-refund": (
        True,
        lambda r: _cancellation("CANCELED", [_bag_entry(BAG, "CANCELED", None)]),
    ),
    "our-bag-canceled-refund-of-other-order": (
        True,
        lambda r: _cancellation(
            "CANCELED", [_bag_entry(BAG, "CANCELED", {**(r or {}), "order_id": ORDER + 1})]
        ),
    ),
    "bare-refund-200": (True, lambda r: r),
    "unknown-status-our-bag": (
        True,
        lambda r: _cancellation("PENDING", [_bag_entry(BAG, "PENDING", None)]),
    ),
}


@pytest.mark.parametrize("shape", sorted(CANCEL_SHAPES))
async def test_cancel_bodies_report_the_truth(shape: str) -> None:
    """Each documented (or near) 202 body for a cancel that applied: the call returns
    this bag's refund, or ends pending; never a definite failure, never another
    refund, and never a second cancel."""
    from violet_async import CancellationFailedError

    clock = FakeClock()
    server = Violet6(clock)
    applied, body = CANCEL_SHAPES[shape]
    server.scripts = [server.cancel_answer(202, body, commit=applied)]
    async with running(server, retry=RetryPolicy(deadline=120.0)) as client:
        try:
            refund = await client.cancel_bag(ORDER, BAG)
        except AmbiguousOutcomeError:
            refund = None
        except CancellationFailedError as exc:
            pytest.fail(f"a cancel that applied reported as failed: {exc}")
    assert len(server.made) == 1
    assert refund is None or refund.id == server.made[0]


# -- a 2xx naming the right bag and amount, but a refund listed long before ---------------


async def test_a_2xx_naming_an_hour_old_refund_is_not_this_calls() -> None:
    """No baseline. Another system refunded 300 on the bag an hour ago (refund A). Our
    POST commits refund B and its 200 answer is A's record (a replayed or cached
    answer: right order, bag and amount). A is an hour older than this send: returning
    it reports a refund this call did not make, and B is lost track of."""
    clock = FakeClock()
    server = Violet6(clock)
    older = server.commit(300, ours=False, age=3600.0)

    async def replayed(req: dict[str, Any]) -> web.StreamResponse:
        server.commit(req.get("amount_refunded"), req.get("reason"), bag=req["_bag"])
        return web.json_response(server.public(older))

    server.scripts = [replayed]
    async with running(server) as client:
        try:
            refund = await client.refund_bag(ORDER, BAG, amount_refunded=300)
        except AmbiguousOutcomeError:
            refund = None
    assert len(server.made) == 1
    assert refund is None or refund.id == server.made[0], (
        f"returned refund {refund.id} (an hour old), made {server.made}"
    )


async def test_a_2xx_naming_another_skus_refund_is_not_this_calls() -> None:
    """A refund by SKU line (no amount): the 200 answer names the right bag but another
    SKU line, an earlier refund's record. It is not this request's refund."""
    clock = FakeClock()
    server = Violet6(clock)
    older = server.commit(250, ours=False, age=3600.0)
    older["skus"] = [
        {
            "id": 1,
            "refund_id": older["id"],
            "bag_id": BAG,
            "quantity_refunded": 1,
            "order_sku_id": 11,
        }
    ]

    async def replayed(req: dict[str, Any]) -> web.StreamResponse:
        mine = server.commit(250, req.get("reason"), bag=req["_bag"])
        mine["skus"] = [
            {
                "id": 2,
                "refund_id": mine["id"],
                "bag_id": BAG,
                "quantity_refunded": 1,
                "order_sku_id": 10,
            }
        ]
        return web.json_response(server.public(older))

    server.scripts = [replayed]
    from violet_async import SkuRefund

    async with running(server) as client:
        try:
            refund = await client.refund_bag(
                ORDER, BAG, skus=[SkuRefund(order_sku_id=10, quantity_refunded=1)]
            )
        except AmbiguousOutcomeError:
            refund = None
    assert len(server.made) == 1
    assert refund is None or refund.id == server.made[0], (
        f"returned refund {refund.id} (SKU 11, an hour old), made {server.made}"
    )


# -- the wall clock steps at other awaits ------------------------------------------------


@pytest.mark.parametrize("jump", [3 * 3600.0, -15 * 3600.0])
@pytest.mark.parametrize("round_trip", [False, True])
async def test_wall_step_between_pending_and_resume(jump: float, round_trip: bool) -> None:
    """The POST's answer is a 504 and it commits 40 s later (inside the 60 s window).
    The call ends pending at its 20 s deadline; the wall clock steps (NTP) before the
    job resumes it in the same process (the record as given, or through JSON)."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.late_commit(40.0)]
    async with running(server, retry=RetryPolicy(deadline=20.0)) as client:
        pending = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.step_wall(jump)
        again = PendingRefund.from_json(pending.to_json()) if round_trip else pending
        with contextlib.suppress(AmbiguousOutcomeError):
            await client.resume(again)
        clock.advance(200.0)
        with contextlib.suppress(AmbiguousOutcomeError):
            await client.resume(again)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


async def test_wall_step_forward_during_a_resume_settle_wait() -> None:
    """A resume reads back inside the window and sleeps; during that sleep the wall
    clock steps 3 h forward. The request (committing 50 s after its 504) is still
    inside its window by monotonic time."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.late_commit(50.0)]
    stepped = False
    real_sleep = clock.sleep

    async def sleep(seconds: float) -> None:
        nonlocal stepped
        await real_sleep(seconds)
        if not stepped and server.posts == 1 and clock.monotonic() > clock.start + 22.0:
            stepped = True
            clock.step_wall(3 * 3600.0)

    clock.sleep = sleep  # type: ignore[method-assign]
    async with running(server, retry=RetryPolicy(deadline=20.0)) as client:
        pending = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        with contextlib.suppress(AmbiguousOutcomeError):
            await client.resume(pending)
        clock.advance(200.0)
    assert stepped
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


# -- a list whose second page comes back as a bare list ---------------------------------------


async def test_a_second_page_answered_as_a_bare_list_is_not_the_whole_list() -> None:
    """The refund list is paged (one per page). Another system's refund is on page 0;
    ours (a 504 that committed) would be on page 1, but page 1 is answered by a server
    that ignores paging: a bare list of page 0 again. The first page said two refunds
    exist; a read that collected one is part of the list, never proof of absence."""
    clock = FakeClock()
    server = Violet6(clock)
    server.commit(111, ours=False, age=3600.0)
    server.page_size, server.bare_after = 1, True
    server.scripts = [server.commit_then(504, GW_504)]
    async with running(server) as client:
        with contextlib.suppress(AmbiguousOutcomeError):
            await client.refund_bag(ORDER, BAG, amount_refunded=300)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


# -- Violet's own 500 while the platform call still runs -------------------------------------


async def test_violet_shaped_500_then_a_commit_20s_later() -> None:
    """A 500 whose body is Violet-shaped JSON (its API layer timed out its own call to
    the merchant platform, which still completes 20 s later). The SDK waits only
    settle_lag (5 s) after such an answer. The spec only says a 5xx 'may or may not have
    taken effect'."""
    clock = FakeClock()
    server = Violet6(clock)
    violet_500 = orjson.dumps({"status": 500, "message": "Internal error", "error_code": 5000})
    server.scripts = [server.late_commit(20.0, 500, violet_500)]
    async with running(server) as client:
        with contextlib.suppress(AmbiguousOutcomeError):
            await client.refund_bag(ORDER, BAG, amount_refunded=300)
        clock.advance(60.0)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


async def test_batch_row_reason_edited_after_it_was_done(tmp_path: Any) -> None:
    """docs/batches.md: "An edited row never refunds a bag twice." Run 1 refunds the row
    (done). The operator fixes a typo in that row's reason (amount and bag unchanged)
    and runs the file again: the edited row is sent as a new item, a second refund of
    the same 300 on the bag."""
    clock = FakeClock()
    server = Violet6(clock)
    journal = tmp_path / "rows.journal.jsonl"
    async with running(server) as client:
        first = BatchItem.refund(
            1, ORDER, BAG, RefundBagRequest(amount_refunded=300, reason="Damaged itme")
        )
        done = await _results(client, [first], journal)
        assert [r.outcome for r in done] == ["succeeded"]
        edited = BatchItem.refund(
            1, ORDER, BAG, RefundBagRequest(amount_refunded=300, reason="Damaged item")
        )
        again = await _results(client, [edited], journal)
    assert len(server.made) == 1, (
        f"{len(server.made)} refunds; the edited row ended {[r.outcome for r in again]}"
    )


async def test_date_header_jumping_mid_call_never_claims_an_older_refund() -> None:
    """Held: the POST's 504 carries a right Date; the read-backs come through a CDN
    stamping its own Date 10 minutes behind. The readings disagree: the clock is
    unsure, and a refund 5 minutes older than the send is not claimed."""
    clock = FakeClock()
    server = Violet6(clock)
    server.commit(300, ours=False, age=300.0)

    server.read_skew = -600.0  # read-backs' Date is 10 min behind; the POST's is right
    server.scripts = [server.no_commit()]
    async with running(server) as client:
        try:
            refund = await client.refund_bag(ORDER, BAG, amount_refunded=300)
        except AmbiguousOutcomeError:
            refund = None
    assert server.made == []
    assert refund is None


async def test_machine_clock_minutes_fast_with_a_right_date_header() -> None:
    """Held (the mirror of the Date-behind finding): this machine's clock is 10
    minutes fast and Violet's Date is right. A refund 5 minutes older than the send is
    not claimed."""
    clock = FakeClock()
    server = Violet6(clock)
    clock.step_wall(600.0)  # the client's wall clock only (the server keeps its own)
    server.commit(300, ours=False, age=300.0)
    server.scripts = [server.no_commit()]
    async with running(server) as client:
        try:
            refund = await client.refund_bag(ORDER, BAG, amount_refunded=300)
        except AmbiguousOutcomeError:
            refund = None
    assert server.made == []
    assert refund is None


# -- the caller cancels at each read of the failure path, then asks again -----------------


@pytest.mark.parametrize("cancel_at_read", [1, 2, 3, 5])
@pytest.mark.parametrize("again", ["plain", "keyed"])
async def test_cancel_at_each_read_then_ask_again(cancel_at_read: int, again: str) -> None:
    """The POST's answer is a 504; it commits 30 s later. The caller cancels the call
    at its n-th read-back (virtual time moves only in the client's sleeps), then asks
    again: the same call without a key (BagPendingError, then resume its record) or
    with the key (then resume whatever record it ends with). One refund."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.late_commit(30.0)]
    gate = asyncio.Event()
    server.read_gate = (cancel_at_read, gate)
    key = {"idempotency_key": "rma-9"} if again == "keyed" else {}
    async with running(server) as client:
        call = asyncio.ensure_future(client.refund_bag(ORDER, BAG, amount_refunded=300, **key))
        gated = asyncio.ensure_future(gate.wait())
        await asyncio.wait({call, gated}, return_when=asyncio.FIRST_COMPLETED)
        gated.cancel()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, AmbiguousOutcomeError):
            await call
        record = None
        try:
            await client.refund_bag(ORDER, BAG, amount_refunded=300, **key)
        except BagPendingError as exc:
            record = exc.pending[0]
        except AmbiguousOutcomeError as exc:
            record = exc.pending
        clock.advance(200.0)
        if record is not None:
            with contextlib.suppress(AmbiguousOutcomeError):
                await client.resume(record)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"


BASELINE = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0, read_before_send=True)


async def test_with_a_baseline_an_hour_old_refund_in_a_2xx_is_not_returned() -> None:
    """Held with read_before_send: the 2xx names refund A, listed before the send: it is
    read back, and the refund the POST made is returned."""
    clock = FakeClock()
    server = Violet6(clock)
    older = server.commit(300, ours=False, age=3600.0)

    async def replayed(req: dict[str, Any]) -> web.StreamResponse:
        server.commit(req.get("amount_refunded"), req.get("reason"), bag=req["_bag"])
        return web.json_response(server.public(older))

    server.scripts = [replayed]
    async with running(server, retry=BASELINE) as client:
        refund = await client.refund_bag(ORDER, BAG, amount_refunded=300)
    assert server.made == [refund.id]


async def test_with_a_baseline_a_date_header_minutes_behind_claims_nothing_older() -> None:
    """Held with read_before_send: the older refund is in the baseline, so it is never
    claimed; the 504 is proven absent after the window and sent again: one refund, the
    call's own. Its 2xx is dated 10 minutes after the answer's own ``Date`` (the header
    is behind Violet's refund dates), which a 2xx check cannot tell from a replayed
    answer, so the call ends for review on that one refund instead of returning it:
    never the older refund, never a second one."""
    clock = FakeClock()
    server = Violet6(clock)
    server.date_skew = -600.0
    older = server.commit(300, ours=False, age=300.0)
    server.scripts = [server.no_commit()]
    async with running(server, retry=BASELINE) as client:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER, BAG, amount_refunded=300)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert server.made[0] != older["id"]
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert [c.id for c in info.value.candidates] == server.made
