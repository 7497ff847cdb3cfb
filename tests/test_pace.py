"""Pace per merchant: a 429 never fails a row, and one strict merchant slows only itself."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from violet_async import RateLimitError, RetryPolicy, batch
from violet_async._ask import PendingRefund, Phase, Settings
from violet_async._pace import DECREASE, RECOVER, MerchantPace
from violet_async._protocol import Do, Observation, start, step
from violet_async.batch import MAX_DEFERRALS, BatchItem, run_batch
from violet_async.models import RefundBagRequest
from violet_async.testing import FakeClock, FakeViolet

from .conftest import make_client
from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client

STRICT = 20001
TOO_MANY = orjson.dumps({"status": 429, "message": "Too Many Requests", "error_code": 4290})


def _rate_limited(retry_after: str | None = "1") -> RateLimitError:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return RateLimitError(
        "Too Many Requests",
        status=429,
        body=TOO_MANY,
        headers=headers,
        error_code=4290,
        method="POST",
        path="/orders/1/bags/2/refunds",
    )


# -- the protocol -------------------------------------------------------------------


def test_a_deferred_429_ends_absent_and_resumes_as_a_send() -> None:
    """With defer_rate_limited a 429 ends the ask ABSENT (not FAILED) with DEFER and
    the backoff; resuming it reads the bag, then sends again with a fresh attempt
    budget."""
    settings = Settings(max_attempts=1, defer_rate_limited=True)
    ask = PendingRefund("refund", 1, 2, RefundBagRequest(amount_refunded=100))
    ask, action = start(ask, settings, 100.0, attempt_timeout=30)
    assert action.do is Do.SEND
    obs = Observation.send_failed(100.0, _rate_limited(), backoff=1.5)
    ask, action = step(ask, obs, settings, 100.1, None)
    assert (ask.phase, action.do, action.delay) == (Phase.ABSENT, Do.DEFER, 1.5)
    assert action.final
    again, action = start(ask, settings, 102.0, attempt_timeout=30)
    # The bag is read first (review 28: what it lists then is never this ask's).
    assert (again.phase, action.do, again.sends, again.budget_from) == (Phase.ABSENT, Do.READ, 1, 1)
    again, action = step(again, Observation.read(102.0, []), settings, 102.0, None)
    assert (again.phase, action.do, again.sends, again.budget_from) == (Phase.SENT, Do.SEND, 2, 1)


def test_without_defer_a_429_out_of_budget_still_fails() -> None:
    """A direct call (no batch pacing) keeps its behaviour: out of attempts, FAILED."""
    settings = Settings(max_attempts=1)
    ask = PendingRefund("refund", 1, 2, RefundBagRequest(amount_refunded=100))
    ask, _ = start(ask, settings, 100.0, attempt_timeout=30)
    ask, action = step(ask, Observation.send_failed(100.0, _rate_limited()), settings, 100.1, None)
    assert (ask.phase, action.do) == (Phase.FAILED, Do.FAIL)


# -- the lanes ----------------------------------------------------------------------


def test_a_merchant_has_no_lane_until_its_first_429() -> None:
    """Before any 429 nothing is paced; the 429 makes a lane that spaces sends and
    waits out Retry-After; other merchants stay unpaced."""
    pace = MerchantPace()
    assert pace.reserve(STRICT, 0.0) is None
    for at in (0.0, 0.5, 1.0, 1.5):
        pace.succeeded(STRICT, at)
    lane = pace.limited(STRICT, 1.6, retry_after=0.5)
    assert pace.learning
    # Four successes in the last 1.6 s, but never more than one send per Retry-After.
    assert lane.rate == pytest.approx(2.0)
    assert MerchantPace().limited(STRICT, 0.0, retry_after=0.01).rate == 1.0  # none seen
    first = pace.reserve(STRICT, 1.6)
    second = pace.reserve(STRICT, 1.6)
    assert first is not None
    assert second is not None
    assert first[0] == pytest.approx(2.1)  # not before Retry-After
    assert second[0] - first[0] == pytest.approx(1 / lane.rate)
    assert pace.reserve(STRICT + 1, 1.6) is None


def test_a_wave_of_429s_slows_a_lane_once() -> None:
    """429s from sends already in flight count once (once per 1 / rate); each slowdown
    voids the slots reserved before it."""
    pace = MerchantPace()
    pace.limited(STRICT, 0.0, retry_after=0.25)
    lane = pace.lanes[STRICT]
    rate = lane.rate
    slot = pace.reserve(STRICT, 1.0)
    assert slot is not None
    pace.limited(STRICT, 1.0, retry_after=0.0)
    pace.limited(STRICT, 1.01, retry_after=0.0)
    assert lane.rate == pytest.approx(rate * DECREASE)
    assert not lane.probing
    assert not pace.current(STRICT, slot[1])
    # A success climbs quickly back toward the rate the 429 came at, then slowly past it.
    pace.succeeded(STRICT, 1.5)
    assert lane.rate == pytest.approx(rate * DECREASE + (rate - rate * DECREASE) * RECOVER)
    for _ in range(20):
        pace.succeeded(STRICT, 2.0)
    assert 0.95 * rate <= lane.rate < 1.1 * rate


def test_successes_probe_a_lane_up() -> None:
    """After its first 429 a lane grows fast until its second, then slowly."""
    pace = MerchantPace(max_rate=10.0)
    pace.limited(STRICT, 0.0, retry_after=0.5)
    lane = pace.lanes[STRICT]
    before = lane.rate
    pace.succeeded(STRICT, 1.0)
    assert lane.rate == pytest.approx(before * 1.25)
    for _ in range(50):
        pace.succeeded(STRICT, 2.0)
    assert lane.rate == 10.0  # the global cap


def test_lane_queues_release_in_order_at_the_lanes_pace() -> None:
    """Entries queued on a lane come out one per slot, one already answered 429 first."""
    pace = MerchantPace()
    pace.limited(STRICT, 0.0, retry_after=1.0)
    pace.lanes[STRICT].rate = 2.0
    pace.wait_in_lane(STRICT, "a")
    pace.wait_in_lane(STRICT, "b")
    pace.wait_in_lane(STRICT, "first", first=True)
    assert pace.waiting == 3
    assert pace.release(0.5) == []
    assert pace.next_due() == pytest.approx(1.0)
    assert [entry for entry, _ in pace.release(1.0)] == ["first"]
    assert [entry for entry, _ in pace.release(1.5)] == ["a"]
    assert pace.take_all() == ["b"]
    assert pace.next_due() is None


# -- a batch on FakeViolet ------------------------------------------------------------


def _interleaved(fake: FakeViolet, *, merchant_column: bool = False) -> list[BatchItem]:
    items = []
    for line, (order_id, bag_id) in enumerate(fake.seeded, 1):
        merchant = fake.bag(order_id, bag_id).merchant_id if merchant_column else None
        items.append(BatchItem.refund(line, order_id, bag_id, merchant_id=merchant))
    return items


@pytest.mark.parametrize("merchant_column", [False, True])
async def test_one_strict_merchant_among_four(merchant_column: bool) -> None:
    """4 merchants x 16 rows, interleaved; merchant 20001's platform lets 2 refunds/s
    through, the others 25/s. Every row succeeds, once; the strict merchant's 429s stay
    few, and the other merchants' rows are not held behind it."""
    clock = FakeClock()
    async with FakeViolet(
        orders=64,
        seed=5,
        clock=clock,
        merchants=4,
        merchant_limits={STRICT: 2.0},
        merchant_limit=25.0,
    ) as fake:
        async with make_client(fake, clock) as client:
            finished: dict[int, list[float]] = collections.defaultdict(list)
            results = []
            async for result in run_batch(
                client, _interleaved(fake, merchant_column=merchant_column), concurrency=4
            ):
                merchant = fake.bag(result.item.order_id, result.item.bag_id).merchant_id
                finished[merchant].append(clock.monotonic())
                results.append(result)
        limits = fake.merchant_limits
        assert limits is not None
        assert fake.ledger.double_refunds() == {}
        strict_429s = limits.buckets[STRICT].limited
    assert [r.outcome for r in results] == ["succeeded"] * 64
    # Unpaced, nearly every strict row would be refused at least once. (The virtual
    # clock moves with every row's sleep, so the lane's timing is coarser than in real
    # time: benchmarks/bench_pace.py measures the real-time goal of a quarter.)
    assert strict_429s <= 16 // 2, strict_429s
    assert sum(r.rate_limited for r in results) >= strict_429s
    assert all(r.requests >= 2 for r in results)  # a baseline read and the POST
    # Nobody else waited for the strict merchant: their last rows ended before its.
    strict_end = max(finished[STRICT])
    assert all(max(times) < strict_end for m, times in finished.items() if m != STRICT)


async def test_a_429_never_ends_a_row_failed(tmp_path: Path) -> None:
    """A merchant that answers 429 five times in a row: the row waits its turn each
    time (no real sleep), then succeeds with one refund; the 429s are counted."""
    clock = FakeClock()
    server = Hostile(clock)
    server.script = [Step(429, TOO_MANY, commit_after=None)] * 5 + [Step()]
    async with hostile_client(server, retry=RetryPolicy(max_attempts=2, jitter=False)) as client:
        item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=100))
        journal = tmp_path / "run.jsonl"
        results = [r async for r in run_batch(client, [item], journal=journal)]
    assert [r.outcome for r in results] == ["succeeded"]
    assert (results[0].rate_limited, server.posts, server.refunded) == (5, 6, 100)
    # One baseline read, six POSTs, one read of the bag's refunds before each of the
    # five re-sends (review 28), and one read of the order for its merchant (after the
    # first 429; this server's order names none, so it is not read again).
    assert results[0].requests == 13


async def test_a_row_out_of_waits_ends_not_sent_and_the_next_run_sends_it(
    tmp_path: Path,
) -> None:
    """A merchant that keeps answering 429 past the run's limit: the row ends not_sent
    (nothing applied), never failed, and a second run on the journal sends it once."""
    clock = FakeClock()
    server = Hostile(clock)
    server.script = [Step(429, TOO_MANY, commit_after=None)] * (MAX_DEFERRALS + 1)
    journal = tmp_path / "run.jsonl"
    item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=100))
    async with hostile_client(server, retry=RetryPolicy(jitter=False)) as client:
        first = [r async for r in run_batch(client, [item], journal=journal)]
        assert [r.outcome for r in first] == ["not_sent"]
        assert isinstance(first[0].error, RateLimitError)
        assert server.refunded == 0
        second = [r async for r in run_batch(client, [item], journal=journal)]
    assert [r.outcome for r in second] == ["succeeded"]
    assert server.refunded == 100


async def test_rows_waiting_for_a_strict_merchant_hold_the_input_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Memory stays bounded: once a few rows wait for their merchant's turn, no more
    input is read until some have gone."""
    monkeypatch.setattr(batch, "WAITING_PER_SLOT", 1)
    monkeypatch.setattr(batch, "MIN_WAITING", 4)
    clock = FakeClock()
    async with FakeViolet(
        orders=30, seed=6, clock=clock, merchants=1, merchant_limits={STRICT: 2.0}
    ) as fake:
        read = 0

        def rows() -> Iterator[BatchItem]:
            nonlocal read
            for item in _interleaved(fake, merchant_column=True):
                read += 1
                yield item

        ended = 0
        most_ahead = 0
        async with make_client(fake, clock) as client:
            async for result in run_batch(client, rows(), concurrency=2):
                assert result.outcome == "succeeded"
                ended += 1
                most_ahead = max(most_ahead, read - ended)
        assert ended == 30
        assert fake.ledger.double_refunds() == {}
    assert most_ahead <= 4 + 2 + 2  # waiting, in flight, and the row being placed


async def test_a_run_stopped_while_a_row_waits_ends_it_not_sent(tmp_path: Path) -> None:
    """Ctrl-C while a row waits for its turn after a 429: it ends not_sent (nothing was
    applied), its journal entry says so, and the next run sends it once."""
    clock = FakeClock()
    server = Hostile(clock)
    server.script = [Step(429, TOO_MANY, commit_after=None)]
    journal = tmp_path / "run.jsonl"
    item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=100))
    stop = asyncio.Event()

    async def ctrl_c() -> None:
        await server.post_arrived.wait()
        stop.set()

    async with hostile_client(server, retry=RetryPolicy(jitter=False)) as client:
        pressing = asyncio.create_task(ctrl_c())
        first = [r async for r in run_batch(client, [item], journal=journal, stop=stop)]
        await pressing
        assert [r.outcome for r in first] == ["not_sent"]
        assert (server.posts, server.refunded) == (1, 0)
        lines = [orjson.loads(line) for line in journal.read_bytes().splitlines()]
        assert lines[-1]["state"] == "unsent"
        second = [r async for r in run_batch(client, [item], journal=journal)]
    assert [r.outcome for r in second] == ["succeeded"]
    assert (server.posts, server.refunded) == (2, 100)


async def test_a_send_after_a_429_that_may_have_applied_is_read_back_not_resent() -> None:
    """After a 429 and its wait, the next send times out at a gateway while Violet
    commits it 2 s later: the row is read back and found, never sent a third time."""
    clock = FakeClock()
    server = Hostile(clock)
    server.script = [Step(429, TOO_MANY, commit_after=None), Step(504, GATEWAY_504, 2.0)]
    async with hostile_client(server, retry=RetryPolicy(jitter=False)) as client:
        item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=100))
        results = [r async for r in run_batch(client, [item], patience=120.0)]
    assert [(r.outcome, r.reconciled) for r in results] == [("succeeded", True)]
    assert (server.posts, server.refunded) == (2, 100)
