"""Batch runner and journal, on FakeViolet with a real file journal."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import attrs
import orjson
import pytest

from violet_async import (
    AmbiguousOutcomeError,
    CancelBagRequest,
    NotFoundError,
    RefundBagRequest,
    RetryPolicy,
    VioletClient,
)
from violet_async.batch import (
    AdaptiveRate,
    BatchItem,
    Journal,
    JournalLockedError,
    JournalMismatchError,
    run_batch,
)
from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan

from .conftest import make_client, ours


def items_for(fake: FakeViolet, count: int | None = None) -> list[BatchItem]:
    pairs = fake.seeded[:count] if count else fake.seeded
    return [
        BatchItem.cancel(n, o, b)
        if n % 4 == 0
        else BatchItem.refund(n, o, b, RefundBagRequest(amount_refunded=100))
        for n, (o, b) in enumerate(pairs, start=1)
    ]


async def test_batch_streams_one_typed_result_per_item(
    client: VioletClient, fake: FakeViolet
) -> None:
    """Every item ends in a result; a failing item does not stop the others."""
    items = [*items_for(fake), BatchItem.refund(99, fake.seeded[0][0], 123456)]
    results = [r async for r in run_batch(client, items, concurrency=4)]
    assert len(results) == len(items)
    by_line = {r.item.line: r for r in results}
    assert by_line[99].outcome == "failed"
    assert isinstance(by_line[99].error, NotFoundError)
    assert by_line[99].error_class == "NotFoundError"
    ok = [r for r in results if r.outcome == "succeeded"]
    assert len(ok) == len(items) - 1
    assert all(r.refund is not None and r.refund_id == r.refund.id for r in ok)
    assert fake.ledger.double_refunds() == {}


async def test_batch_counts_retries_and_reconciliations(
    client: VioletClient, fake: FakeViolet
) -> None:
    """Per-item retries and reconciliation are reported on the result."""
    (o1, b1), (o2, b2) = fake.seeded[1:3]
    fake.script("refund", Fault.RATE_LIMIT_NO_HEADER, Fault.RATE_LIMIT, bag_id=b1)
    fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=b2)
    items = [BatchItem.refund(1, o1, b1), BatchItem.refund(2, o2, b2)]
    results = {r.item.line: r async for r in run_batch(client, items, concurrency=2)}
    assert (results[1].retries, results[1].rate_limited, results[1].attempts) == (2, 2, 3)
    assert results[2].reconciled
    assert fake.ledger.refunds_per_bag[b2] == 1


async def test_input_is_consumed_lazily(client: VioletClient, fake: FakeViolet) -> None:
    """The runner never pulls far ahead of what has finished (bounded memory)."""
    pulled = finished = 0
    ahead: list[int] = []
    pairs = fake.seeded

    def source() -> Iterator[BatchItem]:
        nonlocal pulled
        for n in range(200):
            pulled += 1
            ahead.append(pulled - finished)
            o, b = pairs[n % len(pairs)]
            yield BatchItem.refund(n, o, b, RefundBagRequest(amount_refunded=1))

    async for _ in run_batch(client, source(), concurrency=5):
        finished += 1
    assert finished == 200
    # 5 in flight + a results queue of 10 + the one being handed over.
    assert max(ahead) <= 5 + 10 + 2


async def test_async_iterable_input(client: VioletClient, fake: FakeViolet) -> None:
    """An async iterable of items works like a plain one."""

    async def source():  # type: ignore[no-untyped-def]
        for item in items_for(fake, 3):
            yield item

    assert len([r async for r in run_batch(client, source())]) == 3


async def test_journal_resume_skips_done_and_failed(
    client: VioletClient, fake: FakeViolet, tmp_path: Path
) -> None:
    """A second run skips done items; failed ones only with retry_failed."""
    journal = tmp_path / "run.jsonl"
    items = [*items_for(fake, 6), BatchItem.refund(50, fake.seeded[0][0], 424242)]
    first = [r async for r in run_batch(client, items, journal=journal, input_id="in-1")]
    assert sum(r.outcome == "succeeded" for r in first) == 6
    again = [r async for r in run_batch(client, items, journal=journal, input_id="in-1")]
    assert sorted(r.outcome for r in again) == ["already_done"] * 6 + ["already_failed"]
    retried = [
        r
        async for r in run_batch(client, items, journal=journal, input_id="in-1", retry_failed=True)
    ]
    assert sorted(r.outcome for r in retried) == ["already_done"] * 6 + ["failed"]
    assert fake.ledger.total_refunds == 6


async def test_sent_item_is_read_back_not_resent(
    client: VioletClient, fake: FakeViolet, tmp_path: Path
) -> None:
    """An item the journal left "sent" (crash after send) is reconciled on resume."""
    order_id, bag_id = fake.seeded[0]
    item = BatchItem.refund(1, order_id, bag_id, RefundBagRequest(amount_refunded=300))
    journal = await Journal.open(tmp_path / "j.jsonl", input_id="x")
    await journal.record(item.key + ":0", item.line, "sent")
    await journal.aclose()
    # The earlier process's request did land:
    fake.store.commit_refund(fake.bag(order_id, bag_id), {"amount_refunded": 300})
    (result,) = [
        r async for r in run_batch(client, [item], journal=tmp_path / "j.jsonl", input_id="x")
    ]
    assert result.outcome == "succeeded"
    assert result.reconciled
    assert fake.ledger.refunds_per_bag[bag_id] == 1
    assert fake.ledger.requests["refund"] == 0


async def test_sent_item_absent_is_sent_once(
    client: VioletClient, fake: FakeViolet, tmp_path: Path
) -> None:
    """A "sent" item whose request never landed is proven absent, then sent once."""
    order_id, bag_id = fake.seeded[0]
    item = BatchItem.cancel(1, order_id, bag_id, CancelBagRequest())
    journal = await Journal.open(tmp_path / "j.jsonl", input_id="x")
    await journal.record(item.key + ":0", item.line, "sent")
    await journal.aclose()
    (result,) = [
        r async for r in run_batch(client, [item], journal=tmp_path / "j.jsonl", input_id="x")
    ]
    assert result.outcome == "succeeded"
    assert not result.reconciled
    assert fake.ledger.requests["cancel"] == 1


async def test_journal_knows_items_by_content_not_line(
    client: VioletClient, fake: FakeViolet, tmp_path: Path
) -> None:
    """Moved rows stay done, an edited row is a new item, another input id is no refusal."""
    journal = tmp_path / "j.jsonl"
    items = items_for(fake, 3)
    _ = [r async for r in run_batch(client, items, journal=journal, input_id="a")]
    edited = BatchItem.refund(9, *fake.seeded[1], RefundBagRequest(amount_refunded=150))
    moved = [BatchItem(7, i.kind, i.order_id, i.bag_id, i.request) for i in (items[0], items[2])]
    again = {
        r.item.line: r.outcome
        async for r in run_batch(client, [*moved, edited], journal=journal, input_id="b")
    }
    assert again == {7: "already_done", 9: "succeeded"}
    assert fake.ledger.total_refunds == 4  # three 100s, then only the new 150
    assert fake.ledger.refunds_per_bag[fake.seeded[1][1]] == 2


async def test_identical_items_are_distinct_and_the_bag_is_the_last_guard(
    client: VioletClient, fake: FakeViolet, tmp_path: Path
) -> None:
    """Two identical rows are two refunds; with the journal lost, each refund already on
    the bag accounts for one row: one already_present, the other sent, never a third."""
    o, b = fake.seeded[0]
    same = [
        BatchItem.refund(n, o, b, RefundBagRequest(amount_refunded=100, reason="dup"))
        for n in (1, 2)
    ]
    first = [r async for r in run_batch(client, same[:1], journal=tmp_path / "one.jsonl")]
    assert [r.outcome for r in first] == ["succeeded"]
    lost = await Journal.open(tmp_path / "new.jsonl", input_id=None)
    client._shared.known_refunds = type(client._shared.known_refunds)()  # a new process
    second = sorted([r.outcome async for r in run_batch(client, same, journal=lost)])
    await lost.aclose()
    assert second == ["already_present", "succeeded"]
    assert fake.ledger.refunds_per_bag[b] == 2
    third = sorted(
        [r.outcome async for r in run_batch(client, same, journal=tmp_path / "new.jsonl")]
    )
    assert third == ["already_done", "already_present"]
    repeat = [
        r.outcome
        async for r in run_batch(client, same, journal=tmp_path / "new.jsonl", allow_repeat=True)
    ]
    assert sorted(repeat) == ["already_done", "succeeded"]
    assert fake.ledger.refunds_per_bag[b] == 3  # the operator asked for a repeat


async def test_a_second_run_on_a_held_journal_is_refused(tmp_path: Path) -> None:
    """While one run holds the journal, a second open fails at once naming the pid."""
    held = await Journal.open(tmp_path / "j.jsonl", input_id="x")
    with pytest.raises(JournalLockedError, match=f"process {os.getpid()}") as info:
        await Journal.open(tmp_path / "j.jsonl", input_id="x")
    assert info.value.pid == os.getpid()
    await held.aclose()
    again = await Journal.open(tmp_path / "j.jsonl", input_id="x")
    await again.aclose()


async def test_journal_of_another_version_is_refused(tmp_path: Path) -> None:
    """A journal with another format version is refused, suggesting a new journal."""
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"type": "header", "v": 1, "input": "x", "ts": 0}\n')
    with pytest.raises(JournalMismatchError, match="new file with --journal"):
        await Journal.open(path, input_id="x")
    # The lock was released with the refusal.
    path.unlink()
    await (await Journal.open(path, input_id="x")).aclose()


async def test_torn_last_line_is_cut_before_appending(tmp_path: Path) -> None:
    """A line cut by a crash mid-write is treated as never written and cut off, so the
    next record starts on its own line and survives a second crash."""
    path = tmp_path / "j.jsonl"
    journal = await Journal.open(path, input_id="x")
    await journal.record("k#0", 1, "sent")
    await journal.record("k#0", 1, "done", refund_id=7)
    await journal.aclose()
    with path.open("ab") as handle:
        handle.write(b'{"key": "m#0", "line": 2, "sta')
    reopened = await Journal.open(path, input_id="x")
    assert reopened.repaired == len(b'{"key": "m#0", "line": 2, "sta')
    entry = reopened.entry("k#0")
    assert entry is not None
    assert (entry.state, entry.refund_id) == ("done", 7)
    assert reopened.entry("m#0") is None
    await reopened.record("m#0", 2, "sent")
    await reopened.aclose()
    again = await Journal.open(path, input_id="x")
    entry = again.entry("m#0")
    assert entry is not None
    assert entry.state == "sent"
    assert path.read_bytes().endswith(b"\n")
    await again.aclose()


async def test_journal_group_commits(
    client: VioletClient, fake: FakeViolet, tmp_path: Path
) -> None:
    """Concurrent state changes share fsyncs, and every line is on disk."""
    journal = await Journal.open(tmp_path / "j.jsonl", input_id="x")
    items = items_for(fake)
    _ = [r async for r in run_batch(client, items, journal=journal, concurrency=8)]
    await journal.aclose()
    lines = (tmp_path / "j.jsonl").read_bytes().splitlines()
    states = [orjson.loads(line).get("state") for line in lines[1:]]
    assert states.count("sent") == states.count("done") == len(items)
    assert journal.fsyncs < len(lines)


async def test_stop_event_stops_feeding(client: VioletClient, fake: FakeViolet) -> None:
    """Once stop is set, no new item starts; in-flight ones finish."""
    stop = asyncio.Event()
    seen = 0
    async for _ in run_batch(client, items_for(fake), concurrency=2, stop=stop):
        seen += 1
        stop.set()
    assert seen < len(fake.seeded)
    assert fake.ledger.total_refunds == seen


async def test_rate_limit_spaces_calls_and_adapts() -> None:
    """The limiter spaces starts at 1/rate, halves on 429 and recovers."""
    limiter = AdaptiveRate(200.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(11):
        await limiter.wait()
    assert loop.time() - start >= 10 / 200 * 0.9
    limiter.slow_down()
    assert limiter.rate == 100.0
    for _ in range(30):
        limiter.speed_up()
    assert limiter.rate == 200.0
    for _ in range(20):
        limiter.slow_down()
    assert limiter.rate == 200.0 / 64
    with pytest.raises(ValueError, match="rate"):
        AdaptiveRate(0)


async def test_batch_rate_limit_slows_down_on_429(clock: FakeClock) -> None:
    """A 429 during a rate-limited batch halves the limiter's rate."""
    async with FakeViolet(orders=4) as fake:
        async with make_client(fake, clock) as client:
            fake.script("refund", Fault.RATE_LIMIT)
            results = [r async for r in run_batch(client, items_for(fake), rate=1000.0)]
    assert sum(r.rate_limited for r in results) == 1
    assert all(r.outcome == "succeeded" for r in results)


@pytest.mark.parametrize(("naive_dates", "count"), [(False, 1000), (True, 200)])
async def test_chaos_batch_one_refund_per_item(
    tmp_path: Path, naive_dates: bool, count: int
) -> None:
    """1,000 items on the whole chaos plan (lag, pages, skew, gateway errors after
    commits) with Violet's dates (UTC, to the second) through the runner: no double
    refunds, every outcome agrees with the ledger, and no item ends unknown (pending
    ones are parked and revisited). With naive dates (no offset), a refund found after
    a failure in flight can never be placed after the send, baseline or not: those
    items end unknown, for review, and nothing else does."""
    clock = FakeClock()  # shared: late commits and lag run on the client's clock
    chaos = FaultPlan.chaos(seed=4)
    plan = attrs.evolve(chaos, quirks=attrs.evolve(chaos.quirks, naive_dates=naive_dates))
    async with FakeViolet(orders=count, seed=4, faults=plan, clock=clock) as fake:
        async with make_client(fake, clock, retry=RetryPolicy(deadline=30)) as client:
            journal = tmp_path / "chaos.jsonl"
            results = [
                r async for r in run_batch(client, items_for(fake), concurrency=32, journal=journal)
            ]
        fake.settle()
        assert fake.ledger.double_refunds() == {}
        for result in results:
            made = ours(fake, result.item.bag_id)
            if result.outcome == "succeeded":
                assert made == [result.refund_id], result
            elif result.outcome in ("failed", "not_sent"):  # not_sent: never connected
                assert made == [], result
    outcomes = [r.outcome for r in results]
    assert len(outcomes) == count
    if naive_dates:
        unknown = [r for r in results if r.outcome == "unknown"]
        assert unknown
        for result in unknown:
            assert isinstance(result.error, AmbiguousOutcomeError), result
            assert result.error.pending is not None
            assert result.error.pending.needs_review
            assert "its date cannot place it" in result.error.pending.note, result
        assert outcomes.count("succeeded") > count // 2
        return
    assert outcomes.count("unknown") == 0
    last: dict[int, str] = {}
    for line in journal.read_bytes().splitlines()[1:]:
        record = orjson.loads(line)
        last[record["line"]] = record["state"]
    assert len(last) == 1000
    assert set(last.values()) <= {"done", "failed", "unsent"}
    assert outcomes.count("succeeded") > 900
