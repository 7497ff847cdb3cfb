"""Violet's own documented payloads (tests/fixtures/violet/, each with its source in
index.json): every one is parsed, and the client is run against each shape on a server
scripted here. Then the first-day rows of "real Violet": a 202 cancellation body, a
platform's EXTERNAL refund without ids, a cancel answer without our bag, per-bag
CANCELLATION_FAILURE, and FakeViolet speaking the same shapes by default."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from violet_async import (
    AmbiguousOutcomeError,
    CancellationFailedError,
    OrderBag,
    OrderSku,
    RefundStatus,
    RetryPolicy,
    VioletClient,
)
from violet_async._converter import structure
from violet_async._protocol import is_violet_error_body
from violet_async._responses import parse_cancel, parse_refund, parse_refund_page
from violet_async._transport import RawResponse
from violet_async.testing import FakeClock, FakeViolet
from violet_async.webhooks import WebhookEventType

from .conftest import make_client

FIXTURES = Path(__file__).parent / "fixtures" / "violet"
INDEX: list[dict[str, Any]] = json.loads((FIXTURES / "index.json").read_text())["fixtures"]
POLICY = RetryPolicy(initial_delay=0.5, max_delay=4.0, settle_delay=1.0, deadline=300.0)


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def made_now(body: Any) -> Any:
    """``body`` with the refund it names (a refund, or each refund of a cancellation)
    dated now, by the real clock that stamps the answer's ``Date``."""
    body = copy.deepcopy(body)
    now = violet_date(time.time())
    if isinstance(body, dict) and "date_created" in body and "amount" in body:
        body["date_created"] = now
    for entry in body.get("cancelled_bags") or () if isinstance(body, dict) else ():
        if isinstance(entry, dict) and isinstance(entry.get("refund"), dict):
            entry["refund"]["date_created"] = now
    return body


def raw(status: int, data: Any) -> RawResponse:
    headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    return RawResponse(status, headers, orjson.dumps(data))


def by_kind(kind: str) -> list[str]:
    return [entry["file"] for entry in INDEX if entry["kind"] == kind]


def violet_date(when: float) -> str:
    """A date as Violet's list example writes it (``+0000``)."""
    return datetime.fromtimestamp(when, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000")


# -- the corpus ---------------------------------------------------------------------


def test_every_fixture_is_indexed_with_its_source() -> None:
    """Each payload file is in index.json with a source URL and a kind, and nothing in
    the index is missing."""
    files = {path.name for path in FIXTURES.glob("*.json")} - {"index.json"}
    assert files == {entry["file"] for entry in INDEX}
    for entry in INDEX:
        assert entry["source"].startswith("https://docs.violet.io"), entry["file"]
        assert entry["kind"] in {"cancel", "refund", "refund_list", "bag_page", "error"}


@pytest.mark.parametrize("name", by_kind("cancel"))
def test_documented_cancellation_bodies_parse(name: str) -> None:
    """Both pages' cancellation examples give their bag's refund: no
    gateway_transaction_id, no transfer amounts, both date shapes read."""
    body = fixture(name)
    bag_id = body["cancelled_bags"][0]["bag_id"]
    refund = parse_cancel(raw(202, body), "/orders/10000/bags/11111/cancel", bag_id=bag_id)
    assert (refund.id, refund.amount, refund.bag_id) == (99999, 9900, 11111)
    assert refund.gateway_transaction_id is None
    assert refund.merchant_transfer_reversal_amount_usd is None
    assert refund.status is RefundStatus.COMPLETED
    assert [s.order_sku_id for s in refund.skus] == [8014657, 77777]


@pytest.mark.parametrize("name", by_kind("refund"))
def test_documented_refund_bodies_parse(name: str) -> None:
    """The refund-bag examples parse whole, placeholders and all; the newer page's
    payment_transaction_id is read, transfer_reversals ignored."""
    body = fixture(name)
    refund = parse_refund(raw(200, body), "/orders/123/bags/123/refunds")
    assert (refund.amount, refund.status) == (123, RefundStatus.PROCESSING)
    assert refund.shipping is not None
    assert refund.shipping.discrepancy_reason == "<string>"
    assert refund.payment_transaction_id == body.get("payment_transaction_id")


@pytest.mark.parametrize("name", by_kind("refund_list"))
def test_documented_refund_lists_parse(name: str) -> None:
    """The get-bag-refunds examples are bare arrays that read whole (unreadable 0), with
    or without gateway_transaction_id."""
    body = fixture(name)
    page = parse_refund_page(raw(200, body), "/orders/1/bags/2/refunds")
    assert page.unreadable == 0
    assert not page.paged
    assert [r.id for r in page.refunds] == [body[0]["id"]]
    assert page.refunds[0].gateway_transaction_id == body[0].get("gateway_transaction_id")


@pytest.mark.parametrize("name", by_kind("bag_page"))
def test_documented_bags_read_sku_lines_as_violet_sends_them(name: str) -> None:
    """A documented bag's SKU lines carry quantity_fulfilled and status; there is no
    refunded quantity to read."""
    (bag_json,) = fixture(name)["content"]
    bag = structure(bag_json, OrderBag, body=b"", status=200, method="GET", path="/x")
    (sku,) = bag.skus
    assert (sku.quantity_fulfilled, sku.status, sku.sku_id) == (123, "IN_PROGRESS", 123)
    assert "refunded_quantity" not in {f.name for f in attrs.fields(OrderSku)}


@pytest.mark.parametrize("name", by_kind("error"))
def test_documented_error_bodies_are_violet_answers(name: str) -> None:
    """Violet's error example is recognised as its application's own answer."""
    assert is_violet_error_body(orjson.dumps(fixture(name)))


# -- a server scripted here ----------------------------------------------------------


@attrs.define
class Scripted:
    """One POST route answering ``post`` (status, JSON) and optionally committing
    ``commit`` to the refund list; GETs answer ``refunds`` and ``order``."""

    clock: FakeClock
    post: tuple[int, Any]
    commit: Callable[[], dict[str, Any]] | None = None
    refunds: list[Any] = attrs.Factory(list)
    order: dict[str, Any] | None = None
    requests: list[str] = attrs.Factory(list)
    first: list[tuple[int, Any]] = attrs.Factory(list)
    """Answers for the first POSTs, before ``post`` (nothing is committed for them)."""
    dated_now: bool = True
    """The answer's refunds are dated when it is sent, as Violet dates a refund it
    makes (the examples' own dates, from 2023 and 2024, are the pages' placeholders)."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/{action}", self._post)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_get("/v1/orders/{o}", self._order)
        return app

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "t", "refresh_token": "r"})

    async def _post(self, request: web.Request) -> web.Response:
        self.requests.append(f"POST {request.match_info['action']}")
        if self.first:
            status, early = self.first.pop(0)
            return web.json_response(early, status=status, headers={"Retry-After": "1"})
        if self.commit is not None:
            self.refunds.append(self.commit())
        status, body = self.post
        if self.dated_now:
            body = made_now(body)
        return web.json_response(body, status=status)

    async def _list(self, request: web.Request) -> web.Response:
        self.requests.append("GET refunds")
        return web.json_response(self.refunds)

    async def _order(self, request: web.Request) -> web.Response:
        self.requests.append("GET order")
        return web.json_response(self.order or {"id": int(request.match_info["o"]), "bags": []})


@contextlib.asynccontextmanager
async def scripted_client(server: Scripted) -> AsyncIterator[VioletClient]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            11,
            "scripted-secret",
            username="scripted",
            password="scripted-password-0123",
            base_url=f"http://127.0.0.1:{port}/v1",
            retry=POLICY,
            clock=server.clock,
        ) as client:
            yield client
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("name", by_kind("cancel"))
async def test_client_cancels_on_the_documented_202(name: str) -> None:
    """Row 1: a cancel answered 202 with Violet's example returns its refund at once:
    no read-back, one POST, for a bag that was cancelled."""
    server = Scripted(FakeClock(), post=(202, fixture(name)))
    async with scripted_client(server) as client:
        refund = await client.cancel_bag(10000, 11111)
    assert (refund.id, refund.amount, refund.reconciled) == (99999, 9900, False)
    assert server.requests == ["POST cancel"]


async def test_client_cancels_on_the_older_pages_bare_refund() -> None:
    """The older order-service page's 200 schema is the bare Order Refund: accepted."""
    refund_json = fixture("order-service-cancel-bag.json")["cancelled_bags"][0]["refund"]
    server = Scripted(FakeClock(), post=(200, refund_json))
    async with scripted_client(server) as client:
        refund = await client.cancel_bag(10000, 11111)
    assert (refund.id, refund.amount) == (99999, 9900)
    assert server.requests == ["POST cancel"]


@pytest.mark.parametrize("name", by_kind("refund"))
async def test_client_refunds_on_the_documented_answer(name: str) -> None:
    """A refund POST answered with the documented example returns it as the refund."""
    server = Scripted(FakeClock(), post=(200, fixture(name)))
    async with scripted_client(server) as client:
        refund = await client.refund_bag(123, 123, amount_refunded=123)
    assert (refund.id, refund.amount) == (123, 123)
    assert server.requests == ["POST refunds"]


async def test_a_429_is_sent_again_without_a_read_back() -> None:
    """Row 4, as decided (docs/violet-behaviours.md): Violet documents a platform's 429
    as passed through and advises backing off and retrying; nothing it publishes says a
    429 can follow an applied refund. So a 429 is "not applied": sent again after its
    Retry-After, no read-back of whether it applied (the bag's refunds are read once,
    right before the re-send: what they list is not this ask's), one refund returned."""
    rate_limited = {"status": 429, "message": "Too Many Requests", "error_code": 429}
    server = Scripted(
        FakeClock(),
        post=(200, fixture("order-service-refund-bag.json")),
        first=[(429, rate_limited)],
    )
    async with scripted_client(server) as client:
        refund = await client.refund_bag(123, 123, amount_refunded=123)
    assert (refund.id, refund.reconciled) == (123, False)
    assert server.requests == ["POST refunds", "GET refunds", "POST refunds"]


@pytest.mark.parametrize("name", by_kind("refund_list"))
async def test_client_lists_the_documented_refunds(name: str) -> None:
    """list_bag_refunds reads each documented list whole."""
    server = Scripted(FakeClock(), post=(500, {}), refunds=fixture(name))
    async with scripted_client(server) as client:
        refunds = await client.list_bag_refunds(11111, 22222)
    assert [r.id for r in refunds] == [fixture(name)[0]["id"]]


def platform_refund(clock: FakeClock, amount: int) -> dict[str, Any]:
    """A refund made on the merchant's platform, as Violet lists it: EXTERNAL, without
    transaction ids (the list example's shape, less what the platform cannot know)."""
    record = copy.deepcopy(fixture("order-service-get-bag-refunds.json")[0])
    for key in ("transaction_id", "skus"):
        del record[key]
    record.update(
        id=9_990,
        amount=amount,
        status="EXTERNAL",
        reason=None,
        date_created=violet_date(clock.time() - 600),
    )
    return record


async def test_a_read_back_reads_past_platform_refunds_without_ids() -> None:
    """Row 2: Violet's own 500 after the commit; the bag's list holds a platform refund
    (EXTERNAL, no transaction ids) and ours in the documented list shape (no
    gateway_transaction_id). The read-back reads both and reconciles ours: one POST."""
    clock = FakeClock()

    def ours() -> dict[str, Any]:
        record = copy.deepcopy(fixture("order-service-get-bag-refunds.json")[0])
        record.update(order_id=11111, bag_id=22222, date_created=violet_date(clock.time()))
        return record

    violet_500 = {"status": 500, "message": "Internal error", "error_code": 5000}
    server = Scripted(
        clock, post=(500, violet_500), commit=ours, refunds=[platform_refund(clock, 700)]
    )
    async with scripted_client(server) as client:
        refund = await client.refund_bag(
            11111, 22222, amount_refunded=2500, reason="Item is out of stock."
        )
    assert (refund.id, refund.reconciled) == (10000, True)
    assert server.requests.count("POST refunds") == 1


async def test_a_list_with_an_unreadable_record_still_reads() -> None:
    """Row 2: one record of another shape (an amount as a string) no longer makes the
    whole list fail: the readable records come back, and the read is made once."""
    clock = FakeClock()
    good = fixture("order-service-get-bag-refunds.json")[0]
    server = Scripted(
        clock,
        post=(500, {}),
        refunds=[{"id": 1, "amount": "25.00"}, platform_refund(clock, 5), good],
    )
    async with scripted_client(server) as client:
        refunds = await client.list_bag_refunds(11111, 22222)
    assert [r.id for r in refunds] == [9_990, 10000]
    assert refunds[0].status is RefundStatus.EXTERNAL
    assert refunds[0].transaction_id is None
    assert server.requests == ["GET refunds"]


async def test_an_unreadable_record_keeps_a_read_back_from_claiming_or_resending() -> None:
    """A dropped answer on a bag whose list holds a record that cannot be read (it may be
    this ask's own): the read-back never claims the readable look-alike and never proves
    absence; the ask ends pending after one POST."""
    clock = FakeClock()

    def ours() -> dict[str, Any]:
        record = copy.deepcopy(fixture("order-service-get-bag-refunds.json")[0])
        record.update(order_id=11111, bag_id=22222, date_created=violet_date(clock.time()))
        return record

    violet_500 = {"status": 500, "message": "Internal error", "error_code": 5000}
    server = Scripted(
        clock,
        post=(500, violet_500),
        commit=ours,
        refunds=[{"id": 1, "amount": "25.00"}, platform_refund(clock, 700)],
    )
    async with scripted_client(server) as client:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(
                11111, 22222, amount_refunded=2500, reason="Item is out of stock."
            )
    assert info.value.pending is not None
    assert server.requests.count("POST refunds") == 1


async def test_a_failed_bag_entry_with_a_refund_is_read_back() -> None:
    """A bag entry saying CANCELLATION_FAILURE beside a refund is contradictory: money may
    have moved, so it is never a definite failure; the bag is read back (one POST)."""
    clock = FakeClock()
    body = fixture("order-service-cancel-bag.json")
    body["cancelled_bags"][0]["status"] = "CANCELLATION_FAILURE"

    def cancel_refund() -> dict[str, Any]:
        refund: dict[str, Any] = copy.deepcopy(body["cancelled_bags"][0]["refund"])
        refund["date_created"] = violet_date(clock.time())
        return refund

    server = Scripted(
        clock,
        post=(202, body),
        commit=cancel_refund,
        order={"id": 10000, "bags": [{"id": 11111, "status": "CANCELED", "total": 9900}]},
    )
    async with scripted_client(server) as client:
        refund = await client.cancel_bag(10000, 11111)
    assert (refund.id, refund.reconciled) == (99999, True)
    assert server.requests.count("POST cancel") == 1


async def test_cancel_answered_canceled_without_bags_is_read_back_not_a_failure() -> None:
    """Issue 24 row 4: ``{"status": "CANCELED", "cancelled_bags": []}`` (it applied) is
    not a definite CancellationFailedError: the bag is read back, and the cancel's
    refund found there is returned (reconciled), after one POST."""
    clock = FakeClock()

    def cancel_refund() -> dict[str, Any]:
        record = copy.deepcopy(fixture("order-service-cancel-bag.json")["cancelled_bags"][0])
        refund: dict[str, Any] = record["refund"]
        refund["date_created"] = violet_date(clock.time())
        return refund

    server = Scripted(
        clock,
        post=(202, {"status": "CANCELED", "cancelled_bags": []}),
        commit=cancel_refund,
        order={"id": 10000, "bags": [{"id": 11111, "status": "CANCELED", "total": 9900}]},
    )
    async with scripted_client(server) as client:
        refund = await client.cancel_bag(10000, 11111)
    assert (refund.id, refund.amount, refund.reconciled) == (99999, 9900, True)
    assert server.requests.count("POST cancel") == 1


async def test_cancel_answered_canceled_without_bags_never_fails_nor_resends() -> None:
    """The same answer when nothing shows on the bag yet: never a definite failure, and
    the cancel is not sent twice within the call (the outcome stays pending)."""
    server = Scripted(
        FakeClock(),
        post=(202, {"status": "CANCELED", "cancelled_bags": []}),
        order={"id": 10000, "bags": [{"id": 11111, "status": "CANCELED", "total": 9900}]},
    )
    async with scripted_client(server) as client:
        with pytest.raises(AmbiguousOutcomeError):
            await client.cancel_bag(10000, 11111)
    assert server.requests.count("POST cancel") == 1


async def test_a_bags_own_cancellation_failure_is_a_definite_failure() -> None:
    """A 202 whose entry for our bag says CANCELLATION_FAILURE (overall status
    PARTIALLY_CANCELED) is Violet's definite failure: nothing is read back."""
    body = fixture("orders-and-checkout-cancel-bag.json")
    body["status"] = "PARTIALLY_CANCELED"
    failed = {"bag_id": 11112, "status": "CANCELLATION_FAILURE", "originated_by": "VIOLET"}
    body["cancelled_bags"].append(failed)
    server = Scripted(FakeClock(), post=(202, body))
    async with scripted_client(server) as client:
        with pytest.raises(CancellationFailedError) as info:
            await client.cancel_bag(10000, 11112)
        assert (await client.cancel_bag(10000, 11111)).id == 99999  # the other bag's entry
    assert info.value.status == "CANCELLATION_FAILURE"
    assert server.requests == ["POST cancel", "POST cancel"]


async def test_a_cancelled_bag_listed_twice_is_read_back() -> None:
    """Our bag listed twice in one answer says too little: neither refund is taken from
    the answer; the bag is read back and the cancel's refund found there (one POST)."""
    clock = FakeClock()
    body = fixture("order-service-cancel-bag.json")
    body["cancelled_bags"].append(copy.deepcopy(body["cancelled_bags"][0]))
    body["cancelled_bags"][1]["refund"]["id"] = 99998

    def cancel_refund() -> dict[str, Any]:
        refund: dict[str, Any] = copy.deepcopy(body["cancelled_bags"][0]["refund"])
        refund["date_created"] = violet_date(clock.time())
        return refund

    server = Scripted(
        clock,
        post=(202, body),
        commit=cancel_refund,
        order={"id": 10000, "bags": [{"id": 11111, "status": "CANCELED", "total": 9900}]},
    )
    async with scripted_client(server) as client:
        refund = await client.cancel_bag(10000, 11111)
    assert (refund.id, refund.reconciled) == (99999, True)
    assert server.requests.count("POST cancel") == 1
    assert "GET refunds" in server.requests


async def test_a_refund_answer_without_an_amount_is_read_back() -> None:
    """A 2xx refund that does not say what was refunded is not returned as the refund:
    the bag is read back, and the refund found there is returned (one POST)."""
    clock = FakeClock()
    body = fixture("order-service-refund-bag.json")
    del body["amount"]

    def ours() -> dict[str, Any]:
        record = copy.deepcopy(fixture("order-service-get-bag-refunds.json")[0])
        record.update(order_id=123, bag_id=123, amount=123, reason=None)
        record["date_created"] = violet_date(clock.time())
        return record

    server = Scripted(clock, post=(200, body), commit=ours)
    async with scripted_client(server) as client:
        refund = await client.refund_bag(123, 123, amount_refunded=123)
    assert (refund.id, refund.amount, refund.reconciled) == (10000, 123, True)
    assert server.requests.count("POST refunds") == 1


# -- FakeViolet speaks the same shapes by default --------------------------------------


async def test_fake_violet_answers_cancels_with_the_202_body(clock: FakeClock) -> None:
    """FakeViolet's cancel answers 202 with the cancellation body by default; the client
    returns the refund without a read-back."""
    async with FakeViolet(orders=1, clock=clock) as fake:
        order_id, bag_id = fake.seeded[0]
        async with make_client(fake, clock) as client:
            refund = await client.cancel_bag(order_id, bag_id)
        assert refund.amount == fake.bag(order_id, bag_id).total
        assert refund.gateway_transaction_id is None
        assert fake.ledger.requests["list_refunds"] == 0


async def test_fake_violet_records_and_skus_carry_only_what_violet_sends(
    clock: FakeClock,
) -> None:
    """Records have the documented list example's fields only; a platform refund is
    EXTERNAL without transaction ids; SKU lines have quantity_fulfilled and status,
    never an invented refunded_quantity."""
    async with FakeViolet(orders=1, clock=clock) as fake:
        order_id, bag_id = fake.seeded[0]
        async with make_client(fake, clock) as client:
            mine = await client.refund_bag(order_id, bag_id, amount_refunded=100)
            fake.another_actor_refund(order_id, bag_id, 50)
            refunds = await client.list_bag_refunds(order_id, bag_id)
            order = await client.get_order(order_id)
        documented = set(fixture("order-service-get-bag-refunds.json")[0]) | {"shipping"}
        for record in fake.bag(order_id, bag_id).refunds:
            assert set(record) <= documented
        assert mine.gateway_transaction_id is None
        platform = refunds[-1]
        assert (platform.status, platform.transaction_id) == (RefundStatus.EXTERNAL, None)
        bag = order.bag(bag_id)
        assert bag is not None
        assert all(s.quantity_fulfilled == 0 and s.status == "PROCESSING" for s in bag.skus)
        raw_order = fake.store.order(order_id).to_json()
        assert all("refunded_quantity" not in s for b in raw_order["bags"] for s in b["skus"])


async def test_fake_violet_bag_status_can_lag_the_refund(clock: FakeClock) -> None:
    """With bag_status_lag, the order keeps showing the earlier status for that long
    after a refund (Shopify takes minutes); the refund list shows it at once."""
    async with FakeViolet(orders=1, clock=clock, bag_status_lag=600.0) as fake:
        order_id, bag_id = fake.seeded[0]
        async with make_client(fake, clock) as client:
            before = (await client.get_order(order_id)).bag(bag_id)
            assert before is not None
            await client.refund_bag(order_id, bag_id)
            lagging = (await client.get_order(order_id)).bag(bag_id)
            assert lagging is not None
            assert lagging.status == before.status
            assert len(await client.list_bag_refunds(order_id, bag_id)) == 1
            clock.advance(601.0)
            moved = (await client.get_order(order_id)).bag(bag_id)
            assert moved is not None
            assert moved.status == "REFUNDED"


async def test_fake_violet_per_bag_cancellation_failure(clock: FakeClock) -> None:
    """A fulfilled bag: FakeViolet answers 202 with the bag's CANCELLATION_FAILURE, the
    client raises CancellationFailedError, nothing is refunded or read back."""
    async with FakeViolet(clock=clock) as fake:
        order = fake.add_order([{"fulfilled": True}])
        bag_id = next(iter(order.bags))
        async with make_client(fake, clock) as client:
            with pytest.raises(CancellationFailedError):
                await client.cancel_bag(order.id, bag_id)
        assert fake.ledger.total_refunds == 0
        assert fake.ledger.requests["list_refunds"] == 0


# -- webhooks -------------------------------------------------------------------------


def test_webhook_event_types_are_violets_list() -> None:
    """The order events of Violet's Webhook Events page (and ORDER_CANCELED, as the
    Webhook Event resource spells it); ORDER_FAILED is not one of them."""
    documented = {
        "ORDER_ACCEPTED",
        "ORDER_UPDATED",
        "ORDER_COMPLETED",
        "ORDER_SHIPPED",
        "ORDER_DELIVERED",
        "ORDER_REFUNDED",
        "ORDER_RETURNED",
        "ORDER_CANCELLED",
        "ORDER_CANCELED",
    }
    assert {member.value for member in WebhookEventType} == documented
    assert not WebhookEventType("ORDER_FAILED").is_known
