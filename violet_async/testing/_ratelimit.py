"""Violet's per-app rate limit and each merchant platform's own, for FakeViolet: token
buckets on refund and cancel POSTs.

``FakeViolet(rate_limit=R)`` answers a refund or cancel POST beyond ``R`` per second
(with a bucket of ``burst`` tokens, default ``max(1, R / 10)``) with Violet's 429 and
``Retry-After: 1``, before the request is looked at: nothing is applied. It counts what
it let through and what it refused, with the times of the ones let through, so a test
can check that a fleet of workers stays under the limit together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ._wire import violet_error

__all__ = ["AppRateLimit", "MerchantRateLimits"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AppRateLimit:
    """A token bucket of ``rate`` tokens per second holding at most ``burst``."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()
        self.allowed = 0
        self.limited = 0
        self.allowed_at: list[float] = []

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            self.allowed += 1
            self.allowed_at.append(now)
            return True
        self.limited += 1
        return False

    def until_token(self) -> float:
        """Seconds until the bucket holds a whole token again (0: it does now)."""
        return max(0.0, (1 - self._tokens) / self.rate)

    def max_in_window(self, seconds: float = 1.0) -> int:
        """The most POSTs let through in any window of ``seconds``."""
        best = start = 0
        times = self.allowed_at
        for end in range(len(times)):
            while times[end] - times[start] > seconds:
                start += 1
            best = max(best, end - start + 1)
        return best

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        mutating = request.method == "POST" and request.path.endswith(("/refunds", "/cancel"))
        if mutating and not self.take():
            response = violet_error(429, "Too Many Requests", 4290, time.time())
            response.headers["Retry-After"] = "1"
            return response
        return await handler(request)


class MerchantRateLimits:
    """Each merchant platform's own limit on refund and cancel POSTs, as Violet passes
    it through: ``limits`` maps a merchant id to refunds per second (a token bucket
    holding ``burst`` tokens, default 1); merchants not listed get ``default`` (None:
    no limit). Over the limit a POST is answered with Violet's 429 and a
    ``Retry-After`` of the seconds until the merchant's bucket has a token again
    (rounded up to 0.01 s), before anything is looked at: nothing is applied.

    ``merchant_of(order_id, bag_id)`` names a bag's merchant (FakeViolet gives its
    store's). Counts per merchant are in :attr:`buckets`.
    """

    def __init__(
        self,
        limits: dict[int, float],
        merchant_of: Callable[[int, int], int | None],
        *,
        default: float | None = None,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for merchant, rate in limits.items():
            if rate <= 0:
                raise ValueError(f"merchant {merchant}: rate must be > 0")
        if default is not None and default <= 0:
            raise ValueError("default rate must be > 0")
        self.limits = dict(limits)
        self.default = default
        self.burst = burst
        self._merchant_of = merchant_of
        self._clock = clock
        self.buckets: dict[int, AppRateLimit] = {}

    def bucket(self, merchant_id: int) -> AppRateLimit | None:
        found = self.buckets.get(merchant_id)
        if found is None:
            rate = self.limits.get(merchant_id, self.default)
            if rate is None:
                return None
            found = self.buckets[merchant_id] = AppRateLimit(
                rate, burst=self.burst, clock=self._clock
            )
        return found

    @property
    def limited(self) -> int:
        """429s answered, over every merchant."""
        return sum(b.limited for b in self.buckets.values())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        mutating = request.method == "POST" and request.path.endswith(("/refunds", "/cancel"))
        if mutating:
            try:
                order_id = int(request.match_info["order_id"])
                bag_id = int(request.match_info["bag_id"])
            except (KeyError, ValueError):
                return await handler(request)
            merchant = self._merchant_of(order_id, bag_id)
            bucket = self.bucket(merchant) if merchant is not None else None
            if bucket is not None and not bucket.take():
                wait = bucket.until_token()
                response = violet_error(429, "Too Many Requests", 4290, time.time())
                response.headers["Retry-After"] = f"{math.ceil(wait * 100) / 100:.2f}"
                return response
        return await handler(request)
