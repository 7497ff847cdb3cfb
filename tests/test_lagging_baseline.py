"""A baseline read from a replica behind (review5's open finding, issue 24 row 6): the
read before the send does not list another system's refund of the same amount made
shortly before; after an ambiguous POST the read-back lists it, new since the
baseline. Being new since the baseline proves nothing: only a date that places the
refund after the send, by every reading of Violet's clock, lets the SDK claim it.

Each test runs against a Violet scripted here (not FakeViolet, not tests/hostile.py)
and counts the refunds that server made itself."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import attrs
import orjson
import pytest
from aiohttp import web

from violet_async import AmbiguousOutcomeError, PendingRefund, RetryPolicy, VioletClient
from violet_async.models import OrderRefund
from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan, ServerQuirks

from .conftest import ROOMY_POLICY, make_client, ours

ORDER, BAG = 81, 91
#: 20:00 UTC: a day-precision date (00:00 of the day) is 20 h "before" a send now.
EVENING = datetime(2026, 3, 4, 20, 0, tzinfo=timezone.utc).timestamp()
HOUR = 3600.0
BASELINE = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0, read_before_send=True)
NO_BASELINE = attrs.evolve(BASELINE, read_before_send=False)


@attrs.define
class Lagging:
    """One bag. Refunds in ``unlisted`` are missing from the list until a POST arrives
    (the read before the send came from a replica behind). The POST does ``post``:
    "lost" (a gateway's 504, never applied), "late" (504, applied ``late_by`` seconds
    later) or "ok" (200 with the refund)."""

    clock: FakeClock
    post: str = "lost"
    late_by: float = 2.0
    dates: str = "precise"
    """"precise" (``...T20:00:01Z``) or "day" (``...T00:00:00Z``)."""
    label_hours: float = 0.0
    """Dates are the server's local time this many hours east of UTC, marked ``Z``."""
    header: str | float = 0.0
    """Seconds the ``Date`` header is off from the server's clock (a CDN's own), or
    "unreadable" (a header no parser reads: the clock offset is never learned)."""
    refunds: list[dict[str, Any]] = attrs.Factory(list)
    unlisted: set[int] = attrs.Factory(set)
    ours: list[int] = attrs.Factory(list)
    posts: int = 0
    lists: int = 0
    _next: int = 7000
    _wall0: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._wall0 = self.clock.time() - self.clock.monotonic()

    def now(self) -> float:
        return self._wall0 + self.clock.monotonic()

    def _date(self, when: float) -> str:
        shape = "%Y-%m-%dT00:00:00Z" if self.dates == "day" else "%Y-%m-%dT%H:%M:%SZ"
        return datetime.fromtimestamp(when + self.label_hours * HOUR, timezone.utc).strftime(shape)

    def add(
        self, amount: int, *, age: float = 0.0, ours: bool = False, external: bool = False
    ) -> dict[str, Any]:
        """A refund made ``age`` seconds ago: another app's unless ``ours``; ``external``:
        one made on the merchant's platform (EXTERNAL, no transaction id)."""
        self._next += 1
        record: dict[str, Any] = {
            "id": self._next,
            "order_id": ORDER,
            "bag_id": BAG,
            "amount": amount,
            "status": "EXTERNAL" if external else "COMPLETED",
            "date_created": self._date(self.now() - age),
        }
        if ours:
            record["transaction_id"] = 1
            self.ours.append(record["id"])
        self.refunds.append(record)
        return record

    def app(self) -> web.Application:
        @web.middleware
        async def date(request: web.Request, handler: Any) -> web.StreamResponse:
            response: web.StreamResponse = await handler(request)
            if self.header == "unreadable":
                response.headers["Date"] = "sometime today"
            else:
                response.headers["Date"] = formatdate(self.now() + float(self.header), usegmt=True)
            return response

        async def login(request: web.Request) -> web.Response:
            return web.json_response(
                {"token": "lag-access-token-0123456789", "refresh_token": "lag-refresh-01234"}
            )

        async def post(request: web.Request) -> web.Response:
            self.posts += 1
            self.unlisted.clear()  # the replica has caught up by now
            amount = (await request.json())["amount_refunded"]
            if self.post == "ok":
                return web.json_response(self.add(amount, ours=True))
            if self.post == "late":
                self.clock.call_later(self.late_by, lambda: self.add(amount, ours=True))
            return web.Response(status=504, body=b"<html>504 Gateway Time-out</html>")

        async def listing(request: web.Request) -> web.Response:
            self.lists += 1
            shown = [r for r in self.refunds if r["id"] not in self.unlisted]
            return web.Response(body=orjson.dumps(shown), content_type="application/json")

        async def order(request: web.Request) -> web.Response:
            return web.json_response(
                {"id": ORDER, "bags": [{"id": BAG, "status": "COMPLETED", "total": 5000}]}
            )

        app = web.Application(middlewares=[date])
        app.router.add_post("/v1/login", login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", post)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", listing)
        app.router.add_get("/v1/orders/{o}", order)
        return app


@contextlib.asynccontextmanager
async def lagging_client(server: Lagging, policy: RetryPolicy) -> AsyncIterator[VioletClient]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            3,
            "lag-app-secret",
            username="lag-user",
            password="lag-password-0123",
            base_url=f"http://127.0.0.1:{port}/v1",
            clock=server.clock,
            retry=policy,
        ) as client:
            yield client
    finally:
        await runner.cleanup()


async def _refund(client: VioletClient) -> OrderRefund | AmbiguousOutcomeError:
    try:
        return await client.refund_bag(ORDER, BAG, amount_refunded=300)
    except AmbiguousOutcomeError as exc:
        return exc


def _review(outcome: object) -> PendingRefund:
    """The outcome is pending for review (not a success, not a definite failure)."""
    assert isinstance(outcome, AmbiguousOutcomeError), outcome
    assert outcome.pending is not None
    assert outcome.pending.needs_review, outcome.pending.note
    return outcome.pending


# -- another system's refund, missing from the baseline ---------------------------------


@pytest.mark.parametrize("ours", ["lost", "late"])
async def test_day_dates_another_systems_refund_missing_from_the_baseline_is_not_claimed(
    ours: str,
) -> None:
    """Another system refunded 300 ten seconds before our send; the baseline read came
    from a replica that did not list it yet. Dates carry the day only. Our POST gets a
    504 and never applies ("lost"), or applies 2 s later ("late"). The other refund is
    new since the baseline, and its date says only "today": it is never returned as
    ours. The caller sees AmbiguousOutcomeError for review, naming it as a candidate;
    nothing is sent again."""
    clock = FakeClock(wall_start=EVENING)
    server = Lagging(clock, post=ours, dates="day")
    other = server.add(300, age=10.0)
    server.unlisted.add(other["id"])
    async with lagging_client(server, BASELINE) as client:
        outcome = await _refund(client)
        pending = _review(outcome)
        assert other["id"] in [r.id for r in outcome.candidates]  # type: ignore[union-attr]
        assert "the day only" in pending.note
        assert "did not list it proves nothing" in pending.note
        # Resumed later (ours, if it applied, shows by now): still for a person.
        clock.advance(120.0)
        with pytest.raises(AmbiguousOutcomeError) as again:
            await client.resume(pending)
    assert again.value.pending is not None
    assert again.value.pending.needs_review
    assert server.posts == 1
    assert len(server.ours) == (1 if ours == "late" else 0)


@pytest.mark.parametrize("age", [30.0, -3.0])
async def test_a_refund_made_on_the_merchants_platform_is_never_claimed(age: float) -> None:
    """The merchant refunded 300 on its platform; Violet lists it EXTERNAL, dated when
    it processed the platform's webhook: 30 s before our send, or 3 s after it (the
    webhook came late). Missing from the baseline, precise date, sure clock; ours never
    applied. A refund made on the merchant's platform is never this call's: review."""
    clock = FakeClock(wall_start=EVENING)
    server = Lagging(clock)
    other = server.add(300, age=age, external=True)
    server.unlisted.add(other["id"])
    async with lagging_client(server, BASELINE) as client:
        outcome = await _refund(client)
    pending = _review(outcome)
    assert "EXTERNAL" in pending.note
    assert [r.id for r in outcome.candidates] == [other["id"]]  # type: ignore[union-attr]
    assert server.posts == 1
    assert server.ours == []


@pytest.mark.parametrize("header", [15 * HOUR, "unreadable"])
async def test_precise_date_before_the_send_on_an_unsure_clock_is_not_claimed(
    header: str | float,
) -> None:
    """The same with precise dates: the other refund is dated 2 minutes before our
    send. The clock is unsure (the Date headers sit 15 h from this machine's clock, or
    cannot be read), so its date cannot place it after the send by every reading, and
    "new since the baseline" proves nothing: review, never this call's success. (Within
    ``clock_skew``, 60 s, of the send, a refund cannot be told from ours without a Date
    header: docs/remaining-risk.md.)"""
    clock = FakeClock(wall_start=EVENING)
    server = Lagging(clock, header=header)
    other = server.add(300, age=120.0)
    server.unlisted.add(other["id"])
    async with lagging_client(server, BASELINE) as client:
        outcome = await _refund(client)
    pending = _review(outcome)
    assert [r.id for r in outcome.candidates] == [other["id"]]  # type: ignore[union-attr]
    assert "some reading of Violet's clock" in pending.note
    assert server.posts == 1
    assert server.ours == []


async def test_precise_date_before_the_send_on_a_sure_clock_is_not_claimed() -> None:
    """The same on a clock that is sure (Date headers agree with this machine's clock):
    the date places the other refund 30 s before the send. Review, never claimed, and
    never taken as absence either (nothing re-sent)."""
    clock = FakeClock(wall_start=EVENING)
    server = Lagging(clock)
    other = server.add(300, age=30.0)
    server.unlisted.add(other["id"])
    async with lagging_client(server, BASELINE) as client:
        pending = _review(await _refund(client))
    assert "earlier than the send" in pending.note
    assert server.posts == 1


@pytest.mark.parametrize("dates", ["day", "precise"])
async def test_without_a_baseline_the_same_refund_is_not_claimed(dates: str) -> None:
    """No baseline read: the other refund (made 30 s before the send) is on the list
    from the start. Its date cannot place it after the send: review."""
    clock = FakeClock(wall_start=EVENING)
    server = Lagging(clock, dates=dates)
    server.add(300, age=30.0)
    async with lagging_client(server, NO_BASELINE) as client:
        _review(await _refund(client))
    assert server.posts == 1
    assert server.ours == []


# -- the honest case: ours applied, the only candidate ----------------------------------


async def test_ours_alone_with_a_precise_date_after_the_send_is_found() -> None:
    """Ours applied 2 s after the 504, precise dates, a sure clock: it is the only
    refund new since the baseline and its date is after the send. The caller gets it
    (``reconciled``), one POST."""
    clock = FakeClock(wall_start=EVENING)
    server = Lagging(clock, post="late")
    async with lagging_client(server, BASELINE) as client:
        refund = await client.refund_bag(ORDER, BAG, amount_refunded=300)
    assert refund.reconciled
    assert [refund.id] == server.ours
    assert server.posts == 1


async def test_ours_alone_with_a_day_date_is_for_review() -> None:
    """Ours applied 2 s after the 504, and it is the only refund new since the
    baseline, but its date carries the day only: the SDK cannot tell it from another
    system's refund that a replica behind left out of the baseline. The caller sees
    AmbiguousOutcomeError with ``pending.needs_review`` and ours as the one candidate
    (a person confirms it); nothing is re-sent."""
    clock = FakeClock(wall_start=EVENING)
    server = Lagging(clock, post="late", dates="day")
    async with lagging_client(server, BASELINE) as client:
        outcome = await _refund(client)
    _review(outcome)
    assert [r.id for r in outcome.candidates] == server.ours  # type: ignore[union-attr]
    assert len(server.ours) == 1
    assert server.posts == 1


async def test_ours_alone_behind_a_date_header_15h_ahead_is_for_review() -> None:
    """Ours applied; the Date headers are 15 h ahead (a CDN's): whether its precise
    date is after the send depends on which clock is right. Review, with ours as the
    candidate; nothing is re-sent (issue 24 row 5: never two refunds)."""
    clock = FakeClock(wall_start=EVENING)
    server = Lagging(clock, post="late", header=15 * HOUR)
    async with lagging_client(server, BASELINE) as client:
        outcome = await _refund(client)
    _review(outcome)
    assert [r.id for r in outcome.candidates] == server.ours  # type: ignore[union-attr]
    assert server.posts == 1


@pytest.mark.parametrize("dates", ["day", "precise"])
async def test_a_2xx_costs_no_read_back_whatever_the_dates(dates: str) -> None:
    """The happy path: a 200 naming the refund is this call's, dates or not. The only
    list read is the baseline."""
    clock = FakeClock(wall_start=EVENING)
    server = Lagging(clock, post="ok", dates=dates)
    async with lagging_client(server, BASELINE) as client:
        refund = await client.refund_bag(ORDER, BAG, amount_refunded=300)
    assert not refund.reconciled
    assert [refund.id] == server.ours
    assert (server.posts, server.lists) == (1, 1)


# -- FakeViolet: another system's refund listed late (``listed_in``) ------------------


@pytest.mark.parametrize("fault", [Fault.DROP_BEFORE_COMMIT, Fault.LATE_COMMIT])
@pytest.mark.parametrize("day_dates", [True, False])
async def test_fake_violet_lists_another_systems_refund_after_the_baseline(
    fault: Fault, day_dates: bool
) -> None:
    """FakeViolet learns the fault: ``another_actor_refund(..., listed_in=)`` makes a
    refund (of the asked amount, 40 s old) that the baseline read misses. Our POST is
    dropped before it applied, or applies late. Day-only dates or precise ones, the
    other refund is never returned as this call's: review, one POST, and the baseline
    really did miss it."""
    clock = FakeClock(wall_start=EVENING)
    plan = FaultPlan(quirks=ServerQuirks(day_dates=day_dates))
    async with FakeViolet(orders=2, seed=3, clock=clock, faults=plan) as fake:
        order_id, bag_id = fake.seeded[0]
        other = fake.another_actor_refund(order_id, bag_id, 100, age_seconds=40.0, listed_in=0.5)
        policy = attrs.evolve(ROOMY_POLICY, read_before_send=True)
        async with make_client(fake, clock, retry=policy) as client:
            fake.script("refund", fault, bag_id=bag_id)
            try:
                outcome: object = await client.refund_bag(order_id, bag_id, amount_refunded=100)
            except AmbiguousOutcomeError as exc:
                outcome = exc
        fake.settle()
        pending = _review(outcome)
        assert pending.baseline is not None
        assert other["id"] not in pending.baseline
        assert other["id"] in [r.id for r in outcome.candidates]  # type: ignore[union-attr]
        assert fake.ledger.requests["refund"] == 1
        assert len(ours(fake, bag_id)) == (1 if fault is Fault.LATE_COMMIT else 0)


# -- dates with a wrong offset ----------------------------------------------------------


async def test_a_date_later_than_the_read_that_listed_it_places_nothing() -> None:
    """Dates in the server's local time (UTC+2) marked as UTC. Another app refunded 300
    an hour before our send (its date reads an hour after the send); no baseline; ours
    never applied. The date is later than the read that listed the refund, which no
    refund can be: the offset is wrong, and the refund is never claimed. Review."""
    clock = FakeClock(wall_start=EVENING)
    server = Lagging(clock, label_hours=2.0)
    other = server.add(300, age=HOUR)
    async with lagging_client(server, NO_BASELINE) as client:
        outcome = await _refund(client)
    pending = _review(outcome)
    assert "later than the read that listed it" in pending.note
    assert [r.id for r in outcome.candidates] == [other["id"]]  # type: ignore[union-attr]
    assert server.posts == 1
    assert server.ours == []
