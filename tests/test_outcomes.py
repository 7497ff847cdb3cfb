"""Refund outcomes: get_order and wait_for_refund, end to end on FakeViolet (webhooks
are in test_webhooks*.py)."""

from __future__ import annotations

import asyncio

import pytest

from violet_async import (
    BagStatus,
    RefundStatus,
    RefundWaitTimeoutError,
    RequestValidationError,
    VioletClient,
)
from violet_async.testing import FakeClock, FakeViolet

from .conftest import make_client


async def test_get_order_is_typed(client: VioletClient, fake: FakeViolet) -> None:
    """get_order returns the bags with typed statuses and amounts."""
    order_id, bag_id = fake.seeded[0]
    order = await client.get_order(order_id)
    bag = order.bag(bag_id)
    assert bag is not None
    assert bag.status in (BagStatus.COMPLETED, BagStatus.ACCEPTED, BagStatus.SUBMITTED)
    assert bag.total == fake.bag(order_id, bag_id).total
    assert bag.skus[0].id == fake.bag(order_id, bag_id).skus[0].order_sku_id
    assert order.bag(1) is None
    with pytest.raises(RequestValidationError):
        await client.get_order(0)


async def test_wait_for_refund_polls_until_terminal(clock: FakeClock) -> None:
    """A PROCESSING refund is polled with backoff until it is COMPLETED."""
    async with FakeViolet(orders=1, processing_reads=3) as fake:
        async with make_client(fake, clock) as client:
            order_id, bag_id = fake.seeded[0]
            refund = await client.refund_bag(order_id, bag_id, amount_refunded=10)
            assert refund.status is RefundStatus.PROCESSING
            assert refund.id is not None
            final = await client.wait_for_refund(order_id, bag_id, refund.id, poll_interval=1)
    assert final.status is RefundStatus.COMPLETED
    assert clock.sleeps == [1, 2, 4]  # PROCESSING on three reads, COMPLETED on the fourth


async def test_wait_for_refund_times_out_with_last_state(clock: FakeClock) -> None:
    """Past the timeout, a typed error carries the last state seen."""
    async with FakeViolet(orders=1, processing_reads=100) as fake:
        async with make_client(fake, clock) as client:
            order_id, bag_id = fake.seeded[0]
            refund = await client.refund_bag(order_id, bag_id, amount_refunded=10)
            assert refund.id is not None
            with pytest.raises(RefundWaitTimeoutError, match="still PROCESSING") as info:
                await client.wait_for_refund(order_id, bag_id, refund.id, timeout=10)
            assert info.value.refund is not None
            assert info.value.refund.id == refund.id
            assert clock.slept == pytest.approx(10)
            with pytest.raises(RefundWaitTimeoutError, match="not found") as missing:
                await client.wait_for_refund(order_id, bag_id, 999, timeout=1)
            assert missing.value.refund is None
            with pytest.raises(RequestValidationError):
                await client.wait_for_refund(order_id, bag_id, 1, timeout=0)


async def test_stop_with_late_commit_and_webhooks_leaves_no_task() -> None:
    """A late commit still pending at stop lands then, and the delivery it starts is
    ended cleanly: the ledger is final and no task is left."""
    import aiohttp

    from violet_async.testing import Fault, FaultPlan

    before = asyncio.all_tasks()
    async with FakeViolet(orders=1, faults=FaultPlan(late_commit_delay=60)) as fake:
        fake.register_webhook("http://127.0.0.1:9/nobody")
        order_id, bag_id = fake.seeded[0]
        fake.script("refund", Fault.LATE_COMMIT, bag_id=bag_id)
        headers = {
            "X-Violet-App-Id": str(fake.app_id),
            "X-Violet-App-Secret": fake.app_secret,
            "X-Violet-Token": fake.issue_token(),
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{fake.base_url}/orders/{order_id}/bags/{bag_id}/refunds",
                headers=headers,
                data=b'{"amount_refunded": 1}',
            ) as response,
        ):
            assert response.status == 504
        assert fake.ledger.total_refunds == 0  # still pending
    assert fake.ledger.total_refunds == 1
    assert len(fake.webhook_deliveries) == 1
    assert {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()} == set()
