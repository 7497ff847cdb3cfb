"""FakeViolet's hostile side, over raw HTTP on a FakeClock: list lag, pages, dates,
skew, trimmed reasons, held requests, other actors' refunds, odd binds."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan, ServerQuirks

WALL = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall_start=WALL)


async def call(
    http: aiohttp.ClientSession, fake: FakeViolet, method: str, path: str, body: Any = None
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    headers = {
        "X-Violet-App-Id": str(fake.app_id),
        "X-Violet-App-Secret": fake.app_secret,
        "X-Violet-Token": fake.issue_token(),
    }
    data = None if body is None else orjson.dumps(body)
    async with http.request(method, fake.base_url + path, headers=headers, data=data) as r:
        raw = await r.read()
        parsed = orjson.loads(raw) if r.content_type == "application/json" else raw.decode()
        return r.status, parsed, r.headers


@contextlib.asynccontextmanager
async def serve(clock: FakeClock, **options: Any) -> AsyncIterator[tuple[FakeViolet, str]]:
    """A one-order fake on ``clock``; yields it and its bag's refunds path."""
    async with FakeViolet(orders=1, clock=clock, **options) as fake:
        order_id, bag_id = fake.seeded[0]
        yield fake, f"/orders/{order_id}/bags/{bag_id}/refunds"


def test_fake_clock_time_and_timers() -> None:
    """time() follows monotonic(); timers run in time order as time advances, at their
    own due time, and cancelled ones never run."""
    clock = FakeClock(start=10.0, wall_start=WALL)
    ran: list[tuple[str, float]] = []
    clock.call_later(2.0, lambda: ran.append(("b", clock.monotonic())))
    clock.call_at(11.0, lambda: ran.append(("a", clock.monotonic())))
    clock.call_later(1.5, lambda: ran.append(("never", 0.0))).cancel()
    assert clock.pending_timers == 2
    clock.advance(0.5)
    assert ran == []
    clock.advance(5.0)
    assert ran == [("a", 11.0), ("b", 12.0)]
    assert clock.time() == WALL + 5.5
    clock.call_later(0, lambda: ran.append(("now", clock.monotonic())))
    clock.run_due()
    assert ran[-1] == ("now", 15.5)
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)


async def test_fake_clock_sleep_fires_timers_and_records() -> None:
    """sleep() advances virtual time (running due timers) and records the wait."""
    clock = FakeClock()
    fired: list[float] = []
    clock.call_later(1.0, lambda: fired.append(clock.monotonic()))
    await clock.sleep(3.0)
    assert fired == [1_001.0]
    assert (clock.sleeps, clock.slept, clock.monotonic()) == ([3.0], 3.0, 1_003.0)


async def test_list_lag_hides_then_shows(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    """With list_lag, the bag's status changes at commit but the refund shows in the
    list and the single GET only list_lag seconds later."""
    async with serve(clock, list_lag=3.0) as (fake, path):
        order_id, bag_id = fake.seeded[0]
        status, refund, _ = await call(http, fake, "POST", path, {"amount_refunded": 100})
        assert status == 200
        single = f"/orders/{order_id}/refunds/{refund['id']}"
        assert (await call(http, fake, "GET", path))[1] == []
        assert (await call(http, fake, "GET", single))[0] == 404
        order = (await call(http, fake, "GET", f"/orders/{order_id}"))[1]
        assert order["bags"][0]["status"] == "PARTIALLY_REFUNDED"
        clock.advance(2.9)
        assert (await call(http, fake, "GET", path))[1] == []
        clock.advance(0.1)
        assert [r["id"] for r in (await call(http, fake, "GET", path))[1]] == [refund["id"]]
        assert (await call(http, fake, "GET", single))[1]["id"] == refund["id"]
        [commit] = fake.ledger.commits_per_bag[bag_id]
        assert commit.visible_at - commit.at == 3.0


async def test_list_lag_per_bag_and_rate(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    """lag_list() lags one bag only; list_lag_rate lags a seeded share of commits;
    settle() ends all lag."""
    async with FakeViolet(orders=2, clock=clock) as fake:
        (o1, b1), (o2, b2) = fake.seeded
        fake.lag_list(10.0, bag_id=b1)
        for order_id, bag_id in fake.seeded:
            path = f"/orders/{order_id}/bags/{bag_id}/refunds"
            await call(http, fake, "POST", path, {"amount_refunded": 1})
        assert (await call(http, fake, "GET", f"/orders/{o1}/bags/{b1}/refunds"))[1] == []
        assert len((await call(http, fake, "GET", f"/orders/{o2}/bags/{b2}/refunds"))[1]) == 1
        fake.settle()
        assert len((await call(http, fake, "GET", f"/orders/{o1}/bags/{b1}/refunds"))[1]) == 1
    async with FakeViolet(orders=40, clock=clock, list_lag=5.0, list_lag_rate=0.5) as fake:
        for order_id, bag_id in fake.seeded:
            path = f"/orders/{order_id}/bags/{bag_id}/refunds"
            await call(http, fake, "POST", path, {"amount_refunded": 1})
        lagged = [
            c for cs in fake.ledger.commits_per_bag.values() for c in cs if c.visible_at > c.at
        ]
        assert 5 < len(lagged) < 35


async def test_naive_and_missing_dates(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    """naive_dates: server local time (UTC-5 here) without an offset; missing_dates:
    date_created is null."""
    async with serve(clock, naive_dates=True, server_utc_offset_hours=-5) as (fake, path):
        refund = (await call(http, fake, "POST", path, {"amount_refunded": 1}))[1]
        assert refund["date_created"] == "2023-11-14T17:13:20"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", refund["date_last_modified"])
    async with serve(clock, missing_dates=True) as (fake, path):
        refund = (await call(http, fake, "POST", path, {"amount_refunded": 1}))[1]
        assert refund["date_created"] is None
        assert refund["date_last_modified"] is not None


async def test_clock_skew_shows_in_date_header_and_dates(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """Every answer (errors too) has a Date header in server time; skew moves it and
    the refund dates alike."""
    async with serve(clock, server_clock_skew=-90.0) as (fake, path):
        status, refund, headers = await call(http, fake, "POST", path, {"amount_refunded": 1})
        expected = datetime.fromtimestamp(WALL - 90, tz=timezone.utc)
        assert parsedate_to_datetime(str(headers["Date"])) == expected
        created = refund["date_created"].replace("+0000", "Z").replace(".000Z", "Z")
        assert datetime.fromisoformat(created.replace("Z", "+00:00")) == expected
        clock.advance(30)
        status, _, headers = await call(http, fake, "GET", "/orders/1")
        assert status == 404
        assert parsedate_to_datetime(str(headers["Date"])).timestamp() == WALL - 60


async def test_trimmed_reasons(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    """trim_reasons: the stored and answered reason is reason.strip()."""
    async with serve(clock, trim_reasons=True) as (fake, path):
        body = {"amount_refunded": 1, "reason": "  Damaged in transit \n"}
        assert (await call(http, fake, "POST", path, body))[1]["reason"] == "Damaged in transit"
        assert (await call(http, fake, "GET", path))[1][0]["reason"] == "Damaged in transit"
    async with serve(clock) as (fake, path):
        body = {"amount_refunded": 1, "reason": " kept "}
        assert (await call(http, fake, "POST", path, body))[1]["reason"] == " kept "


@pytest.mark.parametrize(
    ("keys", "total_pages", "total_elements", "count"),
    [
        ("snake", "total_pages", "total_elements", "number_of_elements"),
        ("camel", "totalPages", "totalElements", "numberOfElements"),
    ],
)
async def test_refund_list_pages(
    clock: FakeClock,
    http: aiohttp.ClientSession,
    keys: str,
    total_pages: str,
    total_elements: str,
    count: str,
) -> None:
    """page_size answers Spring pages honouring page and size (capped), snake or camel
    keys, last page flagged; bad parameters are 400."""
    async with serve(clock, page_size=2, page_keys=keys) as (fake, path):
        ids = [
            (await call(http, fake, "POST", path, {"amount_refunded": 1}))[1]["id"] for _ in "abc"
        ]
        first = (await call(http, fake, "GET", path))[1]
        assert [r["id"] for r in first["content"]] == ids[:2]
        assert (first["number"], first["size"], first[total_pages], first[total_elements]) == (
            0,
            2,
            2,
            3,
        )
        assert (first["first"], first["last"], first["empty"], first[count]) == (
            True,
            False,
            False,
            2,
        )
        last = (await call(http, fake, "GET", path + "?page=1&size=50"))[1]
        assert [r["id"] for r in last["content"]] == ids[2:]
        assert (last["size"], last["last"], last["first"], last[count]) == (2, True, False, 1)
        beyond = (await call(http, fake, "GET", path + "?page=7"))[1]
        assert (beyond["content"], beyond["empty"], beyond["last"]) == ([], True, True)
        one = (await call(http, fake, "GET", path + "?size=1&page=2"))[1]
        assert ([r["id"] for r in one["content"]], one[total_pages]) == (ids[2:], 3)
        assert (await call(http, fake, "GET", path + "?page=-1"))[0] == 400
        assert (await call(http, fake, "GET", path + "?size=x"))[0] == 400


async def test_empty_page_and_bad_page_keys(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    """An empty list is one empty page; page_keys other than snake/camel are refused."""
    async with serve(clock, faults=FaultPlan(quirks=ServerQuirks(page_size=3))) as (fake, path):
        empty = (await call(http, fake, "GET", path))[1]
        assert (empty["content"], empty["total_pages"], empty["empty"], empty["last"]) == (
            [],
            0,
            True,
            True,
        )
    with pytest.raises(ValueError, match="page_keys"):
        ServerQuirks(page_keys="kebab")


async def test_single_refund_get(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    """GET /orders/{id}/refunds/{refund_id} finds a refund of that order only."""
    async with FakeViolet(orders=2, clock=clock) as fake:
        (o1, b1), (o2, _) = fake.seeded
        path = f"/orders/{o1}/bags/{b1}/refunds"
        refund = (await call(http, fake, "POST", path, {"amount_refunded": 5}))[1]
        status, found, _ = await call(http, fake, "GET", f"/orders/{o1}/refunds/{refund['id']}")
        assert (status, found) == (200, refund)
        assert (await call(http, fake, "GET", f"/orders/{o2}/refunds/{refund['id']}"))[0] == 404
        assert (await call(http, fake, "GET", f"/orders/{o1}/refunds/1"))[0] == 404
        assert (await call(http, fake, "GET", f"/orders/{o1}/refunds/x"))[0] == 404
        assert fake.ledger.requests["get_refund"] == 4


async def test_another_actor_refund(clock: FakeClock, http: aiohttp.ClientSession) -> None:
    """Another system's refunds are committed and listed but counted apart; they can be
    back-dated or carry a null date_created."""
    async with serve(clock) as (fake, path):
        order_id, bag_id = fake.seeded[0]
        old = fake.another_actor_refund(order_id, bag_id, 100, reason="dashboard", age_seconds=3600)
        assert old["date_created"].startswith("2023-11-14T21:13:20")
        undated = fake.another_actor_refund(order_id, bag_id, 100, date=None)
        ours = (await call(http, fake, "POST", path, {"amount_refunded": 100}))[1]
        listed = (await call(http, fake, "GET", path))[1]
        assert [r["id"] for r in listed] == [old["id"], undated["id"], ours["id"]]
        assert listed[1]["date_created"] is None
        assert fake.ledger.external_refunds_per_bag[bag_id] == 2
        assert fake.ledger.refunds_per_bag[bag_id] == 1
        assert [c.route for c in fake.ledger.commits_per_bag[bag_id]] == [
            "external",
            "external",
            "refund",
        ]
        [post] = fake.ledger.posts_per_bag[bag_id]
        assert post.refund_id == ours["id"]


async def test_timeout_then_commit_holds_until_the_clock_passes(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """TIMEOUT_THEN_COMMIT holds the request unanswered; the commit lands
    late_commit_delay after arrival while still held; the hold ends in a gateway 504
    when the fake's clock passes hang_seconds."""
    plan = FaultPlan(late_commit_delay=2.5, hang_seconds=30.0)
    async with serve(clock, faults=plan) as (fake, path):
        bag_id = fake.seeded[0][1]
        fake.script("refund", Fault.TIMEOUT_THEN_COMMIT, bag_id=bag_id)
        post = asyncio.ensure_future(call(http, fake, "POST", path, {"amount_refunded": 1}))
        await fake.wait_held(1)
        assert fake.held == 1
        clock.advance(2.5)
        assert fake.ledger.refunds_per_bag[bag_id] == 1
        assert not post.done()
        clock.advance(27.5)
        status, body, _ = await post
        assert (status, body) == (504, "upstream request timeout")
        await fake.wait_held(0)


async def test_timeout_then_commit_ends_when_the_client_hangs_up(
    clock: FakeClock, http: aiohttp.ClientSession
) -> None:
    """A client giving up ends the hold; the commit still lands on the clock; stop()
    releases holds (gateway 504) instead of waiting for them."""
    async with serve(clock) as (fake, path):
        bag_id = fake.seeded[0][1]
        fake.script("refund", Fault.TIMEOUT_THEN_COMMIT, Fault.TIMEOUT_THEN_COMMIT, bag_id=bag_id)
        post = asyncio.ensure_future(call(http, fake, "POST", path, {"amount_refunded": 1}))
        await fake.wait_held(1)
        post.cancel()
        await fake.wait_held(0)
        clock.advance(fake.faults.plan.late_commit_delay)
        assert fake.ledger.refunds_per_bag[bag_id] == 1
        held = asyncio.ensure_future(call(http, fake, "POST", path, {"amount_refunded": 1}))
        await fake.wait_held(1)
    assert (await held)[0] == 504  # stop() let it go with the gateway's answer
    assert fake.ledger.refunds_per_bag[bag_id] == 2  # and landed its commit


async def test_drop_after_client_left_is_not_an_assertion() -> None:
    """A drop fault on a request whose client already disconnected (transport None)
    ends the handler quietly instead of raising AssertionError."""
    from violet_async.testing._server import _Dropped

    class Gone:
        transport = None

    async def dropping(_: object) -> web.StreamResponse:
        raise _Dropped

    with pytest.raises(asyncio.CancelledError):
        await FakeViolet()._errors(Gone(), dropping)  # type: ignore[arg-type]


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
async def test_ipv6_base_url(http: aiohttp.ClientSession) -> None:
    """host="::1" gives http://[::1]:PORT/v1, and it answers."""
    async with FakeViolet(orders=1, host="::1") as fake:
        assert re.fullmatch(r"http://\[::1\]:\d+/v1", fake.base_url)
        order_id, _ = fake.seeded[0]
        assert (await call(http, fake, "GET", f"/orders/{order_id}"))[0] == 200


async def test_wildcard_bind_gets_a_loopback_base_url(http: aiohttp.ClientSession) -> None:
    """host="0.0.0.0" listens everywhere but hands clients 127.0.0.1."""
    async with FakeViolet(orders=1, host="0.0.0.0") as fake:  # noqa: S104 - the point of the test
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", fake.base_url)
        order_id, _ = fake.seeded[0]
        assert (await call(http, fake, "GET", f"/orders/{order_id}"))[0] == 200


def test_client_host_forms() -> None:
    """Base-URL hosts: names kept, IPv6 bracketed, wildcards mapped to loopback."""
    from violet_async.testing._wire import client_host

    assert client_host("localhost") == "localhost"
    assert client_host("127.0.0.1") == "127.0.0.1"
    assert client_host("::1") == "[::1]"
    assert client_host("::") == "[::1]"
    assert client_host("0.0.0.0") == "127.0.0.1"  # noqa: S104 - a wildcard is the input


def test_plans_turn_on_the_quirks() -> None:
    """chaos() adds the gateway faults but not the held ones, with moderate quirks;
    hostile() has everything; moderate() lags a little and commits late; a read never
    draws a commit fault."""
    from violet_async.testing._faults import COMMIT_FAULTS, FaultDrawer

    chaos, hostile, moderate = FaultPlan.chaos(1), FaultPlan.hostile(1), FaultPlan.moderate(1)
    assert Fault.HTTP_524_AFTER_COMMIT in chaos.rates
    assert Fault.TIMEOUT_THEN_COMMIT not in chaos.rates
    assert chaos.quirks.list_lag > 0
    assert chaos.quirks.page_size is not None
    assert chaos.quirks.naive_dates
    assert Fault.TIMEOUT_THEN_COMMIT in hostile.rates
    assert hostile.quirks.page_keys == "camel"
    assert hostile.quirks.server_clock_skew != 0
    assert moderate.quirks.list_lag == 0.05
    assert Fault.LATE_COMMIT in moderate.rates
    drawer = FaultDrawer(hostile)
    reads = {drawer.draw("list_refunds", mutating=False) for _ in range(2_000)}
    assert not reads & COMMIT_FAULTS
