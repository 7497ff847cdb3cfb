"""A whole-bag refund is matched by what the refunds before it left on the bag. A
record naming another order listed under the bag's id (a backend filing another
order's refund under this id: no money of this bag moved, by its own word) was
counted as one of them: the ask's own refund of the rest read as "not what was left",
the ask was proven absent and reported failed though it applied (simulator seed
1269007, kind ``other_order``). It is read both ways now: the rest either way is
never a miss, and the rest without it is the ask's."""

from __future__ import annotations

from typing import Any

import attrs

from violet_async import AmbiguousOutcomeError, OrderRefund, RetryPolicy, VioletError
from violet_async.testing import FakeClock

from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client


@attrs.define
class OtherOrderListed(Hostile):
    """The bag's list carries another order's refund; the bag's money counts only this
    order's."""

    @property
    def refunded(self) -> int:
        return sum(r["amount"] for r in self.refunds if r["order_id"] == ORDER_ID)


async def _whole_bag(
    foreign_amount: int, server_class: type[Hostile] = OtherOrderListed
) -> tuple[Hostile, OrderRefund | VioletError]:
    """A whole-bag refund whose POST applies and is answered 504, on a bag that lists
    another order's refund of ``foreign_amount`` (``server_class``: whether the bag's
    money counts it)."""
    clock = FakeClock()
    server = server_class(clock, script=[Step(504, body=GATEWAY_504)], status_lag=600.0)
    foreign: dict[str, Any] = server.add_refund(foreign_amount, age=30.0)
    foreign["order_id"] = ORDER_ID + 1
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0, jitter=False)
    async with hostile_client(server, retry=retry) as client:
        try:
            got: OrderRefund | VioletError = await client.refund_bag(ORDER_ID, BAG_ID)
        except VioletError as exc:
            got = exc
    return server, got


async def test_a_whole_bag_refund_is_its_own_beside_another_orders_record() -> None:
    """Before: parked for review here (in the simulator's world, where the bag's status
    lagged and one attempt was allowed, proven absent and reported failed)."""
    server, got = await _whole_bag(400)
    assert isinstance(got, OrderRefund), got
    assert server.ours == [got.id]
    assert got.amount == server.total


async def test_a_whole_bag_refund_that_is_the_rest_only_with_it_counted_is_reviewed() -> None:
    """Another order's record that did move this bag's money after all (a wrong order
    id): the ask's refund is the rest only with it counted. One way of reading says
    "the rest": never a miss (never sent again, never failed): a person looks. (Before,
    counted only, it was claimed; the record's own word is that it is not this order's,
    so neither reading is taken alone.)"""
    server, got = await _whole_bag(400, Hostile)
    assert isinstance(got, AmbiguousOutcomeError), got
    assert server.posts == 1
    assert len(server.ours) == 1
