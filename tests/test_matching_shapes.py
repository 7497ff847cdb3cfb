"""Matching on the record shapes review 8 found (issue 24): a record without its SKU
lines, an amount that may carry the shipping asked, FAILED or CANCELED attempts and
other bags' records beside a whole-bag refund. As pure rules, against a Violet scripted
here (its own few lines of aiohttp.web, harsher than Violet: its bag status never moves,
so a second POST is always a second refund), against FakeViolet's opt-in shapes. (The fleet
worker's run: tests/test_fleet_matching_shapes.py.)"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    CancelBagRequest,
    RefundBagRequest,
    RetryPolicy,
    ShippingRefund,
    SkuRefund,
    VioletClient,
)
from violet_async._ask import Settings, sent_once
from violet_async._converter import converter
from violet_async._matching import Verdict, cannot_tell, content, judge
from violet_async.batch import BatchItem, run_batch
from violet_async.models import OrderBag, OrderRefund
from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan, ServerQuirks

ORDER, BAG = 7101, 7102
WALL = 1_780_000_123.0  # 2026-05-28 20:28:43 UTC: not a midnight
ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0)


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def rec(refund_id: int, amount: int | None, status: str = "COMPLETED", **more: Any) -> OrderRefund:
    data = {"id": refund_id, "order_id": ORDER, "bag_id": BAG, "amount": amount, "status": status}
    return converter.structure({**data, **more}, OrderRefund)


def bag(total: int = 1000, status: str = "COMPLETED") -> OrderBag:
    return converter.structure({"id": BAG, "status": status, "total": total}, OrderBag)


def ask(request: RefundBagRequest | CancelBagRequest, at: float | None = None) -> Any:
    if isinstance(request, CancelBagRequest):
        return sent_once("cancel", ORDER, BAG, request, at)
    return sent_once("refund", ORDER, BAG, request, at)


WHOLE = RefundBagRequest()
LINES = RefundBagRequest(skus=[SkuRefund(order_sku_id=10, quantity_refunded=1)])
SHIPPED = RefundBagRequest(amount_refunded=1000, shipping=ShippingRefund(amount=500))


# -- the pure rules ---------------------------------------------------------------------------


def test_sku_lines_left_out_of_a_record_cannot_be_told() -> None:
    """No lines listed: NEAR and cannot-tell (the guard parks); other lines: MISS; an
    amount asked that the record contradicts is still a MISS."""
    bare = rec(1, 700)
    assert content(ask(LINES), bare, [bare], None) is Verdict.NEAR
    assert cannot_tell(ask(LINES), bare, [bare], None)
    other = rec(1, 700, skus=[{"order_sku_id": 11, "quantity_refunded": 1}])
    assert content(ask(LINES), other, [other], None) is Verdict.MISS
    assert not cannot_tell(ask(LINES), other, [other], None)
    tied = RefundBagRequest(amount_refunded=500, skus=LINES.skus)
    assert content(ask(tied), bare, [bare], None) is Verdict.MISS
    # A FAILED record without lines moved no money: never "cannot tell" for the guard.
    dead = rec(1, 700, status="FAILED")
    assert not cannot_tell(ask(LINES), dead, [dead], None)


@pytest.mark.parametrize(("recorded", "verdict"), [(1500, "near"), (500, "near"), (1000, "match")])
def test_an_amount_with_the_shipping_in_or_out_cannot_be_told(recorded: int, verdict: str) -> None:
    refund = rec(1, recorded)
    assert content(ask(SHIPPED), refund, [refund], None).value == verdict
    assert cannot_tell(ask(SHIPPED), refund, [refund], None) is (verdict == "near")


def test_an_amount_folded_with_the_recorded_shipping_cannot_be_told() -> None:
    """The record's own shipping amount counts too; another amount is still a MISS, as
    is 1500 when no shipping was asked."""
    refund = rec(1, 1400, shipping={"amount": 400})
    assert content(ask(SHIPPED), refund, [refund], None) is Verdict.NEAR
    assert content(ask(SHIPPED), rec(1, 1200), [rec(1, 1200)], None) is Verdict.MISS
    plain = RefundBagRequest(amount_refunded=1000)
    assert content(ask(plain), rec(1, 1500), [rec(1, 1500)], None) is Verdict.MISS


def test_what_was_left_ignores_dead_attempts_and_other_bags() -> None:
    ours = rec(5, 1000)
    beside = [
        rec(1, 300, status="FAILED"),
        rec(2, 200, bag_id=BAG + 1),
        ours,
        rec(9, 100, status="CANCELED"),
        rec(8, 50, bag_id=BAG + 1),
    ]
    assert content(ask(WHOLE), ours, beside, bag()) is Verdict.MATCH
    assert content(ask(CancelBagRequest()), ours, beside, bag()) is Verdict.MATCH


def test_a_later_refund_makes_what_was_left_cannot_tell_never_a_miss() -> None:
    """The rest, then refunded again after it: NEAR (the guard parks), never a MISS.
    A refund that was not the rest stays a MISS whatever follows it."""
    ours, again = rec(5, 1000), rec(6, 100)
    assert content(ask(WHOLE), ours, [ours, again], bag()) is Verdict.NEAR
    assert cannot_tell(ask(WHOLE), ours, [ours, again], bag())
    part = rec(5, 400)
    assert content(ask(WHOLE), part, [part, rec(6, 600)], bag()) is Verdict.MISS


def test_two_partial_refunds_that_sum_to_the_bag() -> None:
    """Only the second is "the rest": the first never matches a whole-bag ask."""
    first, second = rec(1, 400), rec(2, 600)
    assert content(ask(WHOLE), first, [first, second], bag()) is Verdict.MISS
    assert content(ask(WHOLE), second, [first, second], bag()) is Verdict.MATCH


def test_a_failed_twin_beside_a_match_is_for_review() -> None:
    """A FAILED attempt of exactly the amount asked and a COMPLETED one, both after the
    send: either may be this ask's (its attempt refused, the other another system's).
    NEAR, never claimed; an older FAILED one (before the send) changes nothing."""
    sent = WALL
    failed = rec(1, 100, status="FAILED", date_created=_iso(sent + 1))
    made = rec(2, 100, date_created=_iso(sent + 2))
    asked = ask(RefundBagRequest(amount_refunded=100), sent)
    settings = Settings()
    reading = judge(asked, [failed, made], None, (), settings)
    assert reading.verdict is Verdict.NEAR
    assert {r.id for r in reading.found} == {1, 2}
    old = rec(1, 100, status="FAILED", date_created=_iso(sent - 86_400 * 3))
    assert judge(asked, [old, made], None, (), settings).verdict is Verdict.MATCH


# -- against a Violet scripted here --------------------------------------------------------------


class Shop:
    """One bag of ``total`` cents whose status never moves (Violet's lags for minutes):
    every POST it applies is a refund, so a second POST of a refund that applied is a
    double refund here. ``plan`` says per POST whether it applies; every POST is
    answered Violet's 500. ``shape`` rewrites a listed record."""

    def __init__(self, clock: FakeClock, total: int = 1000) -> None:
        self.clock, self.total = clock, total
        self.refunds: list[dict[str, Any]] = []
        self.made: list[int] = []
        self.posts = 0
        self.plan: list[bool] = []
        self.after_post: list[Any] = []
        self.shape: Any = lambda r: r

    def add(self, amount: int, status: str = "COMPLETED", **more: Any) -> dict[str, Any]:
        record = {
            "id": 70_000 + len(self.refunds) + 1,
            "order_id": ORDER,
            "bag_id": BAG,
            "amount": amount,
            "status": status,
            "date_created": _iso(self.clock.time()),
            **more,
        }
        self.refunds.append(record)
        return record

    async def post(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        if self.plan.pop(0) if self.plan else True:
            live = sum(
                r["amount"]
                for r in self.refunds
                if r["status"] == "COMPLETED" and r["bag_id"] == BAG
            )
            amount = body.get("amount_refunded")
            if amount is None and body.get("skus"):
                amount = 700
            record = self.add(self.total - live if amount is None else amount)
            record["skus"] = body.get("skus") or []
            self.made.append(record["id"])
        for then in self.after_post:
            then()
        return web.json_response({"status": 500, "message": "Internal error"}, status=500)

    async def listing(self, request: web.Request) -> web.Response:
        listed = [self.shape(dict(r)) for r in self.refunds]
        return web.Response(body=orjson.dumps(listed), content_type="application/json")

    async def order(self, request: web.Request) -> web.Response:
        shown = {"id": BAG, "status": "COMPLETED", "total": self.total}
        return web.json_response({"id": ORDER, "bags": [shown]})

    async def login(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"token": "shop-token-value", "refresh_token": "shop-refresh-value"}
        )


@contextlib.asynccontextmanager
async def shop_client(shop: Shop) -> AsyncIterator[VioletClient]:
    @web.middleware
    async def dated(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Date"] = datetime.fromtimestamp(shop.clock.time(), timezone.utc).strftime(
            "%a, %d %b %Y %H:%M:%S GMT"
        )
        return response

    app = web.Application(middlewares=[dated])
    app.router.add_post("/v1/login", shop.login)
    app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", shop.post)
    app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", shop.listing)
    app.router.add_get("/v1/orders/{o}", shop.order)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            1,
            "shop-secret-value",
            base_url=f"http://127.0.0.1:{port}/v1",
            username="u",
            password="shop-password-value",
            allow_insecure_http=True,
            clock=shop.clock,
            retry=ROOMY,
        ) as client:
            yield client
    finally:
        await runner.cleanup()


async def _outcome(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except AmbiguousOutcomeError as exc:
        return exc


def _review(got: Any) -> bool:
    """Parked for review: an AmbiguousOutcomeError whose record needs a person."""
    return (
        isinstance(got, AmbiguousOutcomeError)
        and got.pending is not None
        and got.pending.needs_review
    )


async def test_shop_failed_attempt_then_another_systems_refund_is_never_claimed() -> None:
    """Our POST is refused by the platform (a FAILED record) and answered 500; another
    system's refund of the same amount lands right after. Ours may be either: review,
    not a success built on another's refund, nothing re-sent."""
    shop = Shop(FakeClock(wall_start=WALL))
    shop.plan = [False]
    shop.after_post = [lambda: shop.add(100, status="FAILED"), lambda: shop.add(100)]
    async with shop_client(shop) as client:
        got = await _outcome(client.refund_bag(ORDER, BAG, amount_refunded=100))
        shop.after_post = []
    assert _review(got), got
    assert shop.posts == 1


async def test_shop_whole_bag_refund_then_a_second_refund_is_review_not_resent() -> None:
    """Ours (the whole bag) applies; another refund lands after it (the bag refunded
    past its total): ours may still be the refund of what was left. Review, one POST."""
    shop = Shop(FakeClock(wall_start=WALL))
    shop.after_post = [lambda: shop.add(250)]
    async with shop_client(shop) as client:
        got = await _outcome(client.refund_bag(ORDER, BAG))
    assert _review(got), got
    assert (shop.posts, len(shop.made)) == (1, 1)


async def test_shop_sku_refund_dropped_beside_another_refund_without_lines() -> None:
    """Our SKU refund did not apply; another system's refund (its record without
    lines) lands after the send: it may be ours, so review: never a success, never
    a second POST proven by a guess."""
    shop = Shop(FakeClock(wall_start=WALL))
    shop.plan = [False]
    shop.after_post = [lambda: shop.add(700)]
    async with shop_client(shop) as client:
        got = await _outcome(client.refund_bag(ORDER, BAG, skus=LINES.skus))
    assert _review(got), got
    assert shop.posts == 1


async def test_shop_whole_bag_after_a_failed_attempt_and_another_bag_is_found() -> None:
    """A FAILED attempt, another bag's refund and a CANCELED one listed beside ours:
    ours is the refund of what was left, found by read-back, one POST."""
    shop = Shop(FakeClock(wall_start=WALL))
    shop.add(300, status="FAILED", date_created="2026-01-02T10:00:00Z")
    shop.add(200, bag_id=BAG + 1, date_created="2026-01-02T10:00:00Z")
    shop.after_post = [lambda: shop.add(150, status="CANCELED")]
    async with shop_client(shop) as client:
        got = await _outcome(client.refund_bag(ORDER, BAG))
    assert not isinstance(got, AmbiguousOutcomeError), got
    assert got.id == shop.made[0]
    assert got.reconciled
    assert shop.posts == 1


async def test_shop_batch_guard_of_a_sku_row_beside_an_amount_refund_parks_it() -> None:
    """The guard read before a SKU row's first send: the bag holds a refund whose
    record lists no lines. Not sent: review (it may be the row, sent before its
    journal was lost)."""
    shop = Shop(FakeClock(wall_start=WALL))
    shop.add(700)
    row = BatchItem.refund(1, ORDER, BAG, LINES)
    async with shop_client(shop) as client:
        results = [r async for r in run_batch(client, [row])]
    assert [r.outcome for r in results] == ["unknown"]
    assert shop.posts == 0


# -- FakeViolet's opt-in shapes ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def _fake(clock: FakeClock, **quirks: Any) -> AsyncIterator[FakeViolet]:
    plan = FaultPlan(quirks=ServerQuirks(bag_status_lag=600.0, **quirks))
    async with FakeViolet(clock=clock, faults=plan) as fake:
        yield fake


def _order(fake: FakeViolet, bags: int = 1) -> tuple[int, int, int]:
    spec = {"skus": [{"quantity": 2, "price": 500}], "shipping": 500}
    order = fake.add_order([spec] * bags)
    first = next(iter(order.bags.values()))
    return order.id, first.id, first.skus[0].order_sku_id


async def test_fake_records_without_skus_never_prove_a_sku_refund_absent() -> None:
    clock = FakeClock(wall_start=WALL)
    async with _fake(clock, listed_without_skus=True) as fake:
        order_id, bag_id, sku = _order(fake)
        fake.script("refund", Fault.HTTP_500_AFTER_COMMIT, bag_id=bag_id)
        async with fake.client(clock=clock, retry=ROOMY) as client:
            got = await _outcome(
                client.refund_bag(
                    order_id, bag_id, skus=[SkuRefund(order_sku_id=sku, quantity_refunded=1)]
                )
            )
            listed = await client.list_bag_refunds(order_id, bag_id)
        assert _review(got), got
        assert listed[0].skus == ()
        assert fake.ledger.refunds_per_bag[bag_id] == 1
        assert len(fake.ledger.posts_per_bag[bag_id]) == 1


async def test_fake_amount_with_shipping_never_proves_absence() -> None:
    clock = FakeClock(wall_start=WALL)
    async with _fake(clock, amount_with_shipping=True) as fake:
        order_id, bag_id, _ = _order(fake)
        fake.script("refund", Fault.HTTP_500_AFTER_COMMIT, bag_id=bag_id)
        async with fake.client(clock=clock, retry=ROOMY) as client:
            got = await _outcome(
                client.refund_bag(
                    order_id, bag_id, amount_refunded=300, shipping=ShippingRefund(amount=500)
                )
            )
            listed = await client.list_bag_refunds(order_id, bag_id)
        assert _review(got), got
        assert listed[0].amount == 800
        assert fake.ledger.refunds_per_bag[bag_id] == 1
        assert len(fake.ledger.posts_per_bag[bag_id]) == 1


async def test_fake_whole_bag_beside_failed_attempts_and_other_bags_is_found() -> None:
    clock = FakeClock(wall_start=WALL)
    async with _fake(clock, list_other_bags=True) as fake:
        order_id, bag_id, _ = _order(fake, bags=2)
        other = next(b for b in fake.store.order(order_id).bags if b != bag_id)
        fake.another_actor_refund(order_id, other, 400, status="COMPLETED", age_seconds=30)
        dead = fake.failed_attempt(order_id, bag_id, 300, age_seconds=20)
        assert dead["status"] == "FAILED"
        fake.script("refund", Fault.HTTP_500_AFTER_COMMIT, bag_id=bag_id)
        async with fake.client(clock=clock, retry=ROOMY) as client:
            listed = await client.list_bag_refunds(order_id, bag_id)
            assert {r.bag_id for r in listed} == {bag_id, other}
            got = await client.refund_bag(order_id, bag_id)
        assert got.reconciled
        assert fake.ledger.refunds_per_bag[bag_id] == 1
        assert len(fake.ledger.posts_per_bag[bag_id]) == 1
        with pytest.raises(ValueError, match="FAILED"):
            fake.failed_attempt(order_id, bag_id, 1, status="COMPLETED")
