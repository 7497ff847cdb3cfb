"""Review 22: attacks an outsider would try on today's main.

Each test scripts its own small Violet (aiohttp.web on 127.0.0.1, port 0) on a
FakeClock shared with the client; refunds are counted by that server's own ledger."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import attrs
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    RefundStatus,
    ResponseFormatError,
    RetryPolicy,
    SkuRefund,
    VioletClient,
    VioletError,
)
from violet_async.testing import FakeClock

ORDER_ID = 5221
BAG_ID = 7221
AMOUNT = 300
TOTAL = 1000


@attrs.define
class Shop:
    """One bag at a Violet whose POSTs each commit a refund and answer ``answer``
    (a gateway's 504 by default: it applied, the client cannot know); the refund list
    shows every refund, each record shaped by ``shape``."""

    clock: FakeClock
    answer: int = 504
    shape: Callable[[dict[str, Any]], dict[str, Any]] = lambda record: record
    single: dict[str, Any] | None = None
    """What ``GET /orders/{order}/refunds/{refund}`` answers (None: 404)."""
    bag_total: Any = TOTAL
    """The bag's ``total`` as ``GET /orders/{order}`` shows it."""
    lost: int = 0
    """How many of the first POSTs are lost on the way (504, nothing committed)."""
    refunds: list[dict[str, Any]] = attrs.Factory(list)
    posts: int = 0
    _wall0: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._wall0 = self.clock.time() - self.clock.monotonic()

    def now(self) -> float:
        return self._wall0 + self.clock.monotonic()

    def stamp(self, when: float) -> str:
        return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def app(self) -> web.Application:
        @web.middleware
        async def dated(request: web.Request, handler: Any) -> web.StreamResponse:
            response: web.StreamResponse = await handler(request)
            response.headers["Date"] = formatdate(self.now(), usegmt=True)
            return response

        app = web.Application(middlewares=[dated])
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._post)
        app.router.add_post("/v1/orders/{o}/bags/{b}/cancel", self._post)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_get("/v1/orders/{o}/refunds/{r}", self._one)
        app.router.add_get("/v1/orders/{o}", self._order)
        return app

    async def _post(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        if self.posts <= self.lost:
            return web.Response(status=504, body=b"<html>504 Gateway Time-out</html>")
        left = TOTAL - sum(r["amount"] for r in self.refunds)
        if left <= 0 or body.get("amount_refunded", left) > left:
            message = f"Bag {BAG_ID} cannot be refunded: {left} left"
            return web.json_response({"status": 400, "message": message}, status=400)
        record = {
            "id": 9100 + len(self.refunds),
            "order_id": ORDER_ID,
            "bag_id": BAG_ID,
            "merchant_id": 1,
            "app_id": 11,
            "transaction_id": 1,
            "gateway_transaction_id": "pi_22",
            "amount": body.get("amount_refunded", left),
            "status": "COMPLETED",
            "date_created": self.stamp(self.now()),
        }
        if "skus" in body:
            record["skus"] = [
                {
                    "id": 100 + n,
                    "bag_id": BAG_ID,
                    "order_sku_id": line["order_sku_id"],
                    "quantity_refunded": line["quantity_refunded"],
                }
                for n, line in enumerate(body["skus"])
            ]
        self.refunds.append(record)
        if self.answer == 200:
            return web.json_response(self.shape(record))
        return web.Response(status=self.answer, body=b"<html>504 Gateway Time-out</html>")

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response([self.shape(dict(r)) for r in self.refunds])

    async def _order(self, request: web.Request) -> web.Response:
        # The bag's status lags (the platform reports it minutes later): it has not
        # moved yet.
        bag = {"id": BAG_ID, "status": "COMPLETED", "total": self.bag_total}
        return web.json_response({"id": ORDER_ID, "bags": [bag]})

    async def _one(self, request: web.Request) -> web.Response:
        if self.single is None:
            return web.json_response({"status": 404, "message": "Not found"}, status=404)
        return web.json_response(self.single)


@contextlib.asynccontextmanager
async def shop_client(shop: Shop, **options: Any) -> AsyncIterator[VioletClient]:
    runner = web.AppRunner(shop.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            11,
            "review22-app-secret",
            token="review22-token-0123456789",
            base_url=f"http://127.0.0.1:{port}/v1",
            **{"clock": shop.clock, **options},
        ) as client:
            yield client
    finally:
        await runner.cleanup()


async def _outcome(call: Any) -> object:
    try:
        return await call
    except VioletError as exc:
        return exc


# -- a refund listed with a placeholder date ---------------------------------------------


@pytest.mark.parametrize(
    "placeholder",
    [
        "1970-01-01T00:00:00Z",  # Unix time 0: a date column never set, read as a number
        "1970-01-01T00:00:00.000+0000",
        "0001-01-01T00:00:00Z",  # a zero-valued datetime (Go, .NET's MinValue, Java's)
        "1969-12-31T23:59:59Z",  # -1: a "no date" sentinel
    ],
)
async def test_a_refund_listed_with_a_placeholder_date_is_never_sent_twice(
    placeholder: str,
) -> None:
    """A refund POST answered by a gateway's 504 (it applied); the bag's list shows
    the refund with a date its backend never set (Unix time 0, or a zero datetime).
    Without a baseline, a refund dated more than a day's worth of time zones before
    the send is another's, made long ago, and skipped: the ask's own refund was never
    a candidate, the settle window ran out "missing" it, and the refund was sent
    again: two refunds. Such a date places nothing: the refund may be this ask's."""
    clock = FakeClock()
    shop = Shop(clock, shape=lambda record: {**record, "date_created": placeholder})
    policy = RetryPolicy(deadline=None, settle_running=60.0)
    async with shop_client(shop, retry=policy) as client:
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        if isinstance(got, AmbiguousOutcomeError) and got.pending is not None:
            clock.advance(3600.0)
            got = await _outcome(client.resume(got.pending))
    assert len(shop.refunds) == 1, f"{got!r}: refunded twice"
    assert shop.posts == 1
    assert isinstance(got, (AmbiguousOutcomeError, OrderRefund)), got
    if isinstance(got, OrderRefund):
        assert got.id == shop.refunds[0]["id"]


# -- wait_for_refund answered with another refund -------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        {"id": 9101},  # another refund (a cached or misrouted answer)
        {"bag_id": BAG_ID + 1},  # a refund of another bag
        {"order_id": ORDER_ID + 1},  # of another order
    ],
)
async def test_wait_for_refund_never_reports_another_refunds_status(other: dict[str, Any]) -> None:
    """``wait_for_refund(order, bag, refund)`` polls ``GET /orders/{order}/refunds/
    {refund}`` until the refund is terminal. The answer named another refund (another
    id, bag or order) that is COMPLETED, while the refund waited for is still
    PROCESSING (and may yet fail): it was returned as the waited refund's outcome, the
    caller told the shopper's money had moved. An answer that names another refund is
    not this one's: it is never returned."""
    clock = FakeClock()
    waited = {
        "id": 9100,
        "order_id": ORDER_ID,
        "bag_id": BAG_ID,
        "amount": AMOUNT,
        "status": "PROCESSING",
    }
    shop = Shop(clock, single={**waited, "status": "COMPLETED", **other})
    async with shop_client(shop) as client:
        got = await _outcome(client.wait_for_refund(ORDER_ID, BAG_ID, 9100, timeout=5.0))
    assert not isinstance(got, OrderRefund), f"another refund's status returned: {got!r}"
    assert isinstance(got, ResponseFormatError), got


async def test_wait_for_refund_takes_an_answer_that_leaves_its_names_out() -> None:
    """Every field of Violet's records is optional: an answer without its id, order or
    bag names no other refund, and its terminal status is returned."""
    clock = FakeClock()
    shop = Shop(clock, single={"amount": AMOUNT, "status": "COMPLETED"})
    async with shop_client(shop) as client:
        got = await client.wait_for_refund(ORDER_ID, BAG_ID, 9100, timeout=5.0)
    assert got.status is RefundStatus.COMPLETED


# -- a refund listed with a zero where its amount or its SKU lines' ids belong -----------


@pytest.mark.parametrize(
    ("placeholder", "asked"),
    [
        # The amount a backend never filled in (a refund still processing, say).
        (lambda record: {**record, "amount": 0}, {"amount_refunded": AMOUNT}),
        # SKU lines naming order SKU 0 or -1: a default for an id never set.
        (
            lambda record: {
                **record,
                "skus": [{**line, "order_sku_id": 0} for line in record["skus"]],
            },
            {"skus": [SkuRefund(order_sku_id=10000, quantity_refunded=1)]},
        ),
        (
            lambda record: {
                **record,
                "skus": [{**line, "order_sku_id": -1} for line in record["skus"]],
            },
            {"skus": [SkuRefund(order_sku_id=10000, quantity_refunded=1)]},
        ),
    ],
    ids=["amount-0", "order-sku-0", "order-sku-minus-1"],
)
async def test_a_refund_listed_with_a_zero_for_what_it_carries_is_never_sent_twice(
    placeholder: Callable[[dict[str, Any]], dict[str, Any]], asked: dict[str, Any]
) -> None:
    """A refund POST answered by a gateway's 504 (it applied); the bag's list shows
    the refund with ``amount: 0`` (asked 300), or with SKU lines naming order SKU 0 or
    -1 (asked order SKU 10000). Read as a refund of nothing, or of other SKUs, it was
    another refund: each read-back missed the ask's own, the settle window proved it
    absent and it was sent again, four times (the attempt budget): four refunds. A
    zero where a refund's amount or a line's order SKU belongs tells nothing (as a
    field left out): the refund may be this ask's."""
    clock = FakeClock()
    shop = Shop(clock, shape=placeholder)
    policy = RetryPolicy(deadline=None, settle_running=60.0)
    async with shop_client(shop, retry=policy) as client:
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, **asked))
        if isinstance(got, AmbiguousOutcomeError) and got.pending is not None:
            clock.advance(3600.0)
            got = await _outcome(client.resume(got.pending))
    assert len(shop.refunds) == 1, f"{got!r}: refunded {len(shop.refunds)} times"
    assert shop.posts == 1
    assert isinstance(got, AmbiguousOutcomeError), got


@pytest.mark.parametrize("earlier", [False, True], ids=["alone", "after-a-partial"])
async def test_a_whole_bag_refund_listed_with_a_zero_amount_is_never_sent_again(
    earlier: bool,
) -> None:
    """A whole-bag refund (no amount, no lines) answered by a gateway's 504 (it
    applied), its bag's status not moved yet (the platform reports it minutes later).
    The list shows the ask's refund with ``amount: 0`` (or, after a partial refund of
    300 three days before, that earlier refund with ``amount: 0``): what was left on
    the bag was read as 1000, the refund was not "the rest", the settle window proved
    the ask absent and it was sent again (refused here only because this server counts
    what is left; a platform whose bag status lags refunds it). A zero amount tells
    nothing: what was left cannot be told, and the ask is for review."""
    clock = FakeClock()

    def placeholder(record: dict[str, Any]) -> dict[str, Any]:
        zeroed = record["id"] == 9000 if earlier else True
        return {**record, "amount": 0} if zeroed else record

    shop = Shop(clock, shape=placeholder)
    if earlier:
        three_days = shop.stamp(shop.now() - 3 * 86_400.0)
        shop.refunds.append(
            {"id": 9000, "bag_id": BAG_ID, "amount": AMOUNT, "date_created": three_days}
        )
    policy = RetryPolicy(deadline=None, settle_running=60.0)
    async with shop_client(shop, retry=policy) as client:
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID))
        if isinstance(got, AmbiguousOutcomeError) and got.pending is not None:
            clock.advance(3600.0)
            got = await _outcome(client.resume(got.pending))
    assert shop.posts == 1, f"{got!r}: a whole-bag refund that applied was sent again"
    assert isinstance(got, AmbiguousOutcomeError), got


# -- a paged refund list that does not say where it ends ------------------------------


@attrs.define
class PagedShop(Shop):
    """The bag's refunds in pages of two, oldest first, each page carrying ``meta``."""

    meta: Callable[[int, int], dict[str, Any]] = lambda page, count: {}

    async def _list(self, request: web.Request) -> web.Response:
        page = int(request.query.get("page", "0"))
        rows = [self.shape(dict(r)) for r in self.refunds]
        chunk = rows[page * 2 : (page + 1) * 2]
        return web.json_response({"content": chunk, **self.meta(page, len(rows))})


@pytest.mark.parametrize(
    "meta",
    [
        # A page that says its number and size, not whether it is the last.
        lambda page, count: {"number": page, "size": 2},
        # Totals left at 0 (never filled in), no ``last``.
        lambda page, count: {"number": page, "size": 2, "total_elements": 0, "total_pages": 0},
        # ``last`` as a string, and Spring's ``first`` / ``number_of_elements`` only.
        lambda page, count: {"number": page, "size": 2, "last": str((page + 1) * 2 >= count)},
        lambda page, count: {
            "number": page,
            "first": page == 0,
            "number_of_elements": min(2, count - 2 * page),
        },
    ],
    ids=["number-size", "totals-0", "last-str", "first-only"],
)
async def test_a_paged_list_that_does_not_say_it_ended_is_followed(
    meta: Callable[[int, int], dict[str, Any]],
) -> None:
    """The bag already holds two older refunds; a refund POST is answered by a
    gateway's 504 (it applied) and its refund is listed third: on the second page of a
    paged list whose pages do not say whether more follow (no ``last``, totals of 0, a
    ``last`` that is no boolean). The first page was taken for the whole list: the
    ask's own refund was never seen, the settle window proved it absent, and it was
    sent again: two refunds. A full page that does not say it is the last is followed
    to the next (an empty or shorter page ends the list)."""
    clock = FakeClock()
    shop = PagedShop(clock, meta=meta)
    for n in range(2):
        five_days = shop.stamp(shop.now() - (5 - n) * 86_400.0)
        shop.refunds.append(
            {"id": 8000 + n, "bag_id": BAG_ID, "amount": 50 + n, "date_created": five_days}
        )
    policy = RetryPolicy(deadline=None, settle_running=60.0)
    async with shop_client(shop, retry=policy) as client:
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        if isinstance(got, AmbiguousOutcomeError) and got.pending is not None:
            clock.advance(3600.0)
            got = await _outcome(client.resume(got.pending))
        listed = await client.list_bag_refunds(ORDER_ID, BAG_ID)
    assert shop.posts == 1, f"{got!r}: refunded twice"
    assert isinstance(got, OrderRefund), got
    assert got.id == shop.refunds[2]["id"]
    assert [r.id for r in listed] == [r["id"] for r in shop.refunds]


@pytest.mark.parametrize("total", [0, -1])
async def test_a_whole_bag_refund_on_a_bag_listed_with_a_zero_total_is_never_sent_again(
    total: int,
) -> None:
    """A whole-bag refund answered by a gateway's 504 (it applied), its bag's status
    not moved yet; the order shows the bag with ``total: 0`` (a total never filled in)
    or -1. The refund of 1000 was read as not what was left of a bag of 0, a miss: the
    settle window proved the ask absent and it was sent again (refused here only
    because this server counts what is left). A total of 0 or less tells nothing."""
    clock = FakeClock()
    shop = Shop(clock, bag_total=total)
    policy = RetryPolicy(deadline=None, settle_running=60.0)
    async with shop_client(shop, retry=policy) as client:
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID))
        if isinstance(got, AmbiguousOutcomeError) and got.pending is not None:
            clock.advance(3600.0)
            got = await _outcome(client.resume(got.pending))
    assert shop.posts == 1, f"{got!r}: a whole-bag refund that applied was sent again"
    assert isinstance(got, AmbiguousOutcomeError), got


@pytest.mark.parametrize("read_before_send", [False, True])
async def test_refunds_listed_under_one_id_are_never_taken_for_one(read_before_send: bool) -> None:
    """The bag holds an older refund of 50 (id 8000); a refund POST of 300 is answered
    by a gateway's 504 (it applied), and the list shows the new refund under the older
    one's id (a backend that lists another id in ``id``). The read kept the first
    record of each id: the ask's own refund was dropped as a repeat of the older one,
    the settle window proved it absent, and it was sent again, three times. Two records
    under one id that carry different refunds are no repeat: the read cannot tell which
    is which, and proves nothing (for review)."""
    clock = FakeClock()
    shop = Shop(clock, shape=lambda record: {**record, "id": 8000})
    five_days = shop.stamp(shop.now() - 5 * 86_400.0)
    shop.refunds.append({"id": 8000, "bag_id": BAG_ID, "amount": 50, "date_created": five_days})
    policy = RetryPolicy(deadline=None, settle_running=60.0, read_before_send=read_before_send)
    async with shop_client(shop, retry=policy) as client:
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        if isinstance(got, AmbiguousOutcomeError) and got.pending is not None:
            clock.advance(3600.0)
            got = await _outcome(client.resume(got.pending))
    assert shop.posts == 1, f"{got!r}: refunded {shop.posts} times"
    assert isinstance(got, AmbiguousOutcomeError), got


@pytest.mark.parametrize("whole", [False, True], ids=["amount", "whole-bag"])
@pytest.mark.parametrize("read_before_send", [False, True])
async def test_the_asks_refund_listed_under_another_bag_is_never_sent_again(
    whole: bool, read_before_send: bool
) -> None:
    """A refund POST answered by a gateway's 504 (it applied); the bag's own list
    shows the refund naming another bag of the order (a backend that fills ``bag_id``
    from the order's first bag). Records naming another bag were left out as that
    bag's: the ask's own refund was never a candidate, the settle window proved it
    absent, and it was sent again (three more refunds of 300; a whole-bag refund once
    more). One carrying what was asked may be this ask's: for review."""
    clock = FakeClock()
    shop = Shop(clock, shape=lambda record: {**record, "bag_id": BAG_ID - 1})
    policy = RetryPolicy(deadline=None, settle_running=60.0, read_before_send=read_before_send)
    asked: dict[str, Any] = {} if whole else {"amount_refunded": AMOUNT}
    async with shop_client(shop, retry=policy) as client:
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, **asked))
        if isinstance(got, AmbiguousOutcomeError) and got.pending is not None:
            clock.advance(3600.0)
            got = await _outcome(client.resume(got.pending))
    assert shop.posts == 1, f"{got!r}: refunded {shop.posts} times"
    assert isinstance(got, AmbiguousOutcomeError), got


@pytest.mark.parametrize(
    ("amount", "age"), [(AMOUNT + 1, 60.0), (AMOUNT, 4 * 86_400.0)], ids=["other-money", "old"]
)
async def test_another_bags_refund_that_cannot_be_the_asks_does_not_hold_it_back(
    amount: int, age: float
) -> None:
    """The other side: a record of another bag that does not carry what was asked
    (another amount), or was made days before the send, is no candidate. A POST lost
    on the way (a 504, nothing applied): the read-backs miss it over the settle window,
    and it is sent again once: one refund of the ask's."""
    clock = FakeClock()
    shop = Shop(clock, answer=200, lost=1)
    made = shop.stamp(shop.now() - age)
    shop.refunds.append({"id": 8000, "bag_id": BAG_ID - 1, "amount": amount, "date_created": made})
    policy = RetryPolicy(deadline=None, settle_running=60.0)
    async with shop_client(shop, retry=policy) as client:
        got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
    assert shop.posts == 2
    assert [r["id"] for r in shop.refunds] == [8000, got.id]


async def test_a_cancel_listed_under_another_bag_after_a_partial_refund_is_never_sent_again() -> (
    None
):
    """A cancel answered by a gateway's 504 (it applied: the rest of the bag, 700, is
    refunded), three days after a partial refund of 300; the bag's list labels both
    records with another bag. Held against this bag's total as another bag's record
    (the earlier 300 left out too), the cancel's refund was not what was left, a miss:
    the cancel was sent again. For a cancel or a whole-bag refund, a record of another
    bag that moved money cannot be told apart: near, for review."""
    clock = FakeClock()
    shop = Shop(clock, shape=lambda record: {**record, "bag_id": BAG_ID - 1})
    three_days = shop.stamp(shop.now() - 3 * 86_400.0)
    shop.refunds.append(
        {"id": 8000, "bag_id": BAG_ID, "amount": AMOUNT, "date_created": three_days}
    )
    policy = RetryPolicy(deadline=None, settle_running=60.0)
    async with shop_client(shop, retry=policy) as client:
        got = await _outcome(client.cancel_bag(ORDER_ID, BAG_ID))
        if isinstance(got, AmbiguousOutcomeError) and got.pending is not None:
            clock.advance(3600.0)
            got = await _outcome(client.resume(got.pending))
    assert shop.posts == 1, f"{got!r}: a cancel that applied was sent again"
    assert [r["amount"] for r in shop.refunds] == [AMOUNT, TOTAL - AMOUNT]
    assert isinstance(got, AmbiguousOutcomeError), got
