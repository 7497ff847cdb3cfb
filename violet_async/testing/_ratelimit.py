"""Violet's per-app rate limit, for FakeViolet: a token bucket on refund and cancel POSTs.

``FakeViolet(rate_limit=R)`` answers a refund or cancel POST beyond ``R`` per second
(with a bucket of ``burst`` tokens, default ``max(1, R / 10)``) with Violet's 429 and
``Retry-After: 1``, before the request is looked at: nothing is applied. It counts what
it let through and what it refused, with the times of the ones let through, so a test
can check that a fleet of workers stays under the limit together.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ._wire import violet_error

__all__ = ["AppRateLimit"]

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
