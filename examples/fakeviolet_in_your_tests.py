"""Test your own refund code against FakeViolet, like stripe-mock: a real aiohttp
server on 127.0.0.1 (port 0) with Violet's rules, a ledger, and fault injection.

    python examples/fakeviolet_in_your_tests.py     # runs these tests with pytest
    pytest examples/fakeviolet_in_your_tests.py     # from a project of your own
"""

from __future__ import annotations

import sys

import pytest

from violet_async import BadRequestError, VioletClient
from violet_async.testing import FakeClock, FakeViolet, Fault


async def refund_whole_bag(client: VioletClient, order_id: int, bag_id: int) -> int:
    """The code under test: your own function that refunds a bag."""
    refund = await client.refund_bag(order_id, bag_id, reason="Order returned.")
    return refund.amount


# Ids are predictable: orders from 100001, bags from 200001, order SKUs from 300001,
# refunds from 400001; fake.seeded lists the (order_id, bag_id) pairs it seeded.
# Each test starts its own server on a free port (it takes milliseconds).


@pytest.mark.asyncio
async def test_refund_whole_bag_refunds_once() -> None:
    """The whole bag is refunded exactly once, and a second refund is refused."""
    async with FakeViolet(orders=3, seed=1) as fake, fake.client() as client:
        order_id, bag_id = fake.seeded[0]
        amount = await refund_whole_bag(client, order_id, bag_id)
        assert amount == fake.bag(order_id, bag_id).total
        with pytest.raises(BadRequestError):
            await refund_whole_bag(client, order_id, bag_id)
        assert fake.ledger.refunds_per_bag[bag_id] == 1


@pytest.mark.asyncio
async def test_a_dropped_answer_is_read_back_not_sent_twice() -> None:
    """The connection drops after Violet committed: the SDK reads back, no double refund."""
    async with FakeViolet(orders=3, seed=1) as fake:
        order_id, bag_id = fake.seeded[1]
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        async with fake.client(clock=FakeClock()) as client:  # retries without sleeping
            await refund_whole_bag(client, order_id, bag_id)
        assert fake.ledger.double_refunds() == {}
        assert fake.ledger.refunds_per_bag[bag_id] == 1


@pytest.mark.asyncio
async def test_a_webhook_is_sent_for_each_refund() -> None:
    """FakeViolet posts a signed ORDER_REFUNDED to every registered webhook URL."""
    async with FakeViolet(orders=3, seed=1, webhook_attempts=2) as fake:
        # Your app's webhook URL goes here; this one answers 404, so it is retried.
        fake.register_webhook(fake.base_url + "/no-such-endpoint")
        order_id, bag_id = fake.seeded[2]
        async with fake.client() as client:
            await refund_whole_bag(client, order_id, bag_id)
        await fake.drain_webhooks()
        (delivery,) = fake.webhook_deliveries
        assert (delivery["topic"], delivery["bag_id"]) == ("ORDER_REFUNDED", bag_id)


if __name__ == "__main__":
    # -p no:cacheprovider keeps .pytest_cache out of your tree; -o addopts= drops the
    # options of whatever project this file sits in (coverage thresholds and the like).
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider", "-o", "addopts="]))
