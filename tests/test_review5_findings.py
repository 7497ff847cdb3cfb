"""Adversarial review of the never-twice money core (issue 24, issue 27 row 3): each
test against a small Violet scripted here (not FakeViolet, not tests/hostile.py),
counting the refunds the server itself made."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any

import attrs
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
from violet_async.testing import FakeClock

ORDER, BAG = 61, 71


@attrs.define
class Tiny:
    """One bag. POSTs answer per ``script`` (a status, or "late": 504 and commit
    ``late_by`` seconds later); ``hidden`` refund ids are missing from the list (a
    replica behind)."""

    clock: FakeClock
    script: list[Any] = attrs.Factory(list)
    late_by: float = 30.0
    total: int = 1000
    refunds: list[dict[str, Any]] = attrs.Factory(list)
    hidden: set[int] = attrs.Factory(set)
    posts: int = 0
    header_skew: float = 0.0
    """Seconds the ``Date`` header is off from the server's clock (a CDN stamping its own)."""
    _next: int = 500
    stopping: asyncio.Event = attrs.Factory(asyncio.Event)
    arrived: asyncio.Event = attrs.Factory(asyncio.Event)
    _wall0: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # The server's own clock: a step of the client's wall clock leaves it alone.
        self._wall0 = self.clock.time() - self.clock.monotonic()

    def now(self) -> float:
        return self._wall0 + self.clock.monotonic()

    def commit(self, amount: int) -> dict[str, Any]:
        self._next += 1
        from datetime import datetime, timezone

        record = {
            "id": self._next,
            "order_id": ORDER,
            "bag_id": BAG,
            "amount": amount,
            "status": "COMPLETED",
            "date_created": datetime.fromtimestamp(self.now(), timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
        }
        self.refunds.append(record)
        return record

    def app(self) -> web.Application:
        @web.middleware
        async def date(request: web.Request, handler: Any) -> web.StreamResponse:
            response: web.StreamResponse = await handler(request)
            response.headers["Date"] = formatdate(self.now() + self.header_skew, usegmt=True)
            return response

        async def login(request: web.Request) -> web.Response:
            return web.json_response(
                {"token": "tiny-access-token-0123456789", "refresh_token": "tiny-refresh-01234"}
            )

        async def post(request: web.Request) -> web.Response:
            self.posts += 1
            self.arrived.set()
            asked = (await request.json()).get("amount_refunded")
            amount = asked or self.total - sum(r["amount"] for r in self.refunds)
            step = self.script.pop(0) if self.script else 200
            if step == "hang":
                self.clock.call_later(self.late_by, lambda: self.commit(amount))
                await self.stopping.wait()
                return web.Response(status=504)
            if isinstance(step, dict):  # a 200 answering this record, nothing committed
                return web.json_response(step)
            if step == "lost":
                return web.Response(status=504, body=b"<html>504 Gateway Time-out</html>")
            if step == "late":
                self.clock.call_later(self.late_by, lambda: self.commit(amount))
                return web.Response(status=504, body=b"<html>504 Gateway Time-out</html>")
            return web.json_response(self.commit(amount))

        async def listing(request: web.Request) -> web.Response:
            shown = [r for r in self.refunds if r.get("id") not in self.hidden]
            return web.Response(body=orjson.dumps(shown), content_type="application/json")

        async def order(request: web.Request) -> web.Response:
            return web.json_response(
                {"id": ORDER, "bags": [{"id": BAG, "status": "COMPLETED", "total": self.total}]}
            )

        app = web.Application(middlewares=[date])
        app.router.add_post("/v1/login", login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", post)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", listing)
        app.router.add_get("/v1/orders/{o}", order)
        return app


@contextlib.asynccontextmanager
async def tiny_client(server: Tiny, **options: Any) -> AsyncIterator[VioletClient]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            3,
            "tiny-app-secret",
            username="tiny-user",
            password="tiny-password-0123",
            base_url=f"http://127.0.0.1:{port}/v1",
            clock=server.clock,
            **options,
        ) as client:
            yield client
    finally:
        server.stopping.set()
        await runner.cleanup()


async def _pending(call: Any) -> PendingRefund:
    with pytest.raises(AmbiguousOutcomeError) as info:
        await call
    assert info.value.pending is not None
    return info.value.pending


async def test_a_resume_delivered_twice_whose_second_read_is_stale_never_re_sends() -> None:
    """The first call ends pending (its refund commits after the deadline). The resume
    job is delivered twice in one client: the first finds and returns the refund; the
    second reads a replica that does not show it yet. A refund this ask was handed
    does not vanish: that read is stale, never evidence of absence."""
    clock = FakeClock()
    server = Tiny(clock, script=["late"])
    async with tiny_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        pending = await _pending(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        first = await client.resume(pending)
        server.hidden.add(first.id)  # type: ignore[arg-type]
        try:
            second = await client.resume(PendingRefund.from_json(pending.to_json()))
        except AmbiguousOutcomeError:
            second = None
    assert second is None or second.id == first.id
    assert server.posts == 1
    assert len(server.refunds) == 1


@pytest.mark.parametrize(
    ("baseline", "step"),
    [(False, 3 * 3600.0), (False, -15 * 3600.0), (True, 3 * 3600.0), (True, -15 * 3600.0)],
)
async def test_a_cancelled_send_resumed_after_a_wall_clock_step_waits_out_its_post(
    baseline: bool, step: float
) -> None:
    """A send is in flight (Violet commits it 30 s later); NTP steps the wall clock (3 h
    forward, or 15 h back, before or after the caller cancels the call); the caller
    resumes at once, in the same process. The POST can still commit: the settle window
    must not look over because the wall clock jumped. (The inline first send, and the
    driver's send after a baseline read.)"""
    clock = FakeClock()
    server = Tiny(clock, script=["hang"])
    policy = RetryPolicy(deadline=300.0, read_before_send=baseline)
    async with tiny_client(server, retry=policy) as client:
        call = asyncio.create_task(client.refund_bag(ORDER, BAG, amount_refunded=300))
        await server.arrived.wait()
        if step < 0:
            clock.step_wall(step)  # during the POST, before the cancel
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        if step > 0:
            clock.step_wall(step)  # after the cancel, before the resume
        with pytest.raises(BagPendingError) as info:
            await client.refund_bag(ORDER, BAG, amount_refunded=300)
        (pending,) = info.value.pending
        try:
            refund = await client.resume(pending)
        except AmbiguousOutcomeError:
            refund = None
        clock.advance(120.0)  # the first POST commits, if it has not yet
    assert len(server.refunds) == 1
    assert refund is None or refund.id == server.refunds[0]["id"]
    assert server.posts == 1


@pytest.mark.parametrize(("here", "there"), [(-3 * 3600.0, 0.0), (0.0, -3 * 3600.0)])
async def test_a_record_resumed_elsewhere_behind_another_date_header_waits_out_its_post(
    here: float, there: float
) -> None:
    """Process one learned Violet's offset from a ``Date`` header (a baseline read),
    sent, and was cancelled with the POST in flight (Violet commits it 30 s later).
    Process two (another clock) resumes it at once behind another front end: one of
    the two headers is a CDN's, 3 h behind. Whichever was wrong, the POST can still
    commit, and the settle window must not look over."""
    clock = FakeClock()
    server = Tiny(clock, script=["hang"], header_skew=here)
    policy = RetryPolicy(deadline=300.0, read_before_send=True)
    async with tiny_client(server, retry=policy) as client:
        call = asyncio.create_task(client.refund_bag(ORDER, BAG, amount_refunded=300))
        await server.arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(BagPendingError) as info:
            await client.refund_bag(ORDER, BAG, amount_refunded=300)
        (pending,) = info.value.pending
        assert pending.server_offset is not None
        elsewhere = PendingRefund.from_dict(
            {**pending.to_dict(), "clock": "another-process", "wall_mono": None}
        )
        server.header_skew = there
        try:
            refund = await client.resume(elsewhere)
        except AmbiguousOutcomeError:
            refund = None
        clock.advance(120.0)  # the first POST commits, if it has not yet
    assert len(server.refunds) == 1
    assert refund is None or refund.id == server.refunds[0]["id"]
    assert server.posts == 1


async def test_an_old_refund_without_id_or_date_is_never_claimed_as_new_since_the_baseline() -> (
    None
):
    """Older records (an EXTERNAL refund made on the merchant's platform) may carry no
    id and no date. The bag holds one of 300 before this ask; the ask reads its
    baseline, sends a refund of 300, gets a 504 and Violet never applies it. The old
    record cannot be told apart from a new one (no id to find in the baseline, no
    date): never this call's success; pending for a person."""
    clock = FakeClock()
    server = Tiny(clock, script=["lost"])
    server.refunds.append({"order_id": ORDER, "bag_id": BAG, "amount": 300, "status": "COMPLETED"})
    policy = RetryPolicy(deadline=300.0, read_before_send=True)
    async with tiny_client(server, retry=policy) as client:
        pending = await _pending(client.refund_bag(ORDER, BAG, amount_refunded=300))
    assert pending.needs_review
    assert server.posts == 1


async def test_an_answered_record_resumed_in_another_process_is_never_sent_again() -> None:
    """A record whose send got an unreadable 2xx (``answered``: it applied), written by
    another process long ago, resumed here while the bag's list does not show the
    refund (a lagging list): read back, parked; never sent again."""
    clock = FakeClock()
    server = Tiny(clock)
    sent = clock.time() - 600.0
    record = {
        "kind": "refund",
        "order_id": ORDER,
        "bag_id": BAG,
        "request": {"amount_refunded": 300},
        "phase": "pending",
        "sends": 1,
        "first_sent_at": sent,
        "last_sent_at": sent,
        "settle_until": sent + 5.0,
        "doubted": True,
        "clock": "another-process",
        "answered": True,
    }
    async with tiny_client(server, retry=RetryPolicy(deadline=300.0)) as client:
        pending = await _pending(client.resume(PendingRefund.from_dict(record)))
    assert pending.needs_review
    assert server.posts == 0


@pytest.mark.parametrize("commits", [True, False])
async def test_a_whole_bag_refund_after_a_partial_one_with_the_status_lagging(
    commits: bool,
) -> None:
    """A partial refund of 300 (answered), then a whole-bag refund whose POST gets a
    504; the bag's status never moves (the platform reports it minutes later). If the
    POST committed (30 s later), its 700 is found and returned, never the partial
    refund; if it never did, it is sent again once: one whole-bag refund either way."""
    clock = FakeClock()
    server = Tiny(clock, script=[200, "late" if commits else "lost"])
    async with tiny_client(server, retry=RetryPolicy(deadline=300.0)) as client:
        partial = await client.refund_bag(ORDER, BAG, amount_refunded=300)
        whole = await client.refund_bag(ORDER, BAG)
    assert [r["amount"] for r in server.refunds] == [300, 700]
    assert whole.id == server.refunds[1]["id"] != partial.id
    assert server.posts == (2 if commits else 3)


async def test_a_200_naming_a_refund_listed_before_the_send_is_not_this_calls() -> None:
    """``read_before_send``: the bag already holds a refund of 300 (another process's).
    This ask's POST is answered 200 with that very record (a replayed or cached answer),
    and nothing of this ask is on the bag. A refund listed before the request left
    cannot be what it made: the 2xx is read back (it applied, so never sent again) and
    the call ends pending, never with the other refund as its success."""
    clock = FakeClock()
    server = Tiny(clock)
    other = server.commit(300)
    server.script = [dict(other)]
    policy = RetryPolicy(deadline=300.0, read_before_send=True)
    async with tiny_client(server, retry=policy) as client:
        pending = await _pending(client.refund_bag(ORDER, BAG, amount_refunded=300))
    assert pending.answered
    assert server.posts == 1


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("commits", [True, False])
async def test_a_second_ask_of_the_same_amount_never_claims_the_first_ones_refund(
    baseline: bool, commits: bool
) -> None:
    """Two asks of 300 on one bag in sequence: the first is answered; the second's POST
    gets a 504 (committing 30 s later, or never). The second never returns the first's
    refund: its own when it committed, pending (or one re-send after proven absence)
    when it did not."""
    clock = FakeClock()
    server = Tiny(clock, script=[200, "late" if commits else "lost"])
    policy = RetryPolicy(deadline=300.0, read_before_send=baseline)
    async with tiny_client(server, retry=policy) as client:
        first = await client.refund_bag(ORDER, BAG, amount_refunded=300)
        try:
            second = await client.refund_bag(ORDER, BAG, amount_refunded=300)
        except AmbiguousOutcomeError:
            second = None
    assert second is None or second.id != first.id
    assert len(server.refunds) == (2 if commits or second is not None else 1)
    assert second is None or second.id == server.refunds[1]["id"]
