"""One resume rule for every store of ask records (``engine.resumable``): the batch
journal and the fleet ledger resume a stored record the way the key path does. A
record in a phase its store's state does not explain (applied without its refund,
absent, failed, under a state that says it may have been sent) is resumed pending and
doubted, keeping what it knows: the refunds it saw, the ones handed to other calls,
its baseline, its sends. It used to be replaced by a bare "sent once" record, which
forgot them and could claim a refund seen before as its own.

Against our own hostile server: refunds are counted from the server's record."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest

from violet_async import PendingRefund, RefundBagRequest, RetryPolicy, Timeouts
from violet_async._ask import Phase, sent_once
from violet_async._engine import resumable
from violet_async.batch import BatchItem, BatchResult, Journal, run_batch
from violet_async.fleet._ledger import LedgerRecord, State
from violet_async.fleet._ledger import resumable_record as _fleet_resumable
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, Hostile, Step, hostile_client

ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
TIMEOUTS = Timeouts(connect=1.0, read=2.0)


async def _drain(results: AsyncIterator[BatchResult]) -> list[BatchResult]:
    return [r async for r in results]


def _item() -> BatchItem:
    return BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300, reason="r"))


async def _killed_mid_post(client: object, item: BatchItem, server: Hostile, journal: Path) -> str:
    """Run ``item`` and kill the run while its POST is in flight; its journal key."""
    first = asyncio.ensure_future(_drain(run_batch(client, [item], journal=journal)))  # type: ignore[arg-type]
    await server.post_arrived.wait()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    ((key, entry),) = Journal.peek(journal).items()
    assert entry.state == "sent"
    return key


@pytest.mark.parametrize("with_baseline", [True, False])
@pytest.mark.parametrize("phase", [Phase.ABSENT, Phase.FAILED, Phase.APPLIED])
async def test_batch_resume_keeps_the_records_evidence(
    tmp_path: Path, phase: Phase, with_baseline: bool
) -> None:
    """An earlier run sent the row (its POST never committed) and left a pending line
    whose record knows two refunds on the bag of the same money: one there before the
    send (its baseline) and one handed to another call after it (``others``, and seen).
    Resumed, neither is claimed as the row's: nothing is sent blind, no refund is taken
    for the row's, and the row is not reported done; the server holds the two refunds
    it had. (Resumed as a bare "sent once" record it took the later one for its own.)"""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, commit_after=None, hang=True)])
    journal = tmp_path / "run.jsonl"
    item = _item()
    async with hostile_client(server, retry=ROOMY, timeouts=TIMEOUTS) as client:
        key = await _killed_mid_post(client, item, server, journal)
        before = server.add_refund(300, reason="r", age=10.0) if with_baseline else None
        sent = Journal.peek(journal)[key].ask
        assert sent is not None
        clock.advance(5.0)
        other = server.add_refund(300, reason="r")
        earlier = [before["id"]] if before is not None else []
        record = attrs.evolve(
            PendingRefund.from_dict(sent),
            phase=phase,
            baseline=frozenset(earlier),
            others=frozenset({other["id"]}),
            seen=frozenset({*earlier, other["id"]}),
        )
        log = await Journal.open(journal, input_id=None)
        try:
            await log.record(key, 1, "pending", ask=record.to_dict())
        finally:
            await log.aclose()
        results = await _drain(run_batch(client, [item], journal=journal))
    assert server.posts == 1  # the killed run's only
    assert [r["id"] for r in server.refunds] == [*earlier, other["id"]]
    assert server.ours == []
    (result,) = results
    assert result.refund_id is None
    assert result.outcome not in ("succeeded", "already_done")
    entry = Journal.peek(journal)[key]
    assert entry.state in ("pending", "unknown")
    assert entry.ask is not None
    kept = PendingRefund.from_dict(entry.ask)
    assert other["id"] in kept.others
    assert kept.baseline == frozenset(earlier)
    assert kept.ask_id == record.ask_id


def test_rule_keeps_evidence_where_sent_once_forgets() -> None:
    """The rule itself, on the record the test above stores: kept, pending and doubted;
    the same record under another request is a bare "sent once" (trusted for nothing)."""
    item = _item()
    wanted = PendingRefund(item.kind, item.order_id, item.bag_id, item.request)
    stored = attrs.evolve(
        sent_once(item.kind, item.order_id, item.bag_id, item.request, 100.0),
        phase=Phase.ABSENT,
        baseline=frozenset({1}),
        others=frozenset({2}),
        seen=frozenset({1, 2}),
        sends=3,
    )
    resumed = resumable(stored, wanted, sent_at=50.0)
    assert resumed is not None
    assert (resumed.phase, resumed.doubted) == (Phase.PENDING, True)
    assert (resumed.baseline, resumed.others, resumed.seen, resumed.sends) == (
        frozenset({1}),
        frozenset({2}),
        frozenset({1, 2}),
        3,
    )
    assert resumed.ask_id == stored.ask_id
    other_request = attrs.evolve(stored, request=RefundBagRequest(amount_refunded=299, reason="r"))
    torn = resumable(other_request, wanted, sent_at=50.0)
    assert torn is not None
    assert (torn.phase, torn.sends, torn.first_sent_at, torn.others) == (
        Phase.SENT,
        1,
        50.0,
        frozenset(),
    )


def _ledger_record(
    state: State, ask: PendingRefund | None, updated_at: float | None
) -> LedgerRecord:
    item = _item()
    return LedgerRecord(
        "k",
        state,
        item,
        ask=ask.to_dict() if ask is not None else None,
        updated_at=updated_at,
    )


def test_fleet_ledger_resumes_by_the_same_rule() -> None:
    """The fleet worker's edge: a record in another phase under a sent/pending state
    keeps its evidence (as the batch journal's and the key path's); a NEW record under
    a sent state was torn mid-send and counts as sent once at the record's last write;
    an unreadable record, another item's, or none, the same; states that never sent
    resume nothing."""
    item = _item()
    sent = sent_once(item.kind, item.order_id, item.bag_id, item.request, 100.0)
    evidence = attrs.evolve(
        sent, phase=Phase.ABSENT, others=frozenset({2}), seen=frozenset({2}), sends=2
    )
    kept = _fleet_resumable(_ledger_record("pending", evidence, 120.0), now=500.0)
    assert kept is not None
    assert (kept.phase, kept.doubted, kept.others, kept.seen, kept.sends) == (
        Phase.PENDING,
        True,
        frozenset({2}),
        frozenset({2}),
        2,
    )
    assert kept.ask_id == evidence.ask_id
    assert _fleet_resumable(_ledger_record("sent", sent, 120.0), now=500.0) == sent
    new = PendingRefund(item.kind, item.order_id, item.bag_id, item.request)
    another = attrs.evolve(sent, bag_id=item.bag_id + 1)
    for torn, updated_at, at in (
        (new, 120.0, 120.0),
        (None, None, 500.0),
        (another, 120.0, 120.0),
    ):
        resumed = _fleet_resumable(_ledger_record("sent", torn, updated_at), now=500.0)
        assert resumed is not None
        assert (resumed.phase, resumed.sends, resumed.first_sent_at, resumed.others) == (
            Phase.SENT,
            1,
            at,
            frozenset(),
        )
        assert resumed.bag_id == item.bag_id
    for state in ("new", "applied", "failed"):
        assert _fleet_resumable(_ledger_record(state, evidence, 120.0), now=500.0) is None
