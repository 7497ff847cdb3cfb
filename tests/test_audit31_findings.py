"""Issue 31, attacked: `violet-async audit` and `violet_async.batch.audit` against a
Violet scripted here (``Hostile``): bags holding doubles, EXTERNAL refunds, near matches
(amount, lines, reason), refunds that never showed, unreadable bags (500s, garbage,
paging that lies, another order's answer), and merchants answering 429. Each row's
verdict, the money per verdict, the exit code and the CSV output are checked against
what the server holds; the findings this attack made are tests at the end."""
# The files read here are small inputs and outputs of a test: blocking reads are fine.

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from aiohttp import web

from violet_async import RetryPolicy, VioletClient, _audit
from violet_async._audit import RATE_LIMITED_ROUNDS, MerchantLanes
from violet_async._audit_cli import AuditOptions, run_audit
from violet_async._audit_judge import format_money
from violet_async._batch_cli import read_items
from violet_async.batch import AdaptiveRate, AuditRow, AuditStats, BatchItem, audit
from violet_async.testing import FakeClock

from . import _fleet_redis
from .conftest import serve

APP_ID, SECRET, USER, PASSWORD = 31, "audit31-app-secret-0123", "audit31-user", "audit31-pw-0123"
#: Retries on a virtual clock: a bag answering 500 is given up on at no real cost.
POLICY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=60.0)


def rec(
    refund_id: int, order_id: int, bag_id: int | None, amount: int, reason: str | None, **more: Any
) -> dict[str, Any]:
    """A refund record as Violet lists it (``bag_id`` None: the record leaves it out)."""
    record: dict[str, Any] = {
        "id": refund_id,
        "order_id": order_id,
        "merchant_id": 1,
        "amount": amount,
        "reason": reason,
        "status": "COMPLETED",
        "refund_currency": "USD",
        "date_created": "2026-12-05T10:00:00Z",
    }
    if bag_id is not None:
        record["bag_id"] = bag_id
    return {**record, **more}


@attrs.define
class Bag:
    id: int
    refunds: list[dict[str, Any]] = attrs.Factory(list)
    merchant: int = 1
    currency: str = "USD"
    total: int = 5000
    status: str = "COMPLETED"
    fault: str | None = None
    """``500`` always; ``garbage`` (a 200 that is not JSON); ``lie_total`` (the pages
    hold one refund fewer than they count); ``lie_repeat`` (every page is page 0)."""
    page: int | None = None
    """Page size: the list is a Spring page of this size (None: a bare list)."""


@attrs.define
class Hostile:
    """Orders by id, their bags and every bag's refund records. ``limited``: 429s each
    merchant still gives on its bags' lists (``Retry-After: 0``). Counts every GET and
    refuses (and counts) every POST: an audit never sends."""

    orders: dict[int, tuple[list[Bag], str, str | None]] = attrs.Factory(dict)
    limited: Counter[int] = attrs.Factory(Counter)
    orders_limited: int = 0
    """429s still to give on order reads (Violet's own limit: no merchant known yet)."""
    rate_limited: Counter[int] = attrs.Factory(Counter)
    listed: list[int] = attrs.Factory(list)
    """Bags whose list was answered (429s, 500s and garbage not counted), in order."""
    gets: int = 0
    posts: int = 0

    def add(
        self, order_id: int, *bags: Bag, currency: str = "USD", fault: str | None = None
    ) -> None:
        self.orders[order_id] = (list(bags), currency, fault)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_get("/v1/orders/{o}", self._order)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_post("/v1/orders/{o}/bags/{b}/{action}", self._post)
        return app

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "audit31-token-0123456789", "refresh_token": "r-31"})

    async def _post(self, request: web.Request) -> web.Response:
        self.posts += 1
        return web.json_response({"message": "an audit never sends"}, status=500)

    async def _order(self, request: web.Request) -> web.Response:
        self.gets += 1
        order_id = int(request.match_info["o"])
        bags, currency, fault = self.orders[order_id]
        if self.orders_limited:
            self.orders_limited -= 1
            return web.json_response({"message": "slow"}, status=429, headers={"Retry-After": "0"})
        if fault == "500":
            return web.json_response({"message": "boom"}, status=500)
        if fault == "garbage":
            return web.Response(body=b"<html>down for maintenance", content_type="text/html")
        answered = order_id + 1 if fault == "another_order" else order_id
        return web.json_response(
            {
                "id": answered,
                "currency": currency,
                "bags": [
                    {
                        "id": b.id,
                        "status": b.status,
                        "currency": b.currency,
                        "total": b.total,
                        "merchant_id": b.merchant,
                    }
                    for b in bags
                ],
            }
        )

    async def _list(self, request: web.Request) -> web.Response:
        self.gets += 1
        bags, _, _ = self.orders[int(request.match_info["o"])]
        bag = next(b for b in bags if b.id == int(request.match_info["b"]))
        if self.limited[bag.merchant]:
            self.limited[bag.merchant] -= 1
            self.rate_limited[bag.merchant] += 1
            return web.json_response(
                {"message": "platform rate limit"}, status=429, headers={"Retry-After": "0"}
            )
        if bag.fault == "500":
            return web.json_response({"message": "boom"}, status=500)
        if bag.fault == "garbage":
            return web.Response(body=b"\x00\xffnot json", content_type="application/json")
        self.listed.append(bag.id)
        if bag.page is None:
            return web.json_response(bag.refunds)
        size, number = bag.page, int(request.query.get("page", "0"))
        chunk = bag.refunds[number * size : (number + 1) * size]
        total = len(bag.refunds) + (1 if bag.fault == "lie_total" else 0)
        if bag.fault == "lie_repeat":
            chunk, number = bag.refunds[:size], 0
        return web.json_response(
            {
                "content": chunk,
                "number": number,
                "size": size,
                "last": (number + 1) * size >= len(bag.refunds),
                "total_elements": total,
            }
        )


SKUS_2 = [{"order_sku_id": 71, "quantity_refunded": 2, "amount_refunded": 800}]
SKUS_1 = '[{"order_sku_id": 71, "quantity_refunded": 1, "amount_refunded": 800}]'


def world() -> tuple[Hostile, list[tuple[Any, ...]]]:
    """One bag per case, and the rows asking for them, each with the verdict it must
    get and the money that verdict counts (the row's, in the bag's currency)."""
    h = Hostile()
    external = rec(9007, 1, 105, 1200, None, status="EXTERNAL", date_created="2026-12-04T08:30:00Z")
    h.add(
        1,
        Bag(101, [rec(9001, 1, 101, 500, "damaged")]),
        Bag(102, [rec(9002 + n, 1, 102, 700, "late") for n in range(3)], page=2),
        Bag(103),
        Bag(104, [rec(9005, 1, 104, 350, "wrong size")]),
        Bag(105, [rec(9006, 1, 105, 250, "gift"), external]),
        Bag(106, [rec(9008, 1, 106, 600, "oops")]),
        Bag(107, [rec(9009, 1, 107, 800, "lines", skus=SKUS_2)]),
        Bag(108, [rec(9010, 1, 108, 450, "never", status="FAILED")]),
    )
    h.add(
        2,
        Bag(201, [rec(9201, 2, 201, 100, "a")], fault="garbage", merchant=2),
        Bag(
            202,
            [rec(9202, 2, 202, 100, "a"), rec(9203, 2, 202, 100, "a")],
            fault="lie_total",
            page=1,
            merchant=2,
        ),
        Bag(
            203,
            [rec(9204, 2, 203, 100, "a"), rec(9205, 2, 203, 100, "a")],
            fault="lie_repeat",
            page=1,
            merchant=2,
        ),
        Bag(204, currency="EUR", refunds=[rec(9206, 2, 204, 100, "a", refund_currency="EUR")]),
        currency="EUR",
    )
    h.add(3, Bag(301), fault="garbage")
    h.add(4, Bag(401), fault="another_order")
    h.add(6, Bag(601, [rec(9601, 6, 601, 5000, None)], status="REFUNDED"))
    h.add(7, Bag(701))
    h.add(8, Bag(801, [rec(9801, 8, 801, 12340, "k", refund_currency="KWD")], currency="KWD"))
    for order_id in range(10, 30):  # five merchants, two of them answering 429 first
        bag_id, merchant = order_id * 10, 100 + order_id % 5
        h.add(
            order_id,
            Bag(bag_id, [rec(90000 + order_id, order_id, bag_id, 100, "r")], merchant=merchant),
        )
    h.limited.update({100: 2, 101: 1})
    rows: list[tuple[Any, ...]] = [
        # order, bag, amount, reason, skus, verdict, money (cents), currency
        (1, 101, 500, "damaged", "", "as_asked", 500, "USD"),
        (1, 102, 700, "late", "", "extra", 700, "USD"),  # a third refund, on page 2
        (1, 102, 700, "late", "", "as_asked", 700, "USD"),
        (1, 103, 300, "lost", "", "missing", 300, "USD"),
        (1, 104, 400, "wrong size", "", "mismatch", 350, "USD"),
        (1, 105, 250, "gift", "", "extra", 1200, "USD"),  # the EXTERNAL one
        (1, 106, 600, "right", "", "mismatch", 600, "USD"),
        (1, 107, 800, "lines", SKUS_1, "mismatch", 800, "USD"),
        (1, 108, 450, "never", "", "missing", 450, "USD"),  # only a FAILED attempt
        (2, 201, 100, "a", "", "unreadable", None, None),
        (2, 202, 100, "a", "", "unreadable", None, None),
        (2, 203, 100, "a", "", "unreadable", None, None),
        (2, 204, 100, "a", "", "as_asked", 100, "EUR"),
        (3, 301, 100, "a", "", "unreadable", None, None),
        (4, 401, 100, "a", "", "unreadable", None, None),
        (6, 601, "full", "", "", "as_asked", 5000, "USD"),
        (7, 701, "full", "", "", "missing", 5000, "USD"),
        (8, 801, 12340, "k", "", "as_asked", 12340, "KWD"),
    ]
    rows += [(o, o * 10, 100, "r", "", "as_asked", 100, "USD") for o in range(10, 30)]
    return h, rows


def write_rows(path: Path, rows: list[tuple[Any, ...]]) -> Path:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["order_id", "bag_id", "amount_refunded", "reason", "skus"])
    writer.writerows(row[:5] for row in rows)
    path.write_text(out.getvalue())
    return path


def expected(rows: list[tuple[Any, ...]]) -> dict[int, tuple[str, int | None, str | None]]:
    return {line: row[5:] for line, row in enumerate(rows, start=2)}


def use_env(monkeypatch: pytest.MonkeyPatch, base_url: str) -> None:
    for name, value in {
        "VIOLET_APP_ID": str(APP_ID),
        "VIOLET_APP_SECRET": SECRET,
        "VIOLET_USERNAME": USER,
        "VIOLET_PASSWORD": PASSWORD,
        "VIOLET_BASE_URL": base_url,
    }.items():
        monkeypatch.setenv(name, value)


def client_for(base_url: str) -> VioletClient:
    return VioletClient(
        APP_ID,
        SECRET,
        username=USER,
        password=PASSWORD,
        base_url=base_url,
        retry=POLICY,
        clock=FakeClock(),
    )


async def audited(base_url: str, path: Path, **kwargs: Any) -> dict[int, AuditRow]:
    items = [i for i in read_items(path, "refund") if isinstance(i, BatchItem)]
    async with client_for(base_url) as client:
        return {row.item.line: row async for row in audit(client, items, **kwargs)}


async def test_every_hostile_case_in_process_each_row_its_verdict_and_money(
    tmp_path: Path,
) -> None:
    """batch.audit on a virtual clock, a bag answering 500 on every read added: every
    row's verdict and money are what the server holds; merchants' 429s are retried and
    counted; nothing is sent."""
    h, rows = world()
    h.add(5, Bag(501, [rec(9501, 5, 501, 100, "a")], fault="500"))
    rows.append((5, 501, 100, "a", "", "unreadable", None, None))
    path = write_rows(tmp_path / "rows.csv", rows)
    stats = AuditStats()
    async with serve(h.app()) as url:
        got = await audited(f"{url}/v1", path, concurrency=3, stats=stats)
    assert {line: (r.audit, r.money, r.currency) for line, r in got.items()} == expected(rows)
    assert got[3].refund_ids == (9002, 9004)  # the double, found on the second page
    assert got[4].refund_ids == (9003,)
    assert got[7].refund_ids == (9006, 9007)
    assert "EXTERNAL 2026-12-04T08:30:00+00:00" in got[7].detail
    assert "reason: asked 'right', refund says 'oops'" in got[8].detail
    assert "lines: asked {71: 1}, refunded {71: 2}" in got[9].detail
    assert "no money moved: refund 9010" in got[10].detail
    assert "the pages hold 2 refunds, the server counts 3" in got[12].detail
    assert "asked for page 1, got 0" in got[13].detail
    assert "Violet answered order 5 for order 4" in got[16].detail
    assert "ServerError" in got[len(rows) + 1].detail
    assert h.rate_limited == {100: 2, 101: 1}
    assert stats.rate_limited == 3
    assert h.posts == 0


async def test_every_hostile_case_through_the_command_money_per_verdict_and_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`violet-async audit FILE --output OUT` (JSON lines, then --format csv): every
    row's verdict and money as the server holds them, the summary's money per verdict
    in each currency's own minor unit (KWD has three decimals), exit 1."""
    h, rows = world()
    path = write_rows(tmp_path / "rows.csv", rows)
    want = expected(rows)
    async with serve(h.app()) as url:
        use_env(monkeypatch, f"{url}/v1")
        out = io.StringIO()
        output = tmp_path / "audit.jsonl"
        options = AuditOptions(output=output, concurrency=4)
        assert await run_audit(path, options, out, io.StringIO()) == 1
        lines = [orjson.loads(x) for x in output.read_bytes().splitlines()]
        assert {x["line"]: (x["audit"], x["money"], x["currency"]) for x in lines} == want
        h.limited.update({100: 2, 101: 1})
        sheet = tmp_path / "audit.csv"
        options = AuditOptions(output=sheet, format="csv", concurrency=4)
        assert await run_audit(path, options, io.StringIO(), io.StringIO()) == 1
    with sheet.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert {int(r["line"]): r["audit"] for r in table} == {k: v[0] for k, v in want.items()}
    assert next(r for r in table if r["line"] == "3")["refund_ids"] == "9002 9004"
    summary = out.getvalue()
    sums: dict[str, Counter[str]] = {}
    for verdict, money, currency in want.values():
        if money is not None:
            sums.setdefault(verdict, Counter())[currency] += money
    for verdict, by_currency in sums.items():
        shown = ", ".join(format_money(c, cur) for cur, c in sorted(by_currency.items()))
        count = sum(v == verdict for v, *_ in want.values())
        assert f"  {verdict:<12} {count:>8}  {shown}\n" in summary
    assert "KWD 12.340" in summary
    assert f"progress {len(rows)}/{len(rows)} (" in summary  # not a terminal: plain lines
    assert "  unreadable          5  (not a verdict about money)" in summary
    assert h.posts == 0


async def test_exit_0_only_when_every_row_is_as_asked_with_429s_on_the_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the bags whose rows are all as asked, their merchants answering 429 first:
    exit 0 (bag 102 is left out: its third refund makes one of its rows extra)."""
    h, rows = world()
    as_asked = [r for r in rows if r[5] == "as_asked" and r[1] != 102]
    path = write_rows(tmp_path / "rows.csv", as_asked)
    async with serve(h.app()) as url:
        use_env(monkeypatch, f"{url}/v1")
        out = io.StringIO()
        assert await run_audit(path, AuditOptions(), out, io.StringIO()) == 0, out.getvalue()
    assert f"  as_asked     {len(as_asked):>8}" in out.getvalue()
    assert sum(h.rate_limited.values()) == 3


# Findings of this attack: each failed before its fix.


def test_three_decimal_currencies_are_written_with_three_decimals() -> None:
    """Finding: KWD 12.340 (12340 minor units) was written "KWD 123.40", ten times the
    money, in the summary and in every detail."""
    assert format_money(12340, "KWD") == "KWD 12.340"
    assert format_money(-5, "BHD") == "BHD -0.005"
    assert format_money(1_234_500, "JOD") == "JOD 1,234.500"
    assert format_money(12340, "USD") == "USD 123.40"
    assert format_money(1500, "JPY") == "JPY 1,500"


async def test_one_refund_listed_on_two_bags_of_an_order_is_never_as_asked_twice(
    tmp_path: Path,
) -> None:
    """Finding: a refund record without its bag_id, listed on two bags of one order,
    made both rows as_asked: one refund counted twice, as two shoppers paid. A refund
    is on one bag: both bags are unreadable, the third bag judged as usual."""
    h = Hostile()
    shared = rec(5002, 2, None, 500, "y")
    h.add(2, Bag(21, [shared]), Bag(22, [dict(shared)]), Bag(23, [rec(5003, 2, 23, 500, "y")]))
    rows = [(2, bag, 500, "y", "") for bag in (21, 22, 23)]
    path = write_rows(tmp_path / "rows.csv", rows)
    async with serve(h.app()) as url:
        got = await audited(f"{url}/v1", path)
    assert {line: r.audit for line, r in got.items()} == {
        2: "unreadable",
        3: "unreadable",
        4: "as_asked",
    }
    assert "refund 5002 is listed on bags 21 and 22" in got[2].detail


async def test_a_refund_of_a_negative_amount_makes_the_bag_unreadable(tmp_path: Path) -> None:
    """Finding: a record of amount -500 beside the row's refund was an `extra` of
    USD -5.00: it took money off the summary's extras. A refund cannot be negative: the
    list is not one that can be counted."""
    h = Hostile()
    h.add(3, Bag(31, [rec(5004, 3, 31, 500, "z"), rec(5005, 3, 31, -500, "z")]))
    path = write_rows(tmp_path / "rows.csv", [(3, 31, 500, "z", "")])
    async with serve(h.app()) as url:
        got = await audited(f"{url}/v1", path)
    assert got[2].audit == "unreadable"
    assert "refund 5005 of a negative amount (-500)" in got[2].detail
    assert got[2].money is None


async def test_a_row_the_journal_left_open_is_never_called_not_ours(tmp_path: Path) -> None:
    """Finding: a row the journal left pending (or sent, or unknown: it may have
    applied), whose refund Violet shows, was `ours: false`, "not made by this tool's
    run", beside "it may have applied". Whose refund it is cannot be told: ours is
    None and the detail says only what the journal says."""
    h = Hostile()
    h.add(1, *(Bag(b, [rec(b * 10, 1, b, 500, "late")]) for b in (11, 12, 13, 14)))
    path = write_rows(tmp_path / "rows.csv", [(1, b, 500, "late", "") for b in (11, 12, 13, 14)])
    items = {i.line: i for i in read_items(path, "refund") if isinstance(i, BatchItem)}
    states = {2: ("pending", None), 3: ("sent", None), 4: ("unknown", None), 5: ("done", 999)}
    lines = [orjson.dumps({"type": "header", "v": 2, "input": "x", "ts": 1.0})]
    for line, (state, refund_id) in states.items():
        entry: dict[str, Any] = {"key": f"{items[line].key}:0", "line": line, "state": state}
        if refund_id is not None:
            entry["refund_id"] = refund_id
        lines.append(orjson.dumps({**entry, "ts": 2.0}))
    journal = tmp_path / "j.jsonl"
    journal.write_bytes(b"\n".join(lines) + b"\n")
    async with serve(h.app()) as url:
        got = await audited(f"{url}/v1", path, journal=journal)
    for line in (2, 3, 4):
        assert (got[line].audit, got[line].ours) == ("as_asked", None)
        assert "not made by this tool" not in got[line].detail
        assert "it may have applied (outcome not known)" in got[line].detail
    assert (got[5].audit, got[5].ours) == ("as_asked", False)  # its journal names another
    assert "not made by this tool's run" in got[5].detail


async def test_a_rate_that_is_not_a_number_is_refused_reading_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding: `--rate nan` (and `inf`) passed the "must be positive" check and turned
    pacing off (1 / nan never waits). Now exit 2 with nothing read; audit(rate=nan)
    and AdaptiveRate(nan) raise."""
    from violet_async.__main__ import main

    h, rows = world()
    path = write_rows(tmp_path / "rows.csv", rows[:1])
    async with serve(h.app()) as url:
        use_env(monkeypatch, f"{url}/v1")
        for bad in (["--rate", "nan"], ["--rate", "inf"], ["--timeout", "nan"]):
            assert main(["audit", str(path), *bad]) == 2
            assert "must be positive" in capsys.readouterr().err
        for rate in (math.nan, math.inf):
            with pytest.raises(ValueError, match="rate"):
                AdaptiveRate(rate)
            async with client_for(f"{url}/v1") as client:
                with pytest.raises(ValueError, match="rate"):
                    [r async for r in audit(client, [], rate=rate)]
    assert h.gets == 0


redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for the ledger's signatures


async def test_the_ledger_is_named_when_it_says_succeeded_and_violet_shows_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str, fleet_key: str
) -> None:
    """Finding: with --redis, a row the fleet ledger says applied, with no such refund
    at Violet, was announced as "the journal says SUCCEEDED" on the summary and on
    stderr; the ledger's rows made were not counted. Now each names the ledger."""
    from redis.asyncio import Redis

    from violet_async.fleet import RedisLedger, keyed_items

    h = Hostile()
    h.add(1, Bag(11, [rec(110, 1, 11, 500, "late")]), Bag(12))
    path = write_rows(tmp_path / "rows.csv", [(1, 11, 500, "late", ""), (1, 12, 500, "late", "")])
    items = [i for i in read_items(path, "refund") if isinstance(i, BatchItem)]
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushall()
        ledger = RedisLedger(redis)
        await ledger.new_fleet()
        for (key, item), refund_id in zip(keyed_items(items), (110, 120), strict=True):
            await ledger.register(key, item)
            await ledger.mark_applied(
                key, item.bag_id, refund_id, reconciled=False, outcome="succeeded"
            )
    finally:
        await redis.aclose()
    async with serve(h.app()) as url:
        use_env(monkeypatch, f"{url}/v1")
        out, err = io.StringIO(), io.StringIO()
        assert await run_audit(path, AuditOptions(redis=redis_url), out, err) == 1
    assert "!!! 1 row(s) the ledger says SUCCEEDED have NO such refund" in out.getvalue()
    assert "THE LEDGER SAYS SUCCEEDED (refund 120)" in out.getvalue()
    assert "the fleet ledger: recorded making the refund found for 1 row(s)" in out.getvalue()
    assert "1 row(s) the ledger says succeeded have no such refund" in err.getvalue()
    assert "journal" not in out.getvalue() + err.getvalue()


async def test_a_whole_bag_refunded_twice_is_extra_not_an_almost_match(tmp_path: Path) -> None:
    """Finding: a cancel (or a whole-bag refund) whose bag was refunded in full twice,
    the double of all doubles, was `mismatch` ("almost matches: a cancel was asked:
    refunded 5000 of a bag of 5000"), the second refund only named as asked by no row.
    The row's refund is the one that emptied the bag; what came after is extra."""
    h = Hostile()
    h.add(1, Bag(11, [rec(1, 1, 11, 5000, None), rec(2, 1, 11, 5000, None)], status="CANCELED"))
    h.add(2, Bag(21, [rec(3, 2, 21, 1000, "x", status="EXTERNAL"), rec(4, 2, 21, 4000, None)]))
    h.add(3, Bag(31, [rec(5, 3, 31, 5000, None), rec(6, 3, 31, 700, "late")], status="REFUNDED"))
    cancels = tmp_path / "cancels.csv"
    cancels.write_text("order_id,bag_id\n1,11\n2,21\n")
    refunds = write_rows(tmp_path / "rows.csv", [(3, 31, "full", "", "")])
    async with serve(h.app()) as url:
        items = [i for i in read_items(cancels, "cancel") if isinstance(i, BatchItem)]
        items += [i for i in read_items(refunds, "refund") if isinstance(i, BatchItem)]
        async with client_for(f"{url}/v1") as client:
            got = {(r.item.kind, r.item.order_id): r async for r in audit(client, items)}
    assert (got["cancel", 1].audit, got["cancel", 1].refund_ids) == ("extra", (1, 2))
    assert got["cancel", 1].money == 5000
    assert "asked by no row: refund 2 USD 50.00" in got["cancel", 1].detail
    # a refund before the cancel is extra too, the cancel's own refund the rest of it
    assert (got["cancel", 2].audit, got["cancel", 2].refund_ids) == ("extra", (4, 3))
    assert got["cancel", 2].money == 1000
    assert (got["refund", 3].audit, got["refund", 3].refund_ids) == ("extra", (5, 6))
    assert got["refund", 3].money == 700


# Pacing per merchant (the "paced per merchant like a batch"): a gap closed here.


def test_a_merchant_gets_a_lane_on_its_first_429_and_only_it_waits() -> None:
    """MerchantLanes: no lane, no wait; the first 429 opens a lane at half the start
    rate; a wave of 429s within one turn halves it once; successes climb back up to
    the start rate; the floor is a 64th of it. Another merchant never waits."""
    clock = FakeClock()
    lanes = MerchantLanes(8.0, clock)
    assert [lanes.turn(7), lanes.turn(7), lanes.turn(None)] == [0.0, 0.0, 0.0]
    lanes.limited(7)
    assert lanes.turn(7) == 0.0  # its turn is now...
    assert lanes.turn(7) == pytest.approx(1 / 4.0)  # ...the next one a quarter second on
    assert lanes.turn(8) == 0.0
    lanes.limited(7)  # the same wave: no second halving
    assert lanes.lanes[7].rate == 4.0
    clock.advance(0.25)
    lanes.limited(7)
    assert lanes.lanes[7].rate == 2.0
    for _ in range(100):
        clock.advance(10.0)
        lanes.limited(7)
    assert lanes.lanes[7].rate == 8.0 / 64
    for _ in range(100):
        lanes.succeeded(7)
    assert lanes.lanes[7].rate == 8.0
    lanes.succeeded(9)  # no lane: nothing to speed up
    assert 9 not in lanes.lanes


async def test_a_merchant_refusing_more_than_the_retries_is_read_in_its_turn(
    tmp_path: Path,
) -> None:
    """GAP closed: a merchant whose platform answered 429 more times in a row than the
    client retries (4 sends) left its bag `unreadable`; now the read waits for the
    merchant's turn and is made again: every row as asked, the 429s charged to that
    merchant's lane alone, nothing sent."""
    h = Hostile()
    for order_id in range(1, 7):
        merchant = 100 if order_id <= 3 else 200
        bag = Bag(order_id * 10, [rec(order_id, order_id, order_id * 10, 100, "r")], merchant)
        h.add(order_id, bag)
    h.limited[100] = 9
    path = write_rows(tmp_path / "rows.csv", [(o, o * 10, 100, "r", "") for o in range(1, 7)])
    stats = AuditStats()
    async with serve(h.app()) as url:
        got = {line: r.audit for line, r in (await audited(f"{url}/v1", path, stats=stats)).items()}
    assert got == dict.fromkeys(range(2, 8), "as_asked")
    assert h.rate_limited == {100: 9}
    assert stats.rate_limited >= 6  # the client's own retries (the rest: new rounds)
    assert h.posts == 0


async def test_a_merchant_that_never_stops_refusing_is_unreadable_in_bounded_rounds(
    tmp_path: Path,
) -> None:
    """A merchant answering 429 to every read: after RATE_LIMITED_ROUNDS rounds its bag
    is unreadable (a 429, said so), never a loop without end; another merchant's bag
    in the same run is as asked."""
    h = Hostile()
    h.add(1, Bag(10, [rec(1, 1, 10, 100, "r")], merchant=100))
    h.add(2, Bag(20, [rec(2, 2, 20, 100, "r")], merchant=200))
    h.limited[100] = 10**6
    path = write_rows(tmp_path / "rows.csv", [(1, 10, 100, "r", ""), (2, 20, 100, "r", "")])
    async with serve(h.app()) as url:
        got = await audited(f"{url}/v1", path)
    assert got[3].audit == "as_asked"
    assert got[2].audit == "unreadable"
    assert "RateLimitError" in got[2].detail
    assert h.rate_limited[100] == (RATE_LIMITED_ROUNDS + 1) * POLICY.max_attempts


async def test_an_order_waiting_for_its_merchant_gives_its_slot_to_another_merchant(
    tmp_path: Path,
) -> None:
    """Concurrency 1: order 1's merchant refuses two rounds of reads, so its third
    waits for the merchant's turn; meanwhile its slot goes to order 2, of another
    merchant, which is read first (with the slot held, order 2 waited behind it)."""
    h = Hostile()
    h.add(1, Bag(10, [rec(1, 1, 10, 100, "r")], merchant=100))
    h.add(2, Bag(20, [rec(2, 2, 20, 100, "r")], merchant=200))
    h.limited[100] = 2 * POLICY.max_attempts
    path = write_rows(tmp_path / "rows.csv", [(1, 10, 100, "r", ""), (2, 20, 100, "r", "")])
    stats = AuditStats()
    async with serve(h.app()) as url:
        got = await audited(f"{url}/v1", path, concurrency=1, stats=stats)
    assert {line: r.audit for line, r in got.items()} == {2: "as_asked", 3: "as_asked"}
    assert h.listed == [20, 10]
    assert stats.max_held_rows == 2  # two orders at once, one of them waiting its turn


async def test_with_the_waiting_room_full_an_order_waits_holding_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No room for orders waiting without a slot (WAITING_PER_SLOT 0): the order waits
    for its merchant's turn holding its slot, so memory holds no more orders than the
    concurrency; order 2 is read after it."""
    monkeypatch.setattr(_audit, "WAITING_PER_SLOT", 0)
    h = Hostile()
    h.add(1, Bag(10, [rec(1, 1, 10, 100, "r")], merchant=100))
    h.add(2, Bag(20, [rec(2, 2, 20, 100, "r")], merchant=200))
    h.limited[100] = 2 * POLICY.max_attempts
    path = write_rows(tmp_path / "rows.csv", [(1, 10, 100, "r", ""), (2, 20, 100, "r", "")])
    stats = AuditStats()
    async with serve(h.app()) as url:
        got = await audited(f"{url}/v1", path, concurrency=1, stats=stats)
    assert {line: r.audit for line, r in got.items()} == {2: "as_asked", 3: "as_asked"}
    assert h.listed == [10, 20]
    assert stats.max_held_rows == 1


async def test_a_429_on_an_order_read_is_retried_under_the_global_rate(tmp_path: Path) -> None:
    """`rate` set and Violet's own 429 on an order read (no merchant known yet): the
    read is retried (the run's global rate slows down, no merchant lane opens) and
    every row is as asked."""
    h, rows = world()
    h.orders_limited = 2
    as_asked = [r for r in rows if r[5] == "as_asked" and r[1] != 102][:3]
    path = write_rows(tmp_path / "rows.csv", as_asked)
    stats = AuditStats()
    async with serve(h.app()) as url:
        got = await audited(f"{url}/v1", path, rate=1000.0, stats=stats)
    assert {r.audit for r in got.values()} == {"as_asked"}
    assert stats.rate_limited == 2
    assert h.orders_limited == 0


async def test_a_refund_recorded_in_another_currency_is_a_mismatch_that_says_so(
    tmp_path: Path,
) -> None:
    """Finding (on main's currency rule): a EUR refund on a USD bag, the row asking 500,
    was a mismatch "not what was left on the bag when it was made" (a whole-bag reason
    for an amount row), its 500 counted as USD. It now says the currencies differ, and
    its money is counted in the refund's currency."""
    h = Hostile()
    h.add(1, Bag(11, [rec(5001, 1, 11, 500, "x", refund_currency="EUR")]))
    path = write_rows(tmp_path / "rows.csv", [(1, 11, 500, "x", "")])
    async with serve(h.app()) as url:
        got = await audited(f"{url}/v1", path)
    assert (got[2].audit, got[2].money, got[2].currency) == ("mismatch", 500, "EUR")
    assert "the bag is in USD, the refund was recorded in EUR" in got[2].detail
