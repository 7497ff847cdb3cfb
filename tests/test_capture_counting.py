"""A sink that only counts requests (a fleet or batch item's) keeps no response, so none
is copied and redacted for it; a caller's ``capture_responses`` list it feeds still
gets each response, redacted."""

from __future__ import annotations

from violet_async import telemetry
from violet_async._engine import engine_of
from violet_async._telemetry import counting_requests
from violet_async.testing import FakeClock, FakeViolet

from .conftest import make_client


async def test_a_count_redacts_nothing_and_a_list_it_feeds_gets_redacted_copies(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """Counting alone redacts nothing (the redactor has not even built its patterns); a
    list around the count gets the response, redacted, and the count still counts."""
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock) as client:
        await client.list_bag_refunds(order_id, bag_id)  # logs in outside the blocks
        redactor = engine_of(client).redactor
        with counting_requests() as count:
            await client.list_bag_refunds(order_id, bag_id)
        assert (count.requests, count.rate_limited) == (1, 0)
        assert redactor._compiled is None  # nothing was redacted
        with telemetry.capture_responses() as seen, counting_requests() as count:
            refund = await client.refund_bag(order_id, bag_id, amount_refunded=10)
        assert (count.requests, len(seen)) == (1, 1)
        assert seen[0].status == 200
        assert seen[0].headers["X-Request-Id"] == refund.request_id
        assert redactor._compiled is not None  # the kept copy was redacted
        token = engine_of(client)._shared.auth.current()
        assert token
        assert token.encode() not in seen[0].body
