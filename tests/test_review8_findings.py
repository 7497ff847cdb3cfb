"""Review 8: adversarial findings against the public API, each against a Violet scripted
in this file (its own few lines of aiohttp.web: not FakeViolet, not the simulator, not
tests/hostile.py). Refunds are counted from this server's own record (``V8.made``: every
refund it committed from a POST). Each test asserts the payments-grade behaviour: it
fails while the finding is open and passes once it is fixed.

Roots: (1) ``_matching.content`` calls a record MISS on data it cannot tell (a SKU
refund's record without lines; an amount that may carry its shipping); (2) "what was
left" on a bag counts FAILED / CANCELED records and other bags' records, and any later
record, so a whole-bag refund that applied reads as absent; (3) a 2xx refund CANCELED,
or a 202 cancel whose refund FAILED, is returned as made; (4) the redactor misses
HTML-safe JSON escapes; (5) the SQLiteStore file is not checked like the other files;
(6) JSON-lines rows take a repeated key's last value; (7) a 2xx without ``id`` is
handed out unremembered, so a later ask claims it; (8) a 3xx to a POST is a definite
failure."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import orjson
from aiohttp import web

from violet_async import AmbiguousOutcomeError, RefundFailedError, RetryPolicy, VioletClient
from violet_async.models import SkuRefund
from violet_async.testing import FakeClock

ORDER = 8801
BAG = 8811
APP = 88
SECRET = "review8-app-secret-value"
PASSWORD = "review8-password-value"
#: A fixed wall clock (2026-05-28 20:28:43 UTC: not a midnight, so no date reads as
#: day-only), so every run sees the same dates.
WALL = 1_780_000_123.0


def _jwt(exp: float) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'sub': 'r8', 'exp': exp})}.c2ln"


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


Answer = Callable[[dict[str, Any], dict[str, Any] | None], Awaitable[web.StreamResponse]]


class V8:
    """One order with one bag of ``total`` cents (its status lags: it stays COMPLETED,
    as Violet documents for Shopify's ~10 minutes). A POST refunds what it names (no
    amount: the whole rest of the bag); ``answers`` script what the POST answers after
    it committed (or not). ``record_shape`` may strip fields from listed records
    (Violet's records leave fields out: every property optional in its OpenAPI)."""

    def __init__(self, clock: FakeClock, total: int = 1000) -> None:
        self.clock = clock
        self.total = total
        self.refunds: list[dict[str, Any]] = []
        self.made: list[int] = []
        self.posts = 0
        self.next_id = 80_000
        self.status = "COMPLETED"
        self.answers: list[Answer] = []
        self.record_shape: Callable[[dict[str, Any]], dict[str, Any]] = lambda r: r

    def now(self) -> float:
        return self.clock.time()

    def add(self, amount: int | None, status: str = "COMPLETED", **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        record: dict[str, Any] = {
            "id": self.next_id,
            "order_id": ORDER,
            "bag_id": BAG,
            "merchant_id": 3,
            "app_id": APP,
            "transaction_id": 4,
            "gateway_transaction_id": "pi_r8",
            "amount": amount,
            "status": status,
            "date_created": _iso(self.now()),
            **fields,
        }
        self.refunds.append(record)
        return record

    def moved(self) -> int:
        return sum(
            r["amount"] or 0 for r in self.refunds if r["status"] not in ("FAILED", "CANCELED")
        )

    def commit(self, body: dict[str, Any]) -> dict[str, Any]:
        amount = body.get("amount_refunded")
        if amount is None and body.get("skus"):
            amount = 100 * sum(line.get("quantity_refunded", 0) for line in body["skus"])
        if amount is None:
            amount = self.total - self.moved()
        skus = [
            {"order_sku_id": line["order_sku_id"], "quantity_refunded": line["quantity_refunded"]}
            for line in body.get("skus") or []
        ]
        record = self.add(amount, reason=body.get("reason"), skus=skus)
        self.made.append(record["id"])
        return record

    def app(self) -> web.Application:
        @web.middleware
        async def date(request: web.Request, handler: Any) -> web.StreamResponse:
            response: web.StreamResponse = await handler(request)
            response.headers["Date"] = formatdate(self.now(), usegmt=True)
            return response

        app = web.Application(middlewares=[date])
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._post)
        app.router.add_post("/v1/orders/{o}/bags/{b}/cancel", self._post)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_get("/v1/orders/{o}", self._order)
        return app

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": _jwt(self.now() + 86_400), "refresh_token": "r8"})

    async def _post(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        body = await request.json()
        if self.total - self.moved() <= 0:
            return web.json_response({"message": "Bag is fully refunded"}, status=400)
        record = self.commit(body)
        if self.answers:
            return await self.answers.pop(0)(body, record)
        return web.json_response(record)

    async def _list(self, request: web.Request) -> web.Response:
        listed = [self.record_shape(dict(r)) for r in self.refunds]
        return web.Response(body=orjson.dumps(listed), content_type="application/json")

    async def _order(self, request: web.Request) -> web.Response:
        bag = {"id": BAG, "status": self.status, "total": self.total}
        return web.json_response({"id": ORDER, "bags": [bag]})


async def violet_500(body: dict[str, Any], record: dict[str, Any] | None) -> web.StreamResponse:
    """Violet's application answered 500 after the refund committed (a timeout inside)."""
    return web.json_response(
        {"status": 500, "message": "Internal error", "error_code": 1}, status=500
    )


@contextlib.asynccontextmanager
async def serving(server: V8, **options: Any) -> AsyncIterator[VioletClient]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    retry = options.pop("retry", RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0))
    try:
        async with VioletClient(
            APP,
            SECRET,
            base_url=f"http://127.0.0.1:{port}/v1",
            username="r8-user",
            password=PASSWORD,
            allow_insecure_http=True,
            clock=server.clock,
            retry=retry,
            **options,
        ) as client:
            yield client
    finally:
        await runner.cleanup()


async def outcome(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except (AmbiguousOutcomeError, RefundFailedError) as exc:
        # RefundFailedError: Violet's answer says the refund moved no money (a typed
        # "not made", which the tests' asserts tell apart from a success).
        return exc


# -- 1. a SKU-line refund whose record lists no SKU lines ---------------------------------


async def test_sku_refund_read_back_without_sku_lines_is_never_proven_absent() -> None:
    """A refund of SKU lines (no amount: Violet prices them) answered 500 after it
    committed. Violet's records leave fields out (every property optional), and this
    bag's refund list gives the record without ``skus``. It carries what may be ours
    and nothing tells it apart: pending or review, never "absent" and a second POST."""
    server = V8(FakeClock(wall_start=WALL))
    server.answers = [violet_500]
    server.record_shape = lambda r: {k: v for k, v in r.items() if k != "skus"}
    async with serving(server) as client:
        got = await outcome(
            client.refund_bag(
                ORDER, BAG, skus=[SkuRefund(order_sku_id=10_000, quantity_refunded=1)]
            )
        )
    assert len(server.made) == 1, f"refunds made: {len(server.made)} ({got!r})"


# -- 2. a whole-bag refund on a bag with an earlier FAILED refund -------------------------


async def test_whole_bag_refund_after_a_failed_refund_is_never_sent_twice() -> None:
    """The bag (1000 cents) holds an earlier refund attempt that FAILED (300 cents: it
    moved no money). A whole-bag refund commits 1000 and is answered 500; the bag's
    status lags (COMPLETED). The read-back lists the FAILED record and ours: ours
    refunded everything that moved, yet the SDK counts the dead 300 as refunded, finds
    that 1000 is not "the rest" (700), proves absence after the window and re-sends:
    the shopper gets the bag's total twice on this server."""
    server = V8(FakeClock(wall_start=WALL))
    server.add(300, status="FAILED", date_created="2026-01-02T10:00:00Z")
    server.answers = [violet_500]
    async with serving(server) as client:
        got = await outcome(client.refund_bag(ORDER, BAG))
    # This server refuses a refund past the bag's balance, so a second refund is not
    # made here; Violet refuses by the bag's status, which lags (docs/remaining-risk.md
    # (f)): the second POST of a refund that applied is the double refund.
    assert server.posts == 1, f"POSTs: {server.posts}, refunds made: {server.made} ({got!r})"
    assert len(server.made) == 1


async def test_whole_bag_refund_followed_by_a_failed_attempt_is_never_sent_twice() -> None:
    """Ours (the whole bag) commits and is answered 500; right after, another system's
    refund attempt on the bag FAILS (a record with a higher id, status FAILED, no money
    moved). The SDK takes any later record as "refunded again after it", so ours did
    not close the bag: a MISS, proven absent after the window, and a second whole-bag
    POST that this server (its status lagging) applies."""
    server = V8(FakeClock(wall_start=WALL))

    async def then_a_failed_attempt(
        body: dict[str, Any], record: dict[str, Any] | None
    ) -> web.StreamResponse:
        server.add(200, status="FAILED")
        return await violet_500(body, record)

    server.answers = [then_a_failed_attempt]
    async with serving(server) as client:
        got = await outcome(client.refund_bag(ORDER, BAG))
    # This server refuses a refund past the bag's balance, so a second refund is not
    # made here; Violet refuses by the bag's status, which lags (docs/remaining-risk.md
    # (f)): the second POST of a refund that applied is the double refund.
    assert server.posts == 1, f"POSTs: {server.posts}, refunds made: {server.made} ({got!r})"
    assert len(server.made) == 1


# -- 3. a password echoed by a Java JSON writer's HTML-safe escaping -----------------------


async def test_password_echoed_with_html_safe_json_escapes_is_redacted() -> None:
    """A login refused with 400 whose body quotes the request, written by a JSON writer
    that escapes HTML characters (Gson's default, common on Java servers such as
    Violet's: ``&`` as ``\\u0026``, ``=`` as ``\\u003d``). The password (generated
    passwords carry ``&`` and ``=``) must not reach the error's message or repr: the
    redactor knows the raw, Python-JSON and URL spellings only."""
    clock = FakeClock(wall_start=WALL)
    server = V8(clock)
    password = "Gx7&k=Qp2<w>"

    async def echoing_login(request: web.Request) -> web.Response:
        sent = await request.text()
        for char, escape in (
            ("&", "\\u0026"),
            ("=", "\\u003d"),
            ("<", "\\u003c"),
            (">", "\\u003e"),
        ):
            sent = sent.replace(char, escape)
        # The request, HTML-safe escaped, quoted inside the error's message (a Java
        # exception message that carries the JSON it could not accept).
        return web.json_response({"message": f"login failed for request {sent}"}, status=400)

    server._login = echoing_login  # type: ignore[method-assign]
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    echoed = "Gx7\\u0026k\\u003dQp2\\u003cw\\u003e"
    try:
        async with VioletClient(
            APP,
            SECRET,
            base_url=f"http://127.0.0.1:{port}/v1",
            username="r8-user",
            password=password,
            allow_insecure_http=True,
            clock=clock,
            retry=RetryPolicy.disabled(),
        ) as client:
            try:
                await client.refund_bag(ORDER, BAG, amount_refunded=100)
            except Exception as exc:  # noqa: BLE001 - any error: its text is checked
                shown = f"{exc}\n{exc!r}\n{vars(exc)!r}"
            else:
                raise AssertionError("the login was refused: the call cannot succeed")
    finally:
        await runner.cleanup()
    assert server.posts == 0
    assert echoed.lower() not in shown.lower(), f"the password leaks: {shown[:300]}"


# -- 4. a 2xx whose refund moved no money ---------------------------------------------------


def _no_money(server: V8, status: str) -> Answer:
    """Answer the POST 2xx with its refund in ``status`` (the platform refused it after
    Violet recorded it): the record stays on the bag with that status, no money moved."""

    async def answer(body: dict[str, Any], record: dict[str, Any] | None) -> web.StreamResponse:
        assert record is not None
        server.made.remove(record["id"])
        record["status"] = status
        record["errors"] = [{"id": 1, "error_code": 4001, "error_message": "platform refused"}]
        return web.json_response(record)

    return answer


async def test_refund_answered_canceled_is_not_reported_as_made() -> None:
    """Violet answers the refund POST 200 with the refund in status CANCELED (it moved
    no money: the SDK's own matching treats CANCELED like FAILED, as dead). The call
    returns it as a plain success (only FAILED is turned into ``RefundFailedError``),
    and a batch counts the row ``succeeded``, so its journal marks it done and a
    re-run never refunds the shopper."""
    server = V8(FakeClock(wall_start=WALL))
    server.answers = [_no_money(server, "CANCELED")]
    async with serving(server) as client:
        got = await outcome(client.refund_bag(ORDER, BAG, amount_refunded=100))
    assert server.made == []
    assert not (hasattr(got, "status") and got.status.value == "CANCELED"), (
        f"a refund that moved no money returned as made: {got!r}"
    )


async def test_batch_row_answered_canceled_is_not_succeeded() -> None:
    """The same answer through ``run_batch``: the row must not end ``succeeded``."""
    from violet_async.batch import BatchItem, run_batch
    from violet_async.models import RefundBagRequest

    server = V8(FakeClock(wall_start=WALL))
    server.answers = [_no_money(server, "CANCELED")]
    item = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=100))
    async with serving(server) as client:
        results = [r async for r in run_batch(client, [item])]
    assert server.made == []
    assert [r.outcome for r in results] != ["succeeded"], "no money moved, yet succeeded"


async def test_cancel_202_whose_refund_failed_is_not_reported_as_made() -> None:
    """A cancel answered 202 in Violet's cancellation shape: the bag CANCELED, but its
    refund FAILED (the shopper got nothing back). ``cancel_bag`` returns the FAILED
    refund as its success, where a refund POST answered with a FAILED refund raises
    ``RefundFailedError``."""
    server = V8(FakeClock(wall_start=WALL))

    async def cancelled_refund_failed(
        body: dict[str, Any], record: dict[str, Any] | None
    ) -> web.StreamResponse:
        assert record is not None
        server.made.remove(record["id"])
        record["status"] = "FAILED"
        bag = {"order_id": ORDER, "bag_id": BAG, "merchant_id": 3, "status": "CANCELED"}
        return web.json_response(
            {
                "order_id": ORDER,
                "app_id": APP,
                "status": "CANCELED",
                "message": "Bag canceled",
                "cancelled_bags": [{**bag, "refund": record}],
            },
            status=202,
        )

    server.answers = [cancelled_refund_failed]
    async with serving(server) as client:
        got = await outcome(client.cancel_bag(ORDER, BAG))
    assert server.made == []
    assert not (hasattr(got, "status") and got.status.value == "FAILED"), (
        f"a cancel whose refund FAILED returned as its refund: {got!r}"
    )


async def test_whole_bag_refund_beside_another_bags_record_is_never_sent_twice() -> None:
    """The bag's refund list also carries a record of another bag of the order (the SDK
    itself expects this: its matching skips records whose ``bag_id`` is not the ask's).
    A whole-bag refund answered 500 after it committed is read back; "what was left"
    subtracts the other bag's 200 cents from this bag's total, ours (1000) is not "the
    rest", so the read misses, proves absence after the window, and sends the whole
    bag again."""
    server = V8(FakeClock(wall_start=WALL))
    server.add(200, date_created="2026-01-02T10:00:00Z", bag_id=BAG + 1)
    server.answers = [violet_500]
    server.moved = lambda: sum(  # type: ignore[method-assign]
        r["amount"] for r in server.refunds if r["bag_id"] == BAG and r["status"] == "COMPLETED"
    )
    async with serving(server) as client:
        got = await outcome(client.refund_bag(ORDER, BAG))
    assert server.posts == 1, f"POSTs: {server.posts}, refunds made: {server.made} ({got!r})"
    assert len(server.made) == 1


# -- 5. an amount with shipping, recorded as one total ---------------------------------------


async def test_amount_with_shipping_recorded_as_one_total_is_never_proven_absent() -> None:
    """``amount_refunded=1000`` with ``shipping={"amount": 500}`` (Violet's own example
    request). Violet's pages do not say whether the record's ``amount`` includes the
    shipping; this platform records 1500 (with ``shipping.amount`` 500). Answered 200,
    the SDK reads it back and parks it (a 2xx naming another amount); answered 500, the
    read-back calls the same record a MISS (1500 != 1000), proves absence after the
    window and sends again: two refunds. An amount the docs leave open must not prove
    absence."""
    from violet_async.models import ShippingRefund

    server = V8(FakeClock(wall_start=WALL), total=5000)
    base_commit = server.commit

    def with_shipping(body: dict[str, Any]) -> dict[str, Any]:
        record = base_commit(body)
        shipping = (body.get("shipping") or {}).get("amount", 0)
        record["amount"] += shipping
        record["shipping"] = {"amount": shipping, "full_refund": False}
        return record

    server.commit = with_shipping  # type: ignore[method-assign]
    server.answers = [violet_500]
    async with serving(server) as client:
        got = await outcome(
            client.refund_bag(ORDER, BAG, amount_refunded=1000, shipping=ShippingRefund(amount=500))
        )
    assert server.posts == 1, f"POSTs: {server.posts}, refunds made: {server.made} ({got!r})"
    assert len(server.made) == 1


# -- 6. a key store file others may write ------------------------------------------------------


async def test_sqlite_store_others_may_write_is_refused_before_it_answers(tmp_path: Any) -> None:
    """SECURITY.md: files the SDK opens are used only when owned by the user and
    writable by no one else (journals, locks, outputs, the webhook queue). The
    ``SQLiteStore`` file is not checked: a key file left world-writable (0666, e.g. in
    a shared directory) is used as is, so anyone on the machine can plant a finished
    entry under a key, and the next call with that key returns a refund Violet never
    made, sending nothing: the shopper is never refunded while the app records that
    they were."""
    import os

    from violet_async.stores import SQLiteStore

    path = tmp_path / "keys.db"
    # Another user writes a finished entry under the key, through a Violet of their own
    # (the key is scoped by app id and host only: 127.0.0.1 for both servers), then
    # leaves the file world-writable (planting through the SDK needs a file it accepts).
    elsewhere = V8(FakeClock(wall_start=WALL))
    async with serving(elsewhere, store=SQLiteStore(path)) as planter:
        planted = await planter.refund_bag(ORDER, BAG, amount_refunded=100, idempotency_key="r-1")
    os.chmod(path, 0o666)  # noqa: S103 - the world-writable file is the attack
    server = V8(FakeClock(wall_start=WALL))
    async with serving(server, store=SQLiteStore(path)) as client:
        try:
            got: Any = await client.refund_bag(
                ORDER, BAG, amount_refunded=100, idempotency_key="r-1"
            )
        except Exception as exc:  # noqa: BLE001 - refusing the file is the right outcome
            got = exc
    assert not (getattr(got, "id", None) == planted.id and server.made == []), (
        f"a refund this Violet never made was returned from a world-writable key file: {got!r}"
    )


# -- 7. the batch guard read, on a SKU-line row whose record lists no lines ---------------------


async def test_batch_rerun_of_a_sku_row_without_its_journal_is_never_sent_again() -> None:
    """docs/batches.md: "each bag's refunds are read first, so a row already on the bag
    is never sent twice". A SKU-line row is refunded by a first run; the run's journal
    is gone (a new machine, a deleted file) and the same row runs again. The guard read
    lists the refund, but Violet's record leaves ``skus`` out (every property
    optional): the guard takes it for another refund and sends the row again."""
    from violet_async.batch import BatchItem, run_batch
    from violet_async.models import RefundBagRequest

    server = V8(FakeClock(wall_start=WALL))
    server.record_shape = lambda r: {k: v for k, v in r.items() if k != "skus"}
    row = RefundBagRequest(skus=[SkuRefund(order_sku_id=10_000, quantity_refunded=1)])
    async with serving(server) as client:
        first = [r async for r in run_batch(client, [BatchItem.refund(1, ORDER, BAG, row)])]
    assert [r.outcome for r in first] == ["succeeded"]
    async with serving(server) as client:
        again = [r async for r in run_batch(client, [BatchItem.refund(1, ORDER, BAG, row)])]
    assert len(server.made) == 1, f"refunds made: {server.made} ({[r.outcome for r in again]})"


# -- 8. a JSON-lines row that names its amount twice --------------------------------------------


def test_jsonl_row_with_a_repeated_amount_key_is_refused(
    tmp_path: Any, capsys: Any, monkeypatch: Any
) -> None:
    """A CSV header that names a column twice is refused ("column(s) named twice"); a
    JSON-lines row that names ``amount_refunded`` twice is taken as valid, with the
    LAST value (the JSON parser's rule): the operator reads 500 cents first on the
    line, ``--dry-run`` signs off the plan, and 50000 is what would be sent. Input that
    moves money is strict: the row must be refused, naming the field."""
    from violet_async.__main__ import main

    for name in [n for n in __import__("os").environ if n.startswith("VIOLET_")]:
        monkeypatch.delenv(name)
    rows = tmp_path / "refunds.jsonl"
    rows.write_text(
        '{"order_id": 8801, "bag_id": 8811, "amount_refunded": 500, '
        '"reason": "goodwill", "amount_refunded": 50000}\n'
    )
    code = main(["refund", str(rows), "--dry-run"])
    out = capsys.readouterr()
    assert code == 2, f"exit {code}: {out.out}{out.err}"
    assert "amount_refunded" in out.out + out.err


async def test_batch_rerun_of_a_whole_bag_row_beside_a_failed_record_is_never_sent_again() -> None:
    """The guard read of the same root as the whole-bag findings above, with no fault
    at all: a whole-bag row refunded by a first run, its journal gone, runs again. The
    bag holds an older FAILED attempt (300, no money moved) and the first run's refund
    of the whole 1000; the guard counts the dead 300, finds 1000 is not "the rest" and
    POSTs the whole bag again (this server refuses it by balance; Violet, whose bag
    status lags, would not: docs/remaining-risk.md (f))."""
    from violet_async.batch import BatchItem, run_batch
    from violet_async.models import RefundBagRequest

    server = V8(FakeClock(wall_start=WALL))
    server.add(300, status="FAILED", date_created="2026-01-02T10:00:00Z")
    row = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(reason="damaged"))
    async with serving(server) as client:
        first = [r.outcome async for r in run_batch(client, [row])]
    assert first == ["succeeded"]
    async with serving(server) as client:
        again = [r.outcome async for r in run_batch(client, [row])]
    assert server.posts == 1, f"POSTs: {server.posts} ({again})"


# -- 9. a 2xx refund without its id, then a second refund of the same amount ------------------


async def test_second_refund_never_claims_a_first_answered_without_its_id() -> None:
    """Two refunds of 100 cents on one bag, one after the other from one client (two
    items returned). The first is answered 200 with Violet's Order Refund without
    ``id`` (the spec page marks order_id, merchant_id, app_id, transaction_id,
    gateway_transaction_id and amount required, not ``id``): returned as made. The
    second is answered 500 and did NOT apply. Its read-back finds the first's refund
    (same amount, dated within the tolerance of the send, not known to the client
    since it had no id when handed out) and claims it: two successes for one refund
    made on this server, the shopper short of 100 cents."""
    from violet_async.models import OrderRefund

    server = V8(FakeClock(wall_start=WALL))

    async def without_id(body: dict[str, Any], record: dict[str, Any] | None) -> web.StreamResponse:
        assert record is not None
        return web.json_response({k: v for k, v in record.items() if k != "id"})

    async def not_applied(
        body: dict[str, Any], record: dict[str, Any] | None
    ) -> web.StreamResponse:
        assert record is not None
        server.refunds.remove(record)
        server.made.remove(record["id"])
        return await violet_500(body, record)

    server.answers = [without_id, not_applied]
    async with serving(server) as client:
        first = await outcome(client.refund_bag(ORDER, BAG, amount_refunded=100))
        second = await outcome(client.refund_bag(ORDER, BAG, amount_refunded=100))
    made = [r for r in (first, second) if isinstance(r, OrderRefund)]
    assert len(made) <= len(server.made), (
        f"{len(made)} calls report a refund made, this server made {server.made}: "
        f"the second returned refund {getattr(second, 'id', None)}"
    )


# -- 10. a POST answered 303 See Other ------------------------------------------------------------


async def test_refund_answered_303_see_other_is_not_a_definite_failure() -> None:
    """The refund commits and the answer is ``303 See Other`` to the created refund
    (HTTP's own answer for "the POST was processed; the result is there": RFC 9110
    15.4.4). Redirects are off, and the SDK raises a plain ``APIError``, which the docs
    say means "the request did not apply": a definite failure for money this server
    moved (a batch marks the row failed; ``--retry-failed`` would send it again). A 3xx
    to a POST proves nothing either way: read back, or pending."""
    from violet_async import APIError

    server = V8(FakeClock(wall_start=WALL))

    async def see_other(body: dict[str, Any], record: dict[str, Any] | None) -> web.StreamResponse:
        assert record is not None
        location = f"/v1/orders/{ORDER}/refunds/{record['id']}"
        return web.Response(status=303, headers={"Location": location})

    server.answers = [see_other]
    async with serving(server) as client:
        try:
            got: Any = await client.refund_bag(ORDER, BAG, amount_refunded=100)
        except Exception as exc:  # noqa: BLE001 - which error it is, is the point
            got = exc
    assert server.made != []
    assert not isinstance(got, APIError), f"a definite failure for money that moved: {got!r}"
