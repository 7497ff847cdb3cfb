"""Never refund twice: ambiguous refunds and cancels are read back, never blindly re-sent."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from violet_async import AmbiguousOutcomeError, RetryPolicy, ServerError, VioletClient
from violet_async._converter import converter
from violet_async._reconcile import KnownRefunds, matches_refund_request
from violet_async.models import OrderRefund, RefundBagRequest, SkuRefund
from violet_async.testing import FakeClock, FakeViolet, Fault

from .conftest import make_client
from .samples import refund_body

AFTER_COMMIT = [
    Fault.DROP_AFTER_COMMIT,
    Fault.HTTP_500_AFTER_COMMIT,
    Fault.TRUNCATED_JSON,
    Fault.WRONG_TYPES,
]


@pytest.mark.parametrize("fault", AFTER_COMMIT)
async def test_failure_after_commit_returns_the_existing_refund(
    client: VioletClient, fake: FakeViolet, fault: Fault
) -> None:
    """Drop / 500 / truncated / garbled after commit: the refund is found, not re-sent."""
    order_id, bag_id = fake.seeded[0]
    fake.script("refund", fault, bag_id=bag_id)
    refund = await client.refund_bag(order_id, bag_id, amount_refunded=150, reason="dup?")
    assert refund.reconciled
    assert refund.amount == 150
    assert fake.ledger.requests["refund"] == 1
    assert fake.ledger.refunds_per_bag[bag_id] == 1


@pytest.mark.parametrize(
    "fault",
    [Fault.DROP_BEFORE_COMMIT, Fault.HTTP_500, Fault.HTTP_502, Fault.HTTP_504, Fault.HTML_502],
)
async def test_ambiguous_failure_before_commit_is_read_back_then_re_sent(
    client: VioletClient, fake: FakeViolet, fault: Fault
) -> None:
    """Nothing applied: the read-backs prove absence, then exactly one re-send."""
    order_id, bag_id = fake.seeded[0]
    fake.script("refund", fault, bag_id=bag_id)
    refund = await client.refund_bag(order_id, bag_id, amount_refunded=150)
    assert not refund.reconciled
    assert fake.ledger.requests["refund"] == 2
    assert fake.ledger.requests["list_refunds"] == 3  # settle_reads
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_late_commit_after_first_read_back_is_one_refund(clock: FakeClock) -> None:
    """The commit lands (0.2 s on the shared clock) after the first read-back: the
    second read, after a settle wait, finds it."""
    async with (
        FakeViolet(orders=20, seed=3, clock=clock) as fake,
        make_client(fake, clock) as client,
    ):
        order_id, bag_id = fake.seeded[0]
        fake.script("refund", Fault.LATE_COMMIT, bag_id=bag_id)
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=150)
    assert refund.reconciled
    assert fake.ledger.requests["list_refunds"] == 2
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_pre_existing_identical_refund_is_not_taken_as_ours(
    client: VioletClient, fake: FakeViolet
) -> None:
    """An identical partial refund made earlier by this client is excluded; the
    dropped request is then proven absent and re-sent once."""
    order_id, bag_id = fake.seeded[0]
    first = await client.refund_bag(order_id, bag_id, amount_refunded=100)
    fake.script("refund", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
    second = await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert second.id != first.id
    assert not second.reconciled
    assert fake.ledger.refunds_per_bag[bag_id] == 2  # two calls, two refunds: correct


async def test_pre_existing_refund_from_elsewhere_outside_window_is_ignored(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """An identical refund created before the call (older than the skew window) by
    another process is not ours."""
    order_id, bag_id = fake.seeded[0]
    bag = fake.bag(order_id, bag_id)
    fake.store.commit_refund(bag, {"amount_refunded": 100})
    bag.refunds[-1]["date_created"] = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    async with make_client(fake, clock) as client:
        fake.script("refund", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert not refund.reconciled
    assert fake.ledger.refunds_per_bag[bag_id] == 2


async def test_two_matching_candidates_raise_rather_than_guess(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """Two fresh identical refunds from elsewhere: AmbiguousOutcomeError, nothing re-sent."""
    order_id, bag_id = fake.seeded[0]
    bag = fake.bag(order_id, bag_id)
    async with make_client(fake, clock) as client:
        fake.store.commit_refund(bag, {"amount_refunded": 100})  # by another process
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert len(info.value.candidates) == 2
    assert info.value.attempts == 1
    assert fake.ledger.requests["refund"] == 1


async def test_read_back_failing_raises_ambiguous_with_context(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """If the read-back itself fails, the caller gets AmbiguousOutcomeError."""
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock, retry=RetryPolicy(max_attempts=2)) as client:
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        fake.script("list_refunds", *[Fault.HTTP_503] * 12, bag_id=bag_id)  # every read
        with pytest.raises(AmbiguousOutcomeError, match="reading the bag back failed") as info:
            await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert info.value.request == RefundBagRequest(amount_refunded=100)
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_retries_disabled_still_reconciles(fake: FakeViolet, clock: FakeClock) -> None:
    """With retries off, an ambiguous refund is still read back (never lost)."""
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock, retry=RetryPolicy.disabled()) as client:
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=100)
        assert refund.reconciled
        fake.script("refund", Fault.HTTP_500, bag_id=bag_id)
        with pytest.raises(ServerError):  # proven absent, but no attempt left to re-send
            await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert fake.ledger.refunds_per_bag[bag_id] == 1


@pytest.mark.parametrize("fault", [Fault.DROP_AFTER_COMMIT, Fault.LATE_COMMIT])
async def test_cancel_after_commit_is_reconciled(clock: FakeClock, fault: Fault) -> None:
    """A cancel that committed (a late one on the shared clock) is found through the
    bag state and its refund."""
    async with (
        FakeViolet(orders=20, seed=3, clock=clock) as fake,
        make_client(fake, clock) as client,
    ):
        order_id, bag_id = fake.seeded[1]
        fake.script("cancel", fault, bag_id=bag_id)
        refund = await client.cancel_bag(order_id, bag_id)
    assert refund.reconciled
    assert fake.ledger.requests["cancel"] == 1
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_cancel_before_commit_is_re_sent_once(client: VioletClient, fake: FakeViolet) -> None:
    """A cancel dropped before commit is proven absent and sent again once."""
    order_id, bag_id = fake.seeded[1]
    fake.script("cancel", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
    refund = await client.cancel_bag(order_id, bag_id)
    assert not refund.reconciled
    assert fake.ledger.requests["cancel"] == 2
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_bag_cancelled_elsewhere_without_refund_is_ambiguous(
    client: VioletClient, fake: FakeViolet
) -> None:
    """Bag reads CANCELED but no refund of ours: never re-sent, typed error."""
    order_id, bag_id = fake.seeded[1]
    fake.script("cancel", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
    fake.bag(order_id, bag_id).status = "CANCELED"
    with pytest.raises(AmbiguousOutcomeError):
        await client.cancel_bag(order_id, bag_id)
    assert fake.ledger.requests["cancel"] == 1


def _refund(**overrides: object) -> OrderRefund:
    return converter.structure(refund_body(**overrides), OrderRefund)


def test_matching_rule_fields() -> None:
    """Amount, SKU lines and reason must agree where both sides carry them."""
    refund = _refund(amount=500, reason="r", skus=[{"order_sku_id": 1, "quantity_refunded": 2}])
    assert matches_refund_request(refund, RefundBagRequest())
    assert matches_refund_request(refund, RefundBagRequest(amount_refunded=500, reason="r"))
    assert not matches_refund_request(refund, RefundBagRequest(amount_refunded=501))
    assert not matches_refund_request(refund, RefundBagRequest(reason="other"))
    assert matches_refund_request(
        refund, RefundBagRequest(skus=[SkuRefund(order_sku_id=1, quantity_refunded=2)])
    )
    assert not matches_refund_request(
        refund, RefundBagRequest(skus=[SkuRefund(order_sku_id=1, quantity_refunded=1)])
    )


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
    """Settle waits never run past the call's deadline; the outcome is then unknown."""
    order_id, bag_id = fake.seeded[0]
    policy = RetryPolicy(deadline=2.5, settle_delay=1.0, max_attempts=1)
    async with make_client(fake, clock, retry=policy) as client:
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        fake.script("list_refunds", *[Fault.HTTP_503] * 20, bag_id=bag_id)
        with pytest.raises(AmbiguousOutcomeError):
            await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert clock.slept <= 2.5
    assert fake.ledger.requests["refund"] == 1
