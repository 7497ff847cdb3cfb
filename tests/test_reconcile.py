"""Never refund twice, on FakeViolet's faults (the shared virtual clock makes late
commits, lag and settle windows cost no real time)."""

from __future__ import annotations

import asyncio

import attrs
import pytest

from violet_async import (
    AmbiguousOutcomeError,
    RefundBagRequest,
    RetryEvent,
    RetryPolicy,
    ServerError,
    VioletClient,
)
from violet_async._reconcile import BagLocks, KnownRefunds
from violet_async.exceptions import APITimeoutError
from violet_async.models import OrderRefund, RefundStatus
from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan

from .conftest import ROOMY_POLICY, make_client

AFTER_COMMIT = [
    Fault.DROP_AFTER_COMMIT,
    Fault.HTTP_500_AFTER_COMMIT,
    Fault.HTTP_502_AFTER_COMMIT,
    Fault.HTTP_503_AFTER_COMMIT,
    Fault.HTTP_504_AFTER_COMMIT,
    Fault.HTTP_524_AFTER_COMMIT,
    Fault.TRUNCATED_JSON,
    Fault.WRONG_TYPES,
]


@pytest.mark.parametrize("fault", AFTER_COMMIT)
async def test_failure_after_commit_returns_the_existing_refund(
    client: VioletClient, fake: FakeViolet, fault: Fault
) -> None:
    """Drop / 5xx / gateway page / garbled body after commit: found, not re-sent."""
    order_id, bag_id = fake.seeded[0]
    fake.script("refund", fault, bag_id=bag_id)
    refund = await client.refund_bag(order_id, bag_id, amount_refunded=150, reason="dup?")
    assert refund.reconciled
    assert refund.amount == 150
    assert fake.ledger.requests["refund"] == 1
    assert fake.ledger.refunds_per_bag[bag_id] == 1


@pytest.mark.parametrize(
    ("fault", "window"),
    [
        (Fault.DROP_BEFORE_COMMIT, 60.0),
        (Fault.HTTP_502, 60.0),
        (Fault.HTTP_504, 60.0),
        (Fault.HTML_502, 60.0),
        (Fault.HTTP_500, 5.0),
    ],
)
async def test_failure_before_commit_is_re_sent_only_after_the_window(
    fake: FakeViolet, clock: FakeClock, fault: Fault, window: float
) -> None:
    """Nothing applied: re-sent once, and only after the settle window for its cause
    (60 s when Violet did not answer, 5 s after Violet's own 500)."""
    order_id, bag_id = fake.seeded[0]
    sends: list[float] = []

    def on_retry(event: RetryEvent) -> None:
        sends.append(clock.monotonic())

    async with make_client(fake, clock, retry=ROOMY_POLICY, on_retry=on_retry) as client:
        fake.script("refund", fault, bag_id=bag_id)
        started = clock.monotonic()
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=150)
    assert not refund.reconciled
    assert fake.ledger.requests["refund"] == 2
    assert fake.ledger.refunds_per_bag[bag_id] == 1
    assert sends
    assert sends[0] - started >= window
    assert fake.ledger.requests["list_refunds"] >= 2


async def test_late_commit_is_found_not_re_sent(clock: FakeClock) -> None:
    """A 504 whose refund commits 30 s later (fake clock): found inside the window."""
    plan = FaultPlan(late_commit_delay=30.0)
    async with FakeViolet(orders=2, seed=3, clock=clock, faults=plan) as fake:
        order_id, bag_id = fake.seeded[0]
        async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
            fake.script("refund", Fault.LATE_COMMIT, bag_id=bag_id)
            refund = await client.refund_bag(order_id, bag_id, amount_refunded=150)
        assert refund.reconciled
        assert fake.ledger.requests["refund"] == 1
        assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_pre_existing_identical_refund_is_not_taken_as_ours(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """An identical partial refund this client returned to another call is never
    claimed; and being known to another call is not absence either, so without a
    baseline the dropped second request is pending for review, never re-sent."""
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
        first = await client.refund_bag(order_id, bag_id, amount_refunded=100)
        fake.script("refund", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert [r.id for r in info.value.candidates] == [first.id]
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_with_a_baseline_an_earlier_identical_refund_is_excluded_and_ours_sent(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """The same with read_before_send: the first refund is in the second call's
    baseline, the dropped request is proven absent after the window and re-sent once."""
    order_id, bag_id = fake.seeded[0]
    policy = attrs.evolve(ROOMY_POLICY, read_before_send=True)
    async with make_client(fake, clock, retry=policy) as client:
        first = await client.refund_bag(order_id, bag_id, amount_refunded=100)
        fake.script("refund", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
        second = await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert second.id != first.id
    assert not second.reconciled
    assert fake.ledger.refunds_per_bag[bag_id] == 2  # two calls, two refunds: correct


async def test_an_older_refund_from_elsewhere_is_ignored(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """An identical refund another system made the day before is not ours."""
    order_id, bag_id = fake.seeded[0]
    fake.another_actor_refund(order_id, bag_id, 100, age_seconds=100_000)
    async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
        fake.script("refund", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert not refund.reconciled
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_an_identical_refund_hours_old_is_for_review(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """An identical refund dated three hours before the send could be ours under a
    wrongly labelled offset: pending for review, never claimed, never re-sent."""
    order_id, bag_id = fake.seeded[0]
    fake.another_actor_refund(order_id, bag_id, 100, age_seconds=3 * 3600)
    async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
        fake.script("refund", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert fake.ledger.requests["refund"] == 1


async def test_two_matching_candidates_raise_rather_than_guess(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """Another system's fresh identical refund plus ours: pending for review."""
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock) as client:
        fake.another_actor_refund(order_id, bag_id, 100)
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert len(info.value.candidates) == 2
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert fake.ledger.requests["refund"] == 1


async def test_read_before_send_tells_them_apart(fake: FakeViolet, clock: FakeClock) -> None:
    """The same, with read_before_send: the baseline excludes the other refund."""
    order_id, bag_id = fake.seeded[0]
    policy = RetryPolicy(deadline=60.0, read_before_send=True)
    async with make_client(fake, clock, retry=policy) as client:
        fake.another_actor_refund(order_id, bag_id, 100)
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert refund.reconciled
    assert fake.ledger.requests["refund"] == 1
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_read_back_failing_ends_pending_with_context(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """If every read-back fails, the caller gets AmbiguousOutcomeError with a record."""
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock, retry=RetryPolicy(max_attempts=2, deadline=20)) as client:
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        fake.script("list_refunds", *[Fault.HTTP_503] * 200, bag_id=bag_id)
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert info.value.request == RefundBagRequest(amount_refunded=100)
    assert info.value.pending is not None
    assert fake.ledger.refunds_per_bag[bag_id] == 1
    assert fake.ledger.requests["refund"] == 1


async def test_retries_disabled_still_reconciles(fake: FakeViolet, clock: FakeClock) -> None:
    """With retries off, a refund that failed in flight is still read back; one that
    is proven absent ends as a definite failure (no attempt left to re-send)."""
    order_id, bag_id = fake.seeded[0]
    policy = RetryPolicy(max_attempts=1, deadline=120)
    async with make_client(fake, clock, retry=policy) as client:
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=100)
        assert refund.reconciled
        fake.script("refund", Fault.HTTP_500, bag_id=bag_id)
        with pytest.raises(ServerError):
            await client.refund_bag(order_id, bag_id, amount_refunded=150)
    assert fake.ledger.refunds_per_bag[bag_id] == 1


@pytest.mark.parametrize("fault", [Fault.DROP_AFTER_COMMIT, Fault.LATE_COMMIT])
async def test_cancel_after_commit_is_reconciled(
    fake: FakeViolet, clock: FakeClock, fault: Fault
) -> None:
    """A cancel that committed (a late one on the shared clock) is found through the
    bag state and its refund."""
    order_id, bag_id = fake.seeded[1]
    async with make_client(fake, clock) as client:
        fake.script("cancel", fault, bag_id=bag_id)
        refund = await client.cancel_bag(order_id, bag_id)
    assert refund.reconciled
    assert fake.ledger.requests["cancel"] == 1
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_cancel_before_commit_is_re_sent_once(fake: FakeViolet, clock: FakeClock) -> None:
    """A cancel dropped before commit is proven absent after the window, sent again."""
    order_id, bag_id = fake.seeded[1]
    async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
        fake.script("cancel", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
        refund = await client.cancel_bag(order_id, bag_id)
    assert not refund.reconciled
    assert fake.ledger.requests["cancel"] == 2
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_bag_cancelled_elsewhere_without_refund_is_pending(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """Bag reads CANCELED but no refund of ours: never re-sent, pending."""
    order_id, bag_id = fake.seeded[1]
    async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
        fake.script("cancel", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
        fake.bag(order_id, bag_id).status = "CANCELED"
        with pytest.raises(AmbiguousOutcomeError):
            await client.cancel_bag(order_id, bag_id)
    assert fake.ledger.requests["cancel"] == 1


def test_known_refunds_is_bounded() -> None:
    """The memory of returned refund ids evicts the oldest beyond capacity."""
    known = KnownRefunds(capacity=2)
    for refund_id in (1, 2, 3, None):
        known.add(refund_id)
    assert 1 not in known
    assert 2 in known
    assert 3 in known
    known.add(3)  # already known: neither stored twice nor evicting anything
    assert len(known) == 2
    assert 2 in known


def test_a_claim_moves_from_a_refund_that_moved_no_money_only() -> None:
    """An owner's claim stays its first refund, unless that one moved no money (FAILED,
    CANCELED) and a later one may have: a claim that may have moved money (COMPLETED,
    PROCESSING) is never replaced, by anything."""
    known = KnownRefunds()
    failed = OrderRefund(id=1, status=RefundStatus.FAILED)
    canceled = OrderRefund(id=2, status=RefundStatus.CANCELED)
    applied = OrderRefund(id=3, status=RefundStatus.COMPLETED)
    later = OrderRefund(id=4, status=RefundStatus.PROCESSING)
    known.add(1, 22, "item", failed)
    known.add(2, 22, "item", canceled)  # moved no money either: the first stays
    assert known.claimed("item") is failed
    known.add(3, 22, "item", applied)
    assert known.claimed("item") is applied
    known.add(4, 22, "item", later)
    known.add(1, 22, "item", failed)
    assert known.claimed("item") is applied
    known.add(4, 22, "other", later)
    known.add(3, 22, "other", applied)
    assert known.claimed("other") is later


async def test_a_failed_read_back_is_tried_again(client: VioletClient, fake: FakeViolet) -> None:
    """One read-back failing after its retries does not make the outcome unknown:
    the next read finds the refund."""
    order_id, bag_id = fake.seeded[0]
    fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
    fake.script("list_refunds", *[Fault.HTTP_503] * 4, bag_id=bag_id)  # one whole read
    refund = await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert refund.reconciled
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_reconciliation_stays_inside_the_deadline(fake: FakeViolet, clock: FakeClock) -> None:
    """Settle waits and read-backs never run past the call's deadline."""
    order_id, bag_id = fake.seeded[0]
    policy = RetryPolicy(deadline=2.5, settle_delay=1.0, max_attempts=1)
    async with make_client(fake, clock, retry=policy) as client:
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        fake.script("list_refunds", *[Fault.HTTP_503] * 50, bag_id=bag_id)
        started = clock.monotonic()
        with pytest.raises(AmbiguousOutcomeError):
            await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert clock.monotonic() - started <= 2.5
    assert fake.ledger.requests["refund"] == 1


async def test_one_ask_per_bag_at_a_time(fake: FakeViolet, clock: FakeClock) -> None:
    """Calls on one bag are serialized (the second waits for the first's read-back);
    calls on another bag are not held up."""
    (o1, b1), (o2, b2) = fake.seeded[0], fake.seeded[1]
    order: list[str] = []
    async with make_client(fake, clock) as client:
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=b1)

        async def call(name: str, order_id: int, bag_id: int) -> int | None:
            refund = await client.refund_bag(order_id, bag_id, amount_refunded=100)
            order.append(name)
            return refund.id

        ids = await asyncio.gather(call("a", o1, b1), call("b", o1, b1), call("c", o2, b2))
    assert len(set(ids)) == 3
    assert order.index("a") < order.index("b")
    assert fake.ledger.refunds_per_bag[b1] == 2


async def test_bag_locks_time_out_and_hand_over_in_order() -> None:
    """A waiter past its deadline gets APITimeoutError (nothing sent); the others get
    the bag in arrival order."""
    locks = BagLocks()
    assert locks.try_acquire(1)
    with pytest.raises(APITimeoutError):
        await locks.acquire(1, 0.01)
    got: list[int] = []

    async def waiter(n: int) -> None:
        await locks.acquire(1, None)
        got.append(n)
        locks.release(1)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)
    locks.release(1)
    await asyncio.gather(*tasks)
    assert got == [0, 1, 2]
    assert not locks.held(1)
