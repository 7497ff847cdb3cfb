"""One rate budget per Violet app, shared by every worker of a fleet.

A GCRA (generic cell rate algorithm) in one Lua script: Redis keeps the app's current
rate and its *theoretical arrival time* (the next free send slot, ``tat``) in a hash
``P:rate:<app_id>``; each send reserves the slot ``max(tat, now)`` and moves ``tat`` on
by ``1 / rate``. The clock is Redis's own ``TIME``, so hosts with skewed clocks share one
schedule, and N workers together send at ``rate``, never N times it.

The rate is adaptive, like the batch runner's: a 429 seen by any worker halves it (at
most once per ``1 / rate`` seconds, so one burst of 429s across the fleet halves once,
not once per worker), never below ``ceiling / 64``; every success creeps it back by
``ceiling / 20`` up to ``ceiling``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ._ledger import DEFAULT_PREFIX, resolve

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["FleetRateLimit"]

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ceiling = tonumber(ARGV[1])
local rate = tonumber(redis.call('HGET', KEYS[1], 'rate') or ceiling)
if rate > ceiling then rate = ceiling end
"""

# ARGV: ceiling, earliest (ms from now), the furthest wait the caller may take (ms after
# earliest; '' or absent: any). Returns ms to wait, as text (Lua numbers would be cut to
# integers); negative when the slot is further than that (nothing taken).
_RESERVE = (
    _PRELUDE
    + """
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or 0)
local earliest = now + tonumber(ARGV[2])
local slot = math.max(tat, earliest)
local limit = tonumber(ARGV[3])
if limit and slot - earliest > limit then return tostring(-(slot - earliest)) end
redis.call('HSET', KEYS[1], 'tat', tostring(slot + 1000 / rate))
redis.call('PEXPIRE', KEYS[1], 86400000)
return tostring(slot - earliest)
"""
)

# ARGV: ceiling, "down" | "up"
_ADJUST = (
    _PRELUDE
    + """
if ARGV[2] == 'down' then
  local last = tonumber(redis.call('HGET', KEYS[1], 'halved_at') or 0)
  if now - last >= 1000 / rate then
    rate = math.max(ceiling / 64, rate / 2)
    redis.call('HSET', KEYS[1], 'halved_at', tostring(now))
    -- Nothing already reserved is sent sooner than the new spacing allows.
    local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or 0)
    redis.call('HSET', KEYS[1], 'tat', tostring(math.max(tat, now) + 1000 / rate))
  end
else
  rate = math.min(ceiling, rate + ceiling / 20)
end
redis.call('HSET', KEYS[1], 'rate', tostring(rate))
redis.call('PEXPIRE', KEYS[1], 86400000)
return tostring(rate)
"""
)


class FleetRateLimit:
    """At most ``rate`` sends per second for app ``app_id``, across every worker that
    shares this Redis and prefix (see the module docstring)."""

    def __init__(
        self, redis: Redis, app_id: int, rate: float, *, prefix: str = DEFAULT_PREFIX
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.redis = redis
        self.ceiling = float(rate)
        self.key = f"{prefix}:rate:{app_id}"
        self._reserve = redis.register_script(_RESERVE)
        self._adjust = redis.register_script(_ADJUST)

    async def wait(self, earliest: float = 0.0, limit: float | None = None) -> float:
        """Reserve the next send slot no sooner than ``earliest`` seconds from now and
        sleep until ``earliest`` before it; returns the seconds slept. (The caller
        waits the ``earliest`` part itself, as the refund driver does for a backoff.)

        ``limit``: take no slot more than that many seconds after ``earliest`` (a
        call's deadline); then nothing is taken, nothing slept, and the negative wait
        the slot would have needed is returned (the request must not leave)."""
        args: list[float | str] = [self.ceiling, max(earliest, 0.0) * 1000]
        args.append("" if limit is None else max(limit, 0.0) * 1000)
        waited = float(await self._reserve(keys=[self.key], args=args)) / 1000
        if waited > 0:
            await asyncio.sleep(waited)
        return waited

    async def slow_down(self) -> float:
        """A 429: halve the fleet's rate (once per burst). Returns the new rate."""
        return float(await self._adjust(keys=[self.key], args=[self.ceiling, "down"]))

    async def speed_up(self) -> float:
        """A success: creep the fleet's rate back toward the ceiling."""
        return float(await self._adjust(keys=[self.key], args=[self.ceiling, "up"]))

    async def current(self) -> float:
        raw = await resolve(self.redis.hget(self.key, "rate"))
        return min(float(raw), self.ceiling) if raw is not None else self.ceiling
