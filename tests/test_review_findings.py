"""The adversarial review's findings, each reproduced against a hostile server of our
own and each asserting the true outcome now: one refund, and what the caller sees
agrees with the server."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    BagPendingError,
    PendingRefund,
    RefundBagRequest,
    RequestValidationError,
    ResponseFormatError,
    RetryPolicy,
    SkuRefund,
    Timeouts,
    VioletError,
)
from violet_async._journal import JournalWriteError
from violet_async.batch import BatchItem, Journal, run_batch
from violet_async.testing import FakeClock, FakeViolet

from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, VIOLET_500, Hostile, Step, hostile_client

ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)


class Skewed:
    """One machine's view of a shared FakeClock: its wall clock is ``ahead`` s ahead."""

    def __init__(self, clock: FakeClock, ahead: float) -> None:
        self.clock, self.ahead = clock, ahead

    def monotonic(self) -> float:
        return self.clock.monotonic()

    def time(self) -> float:
        return self.clock.time() + self.ahead

    async def sleep(self, seconds: float) -> None:
        await self.clock.sleep(seconds)


@pytest.mark.parametrize("ahead", [30.0, -30.0])
async def test_resume_on_a_machine_with_another_clock_finds_the_refund(ahead: float) -> None:
    """A pending record made on a machine whose clock is 30 s off, resumed on one with
    the right clock: its times are moved onto the new clock, the refund is found, and
    nothing is re-sent."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=2.5)])
    policy = RetryPolicy(deadline=2.0)
    async with hostile_client(server, retry=policy, clock=Skewed(clock, ahead)) as first:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert info.value.pending is not None
    stored = info.value.pending.to_json()
    clock.advance(5.0)
    server._stopping = asyncio.Event()
    async with hostile_client(server, retry=ROOMY) as second:
        refund = await second.resume(PendingRefund.from_json(stored))
    assert refund.id == server.ours[0]
    assert server.posts == 1


async def test_another_attempts_failed_refund_is_never_this_calls_outcome() -> None:
    """A FAILED refund of the same amount made a second earlier (another attempt):
    never reported as this call's outcome; ours, landing later, is."""
    server = Hostile(FakeClock(), script=[Step(504, GATEWAY_504, commit_after=2.5)])
    failed = server.add_refund(300, age=1.0)
    failed["status"] = "FAILED"
    async with hostile_client(server, retry=ROOMY) as client:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert server.posts == 1


class MislabelledDates(Hostile):
    """date_created in US server-local time, labelled 'Z' (a LocalDateTime plus 'Z')."""

    def _date(self, when: float | None) -> str | None:
        if when is None:
            return None
        local = datetime.fromtimestamp(when, timezone(timedelta(hours=-5)))
        return local.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("baseline", [False, True])
async def test_dates_with_a_wrong_offset_never_refund_twice(baseline: bool) -> None:
    """Our own refund dated five hours 'before' the send by a wrong offset: pending for
    review, never re-sent (with or without a baseline)."""
    server = MislabelledDates(FakeClock(), script=[Step(504, GATEWAY_504, commit_after=2.5)])
    policy = RetryPolicy(deadline=300.0, read_before_send=baseline)
    async with hostile_client(server, retry=policy) as client:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert len(server.ours) == 1
    assert server.posts == 1


class IgnoresPage(Hostile):
    """A paged list whose server ignores ?page= (always page 0 of 2)."""

    async def _list(self, request: web.Request) -> web.Response:
        self.reads += 1
        data = {"content": [], "number": 0, "size": 2, "total_pages": 2, "last": False}
        return web.Response(body=orjson.dumps(data), content_type="application/json")


async def test_a_server_that_ignores_page_fails_the_read() -> None:
    """A server answering page 0 whatever page is asked: the read fails at once (a
    partial list is never the whole), no endless following."""
    server = IgnoresPage(FakeClock())
    async with hostile_client(server, retry=RetryPolicy(deadline=None)) as client:
        with pytest.raises(ResponseFormatError, match="asked for page 1, got 0"):
            await client.list_bag_refunds(ORDER_ID, BAG_ID)
    assert server.reads == 2


class ShrinkingPages(Hostile):
    """Page 0 counts three refunds and says more pages follow; page 1 says it is the
    last and holds one: two refunds read of three counted."""

    async def _list(self, request: web.Request) -> web.Response:
        self.reads += 1
        page = int(request.query.get("page", "0"))
        refund = {"id": 700 + page, "order_id": ORDER_ID, "bag_id": BAG_ID, "amount": 1}
        data: dict[str, object] = {"content": [refund], "number": page, "size": 1}
        data |= {"total_elements": 3, "last": False} if page == 0 else {"last": True}
        return web.Response(body=orjson.dumps(data), content_type="application/json")


async def test_pages_that_hold_fewer_refunds_than_the_first_counted_fail_the_read() -> None:
    """Refunds are never deleted: a read whose pages hold fewer refunds than the first
    page counted has a gap, and a gap is never taken for the whole list."""
    server = ShrinkingPages(FakeClock())
    async with hostile_client(server, retry=RetryPolicy(deadline=None)) as client:
        with pytest.raises(ResponseFormatError, match="hold 2 refunds, the first page counted 3"):
            await client.list_bag_refunds(ORDER_ID, BAG_ID)
    assert server.reads == 2


class SlowLogin(Hostile):
    async def _login(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.4)
        return await super()._login(request)


async def test_login_time_is_charged_to_the_call() -> None:
    """A slow login, then a POST that hangs and read-backs that hang: the call still
    ends within its deadline (real clock)."""
    server = SlowLogin(FakeClock(), script=[Step(504, hang=True, commit_after=None)])
    server.hang_reads = True
    timeouts = Timeouts(connect=5, read=5)
    policy = RetryPolicy(deadline=0.8)
    async with hostile_client(server, retry=policy, timeouts=timeouts, clock=None) as client:
        started = time.monotonic()
        with pytest.raises(VioletError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        elapsed = time.monotonic() - started
    assert elapsed < 0.8 + 1.5, elapsed  # not the 5 s timeouts


@pytest.mark.parametrize("status", [599, 598, 530, 500])
async def test_a_5xx_without_violets_body_gets_the_long_window(status: int) -> None:
    """A proxy's 599 / 598, a 530 or an HTML 500: not Violet's error JSON, so the
    request may still be running: the refund committing 10 s later is found."""
    page = b"<html>network read timeout</html>"
    server = Hostile(FakeClock(), script=[Step(status, page, commit_after=10.0)])
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert refund.id == server.ours[0]
    assert server.posts == 1


class SplitsSkuLines(Hostile):
    """The platform records a 2-unit SKU refund as two 1-unit lines."""

    def _commit(self, body: dict[str, Any], *, cancel: bool) -> dict[str, Any] | str:
        record = super()._commit(body, cancel=cancel)
        if isinstance(record, dict) and body.get("skus"):
            record["skus"] = [
                {"order_sku_id": s["order_sku_id"], "quantity_refunded": 1}
                for s in body["skus"]
                for _ in range(s["quantity_refunded"])
            ]
        return record


async def test_sku_refund_listed_as_single_units_is_found() -> None:
    """SKU-only refund of 2 units, listed by the platform as two 1-unit lines: it is
    the same refund, found, never sent again."""
    server = SplitsSkuLines(FakeClock(), script=[Step(504, GATEWAY_504)])
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.refund_bag(
            ORDER_ID, BAG_ID, skus=[SkuRefund(order_sku_id=10, quantity_refunded=2)]
        )
    assert refund.id == server.ours[0]
    assert server.posts == 1


class DupAcrossPages(Hostile):
    """Newest first; refunds land between page reads, so a refund shows on two pages."""

    async def _list(self, request: web.Request) -> web.Response:
        page = int(request.query.get("page", "0"))
        if page == 0 and not getattr(self, "_first", False):
            self._first = True
            self.add_refund(50, reason="other actor")
        if page == 1 and not getattr(self, "_shifted", False):
            self._shifted = True
            self.add_refund(60, reason="other actor")
        self.reads += 1
        now = self.clock.monotonic()
        visible = list(reversed([r for r in self.refunds if r["_visible_at"] <= now]))
        size = 2
        pages = max(1, -(-len(visible) // size))
        data = {
            "content": [
                {k: v for k, v in r.items() if not k.startswith("_")}
                for r in visible[page * size : (page + 1) * size]
            ],
            "number": page,
            "size": size,
            "total_pages": pages,
            "last": page + 1 >= pages,
        }
        return web.Response(body=orjson.dumps(data), content_type="application/json")


async def test_a_refund_shown_on_two_pages_counts_once() -> None:
    """A refund repeated across pages (the list shifted between reads) is one refund:
    ours is found, not taken for two matches."""
    server = DupAcrossPages(FakeClock(), script=[Step(504, GATEWAY_504)])
    server.add_refund(10, age=100_000)
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert refund.id == server.ours[0]


class OneBasedNoLast(Hostile):
    """Pages numbered from 1 ('number' echoes the page asked), no 'last'."""

    async def _list(self, request: web.Request) -> web.Response:
        self.reads += 1
        page = int(request.query.get("page", "1"))
        now = self.clock.monotonic()
        visible = [r for r in self.refunds if r["_visible_at"] <= now]
        size = 2
        pages = max(1, -(-len(visible) // size))
        data = {
            "content": [
                {k: v for k, v in r.items() if not k.startswith("_")}
                for r in visible[(page - 1) * size : page * size]
            ],
            "number": page,
            "size": size,
            "total_pages": pages,
        }
        return web.Response(body=orjson.dumps(data), content_type="application/json")


async def test_pages_numbered_from_one_are_read_to_the_end() -> None:
    """Pages numbered from 1 without 'last': the count of pages is read from where the
    server starts, and the refund on the last page is found."""
    server = OneBasedNoLast(FakeClock(), script=[Step(504, GATEWAY_504)])
    for _ in range(4):
        server.add_refund(10, age=100_000)
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert refund.id == server.ours[0]
    assert server.posts == 1


async def test_a_lagging_foreign_refund_older_than_the_send_is_not_claimed() -> None:
    """read_before_send: another system refunded 300 ten seconds before our send and
    the list shows it late, after the baseline. Ours never applied: the foreign refund
    is never returned as ours (it goes to review)."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    other = server.add_refund(300, age=10.0)
    other["_visible_at"] = clock.monotonic() + 12.0
    policy = RetryPolicy(deadline=300.0, read_before_send=True)
    async with hostile_client(server, retry=policy) as client:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert server.ours == []


async def test_a_pending_ask_keeps_a_later_ask_on_the_bag_from_claiming_its_refund() -> None:
    """Call 1 ends pending (its commit lands after its deadline). Call 2 on the same bag
    and amount is refused before sending (it could claim call 1's refund); call 1's
    resume then finds its refund. One refund, each outcome true."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=30.0)])
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        with pytest.raises(AmbiguousOutcomeError) as first:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        with pytest.raises(BagPendingError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        assert first.value.pending is not None
        clock.advance(60.0)
        refund = await client.resume(first.value.pending)
    assert refund.id == server.ours[0]
    assert server.posts == 1


async def test_a_cancelled_waiter_for_the_bag_lets_the_next_one_through() -> None:
    """An ask cancelled while it waits for the bag: the next ask still gets it, and
    the two asks that ran made two refunds with two ids."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=1.5)])
    async with hostile_client(server, retry=ROOMY) as client:
        a = asyncio.create_task(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=100))
        await asyncio.sleep(0)
        b = asyncio.create_task(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=100))
        await asyncio.sleep(0)
        b.cancel()
        c = asyncio.create_task(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=100))
        first, third = await asyncio.wait_for(asyncio.gather(a, c), 10)
        assert b.cancelled()
    assert first.id != third.id
    assert sorted([first.id, third.id]) == sorted(server.ours)


async def test_token_expired_mid_ask_is_one_refund() -> None:
    """401 "Token has expired" on the POST (refresh, repeat), then a 504 after the
    commit: one refund, found by read-back."""
    body = orjson.dumps({"status": 401, "message": "Token has expired", "error_code": 11})
    server = Hostile(
        FakeClock(), script=[Step(401, body, commit_after=None), Step(504, GATEWAY_504)]
    )
    async with hostile_client(server, retry=ROOMY) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert refund.reconciled
    assert server.ours == [refund.id]
    assert server.posts == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("phase", "bogus"),
        ("sends", -1),
        ("baseline", ["x"]),
        ("first_sent_at", "nan"),
        ("settle_until", float("inf")),
        ("order_id", True),
    ],
)
def test_tampered_records_are_refused(key: str, value: object) -> None:
    """A stored record with a bad field is refused, never resumed."""
    good = PendingRefund(
        "refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=1), sends=1, first_sent_at=1.0
    ).to_dict()
    with pytest.raises(RequestValidationError):
        PendingRefund.from_dict({**good, key: value})


async def test_closing_run_batch_early_does_not_hang() -> None:
    """A consumer that stops reading and closes the iterator while results are queued:
    the close returns, the tasks are cancelled."""
    clock = FakeClock()
    async with FakeViolet(orders=10, seed=3, clock=clock) as fake:
        async with fake.client(retry=ROOMY, clock=clock) as client:
            items = [
                BatchItem.refund(n, o, b, RefundBagRequest(amount_refunded=100))
                for n, (o, b) in enumerate(fake.seeded, start=1)
            ]
            results = run_batch(client, items, concurrency=1)
            async for _ in results:
                break
            await asyncio.sleep(0.2)  # the bounded result queue fills up
            await asyncio.wait_for(results.aclose(), 5.0)


async def test_a_parked_item_keeps_its_bag_from_the_next_item() -> None:
    """Two batch lines on one bag; the first parks (504, its refund commits 2.5 s
    later). The second waits for the bag: each line ends with its own refund, one each."""
    clock = FakeClock()
    script = [Step(504, GATEWAY_504, commit_after=2.5), Step(504, GATEWAY_504, commit_after=None)]
    server = Hostile(clock, script=script)
    async with hostile_client(server, retry=ROOMY) as client:
        items = [
            BatchItem.refund(n, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300))
            for n in (1, 2)
        ]
        results = {r.item.line: r async for r in run_batch(client, items, concurrency=2)}
    assert results[1].outcome == "succeeded"
    assert results[2].outcome == "succeeded"
    assert results[1].refund_id == server.ours[0]
    assert results[2].refund_id == server.ours[1]
    assert len(server.ours) == 2


async def test_a_failed_journal_write_stops_the_batch(tmp_path: Any) -> None:
    """A journal write that fails (a full disk) stops the batch with the error; the
    item is never journaled "failed" although its refund applied."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=2.5)])
    path = tmp_path / "j.jsonl"
    log = await Journal.open(path, input_id=None)
    real, failed_once = log.record, []

    async def flaky(*args: Any, **fields: Any) -> None:
        if "pending" in args and not failed_once:
            failed_once.append(1)
            raise JournalWriteError("could not write the journal: [Errno 28] No space left")
        await real(*args, **fields)

    log.record = flaky  # type: ignore[method-assign]
    item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300))
    async with hostile_client(server, retry=ROOMY) as client:
        with pytest.raises(JournalWriteError):
            _ = [r async for r in run_batch(client, [item], journal=log)]
    await log.aclose()
    states = [orjson.loads(line).get("state") for line in path.read_bytes().splitlines()]
    assert "failed" not in states
    assert "sent" in states


async def test_a_list_lagging_past_the_window_ends_for_review_never_twice() -> None:
    """Whole-bag refund, Violet's 500, a list lagging 90 s (past the window): the bag
    reads REFUNDED but shows no refund after the window, so the item ends unknown for a
    person (its record resumes later), never re-sent and never reported failed."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(500, VIOLET_500)], list_lag=90.0)
    async with hostile_client(server, retry=ROOMY) as client:
        items = [BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest())]
        results = [r async for r in run_batch(client, items)]
        assert results[0].outcome == "unknown"
        error = results[0].error
        assert isinstance(error, AmbiguousOutcomeError)
        assert error.pending is not None
        assert error.pending.needs_review
        clock.advance(100.0)
        refund = await client.resume(error.pending)
    assert refund.id == server.ours[0]
    assert server.posts == 1


async def test_a_new_call_on_a_bag_with_a_pending_one_is_refused() -> None:
    """A client that left a refund pending on a bag refuses a new ask on it (nothing
    sent, BagPendingError) until the pending one is resumed."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=30.0)])
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        with pytest.raises(AmbiguousOutcomeError) as pending:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        with pytest.raises(BagPendingError) as refused:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        assert refused.value.pending == (pending.value.pending,)
        assert server.posts == 1
        clock.advance(60.0)
        first = await client.resume(PendingRefund.from_json(pending.value.pending.to_json()))
        second = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
    assert [first.id, second.id] == server.ours
