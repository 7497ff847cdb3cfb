"""Review 18's findings, each against a server scripted here (refunds counted by the
server's own record, not the client's)."""

from __future__ import annotations

import email.utils
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    PendingRefund,
    RequestValidationError,
    RetryPolicy,
    ShippingRefund,
    SkuRefund,
    VioletClient,
    VioletError,
)
from violet_async._transport import Timeouts
from violet_async.stores import SQLiteStore
from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan, ServerQuirks

from .conftest import serve

ORDER, BAG = 1801, 2801
WALL0 = 1_795_000_000.0
GATEWAY_504 = b"<html><body><h1>504 Gateway Time-out</h1></body></html>"


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class Bag18:
    """Violet for one bag of ``total`` cents, on its own (true) clock.

    ``seeded``: refunds already on the bag. Each POST applies (unless ``refuse_when``
    says the bag is closed by Violet's own count) and is answered per ``answers`` (a
    status and a body; the default is a gateway's 504 after the commit). A cancel
    refunds what is left of the bag: its total less every earlier refund's ``amount``
    and ``shipping.amount`` (the record's ``amount`` leaves the shipping out). The bag's
    status is ``status`` and never moves while the test runs (the commerce platform
    reports it minutes later)."""

    def __init__(
        self,
        clock: FakeClock,
        *,
        total: int = 1000,
        status: str = "PARTIALLY_REFUNDED",
        seeded: list[dict[str, Any]] | None = None,
        answers: list[tuple[int, bytes]] | None = None,
        refuse_closed: bool = False,
        sku_line: dict[str, Any] | None = None,
        tax: int = 0,
        list_lag: float = 0.0,
        shipping: int = 0,
        part: float = 1.0,
        listed_bag: int = BAG,
        listed_ids: bool = True,
        shipping_only: bool = False,
    ) -> None:
        self.clock = clock
        self.mono0 = clock.monotonic()
        self.total = total
        self.status = status
        self.made: list[dict[str, Any]] = list(seeded or [])
        self.answers = list(answers or [])
        self.refuse_closed = refuse_closed
        self.listed_bag = listed_bag
        self.listed_ids = listed_ids
        self.shipping_only = shipping_only
        """A refund that names shipping and no amount or lines refunds that shipping
        alone (the letter of Violet's page: the whole bag and its shipping)."""
        """False: the list gives every refund ``id`` 0 (a backend's default)."""
        """The ``bag_id`` the list gives the refunds POSTs make."""
        self.part = part
        """The share of each refund that goes through: below 1, the record is
        PARTIALLY_COMPLETED, its ``amount`` that share, with an error."""
        self.shipping = shipping
        """Shipping a cancel's record names beside its ``amount`` (which leaves it out)."""
        self.list_lag = list_lag
        """Seconds before a refund shows in the bag's list (a replica behind)."""
        self.shown_at: dict[int, float] = {}
        self.tax = tax
        """Tax the platform adds to each refund: its record's ``amount`` carries it,
        and ``tax_amount`` names it."""
        self.sku_line = sku_line
        """How the list shows each SKU line asked for (keys of Violet's Refunded Order
        Sku; None: as asked, with its ``order_sku_id``)."""
        self.posts = 0
        self.ours: list[int] = []
        self.next_id = 9_100

    def violet_time(self) -> float:
        return WALL0 + (self.clock.monotonic() - self.mono0)

    def refunded(self) -> int:
        return sum(
            r["amount"] + ((r.get("shipping") or {}).get("amount") or 0)
            for r in self.made
            if r.get("status") not in ("FAILED", "CANCELED")
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.on_response_prepare.append(self._date)
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/cancel", self._cancel)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_get("/v1/orders/{o}", self._order)
        return app

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Date"] = email.utils.formatdate(self.violet_time(), usegmt=True)

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "r18-token-0123456789", "refresh_token": "r18-r-01"})

    async def _list(self, request: web.Request) -> web.Response:
        now = self.clock.monotonic()
        shown = [r for r in self.made if self.shown_at.get(r["id"], 0.0) <= now]
        if not self.listed_ids:
            shown = [{**r, "id": 0} for r in shown]
        return web.Response(body=orjson.dumps(shown), content_type="application/json")

    async def _order(self, request: web.Request) -> web.Response:
        bag = {"id": BAG, "status": self.status, "total": self.total, "currency": "USD"}
        return web.json_response({"id": ORDER, "currency": "USD", "bags": [bag]})

    def _commit(
        self, amount: int, skus: list[dict[str, Any]] | None = None, *, shipping: int = 0
    ) -> dict[str, Any]:
        self.next_id += 1
        now = _stamp(self.violet_time())
        record = {
            "id": self.next_id,
            "order_id": ORDER,
            "bag_id": BAG,
            "merchant_id": 7,
            "app_id": 4242,
            "transaction_id": 3,
            "gateway_transaction_id": "pi_r18",
            "amount": amount + self.tax - shipping,
            **({"shipping": {"amount": shipping, "full_refund": True}} if shipping else {}),
            **({"tax_amount": self.tax} if self.tax else {}),
            "status": "COMPLETED",
            "refund_currency": "USD",
            "skus": [
                {
                    "id": 70 + n,
                    "refund_id": self.next_id,
                    "bag_id": BAG,
                    "quantity_refunded": line["quantity_refunded"],
                    **(
                        {"order_sku_id": line["order_sku_id"]}
                        if self.sku_line is None
                        else self.sku_line
                    ),
                }
                for n, line in enumerate(skus or [])
            ],
            "errors": [],
            "date_created": now,
            "date_last_modified": now,
        }
        record["bag_id"] = self.listed_bag
        if self.part < 1.0:
            record["amount"] = int(record["amount"] * self.part)
            record["status"] = "PARTIALLY_COMPLETED"
            record["errors"] = [
                {"id": 1, "error_code": 3001, "error_message": "A line could not be refunded"}
            ]
        self.made.append(record)
        self.ours.append(record["id"])
        self.shown_at[record["id"]] = self.clock.monotonic() + self.list_lag
        return record

    async def _answer(self, record: dict[str, Any] | None) -> web.Response:
        status, body = self.answers.pop(0) if self.answers else (504, GATEWAY_504)
        if status in (200, 202) and not body and record is not None:
            body = orjson.dumps({**record, "bag_id": BAG})
        return web.Response(status=status, body=body, content_type="text/html")

    async def _cancel(self, request: web.Request) -> web.Response:
        self.posts += 1
        left = self.total - self.refunded()
        if left <= 0 and self.refuse_closed:
            message = {"status": 400, "message": "Bag cannot be cancelled", "error_code": 4010}
            return web.json_response(message, status=400)
        record = self._commit(left, shipping=self.shipping) if left > 0 else None
        return await self._answer(record)

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        left = self.total - self.refunded()
        amount = body.get("amount_refunded")
        shipped = (body.get("shipping") or {}).get("amount")
        if self.shipping_only and amount is None and shipped and not body.get("skus"):
            record = self._commit(shipped, shipping=shipped)  # amount 0, shipping apart
            return await self._answer(record)
        if amount is None:
            lines = body.get("skus") or []
            amount = sum(line.get("amount_refunded") or 250 for line in lines) or left
        if amount > left or left <= 0:
            message = {"status": 400, "message": "Refund exceeds the bag", "error_code": 4006}
            return web.json_response(message, status=400)
        return await self._answer(self._commit(amount, body.get("skus")))


def _client(url: str, clock: FakeClock, **retry: Any) -> VioletClient:
    return VioletClient(
        4242,
        "review18-app-secret-0123456789abcdef",
        username="review18-user",
        password="review18-password-0123",
        base_url=url + "/v1",
        clock=clock,
        retry=RetryPolicy(**{"initial_delay": 0.5, "max_delay": 1.0, "deadline": 600.0, **retry}),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


def _partial(age: float, *, amount: int = 300, shipping: int = 100) -> dict[str, Any]:
    """A partial refund made ``age`` seconds before the test starts, refunding
    ``amount`` of goods and ``shipping`` of shipping (its ``amount`` leaves the
    shipping out: Violet's pages do not say which way a record reads)."""
    at = _stamp(WALL0 - age)
    return {
        "id": 9_001,
        "order_id": ORDER,
        "bag_id": BAG,
        "merchant_id": 7,
        "app_id": 4242,
        "transaction_id": 3,
        "gateway_transaction_id": "pi_r18",
        "amount": amount,
        "shipping": {"amount": shipping, "full_refund": True},
        "status": "COMPLETED",
        "refund_currency": "USD",
        "reason": "damaged box",
        "skus": [],
        "errors": [],
        "date_created": at,
        "date_last_modified": at,
    }


async def _outcome(call: Any) -> OrderRefund | VioletError:
    try:
        refund: OrderRefund = await call
    except VioletError as exc:
        return exc
    return refund


@pytest.mark.parametrize("kind", ["cancel", "whole-bag refund"])
@pytest.mark.parametrize("refuse_closed", [False, True])
async def test_the_rest_after_a_partial_refund_with_shipping_is_never_sent_twice(
    kind: str, refuse_closed: bool
) -> None:
    """A bag of 1000 had 300 of goods and 100 of shipping refunded an hour ago (the
    record's ``amount`` reads 300, its shipping 100). A cancel (or a whole-bag refund)
    applies (600, the rest) and is answered by a gateway's 504; the bag's status still
    reads PARTIALLY_REFUNDED. Its refund is on the list: the call returns it, or leaves
    it pending, and never sends again (it sent 4 cancels and reported the 504 as a
    definite failure, or re-sent and got a refusal, taking the record's amount as all
    it refunded)."""
    clock = FakeClock(wall_start=WALL0)
    violet = Bag18(clock, seeded=[_partial(3600.0)], refuse_closed=refuse_closed)
    async with serve(violet.app()) as url, _client(url, clock) as client:
        if kind == "cancel":
            call = client.cancel_bag(ORDER, BAG, reason="out of stock")
        else:
            call = client.refund_bag(ORDER, BAG, reason="out of stock")
        outcome = await _outcome(call)
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    assert len(violet.ours) == 1
    if isinstance(outcome, OrderRefund):
        assert outcome.id == violet.ours[0]
    else:
        assert isinstance(outcome, AmbiguousOutcomeError), repr(outcome)


@pytest.mark.parametrize(
    "listed",
    [{"external_id": "gid://shopify/LineItem/1"}, {"order_sku_id": None}],
    ids=["no order_sku_id", "order_sku_id null"],
)
async def test_a_sku_refund_listed_without_its_order_sku_ids_is_never_sent_twice(
    listed: dict[str, Any],
) -> None:
    """A refund of one SKU line (no amount: Violet prices it) applies and is answered by
    a gateway's 504; the bag's list shows it with its line's ``order_sku_id`` left out
    (every field of Violet's records is optional; the platform's own line id only).
    The line may be the one asked for: never a miss, never sent again."""
    clock = FakeClock(wall_start=WALL0)
    violet = Bag18(clock, status="COMPLETED", sku_line=listed)
    async with serve(violet.app()) as url, _client(url, clock) as client:
        line = SkuRefund(order_sku_id=10_000, quantity_refunded=1)
        outcome = await _outcome(client.refund_bag(ORDER, BAG, skus=[line]))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    if isinstance(outcome, OrderRefund):
        assert outcome.id == violet.ours[0]
    else:
        assert isinstance(outcome, AmbiguousOutcomeError), repr(outcome)


async def test_a_refund_whose_record_carries_its_tax_in_the_amount_is_never_sent_twice() -> None:
    """A refund of 500 applies and is answered by a gateway's 504; the platform added
    80 of tax, and the list shows the record's ``amount`` as 580 with ``tax_amount``
    80 (Violet's pages do not say whether ``amount`` carries the tax). It may be ours:
    never a miss, never sent again (it was sent twice: two refunds)."""
    clock = FakeClock(wall_start=WALL0)
    violet = Bag18(clock, total=5000, status="COMPLETED", tax=80)
    async with serve(violet.app()) as url, _client(url, clock) as client:
        outcome = await _outcome(client.refund_bag(ORDER, BAG, amount_refunded=500))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    if isinstance(outcome, OrderRefund):
        assert outcome.id == violet.ours[0]
    else:
        assert isinstance(outcome, AmbiguousOutcomeError), repr(outcome)


def _stored_client(url: str, clock: FakeClock, path: Path) -> VioletClient:
    return VioletClient(
        4242,
        "review18-app-secret-0123456789abcdef",
        username="review18-user",
        password="review18-password-0123",
        base_url=url + "/v1",
        clock=clock,
        store=SQLiteStore(str(path)),
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=20.0),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


async def test_a_pending_record_edited_before_its_resume_elsewhere_is_not_sent(
    tmp_path: Path,
) -> None:
    """A refund of 500 (no key; the client has a store on a shared SQLite file) applies,
    is answered by a 504, and its list lags past the call's deadline: pending. An
    operator "fixes" the stored JSON to 900 and another process sharing the file
    resumes it: the edited record names another request under the ask's identity and
    is refused, nothing sent (the store held nothing of it: the 500 was proven absent
    by the list and 900 sent, two refunds)."""
    clock = FakeClock(wall_start=WALL0)
    violet = Bag18(clock, total=5000, status="COMPLETED", list_lag=45.0)
    path = tmp_path / "records.db"
    async with serve(violet.app()) as url:
        async with _stored_client(url, clock, path) as one:
            first = await _outcome(one.refund_bag(ORDER, BAG, amount_refunded=500))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        data = orjson.loads(first.pending.to_json())
        data["request"]["amount_refunded"] = 900
        edited = PendingRefund.from_json(orjson.dumps(data))
        clock.advance(120.0)
        async with _stored_client(url, clock, path) as two:
            outcome = await _outcome(two.resume(edited))
            assert isinstance(outcome, RequestValidationError), repr(outcome)
            assert violet.posts == 1
            refund = await two.resume(first.pending)  # the record as it was
    assert refund.id == violet.ours[0]
    assert violet.posts == 1


async def test_a_cancel_whose_record_names_its_shipping_apart_is_never_sent_twice() -> None:
    """A cancel of a bag of 1000 (no earlier refund) applies and is answered by a
    gateway's 504; its record reads ``amount`` 900 and ``shipping.amount`` 100, and the
    bag's status still reads COMPLETED. It is the whole bag read one way: never a
    miss, never cancelled again."""
    clock = FakeClock(wall_start=WALL0)
    violet = Bag18(clock, status="COMPLETED", shipping=100)
    async with serve(violet.app()) as url, _client(url, clock) as client:
        outcome = await _outcome(client.cancel_bag(ORDER, BAG))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    assert isinstance(outcome, (OrderRefund, AmbiguousOutcomeError)), repr(outcome)


@pytest.mark.parametrize("kind", ["amount", "cancel"])
async def test_a_partially_completed_refund_is_never_sent_again(kind: str) -> None:
    """A refund of 500 (or a cancel of a bag of 5000) applies only in part: Violet
    lists it PARTIALLY_COMPLETED with the ``amount`` that went through (300, or 3000)
    and an error, after a gateway's 504. It may be this ask's: never a miss (it was
    sent four times, four refunds, and the last 504 reported as a definite failure)."""
    clock = FakeClock(wall_start=WALL0)
    violet = Bag18(clock, total=5000, status="COMPLETED", part=0.6)
    async with serve(violet.app()) as url, _client(url, clock) as client:
        if kind == "cancel":
            outcome = await _outcome(client.cancel_bag(ORDER, BAG))
        else:
            outcome = await _outcome(client.refund_bag(ORDER, BAG, amount_refunded=500))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    assert isinstance(outcome, (OrderRefund, AmbiguousOutcomeError)), repr(outcome)


async def test_a_refund_listed_with_bag_id_0_is_never_sent_twice() -> None:
    """A refund of 500 applies and is answered by a gateway's 504; the list gives it
    ``bag_id`` 0 (no id: a backend's default for a field it never set). It names no
    other bag: it is found, never sent again (read as another bag's, it was sent four
    times: four refunds)."""
    clock = FakeClock(wall_start=WALL0)
    violet = Bag18(clock, total=5000, status="COMPLETED", listed_bag=0)
    async with serve(violet.app()) as url, _client(url, clock) as client:
        outcome = await _outcome(client.refund_bag(ORDER, BAG, amount_refunded=500))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    assert isinstance(outcome, OrderRefund), repr(outcome)
    assert outcome.id == violet.ours[0]


async def test_a_cancel_after_a_platform_refund_listed_with_bag_id_0_is_sent_once() -> None:
    """The merchant's platform refunded 300 of a bag of 1000 an hour ago; the list
    shows that record (EXTERNAL) with ``bag_id`` 0. A cancel applies (700, the rest),
    answered by a 504, the bag's status lagging: its refund is the rest of the bag,
    found, and the bag is never cancelled again (it was sent four times)."""
    clock = FakeClock(wall_start=WALL0)
    platform = {**_partial(3600.0, shipping=0), "bag_id": 0, "status": "EXTERNAL"}
    violet = Bag18(clock, seeded=[platform])
    async with serve(violet.app()) as url, _client(url, clock) as client:
        outcome = await _outcome(client.cancel_bag(ORDER, BAG))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    assert isinstance(outcome, (OrderRefund, AmbiguousOutcomeError)), repr(outcome)


@pytest.mark.parametrize("read_before_send", [False, True])
async def test_refunds_listed_with_id_0_are_not_one_refund(read_before_send: bool) -> None:
    """The list gives every refund ``id`` 0 (no id: a backend's default): the
    platform's refund of 300 an hour ago, and this call's 500, applied and answered by
    a 504. They are two records without ids, never one refund listed twice (the
    second was dropped as a repeat, this call's refund proven absent and sent four
    times)."""
    clock = FakeClock(wall_start=WALL0)
    platform = {**_partial(3600.0, shipping=0), "status": "EXTERNAL"}
    violet = Bag18(clock, total=5000, status="COMPLETED", seeded=[platform], listed_ids=False)
    retry = {"read_before_send": read_before_send}
    async with serve(violet.app()) as url, _client(url, clock, **retry) as client:
        outcome = await _outcome(client.refund_bag(ORDER, BAG, amount_refunded=500))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    assert isinstance(outcome, AmbiguousOutcomeError), repr(outcome)
    assert outcome.pending is not None
    assert outcome.pending.needs_review


async def test_a_shipping_only_refund_is_never_sent_twice() -> None:
    """``refund_bag(shipping=ShippingRefund(700))``, no amount, no lines: the platform
    refunds the shipping alone (its record: ``amount`` 0, ``shipping.amount`` 700),
    answered by a gateway's 504. Taken for a whole-bag refund, it was never "the rest"
    of the bag, proven absent, and sent four times (four shipping refunds)."""
    clock = FakeClock(wall_start=WALL0)
    violet = Bag18(clock, total=5000, status="COMPLETED", shipping_only=True)
    async with serve(violet.app()) as url, _client(url, clock) as client:
        outcome = await _outcome(client.refund_bag(ORDER, BAG, shipping=ShippingRefund(amount=700)))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    assert isinstance(outcome, AmbiguousOutcomeError), repr(outcome)


class ItemsOnly(Bag18):
    """A bag of 1000: 850 of items, 100 of shipping, 50 of tax. Refunding the whole
    bag (a cancel, or a refund with no amount or lines) refunds its items alone."""

    async def _order(self, request: web.Request) -> web.Response:
        bag = {
            "id": BAG,
            "status": self.status,
            "total": 1000,
            "sub_total": 850,
            "shipping_total": 100,
            "tax_total": 50,
            "currency": "USD",
        }
        return web.json_response({"id": ORDER, "currency": "USD", "bags": [bag]})

    async def _whole(self, request: web.Request) -> web.Response:
        self.posts += 1
        left = 850 - sum(r["amount"] for r in self.made)
        return await self._answer(self._commit(left) if left > 0 else None)

    _refund = _cancel = _whole


@pytest.mark.parametrize("kind", ["cancel", "whole-bag refund"])
async def test_a_whole_bag_refunded_items_only_is_never_sent_twice(kind: str) -> None:
    """A cancel (or a whole-bag refund) applies and is answered by a gateway's 504;
    the platform refunded the items alone (850 of a bag of 1000), and the bag's status
    still reads COMPLETED. It was never "the rest" of the total: proven absent, sent
    four times, and the last 504 reported as a definite failure."""
    clock = FakeClock(wall_start=WALL0)
    violet = ItemsOnly(clock, status="COMPLETED")
    async with serve(violet.app()) as url, _client(url, clock) as client:
        if kind == "cancel":
            outcome = await _outcome(client.cancel_bag(ORDER, BAG))
        else:
            outcome = await _outcome(client.refund_bag(ORDER, BAG))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    assert isinstance(outcome, AmbiguousOutcomeError), repr(outcome)


class EarlierFails(Bag18):
    """The bag's earlier refund, PROCESSING when a cancel comes, fails right after the
    cancel refunded what it left."""

    async def _cancel(self, request: web.Request) -> web.Response:
        self.posts += 1
        left = self.total - self.refunded()
        record = self._commit(left) if left > 0 else None
        self.made[0]["status"] = "FAILED"
        return await self._answer(record)


async def test_a_cancel_whose_earlier_refund_failed_after_it_is_sent_once() -> None:
    """A bag of 1000 has a refund of 300 PROCESSING; a cancel refunds the 700 left and
    is answered by a 504; the 300 then fails. The cancel's 700 is no longer "the rest"
    by the refunds that moved money, but it was when it was made: never a miss (the
    bag was cancelled again, and that second refund of 300 returned as the cancel's)."""
    clock = FakeClock(wall_start=WALL0)
    earlier = {**_partial(600.0, shipping=0), "status": "PROCESSING"}
    violet = EarlierFails(clock, seeded=[earlier])
    async with serve(violet.app()) as url, _client(url, clock) as client:
        outcome = await _outcome(client.cancel_bag(ORDER, BAG))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    assert isinstance(outcome, AmbiguousOutcomeError), repr(outcome)


@pytest.mark.parametrize("quirk", ["listed_without_sku_ids", "listed_zero_ids"])
async def test_fake_violet_lists_records_without_ids_and_one_refund_is_made(quirk: str) -> None:
    """FakeViolet learned both shapes (lines without their ``order_sku_id``; ``id``
    and ``bag_id`` 0): a refund of one SKU line committed and answered by a 504 is
    never sent again."""
    clock = FakeClock(wall_start=WALL0)
    plan = FaultPlan(quirks=ServerQuirks(bag_status_lag=600.0, **{quirk: True}))
    async with FakeViolet(clock=clock, faults=plan) as fake:
        order = fake.add_order([{"skus": [{"quantity": 2, "price": 500}], "shipping": 500}])
        bag = next(iter(order.bags.values()))
        fake.script("refund", Fault.HTTP_504_AFTER_COMMIT, bag_id=bag.id)
        line = SkuRefund(order_sku_id=bag.skus[0].order_sku_id, quantity_refunded=1)
        async with fake.client(clock=clock, retry=RetryPolicy(deadline=600.0)) as client:
            outcome = await _outcome(client.refund_bag(order.id, bag.id, skus=[line]))
            listed = await client.list_bag_refunds(order.id, bag.id)
    assert isinstance(outcome, AmbiguousOutcomeError), repr(outcome)
    assert fake.ledger.refunds_per_bag[bag.id] == 1
    assert len(fake.ledger.posts_per_bag[bag.id]) == 1
    if quirk == "listed_zero_ids":
        assert (listed[0].id, listed[0].bag_id) == (None, None)
    else:
        assert [line.order_sku_id for line in listed[0].skus] == [None]


class InCents(Bag18):
    """A bag in JPY (no minor unit) whose platform records refunds as if in cents: a
    refund of 500 yen reads back as ``amount`` 50000."""

    def _commit(
        self, amount: int, skus: list[dict[str, Any]] | None = None, *, shipping: int = 0
    ) -> dict[str, Any]:
        record = super()._commit(amount, skus, shipping=shipping)
        record["amount"] = amount * 100
        record["refund_currency"] = "JPY"
        return record

    def refunded(self) -> int:
        return sum(r["amount"] // 100 for r in self.made)

    async def _order(self, request: web.Request) -> web.Response:
        bag = {"id": BAG, "status": self.status, "total": self.total, "currency": "JPY"}
        return web.json_response({"id": ORDER, "currency": "JPY", "bags": [bag]})


@pytest.mark.parametrize("kind", ["amount", "cancel"])
async def test_a_refund_recorded_in_other_minor_units_is_never_sent_twice(kind: str) -> None:
    """A refund of 500 (or a cancel of a bag of 5000) in JPY applies and is answered by
    a 504; the list records it in hundredths (50000, or 500000). It may be this ask's:
    never a miss (the refund was sent twice, the cancel four times with the last 504
    reported as a definite failure)."""
    clock = FakeClock(wall_start=WALL0)
    violet = InCents(clock, total=5000, status="COMPLETED")
    async with serve(violet.app()) as url, _client(url, clock) as client:
        if kind == "cancel":
            outcome = await _outcome(client.cancel_bag(ORDER, BAG))
        else:
            outcome = await _outcome(client.refund_bag(ORDER, BAG, amount_refunded=500))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    assert isinstance(outcome, AmbiguousOutcomeError), repr(outcome)


class OtherBagsToo(Bag18):
    """The bag's list also carries a refund of the order's other bag, listed with
    ``bag_id`` 0; this bag's own refunds count only its own."""

    def refunded(self) -> int:
        return sum(r["amount"] for r in self.made if r["bag_id"] == BAG)


async def test_another_bags_refund_listed_with_bag_id_0_never_proves_absence() -> None:
    """Beside a whole-bag refund (1000 of a bag of 1000, answered by a 504) the list
    carries the order's other bag's refund of 200 with ``bag_id`` 0. That record may
    or may not be this bag's: the refund is what was left one way, so never a miss,
    never sent again."""
    clock = FakeClock(wall_start=WALL0)
    elsewhere = {**_partial(3600.0, amount=200, shipping=0), "bag_id": 0}
    violet = OtherBagsToo(clock, status="COMPLETED", seeded=[elsewhere])
    async with serve(violet.app()) as url, _client(url, clock) as client:
        outcome = await _outcome(client.refund_bag(ORDER, BAG))
    assert violet.posts == 1, f"sent {violet.posts} times: {outcome!r}"
    assert isinstance(outcome, (OrderRefund, AmbiguousOutcomeError)), repr(outcome)
