"""Audit of issue 27 ("Real Violet, day one"): a Violet of our own, scripted here, that
answers only in the shapes Violet documents (tests/fixtures/violet/): the 202
cancellation body whose refund has no ``gateway_transaction_id``, refund lists in the
get-bag-refunds example's shape, refunds made on the merchant's platform (``EXTERNAL``,
without transaction ids; older ones missing more), a bag status that moves ten minutes
after the refund, and merchant 429s passed through. Each test drives ``refund_bag``,
``cancel_bag``, ``list_bag_refunds`` or the batch command line against it and checks
the outcome is true, with exactly one refund made per ask (pending or review is a true
outcome; a refund reported that was not made, or a failure reported for one that
applied, is not)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from email.utils import formatdate
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    RetryPolicy,
    VioletClient,
    VioletError,
)
from violet_async._batch_cli import BatchOptions, run_file
from violet_async.testing import FakeClock

from .conftest import serve

FIXTURES = Path(__file__).parent / "fixtures" / "violet"
ORDER = 10000
BAG = 11111
MERCHANT = 22222
TOTAL = 9900
POLICY = RetryPolicy(initial_delay=0.5, max_delay=4.0, settle_delay=1.0, deadline=300.0)
VIOLET_500 = {"status": 500, "message": "Internal error", "error_code": 5000}
MERCHANT_429 = {"status": 429, "message": "Too Many Requests", "error_code": 429}


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class RealClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


def violet_date(when: float) -> str:
    """As the get-bag-refunds example writes a date (``+0000``)."""
    return datetime.fromtimestamp(when, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+0000")


class Violet:
    """One order (10000) whose bags each charged ``TOTAL``, answering only in Violet's
    documented shapes. Every POST on a bag takes the next step of that bag's script:

    - ``ok``: applied; a refund answered 200 with the refund-bag example's shape (no
      ``gateway_transaction_id``), a cancel 202 with the cancellation body;
    - ``null_refund``: a cancel applied, answered 202 with the bag's entry CANCELED but
      ``refund: null``; ``idless_refund``: its refund without an ``id``; ``no_bag_id``:
      the entry without its ``bag_id``;
    - ``applied_500``: applied, answered Violet's own 500;
    - ``lost_500``: not applied, answered Violet's own 500;
    - ``429``: not applied, the merchant platform's 429 passed through.

    A refund made is listed at once in the get-bag-refunds example's shape; the bag's
    status moves ``status_lag`` seconds later (the platform reports it then). ``before``
    holds records listed ahead of the bag's own (platform refunds, older records);
    ``list_429`` (``order_429``) is how many reads of a list (of the order) answer the
    merchant's 429 first."""

    def __init__(self, clock: Clock, *, status_lag: float = 600.0) -> None:
        self.clock = clock
        self.status_lag = status_lag
        self.scripts: dict[int, list[str]] = {}
        self.refunds: dict[int, list[dict[str, Any]]] = {}
        self.before: dict[int, list[dict[str, Any]]] = {}
        self.counted: dict[int, int] = {}
        """Money refunded per bag, in USD: what ``before`` holds (set by the test) and
        every refund made here, so a whole-bag ask refunds what is left."""
        self.moves: dict[int, list[tuple[float, str]]] = {}
        self.list_429 = 0
        self.order_429 = 0
        self.order_reads = 0
        self.platform_rate: float | None = None
        """When set, the platform records each refund in CAD at this rate (the bag's
        base currency is USD): ``refund_currency`` says so, ``amount`` is in CAD."""
        self.order_lists_bag = True
        self.posts: dict[int, int] = {}
        self.made: dict[int, list[int]] = {}
        self._next = 99_990

    # -- state ---------------------------------------------------------------------

    def status(self, bag: int) -> str:
        shown = "COMPLETED"
        for at, status in self.moves.get(bag, []):
            if at <= self.clock.monotonic():
                shown = status
        return shown

    def left(self, bag: int) -> int:
        """What the bag has left, in its base currency (USD)."""
        return TOTAL - self.counted.get(bag, 0)

    def _commit(self, bag: int, amount: int, reason: str | None, *, cancel: bool) -> dict[str, Any]:
        record = copy.deepcopy(fixture("order-service-get-bag-refunds.json")[0])
        self._next += 1
        now = violet_date(self.clock.time())
        record.update(
            id=self._next,
            order_id=ORDER,
            bag_id=bag,
            merchant_id=MERCHANT,
            amount=amount,
            reason=reason,
            date_created=now,
            date_last_modified=now,
        )
        record["skus"][0].update(refund_id=self._next, bag_id=bag)
        self.refunds.setdefault(bag, []).append(record)
        self.made.setdefault(bag, []).append(self._next)
        self.counted[bag] = self.counted.get(bag, 0) + amount
        done = self.left(bag) == 0
        if self.platform_rate is not None:
            record.update(amount=round(amount * self.platform_rate), refund_currency="CAD")
        status = "CANCELED" if cancel else ("REFUNDED" if done else "PARTIALLY_REFUNDED")
        self.moves.setdefault(bag, []).append((self.clock.monotonic() + self.status_lag, status))
        return record

    # -- the app ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._date])
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_put("/v1/orders/{o}/bags/{b}/cancel", self._cancel)
        app.router.add_post("/v1/orders/{o}/bags/{b}/cancel", self._cancel)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_get("/v1/orders/{o}", self._order)
        return app

    @web.middleware
    async def _date(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Date"] = formatdate(self.clock.time(), usegmt=True)
        return response

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "audit27-token", "refresh_token": "audit27-refresh"})

    def _step(self, bag: int) -> str:
        self.posts[bag] = self.posts.get(bag, 0) + 1
        script = self.scripts.get(bag, [])
        return script.pop(0) if script else "ok"

    @staticmethod
    def _answer(step: str) -> web.Response | None:
        if step in ("applied_500", "lost_500"):
            return web.json_response(VIOLET_500, status=500)
        if step == "429":
            return web.json_response(MERCHANT_429, status=429, headers={"Retry-After": "1"})
        return None

    async def _refund(self, request: web.Request) -> web.Response:
        bag = int(request.match_info["b"])
        body = await request.json()
        step = self._step(bag)
        if step in ("429", "lost_500"):
            return self._answer(step)  # type: ignore[return-value]
        amount = body.get("amount_refunded")
        record = self._commit(
            bag, self.left(bag) if amount is None else amount, body.get("reason"), cancel=False
        )
        late = self._answer(step)
        if late is not None:
            return late
        answer = copy.deepcopy(fixture("order-service-refund-bag.json"))
        answer.update({k: record[k] for k in ("id", "order_id", "bag_id", "amount", "reason")})
        answer["refund_currency"] = record["refund_currency"]
        answer.update(
            merchant_id=MERCHANT,
            date_created=record["date_created"],
            date_last_modified=record["date_created"],
        )
        return web.json_response(answer)

    async def _cancel(self, request: web.Request) -> web.Response:
        bag = int(request.match_info["b"])
        step = self._step(bag)
        if step in ("429", "lost_500"):
            return self._answer(step)  # type: ignore[return-value]
        record = self._commit(bag, self.left(bag), "Order canceled", cancel=True)
        late = self._answer(step)
        if late is not None:
            return late
        answer = copy.deepcopy(fixture("order-service-cancel-bag.json"))
        entry = answer["cancelled_bags"][0]
        entry.update(bag_id=bag, date_cancelled=record["date_created"].replace("+0000", ".000Z"))
        refund = entry["refund"]
        refund.update({k: record[k] for k in ("id", "order_id", "bag_id", "amount")})
        refund.update(
            date_created=record["date_created"], date_last_modified=record["date_created"]
        )
        refund["skus"][0]["bag_id"] = bag
        if step == "null_refund":
            entry["refund"] = None
        elif step == "idless_refund":
            del refund["id"]
        elif step == "no_bag_id":
            del entry["bag_id"]
        return web.json_response(answer, status=202)

    async def _list(self, request: web.Request) -> web.Response:
        if self.list_429 > 0:
            self.list_429 -= 1
            return web.json_response(MERCHANT_429, status=429, headers={"Retry-After": "1"})
        bag = int(request.match_info["b"])
        return web.json_response(self.before.get(bag, []) + self.refunds.get(bag, []))

    async def _order(self, request: web.Request) -> web.Response:
        self.order_reads += 1
        if self.order_429 > 0:
            self.order_429 -= 1
            return web.json_response(MERCHANT_429, status=429, headers={"Retry-After": "1"})
        bags = sorted(set(self.scripts) | set(self.refunds) | set(self.before))
        return web.json_response(
            {
                "id": ORDER,
                "app_id": 11,
                "status": "COMPLETED",
                "currency": "USD",
                "bags": [
                    {
                        "id": bag,
                        "order_id": ORDER,
                        "merchant_id": MERCHANT,
                        "status": self.status(bag),
                        "financial_status": "PAID",
                        "fulfillment_status": "PROCESSING",
                        "currency": "USD",
                        "total": TOTAL,
                        "skus": [],
                    }
                    for bag in bags
                    if self.order_lists_bag
                ],
            }
        )


def platform_refund(
    clock: Clock, bag: int, ident: int | None, amount: int | None, age: float, **drop: bool
) -> dict[str, Any]:
    """A refund made on the merchant's platform as Violet lists it: EXTERNAL, without
    transaction ids or SKU lines; ``drop`` leaves out more (an older record)."""
    record: dict[str, Any] = {
        "id": ident,
        "order_id": ORDER,
        "bag_id": bag,
        "merchant_id": MERCHANT,
        "app_id": 10000,
        "amount": amount,
        "reason": None,
        "refund_currency": "USD",
        "status": "EXTERNAL",
        "date_created": violet_date(clock.time() - age),
        "date_last_modified": violet_date(clock.time() - age),
        "external_id": "910123663597",
        "errors": [],
    }
    for key, gone in drop.items():
        if gone:
            del record[key]
    if ident is None:
        del record["id"]
    return record


@contextlib.asynccontextmanager
async def client_of(server: Violet, clock: FakeClock) -> AsyncIterator[VioletClient]:
    async with serve(server.app()) as base:
        async with VioletClient(
            11,
            "audit27-app-secret-0123456789",
            username="audit27",
            password="audit27-password-0123",
            base_url=f"{base}/v1",
            retry=POLICY,
            clock=clock,
        ) as client:
            yield client


async def outcome(call: Callable[[], Any]) -> OrderRefund | VioletError:
    try:
        return await call()  # type: ignore[no-any-return]
    except VioletError as exc:
        return exc


# -- cancels ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["ok", "null_refund", "no_bag_id", "applied_500"])
async def test_a_cancel_answered_as_violet_documents_is_its_one_refund(step: str) -> None:
    """The bag already carries a platform refund of 900 (EXTERNAL, no ids); the cancel
    is answered with the documented 202 body (its refund without a gateway id), with the
    bag's entry carrying no refund, or with Violet's 500 after it applied; the bag still
    reads COMPLETED for ten minutes. Each ends with the cancel's one refund of 9000."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = [step]
    server.before[BAG] = [platform_refund(clock, BAG, 1, 900, age=3_600.0)]
    server.counted[BAG] = 900
    async with client_of(server, clock) as client:
        got = await outcome(lambda: client.cancel_bag(ORDER, BAG))
    assert isinstance(got, OrderRefund), got
    assert (got.id, got.amount) == (server.made[BAG][0], 9000)
    assert got.reconciled is (step != "ok")
    assert server.posts[BAG] == 1
    assert server.status(BAG) == "COMPLETED"  # the status never moved during the call


# -- whole-bag refunds with a lagging status ---------------------------------------------


async def test_a_whole_bag_refund_after_a_platform_refund_is_found_while_status_lags() -> None:
    """Row 3 with row 2 beside it: the platform refunded 900 (EXTERNAL, no ids); our
    whole-bag refund applies (9000), Violet answers 500, the bag reads COMPLETED. One
    refund, reconciled."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["applied_500"]
    server.before[BAG] = [platform_refund(clock, BAG, 1, 900, age=3_600.0)]
    server.counted[BAG] = 900
    async with client_of(server, clock) as client:
        got = await outcome(lambda: client.refund_bag(ORDER, BAG))
    assert isinstance(got, OrderRefund), got
    assert (got.id, got.amount, got.reconciled) == (server.made[BAG][0], 9000, True)
    assert server.posts[BAG] == 1


@pytest.mark.parametrize("kind", ["refund", "cancel"])
async def test_a_whole_bag_ask_beside_an_older_record_without_id_is_never_resent(
    kind: str,
) -> None:
    """An older platform refund of 900 listed without its id; our whole-bag ask applies
    (9000), Violet answers 500, the status lags. What was left cannot be told from the
    list (the id-less record's place is unknown): the true outcomes are ours found, or
    pending / review. Never a re-send (a second refund), never a failure."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["applied_500"]
    server.before[BAG] = [platform_refund(clock, BAG, None, 900, age=3_600.0)]
    server.counted[BAG] = 900
    async with client_of(server, clock) as client:
        if kind == "refund":
            got = await outcome(lambda: client.refund_bag(ORDER, BAG))
        else:
            got = await outcome(lambda: client.cancel_bag(ORDER, BAG))
    assert server.posts[BAG] == 1
    assert len(server.made[BAG]) == 1
    if isinstance(got, OrderRefund):
        assert got.id == server.made[BAG][0]
    else:
        assert isinstance(got, AmbiguousOutcomeError), got
        assert got.pending is not None


@pytest.mark.parametrize("kind", ["refund", "cancel"])
async def test_a_whole_bag_ask_beside_an_older_record_without_amount_is_never_resent(
    kind: str,
) -> None:
    """An older platform refund listed with its id but without its amount; our
    whole-bag ask applies, Violet answers 500, the status lags. Never re-sent, never a
    failure; claimed only as the refund actually made."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["applied_500"]
    server.before[BAG] = [platform_refund(clock, BAG, 1, None, age=3_600.0)]
    server.counted[BAG] = 900
    async with client_of(server, clock) as client:
        if kind == "refund":
            got = await outcome(lambda: client.refund_bag(ORDER, BAG))
        else:
            got = await outcome(lambda: client.cancel_bag(ORDER, BAG))
    assert server.posts[BAG] == 1
    if isinstance(got, OrderRefund):
        assert got.id == server.made[BAG][0]
    else:
        assert isinstance(got, AmbiguousOutcomeError), got
        assert got.pending is not None


async def test_a_platform_refund_of_the_rest_made_during_a_lost_ask_is_not_claimed() -> None:
    """Our whole-bag refund never applies (500); meanwhile the merchant refunds the
    whole bag on the platform (EXTERNAL, no ids, dated after our send). It is not ours:
    never claimed, and never sent again over it (a second refund). Review."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["lost_500"]

    orig = server._refund

    async def refund_then_platform(request: web.Request) -> web.Response:
        answer = await orig(request)
        server.before[BAG] = [platform_refund(clock, BAG, 5, TOTAL, age=-1.0)]
        server.counted[BAG] = TOTAL
        return answer

    server._refund = refund_then_platform  # type: ignore[method-assign]
    async with client_of(server, clock) as client:
        got = await outcome(lambda: client.refund_bag(ORDER, BAG))
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None
    assert got.pending.needs_review
    assert server.posts[BAG] == 1
    assert BAG not in server.made


# -- partial refunds beside platform records with fields missing ---------------------------


@pytest.mark.parametrize(
    "drop",
    [
        {},
        {"date_created": True},
        {"status": True},
        {"bag_id": True, "order_id": True, "merchant_id": True},
    ],
)
async def test_a_partial_refund_reads_past_platform_records_missing_fields(
    drop: dict[str, bool],
) -> None:
    """Row 2: the list holds platform refunds without ids, amounts, dates, status or
    owners; our partial refund of 2500 applies and Violet answers 500. Ours is found
    (or the ask is pending); one POST; list_bag_refunds reads every record."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["applied_500"]
    server.before[BAG] = [
        platform_refund(clock, BAG, None, 700, age=7_200.0, **drop),
        platform_refund(clock, BAG, 2, None, age=3_600.0, **drop),
        platform_refund(clock, BAG, 3, 2500, age=1_800.0, **drop),
    ]
    server.counted[BAG] = 3200
    async with client_of(server, clock) as client:
        got = await outcome(
            lambda: client.refund_bag(ORDER, BAG, amount_refunded=2500, reason="Damaged")
        )
        listed = await client.list_bag_refunds(ORDER, BAG)
    assert server.posts[BAG] == 1
    if isinstance(got, OrderRefund):
        assert (got.id, got.reconciled) == (server.made[BAG][0], True)
    else:
        assert isinstance(got, AmbiguousOutcomeError), got
    assert len(listed) == 4
    assert server.made[BAG][0] in [r.id for r in listed]


async def test_a_list_of_violets_shapes_with_broken_records_still_reads() -> None:
    """list_bag_refunds on a list holding a null, a string, a record of another shape,
    and a record with unknown status and empty errors: the readable ones come back."""
    clock = FakeClock()
    server = Violet(clock)
    good = copy.deepcopy(fixture("order-service-get-bag-refunds.json")[0])
    odd = platform_refund(clock, BAG, 7, 100, age=60.0)
    odd.update(status="REVERSED", errors=[{}], skus=None)
    server.before[BAG] = [None, "refund", {"id": "x", "amount": {}}, odd, good]  # type: ignore[list-item]
    async with client_of(server, clock) as client:
        listed = await client.list_bag_refunds(ORDER, BAG)
    assert [r.id for r in listed] == [7, 10000]
    status = listed[0].status
    assert status is not None
    assert (status.value, status.is_known) == ("REVERSED", False)


# -- merchant 429s ---------------------------------------------------------------------------


async def test_a_merchant_429_then_the_documented_answer_is_one_refund() -> None:
    """Row 4 as decided: the platform's 429 passed through twice, then the refund:
    one refund made, returned; three POSTs, none of them applied twice."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["429", "429", "ok"]
    async with client_of(server, clock) as client:
        got = await outcome(lambda: client.refund_bag(ORDER, BAG, amount_refunded=500))
    assert isinstance(got, OrderRefund), got
    assert (got.id, got.reconciled) == (server.made[BAG][0], False)
    assert len(server.made[BAG]) == 1


async def test_a_read_back_answered_429_is_never_absence() -> None:
    """Violet's 500 after the refund applied, then the bag's list answers the merchant's
    429 for a while: the read-back waits it out and finds the one refund; never re-sent."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["applied_500"]
    server.list_429 = 3
    async with client_of(server, clock) as client:
        got = await outcome(lambda: client.refund_bag(ORDER, BAG, amount_refunded=500))
    assert server.posts[BAG] == 1
    assert isinstance(got, OrderRefund), got
    assert (got.id, got.reconciled) == (server.made[BAG][0], True)


async def test_a_read_back_answered_429_throughout_stays_pending() -> None:
    """The same, with every read answered 429 until the deadline: pending, never a
    re-send, never a failure."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["applied_500"]
    server.list_429 = 10_000
    async with client_of(server, clock) as client:
        got = await outcome(lambda: client.refund_bag(ORDER, BAG, amount_refunded=500))
    assert server.posts[BAG] == 1
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None


# -- the batch command line ----------------------------------------------------------------


async def test_the_batch_cli_gives_the_true_outcome_with_one_refund_per_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refund file on Violet's documented shapes, on the real clock: a whole-bag
    refund answered 500 after it applied (status lagging, a platform refund beside it),
    a partial refund answered the merchant's 429 first, and a partial beside id-less
    platform records. Every row succeeds with one refund; the same command again sends
    nothing."""
    server = Violet(RealClock())
    server.scripts = {1: ["applied_500"], 2: ["429"], 3: ["applied_500"]}
    server.before[1] = [platform_refund(server.clock, 1, 1, 900, age=3_600.0)]
    server.counted[1] = 900
    server.before[3] = [platform_refund(server.clock, 3, None, 400, age=3_600.0)]
    server.counted[3] = 400
    path = tmp_path / "rows.csv"
    path.write_text(
        "order_id,bag_id,amount_refunded,reason\n"
        f"{ORDER},1,full,\n{ORDER},2,500,Damaged\n{ORDER},3,1200,Damaged\n"
    )
    async with serve(server.app()) as base:
        for key, value in {
            "VIOLET_APP_ID": "11",
            "VIOLET_APP_SECRET": "audit27-app-secret-0123456789",
            "VIOLET_USERNAME": "audit27",
            "VIOLET_PASSWORD": "audit27-password-0123",
            "VIOLET_BASE_URL": f"{base}/v1",
        }.items():
            monkeypatch.setenv(key, value)
        out, err = io.StringIO(), io.StringIO()
        options = BatchOptions(full_refunds=True, output=tmp_path / "out.jsonl")
        code = await run_file("refund", path, options, out=out, err=err)
        again_out = io.StringIO()
        again = await run_file(
            "refund", path, BatchOptions(full_refunds=True), out=again_out, err=err
        )
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert code == 0, (out.getvalue(), err.getvalue(), rows)
    assert {r["bag_id"]: r["outcome"] for r in rows} == {
        1: "succeeded",
        2: "succeeded",
        3: "succeeded",
    }
    assert {bag: len(ids) for bag, ids in server.made.items()} == {1: 1, 2: 1, 3: 1}
    assert again == 0, again_out.getvalue()
    assert server.posts == {1: 1, 2: 2, 3: 1}


async def test_a_platform_refund_of_the_asked_amount_made_during_a_lost_ask_is_not_claimed() -> (
    None
):
    """The same for a partial refund: ours never applies (500); the merchant refunds
    the same 2500 on the platform meanwhile (EXTERNAL, no ids, dated after our send).
    Never claimed, never sent again over it: review."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["lost_500"]
    orig = server._refund

    async def refund_then_platform(request: web.Request) -> web.Response:
        answer = await orig(request)
        server.before[BAG] = [platform_refund(clock, BAG, 5, 2500, age=-1.0)]
        server.counted[BAG] = 2500
        return answer

    server._refund = refund_then_platform  # type: ignore[method-assign]
    async with client_of(server, clock) as client:
        got = await outcome(lambda: client.refund_bag(ORDER, BAG, amount_refunded=2500))
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None
    assert got.pending.needs_review
    assert server.posts[BAG] == 1
    assert BAG not in server.made


async def test_the_batch_cli_cancels_as_violet_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel file, real clock: the documented 202 body, the 202 whose bag entry has
    no refund, and Violet's 500 after the cancel applied, each on a bag whose status
    lags and which already carries a platform refund. Every row succeeds with the one
    refund it made; the same command again sends nothing."""
    server = Violet(RealClock())
    server.scripts = {1: ["ok"], 2: ["null_refund"], 3: ["applied_500"]}
    for bag in (1, 2, 3):
        server.before[bag] = [platform_refund(server.clock, bag, bag, 900, age=3_600.0)]
        server.counted[bag] = 900
    path = tmp_path / "rows.csv"
    path.write_text(f"order_id,bag_id\n{ORDER},1\n{ORDER},2\n{ORDER},3\n")
    async with serve(server.app()) as base:
        for key, value in {
            "VIOLET_APP_ID": "11",
            "VIOLET_APP_SECRET": "audit27-app-secret-0123456789",
            "VIOLET_USERNAME": "audit27",
            "VIOLET_PASSWORD": "audit27-password-0123",
            "VIOLET_BASE_URL": f"{base}/v1",
        }.items():
            monkeypatch.setenv(key, value)
        out, err = io.StringIO(), io.StringIO()
        code = await run_file(
            "cancel", path, BatchOptions(output=tmp_path / "out.jsonl"), out=out, err=err
        )
        again = await run_file("cancel", path, BatchOptions(), out=io.StringIO(), err=err)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert code == 0, (out.getvalue(), err.getvalue(), rows)
    assert {r["bag_id"]: r["outcome"] for r in rows} == {
        1: "succeeded",
        2: "succeeded",
        3: "succeeded",
    }
    assert {r["bag_id"]: r.get("refund_id") for r in rows} == {
        b: server.made[b][0] for b in (1, 2, 3)
    }
    assert again == 0
    assert server.posts == {1: 1, 2: 1, 3: 1}


async def test_a_cancel_answered_with_a_refund_without_its_id_is_one_refund(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every field of Violet's refund is optional: the 202 body's refund without its
    ``id``. cancel_bag returns it (a 2xx proves the cancel applied), one POST; the
    batch command line reports the row succeeded and a second run sends nothing."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["idless_refund"]
    async with client_of(server, clock) as client:
        got = await outcome(lambda: client.cancel_bag(ORDER, BAG))
    assert isinstance(got, OrderRefund), got
    assert (got.id, got.amount) == (None, TOTAL)
    assert server.posts[BAG] == 1

    server = Violet(RealClock())
    server.scripts = {1: ["idless_refund"]}
    path = tmp_path / "rows.csv"
    path.write_text(f"order_id,bag_id\n{ORDER},1\n")
    async with serve(server.app()) as base:
        for key, value in {
            "VIOLET_APP_ID": "11",
            "VIOLET_APP_SECRET": "audit27-app-secret-0123456789",
            "VIOLET_USERNAME": "audit27",
            "VIOLET_PASSWORD": "audit27-password-0123",
            "VIOLET_BASE_URL": f"{base}/v1",
        }.items():
            monkeypatch.setenv(key, value)
        out, err = io.StringIO(), io.StringIO()
        code = await run_file(
            "cancel", path, BatchOptions(output=tmp_path / "o.jsonl"), out=out, err=err
        )
        again = await run_file("cancel", path, BatchOptions(), out=io.StringIO(), err=err)
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert code == 0, (out.getvalue(), err.getvalue(), rows)
    assert [r["outcome"] for r in rows] == ["succeeded"]
    assert again == 0
    assert server.posts == {1: 1}


@pytest.mark.parametrize("kind", ["refund", "cancel"])
async def test_a_whole_bag_read_back_whose_order_read_is_rate_limited(kind: str) -> None:
    """A whole-bag ask applies, Violet answers 500, and the order (the bag's status and
    total) answers the merchant's 429 three times: the read-back waits it out and
    finds the one refund; never re-sent."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["applied_500"]
    server.order_429 = 3
    async with client_of(server, clock) as client:
        if kind == "refund":
            got = await outcome(lambda: client.refund_bag(ORDER, BAG))
        else:
            got = await outcome(lambda: client.cancel_bag(ORDER, BAG))
    assert server.posts[BAG] == 1
    assert isinstance(got, OrderRefund), got
    assert (got.id, got.amount, got.reconciled) == (server.made[BAG][0], TOTAL, True)


@pytest.mark.parametrize("kind", ["refund", "cancel"])
async def test_a_whole_bag_read_back_whose_order_read_stays_rate_limited(kind: str) -> None:
    """The same with the order answering 429 until the deadline: pending, never a
    re-send, never a failure."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["applied_500"]
    server.order_429 = 10_000
    async with client_of(server, clock) as client:
        if kind == "refund":
            got = await outcome(lambda: client.refund_bag(ORDER, BAG))
        else:
            got = await outcome(lambda: client.cancel_bag(ORDER, BAG))
    assert server.posts[BAG] == 1
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None


# -- a refund recorded in the merchant platform's currency --------------------------------
#
# Violet documents a bag's base currency apart from the merchant platform's
# (Bag.currency, external_currency, currency_exchange_rate in violet-swift; "exchange
# rates are used when the base currency of an Offer or Bag does not match the source
# currency of the merchant's external store", concepts/currencies) and a refund's
# ``refund_currency`` as "Currency set for this refund by the external ecom platform";
# no page says which currency a refund record's ``amount`` is in. Found by this audit:
# on main, a record of ours in CAD on a USD bag read as another refund (its amount is
# not the one asked, nor what was left), so after a dropped answer the settle window
# "proved" the ask absent and sent it again: two refunds.


@pytest.mark.parametrize("ask", ["partial", "whole", "cancel"])
async def test_a_refund_recorded_in_the_platforms_currency_is_never_sent_twice(
    ask: str,
) -> None:
    """The platform records our refund in CAD (1.35 to the USD); Violet answers 500
    after it applied. The read-back cannot compare a CAD amount with a USD ask or bag
    total: review, one POST, one refund (main: proven absent, sent again)."""
    clock = FakeClock()
    server = Violet(clock)
    server.platform_rate = 1.35
    server.scripts[BAG] = ["applied_500"]
    async with client_of(server, clock) as client:
        if ask == "partial":
            got = await outcome(lambda: client.refund_bag(ORDER, BAG, amount_refunded=2500))
        elif ask == "whole":
            got = await outcome(lambda: client.refund_bag(ORDER, BAG))
        else:
            got = await outcome(lambda: client.cancel_bag(ORDER, BAG))
    assert server.posts[BAG] == 1
    assert len(server.made[BAG]) == 1
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None
    assert got.pending.needs_review
    assert "currency" in str(got) or "almost matches" in str(got)


async def test_a_partial_ask_proven_absent_reads_the_bag_once_when_a_record_has_a_currency() -> (
    None
):
    """Another refund of 700 USD sits on the bag (dated after our send, so the read
    cannot rule it out by date); ours never applied (500). Before proving absence the
    read-back reads the bag once: the same currency, so 700 is another refund; the ask
    is sent again and refunds once."""
    clock = FakeClock()
    server = Violet(clock)
    server.scripts[BAG] = ["lost_500", "ok"]
    orig = server._refund

    async def refund_then_other(request: web.Request) -> web.Response:
        answer = await orig(request)
        if server.posts[BAG] == 1:
            other = copy.deepcopy(fixture("order-service-get-bag-refunds.json")[0])
            other.update(
                id=5,
                order_id=ORDER,
                bag_id=BAG,
                amount=700,
                date_created=violet_date(clock.time() + 1),
            )
            server.before[BAG] = [other]
            server.counted[BAG] = 700
        return answer

    server._refund = refund_then_other  # type: ignore[method-assign]
    async with client_of(server, clock) as client:
        got = await outcome(lambda: client.refund_bag(ORDER, BAG, amount_refunded=2500))
    assert isinstance(got, OrderRefund), got
    assert (got.id, got.amount, got.reconciled) == (server.made[BAG][0], 2500, False)
    assert server.posts[BAG] == 2
    assert len(server.made[BAG]) == 1
    assert server.order_reads == 1


async def test_a_bag_that_cannot_be_read_for_its_currency_leaves_the_ask_for_review() -> None:
    """The same with our refund recorded in CAD and the order not listing the bag: the
    currency cannot be told; review, never a re-send."""
    clock = FakeClock()
    server = Violet(clock)
    server.platform_rate = 1.35
    server.order_lists_bag = False
    server.scripts[BAG] = ["applied_500"]
    async with client_of(server, clock) as client:
        got = await outcome(lambda: client.refund_bag(ORDER, BAG, amount_refunded=2500))
    assert server.posts[BAG] == 1
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None
    assert got.pending.needs_review
    assert got.pending.reads_bag
    again = type(got.pending).from_json(got.pending.to_json())
    assert again.reads_bag


async def test_the_batch_cli_sends_no_whole_bag_refund_over_a_platform_refund_of_it_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merchant already refunded the whole bag on the platform (EXTERNAL, no ids)
    and the bag still reads COMPLETED: a `full` row and a cancel row on such bags are
    never sent (a second refund); neither is reported as succeeded."""
    server = Violet(RealClock())
    server.scripts = {1: ["ok"], 2: ["ok"]}
    for bag in (1, 2):
        server.before[bag] = [platform_refund(server.clock, bag, bag, TOTAL, age=120.0)]
        server.counted[bag] = TOTAL
    refunds, cancels = tmp_path / "refunds.csv", tmp_path / "cancels.csv"
    refunds.write_text(f"order_id,bag_id,amount_refunded,reason\n{ORDER},1,full,\n")
    cancels.write_text(f"order_id,bag_id\n{ORDER},2\n")
    async with serve(server.app()) as base:
        for key, value in {
            "VIOLET_APP_ID": "11",
            "VIOLET_APP_SECRET": "audit27-app-secret-0123456789",
            "VIOLET_USERNAME": "audit27",
            "VIOLET_PASSWORD": "audit27-password-0123",
            "VIOLET_BASE_URL": f"{base}/v1",
        }.items():
            monkeypatch.setenv(key, value)
        err = io.StringIO()
        one = BatchOptions(full_refunds=True, output=tmp_path / "r.jsonl")
        refund_code = await run_file("refund", refunds, one, out=io.StringIO(), err=err)
        two = BatchOptions(output=tmp_path / "c.jsonl")
        cancel_code = await run_file("cancel", cancels, two, out=io.StringIO(), err=err)
    rows = [
        json.loads(line)
        for name in ("r.jsonl", "c.jsonl")
        for line in (tmp_path / name).read_text().splitlines()
    ]
    assert server.posts == {}
    assert refund_code != 0
    assert cancel_code != 0
    assert all(r["outcome"] != "succeeded" for r in rows), rows
