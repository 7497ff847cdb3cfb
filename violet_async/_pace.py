"""Pace per merchant: one lane per merchant platform, each with its own adaptive rate.

Violet passes the merchant platform's 429s through, and each merchant's platform has
its own limit (Shopify's is the strictest). A batch that spans many merchants must slow
down only the merchant that said so: a global rate halved on one merchant's 429s slows
every other merchant for nothing.

Lanes are learned, never configured, and cost nothing on the happy path:

- A merchant has no lane (its rows go at full speed) until one of its sends gets a 429.
  Then its lane starts at the rate its sends succeeded at just before (at most one
  send per ``Retry-After``, at least ``MIN_RATE``), waits out the ``Retry-After``,
  and probes upward (x1.25 a success) until its next 429; from then on it backs off by
  ``DECREASE`` on a 429 (once per ``1 / rate``, so a wave of 429s from sends already in
  flight counts once), climbs back quickly to near the rate that 429 came at, and
  probes past it slowly.
- Which merchant a row belongs to comes from the row (an optional ``merchant_id``),
  from a refund Violet returned for its order (``merchant_id`` is in every refund), or,
  once any 429 has been seen in the run, from ``GET /orders/{id}`` before its first send
  (one read, never rate limited by the merchant's platform; :attr:`learning`).

Decisions only: the caller passes the time in and does the waiting.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any

import attrs

__all__ = ["DECREASE", "INCREASE", "MIN_RATE", "PROBE_INCREASE", "RECOVER", "Lane", "MerchantPace"]

#: Slowest a lane goes, in sends per second.
MIN_RATE = 0.05
#: A lane's rate after a 429 (once per ``1 / rate``), as a fraction of what it was.
DECREASE = 0.8
#: After its second 429, a lane below 95% of the rate its last 429 came at (its peak)
#: closes this fraction of the gap with each success; near or past the peak it grows by
#: INCREASE a success, so it probes past the peak only slowly.
RECOVER = 0.3
INCREASE = 0.005
#: ...and by this fraction while it is still probing (before its second 429).
PROBE_INCREASE = 0.25
#: Seconds of recent successes a new lane's first rate is estimated from.
ESTIMATE_WINDOW = 2.0


@attrs.define
class Lane:
    """One merchant's pace: sends leave at most ``rate`` a second, none before
    ``next_at`` (the caller's clock)."""

    rate: float
    next_at: float
    probing: bool = True
    slowed_at: float = -math.inf
    epoch: int = 0
    """Bumped when the lane slows down: a slot reserved before is taken again."""
    limited: int = 0
    """429s this lane has seen."""
    peak: float = 0.0
    """The rate its last slowdown came at."""
    waiting: deque[Any] = attrs.Factory(deque)
    """What waits for this lane's turn, in order (the caller's entries)."""


class MerchantPace:
    """Every merchant's lane, and what the run knows of which row is whose."""

    def __init__(self, *, max_rate: float | None = None, capacity: int = 100_000) -> None:
        self.max_rate = max_rate
        self.lanes: dict[int, Lane] = {}
        self.learning = False
        """A 429 was seen: rows of unknown merchant are looked up before they are sent."""
        self._orders: OrderedDict[int, int | None] = OrderedDict()
        self._capacity = capacity
        self._recent: dict[int, deque[float]] = {}
        self._queued: set[int] = set()

    # -- which merchant ---------------------------------------------------------

    def merchant_of(self, order_id: int, given: int | None = None) -> int | None:
        if given is not None:
            return given
        return self._orders.get(order_id)

    def looked_up(self, order_id: int) -> bool:
        """Whether the order's merchant was learned, or looked for and not found."""
        return order_id in self._orders

    def learn(self, order_id: int, merchant_id: int | None, *, final: bool = False) -> None:
        """Note the order's merchant; ``final``: what a look-up found, even nothing
        (the order is not looked up again)."""
        if merchant_id is None and not final:
            return
        orders = self._orders
        orders[order_id] = merchant_id
        orders.move_to_end(order_id)
        if len(orders) > self._capacity:
            orders.popitem(last=False)

    # -- pace ---------------------------------------------------------------------

    def reserve(self, merchant_id: int | None, now: float) -> tuple[float, int] | None:
        """Take the merchant's next send slot: (when it may leave, the lane's epoch);
        None when the merchant has no lane (send now)."""
        lane = self.lanes.get(merchant_id) if merchant_id is not None else None
        if lane is None:
            return None
        due = max(lane.next_at, now)
        lane.next_at = due + 1.0 / lane.rate
        return due, lane.epoch

    def lane(self, merchant_id: int | None) -> Lane | None:
        return self.lanes.get(merchant_id) if merchant_id is not None else None

    def wait_in_lane(self, merchant_id: int, entry: Any, *, first: bool = False) -> None:
        """Queue ``entry`` for the merchant's next free slot (``first``: ahead of the
        rest, for one that was already sent and answered 429)."""
        lane = self.lanes[merchant_id]
        if first:
            lane.waiting.appendleft(entry)
        else:
            lane.waiting.append(entry)
        self._queued.add(merchant_id)

    @property
    def waiting(self) -> int:
        return sum(len(self.lanes[m].waiting) for m in self._queued)

    def next_due(self) -> float | None:
        """When the earliest queued entry's lane has a slot (None: nothing queued)."""
        return min((self.lanes[m].next_at for m in self._queued), default=None)

    def release(self, now: float) -> list[tuple[Any, tuple[float, int]]]:
        """Queued entries whose lane has a slot now, each with the slot it takes."""
        out = []
        for merchant in list(self._queued):
            lane = self.lanes[merchant]
            while lane.waiting and lane.next_at <= now:
                slot = self.reserve(merchant, now)
                assert slot is not None  # noqa: S101 - the lane exists
                out.append((lane.waiting.popleft(), slot))
            if not lane.waiting:
                self._queued.discard(merchant)
        return out

    def take_all(self) -> list[Any]:
        """Every queued entry, the lanes emptied (a run that stops)."""
        out: list[Any] = []
        for merchant in self._queued:
            out.extend(self.lanes[merchant].waiting)
            self.lanes[merchant].waiting.clear()
        self._queued.clear()
        return out

    def current(self, merchant_id: int | None, epoch: int) -> bool:
        """Whether a slot reserved at ``epoch`` still holds (the lane has not slowed)."""
        lane = self.lanes.get(merchant_id) if merchant_id is not None else None
        return lane is None or lane.epoch == epoch

    def succeeded(self, merchant_id: int | None, now: float) -> None:
        if merchant_id is None:
            return
        lane = self.lanes.get(merchant_id)
        if lane is None:
            recent = self._recent.get(merchant_id)
            if recent is None:
                recent = self._recent[merchant_id] = deque()
            recent.append(now)
            while recent and recent[0] < now - ESTIMATE_WINDOW:
                recent.popleft()
            return
        if lane.probing:
            grown = lane.rate * (1 + PROBE_INCREASE)
        elif lane.rate < 0.95 * lane.peak:
            grown = lane.rate + (lane.peak - lane.rate) * RECOVER
        else:
            grown = lane.rate * (1 + INCREASE)
        lane.rate = min(grown, self.max_rate) if self.max_rate is not None else grown

    def limited(self, merchant_id: int, now: float, retry_after: float) -> Lane:
        """A send for ``merchant_id`` got a 429 (``retry_after`` seconds to wait)."""
        self.learning = True
        lane = self.lanes.get(merchant_id)
        if lane is None:
            recent = [at for at in self._recent.pop(merchant_id, ()) if at >= now - ESTIMATE_WINDOW]
            # The rate its sends got through at lately (over at least half a second), but
            # never more than one send per Retry-After when that is under a second: a
            # platform that names so short a wait means its next token, never that its
            # rate is high. (Whole seconds say little about a rate.) Probing finds the rest.
            window = min(max(now - recent[0], 0.5), ESTIMATE_WINDOW) if recent else 1.0
            seen = len(recent) / window if recent else 1.0
            told = 1.0 / retry_after if 0 < retry_after < 1 else math.inf
            rate = max(min(seen, told), MIN_RATE)
            if self.max_rate is not None:
                rate = min(rate, self.max_rate)
            lane = self.lanes[merchant_id] = Lane(rate=rate, next_at=now, slowed_at=now)
        elif now - lane.slowed_at >= 1.0 / lane.rate:
            lane.probing = False
            lane.peak = lane.rate
            lane.rate = max(MIN_RATE, lane.rate * DECREASE)
            lane.slowed_at = now
            # Every slot reserved before is void (its row reserves again when it comes
            # due, in the order it had): the lane starts over at the new spacing.
            lane.epoch += 1
            lane.next_at = now + 1.0 / lane.rate
        lane.limited += 1
        lane.next_at = max(lane.next_at, now + retry_after)
        return lane
