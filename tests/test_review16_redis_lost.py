"""Review 16: a RedisStore whose Redis lost its data (a server scripted here: ``Hostile`` of
``test_review16_findings``) that this branch did not fix; see each docstring for why."""

from __future__ import annotations

from violet_async import AmbiguousOutcomeError, OrderRefund
from violet_async.stores import RedisStore
from violet_async.testing import FakeClock

from ._fleet_redis import redis_url  # noqa: F401 - the fixture
from .test_review16_findings import BAG, ORDER, REQUEST, Hostile, _client, _ended, _serve

# -- 2. a RedisStore whose Redis restarted empty ------------------------------------------


async def test_a_keyed_repeat_after_redis_lost_its_data_sends_nothing_blind(
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """Scenario: ``VIOLET_STORE=redis://...`` (the arq example's setup). Worker one's
    keyed refund is applied by Violet, answered with its own 500, and its deadline parks
    it pending: the key's entry in Redis says so. Redis then restarts empty (no
    persistence, or a failover to a replica that had not received the write; here its
    keys are deleted). The job (or the web app's retry) runs the call again with the
    same key, in worker two.

    Main: worker two's claim finds nothing under the key and owns a fresh ask: the
    request is sent again at once, no read-back: a second refund. RedisStore neither
    checks that Redis keeps its writes (the fleet ledger refuses ``appendonly no``
    unless told) nor notices a Redis that lost its data (the fleet ledger's epoch).

    True outcome: nothing sent blind: the second call reads the bag back first (or is
    refused), one refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["applied_lost", "ok"])
    prefix = "review16-lost:"
    key = "rma-review16-redis-lost"
    async with (
        _serve(server) as url,
        RedisStore(redis_url, prefix=prefix) as one_store,
        RedisStore(redis_url, prefix=prefix) as two_store,
        _client(url, clock, deadline=3.0, store=one_store) as one,
        _client(url, clock, deadline=600.0, store=two_store) as two,
    ):
        server.hide = True  # the list lags: worker one's deadline parks it pending
        first = await _ended(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        server.hide = False
        lost = await one_store._redis.keys(f"{prefix}*")
        assert lost  # the key's pending entry
        await one_store._redis.delete(*lost)  # Redis restarted empty
        clock.advance(120.0)
        again = await _ended(two.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
    assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"
    assert isinstance(again, (OrderRefund, AmbiguousOutcomeError)), repr(again)
