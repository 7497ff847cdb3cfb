"""Review 20: attacks an outsider would try on today's main.

Each test scripts its own server (tests/hostile.py) on a FakeClock shared with the
client; refunds are counted by the server's own record."""

from __future__ import annotations

import asyncio
from typing import Any

import attrs
import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    CancellationFailedError,
    OrderRefund,
    PendingRefund,
    RetryPolicy,
)
from violet_async.stores import SQLiteStore
from violet_async.testing import FakeClock, FakeViolet, Fault

from .conftest import ROOMY_POLICY, make_client, ours
from .hostile import (
    APP_ID,
    BAG_ID,
    GATEWAY_504,
    ORDER_ID,
    Hostile,
    Step,
    _public,
    hostile_client,
)

RETRY = RetryPolicy(max_attempts=3, deadline=120.0)


@attrs.define
class ForeignCancellation(Hostile):
    """Every cancel POST commits (the bag is cancelled, its rest refunded) and is
    answered 202 with ``body``: a cancellation body that is not about this bag."""

    body: dict[str, Any] = attrs.Factory(dict)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        self._commit(await request.json(), cancel=True)
        return web.Response(
            status=202, body=orjson.dumps(self.body), content_type="application/json"
        )


async def _cancel_outcome(server: Hostile) -> OrderRefund | BaseException:
    async with hostile_client(server, retry=RETRY) as client:
        try:
            return await client.cancel_bag(ORDER_ID, BAG_ID)
        except (CancellationFailedError, AmbiguousOutcomeError) as exc:
            return exc


async def test_a_cancellation_failure_of_another_order_is_not_this_cancels_failure() -> None:
    """The cancel applied (the bag is cancelled and refunded), but the 202 answered is
    a CANCELLATION_FAILURE of another order (a misrouted or cached answer). An answer
    naming another order is not this call's (as a refund of another order is not):
    it was reported as a definite failure of this cancel, a cancel that moved the
    shopper's money; a caller falling back to a refund would refund the bag twice."""
    server = ForeignCancellation(
        FakeClock(),
        body={
            "order_id": ORDER_ID + 1,
            "app_id": APP_ID,
            "status": "CANCELLATION_FAILURE",
            "cancelled_bags": [],
            "message": f"order {ORDER_ID + 1} could not be cancelled",
        },
    )
    got = await _cancel_outcome(server)
    assert not isinstance(got, CancellationFailedError), got
    assert server.posts == 1
    if isinstance(got, OrderRefund):
        assert [got.id] == server.ours


async def test_a_cancellation_failure_naming_only_another_bag_is_not_this_cancels() -> None:
    """The same with a failure body of this order whose one entry is another bag's
    CANCELLATION_FAILURE: it says nothing of this bag, whose cancel applied."""
    server = ForeignCancellation(
        FakeClock(),
        body={
            "order_id": ORDER_ID,
            "app_id": APP_ID,
            "status": "CANCELLATION_FAILURE",
            "cancelled_bags": [
                {"order_id": ORDER_ID, "bag_id": BAG_ID + 1, "status": "CANCELLATION_FAILURE"}
            ],
            "message": f"bag {BAG_ID + 1} could not be cancelled",
        },
    )
    got = await _cancel_outcome(server)
    assert not isinstance(got, CancellationFailedError), got
    assert server.posts == 1
    if isinstance(got, OrderRefund):
        assert [got.id] == server.ours


async def test_fake_violet_answers_a_cancel_with_another_orders_failure() -> None:
    """FakeViolet learns the fault (``Fault.FOREIGN_CANCELLATION``, opt-in): the cancel
    commits and is answered another order's CANCELLATION_FAILURE. Never this cancel's
    failure: its refund is found by reading the bag back, the cancel sent once."""
    clock = FakeClock()
    async with FakeViolet(orders=1, seed=20, clock=clock) as fake:
        (o, b) = fake.seeded[0]
        fake.script("cancel", Fault.FOREIGN_CANCELLATION, bag_id=b)
        async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
            try:
                got: Any = await client.cancel_bag(o, b)
            except (CancellationFailedError, AmbiguousOutcomeError) as exc:
                got = exc
        made = ours(fake, b)
    assert not isinstance(got, CancellationFailedError), got
    assert len(made) == 1
    if isinstance(got, OrderRefund):
        assert [got.id] == made


async def _resumed(
    server: Hostile, pending: PendingRefund, **options: Any
) -> OrderRefund | AmbiguousOutcomeError:
    async with hostile_client(server, **options) as client:
        try:
            return await client.resume(pending)
        except AmbiguousOutcomeError as exc:
            return exc


@pytest.mark.parametrize("read_before_send", [False, True])
@pytest.mark.parametrize("later", [600.0, 1800.0])
async def test_a_refund_made_long_after_the_send_is_not_claimed_by_a_later_resume(
    read_before_send: bool, later: float
) -> None:
    """The POST is answered by a gateway's 504 and never applies; the call's deadline
    ends first (pending). ``later`` seconds after, long past the settle window (after
    which the SDK itself proves a send absent), another system refunds the same amount
    on the bag. A resume after that took that refund for the call's own (a refund this
    call never made, reported made): by the SDK's own window the send cannot have
    applied that late. It is for a person now; nothing is sent again."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    policy = RetryPolicy(max_attempts=3, deadline=30.0, read_before_send=read_before_send)
    async with hostile_client(server, retry=policy) as client:
        with pytest.raises(AmbiguousOutcomeError) as first:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    pending = first.value.pending
    assert pending is not None
    assert not pending.needs_review
    clock.advance(later)
    other = server.add_refund(300)["id"]
    clock.advance(60.0)
    got = await _resumed(server, PendingRefund.from_json(pending.to_json()), retry=policy)
    assert server.posts == 1
    assert server.ours == []
    assert not isinstance(got, OrderRefund), f"refund {got.id} handed out (another's: {other})"
    assert got.pending is not None
    assert got.pending.needs_review


async def test_a_refund_made_long_after_a_keyed_send_is_not_the_keys(tmp_path: Any) -> None:
    """The same through an idempotency key in a shared store: the key's call ends
    pending, and its repeat half an hour later (another process) took another system's
    refund made long after the send for the key's own."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    policy = RetryPolicy(max_attempts=3, deadline=30.0)
    path = tmp_path / "keys.db"
    async with hostile_client(server, retry=policy, store=SQLiteStore(path)) as client:
        with pytest.raises(AmbiguousOutcomeError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="rma-20")
    clock.advance(1800.0)
    other = server.add_refund(300)["id"]
    clock.advance(60.0)
    async with hostile_client(server, retry=policy, store=SQLiteStore(path)) as client:
        try:
            got: Any = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="rma-20"
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.posts == 1
    assert server.ours == []
    assert not isinstance(got, OrderRefund), f"refund {got.id} handed out (another's: {other})"


@attrs.define
class NegativeAmounts(Hostile):
    """Lists every refund with its amount negated (a ledger's sign for money going
    out: Violet's pages give the amount no sign)."""

    async def _list(self, request: web.Request) -> web.Response:
        self.reads += 1
        rows = [{**_public(r), "amount": -r["amount"]} for r in self.refunds]
        return web.Response(body=orjson.dumps(rows), content_type="application/json")


@pytest.mark.parametrize("read_before_send", [False, True])
@pytest.mark.parametrize("whole", [False, True])
async def test_a_refund_listed_with_a_negative_amount_is_never_sent_twice(
    read_before_send: bool, whole: bool
) -> None:
    """The POST applies and is answered by a gateway's 504; the bag's list gives the
    refund's amount as -300 (its sign for money going out). Read as another amount,
    the ask's own refund was proven absent and sent again: two refunds. It may be
    ours: for a person, never re-sent. (Whole-bag: the bag's status moves minutes
    later, as Shopify's does.)"""
    clock = FakeClock()
    server = NegativeAmounts(
        clock, script=[Step(504, GATEWAY_504)], status_lag=600.0 if whole else None
    )
    policy = RetryPolicy(max_attempts=3, deadline=300.0, read_before_send=read_before_send)
    async with hostile_client(server, retry=policy) as client:
        try:
            got: Any = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=None if whole else 300
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.posts == 1, f"sent {server.posts} times: {len(server.ours)} refunds"
    assert not isinstance(got, OrderRefund) or [got.id] == server.ours


@attrs.define
class CutBody(Hostile):
    """The first refund POST commits and its 200 answer is cut off halfway through its
    body (headers and half the refund sent, then the connection reset); later POSTs
    as usual."""

    cut: bool = True

    async def _refund(self, request: web.Request) -> web.StreamResponse:
        if not self.cut:
            return await super()._refund(request)
        self.cut = False
        self.posts += 1
        record = self._commit(await request.json(), cancel=False)
        assert isinstance(record, dict)
        raw = orjson.dumps(_public(record))
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "application/json", "Content-Length": str(len(raw))},
        )
        await response.prepare(request)
        await response.write(raw[: len(raw) // 2])
        assert request.transport is not None
        request.transport.close()
        raise asyncio.CancelledError


@pytest.mark.parametrize("lag", [0.0, 90.0])
async def test_a_2xx_whose_body_is_cut_off_is_never_sent_again(lag: float) -> None:
    """The refund applies and its 200 answer is cut off mid-body; the bag's list shows
    it ``lag`` seconds later (a replica behind, past the 60 s settle window). Its status
    line proves it applied (a 2xx is never followed by a re-send), but the cut body was
    taken for no answer at all: once the window passed without it on the list, the
    refund was sent again (two refunds)."""
    clock = FakeClock()
    server = CutBody(clock, list_lag=lag)
    async with hostile_client(server, retry=RetryPolicy(max_attempts=3, deadline=600.0)) as client:
        try:
            got: Any = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.posts == 1, f"sent {server.posts} times: {len(server.ours)} refunds"
    if isinstance(got, OrderRefund):
        assert [got.id] == server.ours
    else:
        assert lag, got  # listed at once: found


async def test_a_negative_record_of_another_amount_does_not_hold_a_refund_back() -> None:
    """Read with its sign taken off, a record of -700 is still another refund than the
    300 asked: it neither holds the ask for review nor is claimed. The ask's POST
    never applied (a gateway's 504), is proven absent after the window and sent again
    once: one refund, returned."""
    clock = FakeClock()
    server = NegativeAmounts(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    server.add_refund(700, age=30.0)
    async with hostile_client(server, retry=RetryPolicy(max_attempts=3, deadline=300.0)) as client:
        got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert server.posts == 2
    assert [got.id] == server.ours
