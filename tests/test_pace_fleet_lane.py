"""A fleet lane's slowdowns, on an injected clock (the in-memory Redis, which
``test_fleet_memory_redis`` proves answers as the Lua scripts do on a real
redis-server): a slowdown never squeezes a send between slots already handed out, keeps
the rate its merchant let through lately, and a new lane's first rate is counted from
the merchant's first success."""

from __future__ import annotations

import math
import os
from typing import cast

import pytest

if not os.environ.get("CI"):
    pytest.importorskip("redis")

from redis.asyncio import Redis

from violet_async._pace import DECREASE, MIN_RATE
from violet_async.fleet import FleetPace
from violet_async.fleet._pace import KEEP
from violet_async.testing.sim._redis import MemoryRedisServer

STRICT = 20001


class _Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def _pace(clock: _Clock) -> FleetPace:
    return FleetPace(cast(Redis, MemoryRedisServer(clock).client()), 7)


async def _lane_at(pace: FleetPace, clock: _Clock, rate: float) -> None:
    """A lane at ``rate``, out of probing, with no success counted lately."""
    await pace.limited(STRICT, 0.0)
    await pace.redis.hset(f"{{violet}}:pace:7:{STRICT}", "rate", str(rate))
    await pace.redis.hset(f"{{violet}}:pace:7:{STRICT}", "probing", "0")
    clock.tick(10.0)


async def test_a_slowdown_starts_its_spacing_after_the_slots_already_handed_out() -> None:
    """Three sends gated ahead at the old spacing still leave then: the new epoch's
    first slot is the new spacing after the last of them, not between them (where it
    would reach a one-token platform early and draw a 429 that slows it again)."""
    clock = _Clock()
    pace = _pace(clock)
    await _lane_at(pace, clock, 2.5)
    slots = [await pace.gate_slot(STRICT) for _ in range(3)]
    assert [s[0] if s else None for s in slots] == pytest.approx([0.0, 0.4, 0.8])
    slowed = await pace.limited(STRICT, 0.0, epoch=0)
    assert slowed == pytest.approx(2.5 * DECREASE)
    after = await pace.gate_slot(STRICT)
    assert after is not None
    assert after[1] == 1  # the new epoch
    assert after[0] == pytest.approx(0.8 + 1 / slowed)  # after the last slot handed out
    # Reservations too: the next one comes after those taken at the old spacing.
    assert await pace.reserve(STRICT, 5.0) == pytest.approx(1 / slowed)
    # Nothing handed out ahead (they have all left): the new spacing starts now.
    clock.tick(5.0)
    assert await pace.limited(STRICT, 0.0, epoch=1) == pytest.approx(slowed * DECREASE)
    again = await pace.gate_slot(STRICT)
    assert again is not None
    assert again[0] == pytest.approx(1 / (slowed * DECREASE))


async def test_a_slowdown_keeps_the_rate_its_merchant_let_through() -> None:
    """A 429 from a send that reached the merchant early (its lane at 1.3 a second, the
    merchant letting 1.3 a second through) slows the lane to 90% of its rate, not 80%;
    nine such 429s leave it near 0.9^9 of its rate, not collapsed to 0.8^9."""
    clock = _Clock()
    pace = _pace(clock)
    await _lane_at(pace, clock, 1.3)
    kept: list[float] = []
    for epoch in range(9):
        start = await pace.rate(STRICT)
        assert start is not None
        for _ in range(3):  # the merchant lets the lane's rate through
            clock.tick(1 / start)
            await pace.succeeded(STRICT)
        rate = await pace.rate(STRICT)  # each success raised it a little
        assert rate is not None
        slowed = await pace.limited(STRICT, 0.0, epoch=epoch)
        # What got through is counted by whole seconds (this one and the one before):
        # never less than the whole decrease, never more than KEEP of the rate.
        assert rate * DECREASE - 1e-9 <= slowed <= rate * KEEP + 1e-9
        kept.append(slowed / rate)
        # Climbing back is left out: the next round starts at this round's start, slowed
        # by this slowdown's fraction.
        await pace.redis.hset(f"{{violet}}:pace:7:{STRICT}", "rate", str(slowed / rate * start))
    final = await pace.rate(STRICT)
    assert final is not None
    assert final > 2 * 1.3 * DECREASE**9  # not collapsed to 0.8^9 (0.17 a second)
    assert final == pytest.approx(1.3 * math.prod(kept))
    assert sum(k == pytest.approx(KEEP) for k in kept) >= 7  # most keep 90%


async def test_a_slowdown_with_nothing_let_through_lately_is_the_whole_decrease() -> None:
    """The floor is what got through, never more: a lane whose merchant let little
    through (its rate far over the merchant's) slows by the whole ``DECREASE``, and one
    with no success lately too; the floor never holds a lane above ``KEEP`` of its rate."""
    clock = _Clock()
    pace = _pace(clock)
    await _lane_at(pace, clock, 4.0)
    for _ in range(2):  # 2 a second got through, the lane at 4
        clock.tick(0.5)
        await pace.succeeded(STRICT)
    rate = await pace.rate(STRICT)
    assert rate is not None
    assert await pace.limited(STRICT, 0.0, epoch=0) == pytest.approx(rate * DECREASE)
    clock.tick(10.0)  # nothing let through lately
    rate *= DECREASE
    assert await pace.limited(STRICT, 0.0, epoch=1) == pytest.approx(rate * DECREASE)
    # Far more got through than the lane's rate: it still slows by 1 - KEEP.
    for _ in range(6):
        clock.tick(0.1)
        await pace.succeeded(STRICT)
    rate = await pace.rate(STRICT)
    assert rate is not None
    assert await pace.limited(STRICT, 0.0, epoch=2) == pytest.approx(rate * KEEP)
    # And never under MIN_RATE, whatever the floor.
    await pace.redis.hset(f"{{violet}}:pace:7:{STRICT}", "rate", str(MIN_RATE))
    clock.tick(30.0)
    assert await pace.limited(STRICT, 0.0, epoch=3) == pytest.approx(MIN_RATE)


async def test_a_new_lanes_first_rate_counts_from_the_merchants_first_success() -> None:
    """A run's first seconds: the merchant's only success a quarter second before its
    first 429 is one send per half a second (counted over at least half a second, as
    the batch counts), not one over the second before it, when nothing was sent."""
    clock = _Clock()
    clock.tick(0.1)  # a tenth of a second into a whole second
    pace = _pace(clock)
    await pace.succeeded(STRICT)
    clock.tick(0.25)
    assert await pace.limited(STRICT, 0.3) == pytest.approx(2.0)
    # Its Retry-After still caps it (one send per Retry-After under a second).
    other = _pace(clock)
    await other.succeeded(STRICT)
    clock.tick(0.1)
    assert await other.limited(STRICT, 0.8) == pytest.approx(1 / 0.8)
    # A merchant whose first success is long past: its last seconds as before.
    late = _pace(clock)
    await late.succeeded(STRICT)
    clock.tick(60.0)
    await late.succeeded(STRICT)
    clock.tick(0.5)
    # (its one success this second, 0.95 s into it: over the second before and this)
    assert await late.limited(STRICT, 0.0) == pytest.approx(1 / 1.95)
