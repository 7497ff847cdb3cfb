"""Each merchant's pace, shared by every worker of a fleet (the batch's lanes, in Redis).

Violet passes each merchant platform's 429s through, so the fleet keeps one lane per
merchant in a hash ``P:pace:<app_id>:<merchant_id>`` (its rate, its next free send slot
``tat``, whether it is still probing, when it last slowed), all on Redis's own ``TIME``
as :class:`FleetRateLimit` is: workers on skewed hosts share one schedule. The rules are
the batch's (``violet_async._pace``): no lane until the merchant's first 429; then the
rate its sends got through at in the last two seconds (at most one send per
``Retry-After``), probing up x1.25 a success until its second
429, then -20% on a 429 (once per ``1 / rate``), a quick climb back to near the rate
that 429 came at, and a slow probe past it.

A slot is taken twice: when the item starts (an item whose slot is further than the
worker's patience is handed back until then), and again right before its request
leaves (``sent_tat``, :meth:`FleetPace.gate`). Between the two an item reads the bag
back and records its send, which takes as long as the machine and Redis make it; two
items a slot apart could otherwise reach the merchant closer together than its rate,
and a platform that allows one send per ``1 / rate`` answers the second with a 429
(which slows the lane further, and so on down). Neither takes a slot further away than
the caller may wait (the worker's patience; at the gate, its call's deadline too): a
slot taken and given up would push the lane's later sends ahead of their slots.

Which merchant an item belongs to is its own signed ``merchant_id`` (an input's
column), or else what ``P:merchants:<app_id>`` (order id -> merchant id) holds, learned
from the refunds workers get back and, once any 429 has been seen
(``P:pace:<app_id>:learning``), from ``GET /orders/{id}`` before a send. Until that
first 429 no merchant has a lane and workers pace nothing (one ``EXISTS`` an item).

A lane counts its slowdowns (``epoch``): the gate hands each send the epoch it left
in, and a 429 slows the lane only for a send of the present epoch, so a wave of 429s
from sends spaced at a rate already given up slows it once (the batch's rule). A
slowdown's new spacing starts after the last slot already handed out (those sends still
leave at the old spacing; a send of the new epoch squeezed between them reaches a
one-token platform early, and its 429 would slow the lane again, and so on down), and
it keeps the rate the merchant let through in the last two seconds, up to ``KEEP`` of
the lane's rate: a 429 from a send that arrived a little early proves no lower limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._pace import DECREASE, INCREASE, MIN_RATE, PROBE_INCREASE, RECOVER
from ._ledger import DEFAULT_PREFIX, ScriptCall, resolve

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["FleetPace"]

#: A slowdown keeps the rate the merchant let through in the last two seconds, up to
#: this fraction of the lane's rate (so it always slows by some): 429s from sends that
#: reached a one-token platform a little early (jitter between the gate and the
#: request) cannot take a lane far under the rate its merchant allows.
KEEP = 0.9

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
"""

# KEYS: lane, the order -> merchant hash. ARGV: patience (ms), an order id ('': none; its
# merchant, this lane's, is noted first) and the merchant id. Returns ms to wait for the
# slot taken, or -ms when the slot is further than patience (nothing taken), or "none"
# when the merchant has no lane.
_RESERVE = (
    _NOW
    + """
if ARGV[2] and ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
end
local rate = tonumber(redis.call('HGET', KEYS[1], 'rate') or 0)
if rate <= 0 then return 'none' end
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or 0)
local slot = math.max(tat, now)
if slot - now > tonumber(ARGV[1]) then return tostring(-(slot - now)) end
redis.call('HSET', KEYS[1], 'tat', tostring(slot + 1000 / rate))
redis.call('PEXPIRE', KEYS[1], 86400000)
return tostring(slot - now)
"""
)

# The send-time gate: the lane's next send slot for a request about to leave. ARGV: the
# furthest slot the caller may take (ms from now; '': any). Returns "<ms to wait> <the
# lane's epoch>", the wait negative when the slot is further than that (nothing taken),
# or "none" when the merchant has no lane.
_GATE = (
    _NOW
    + """
local rate = tonumber(redis.call('HGET', KEYS[1], 'rate') or 0)
if rate <= 0 then return 'none' end
local sent = tonumber(redis.call('HGET', KEYS[1], 'sent_tat') or 0)
local slot = math.max(sent, now)
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
local limit = tonumber(ARGV[1])
if limit and slot - now > limit then return tostring(-(slot - now)) .. ' ' .. epoch end
redis.call('HSET', KEYS[1], 'sent_tat', tostring(slot + 1000 / rate))
redis.call('PEXPIRE', KEYS[1], 86400000)
return tostring(slot - now) .. ' ' .. epoch
"""
)

# KEYS: lane, learning flag. ARGV: retry-after (ms), min rate, decrease, ceiling (0: none),
# the epoch the 429'd send passed the gate in ('': not known; -1: it passed no gate),
# the most of its rate a slowdown keeps when its merchant let that much through lately
_LIMITED = (
    _NOW
    + """
redis.call('SET', KEYS[2], '1', 'PX', 86400000)
local ceiling = tonumber(ARGV[4])
local rate = tonumber(redis.call('HGET', KEYS[1], 'rate') or 0)
local wait = tonumber(ARGV[1])
-- The merchant's sends that got through in the last two whole seconds: this second so
-- far and the one before it (counted by _SUCCEEDED, lane or not).
local sec = math.floor(now / 1000)
local ok_sec = tonumber(redis.call('HGET', KEYS[1], 'ok_sec') or 0)
local seen, window = 0, 1
if ok_sec == sec then
  seen = tonumber(redis.call('HGET', KEYS[1], 'ok_cur') or 0)
    + tonumber(redis.call('HGET', KEYS[1], 'ok_prev') or 0)
  window = 1 + math.max(now - sec * 1000, 100) / 1000
elseif ok_sec == sec - 1 then
  seen = tonumber(redis.call('HGET', KEYS[1], 'ok_cur') or 0)
end
if rate <= 0 then
  -- The lane's first rate: what got through (one a second when none did), never
  -- counted from before the merchant's first success (a run's first seconds) and over
  -- at least half a second, at most one send per Retry-After when that is under a
  -- second (so short a wait names the next token, never a high rate).
  local since = tonumber(redis.call('HGET', KEYS[1], 'ok_since') or 0)
  window = math.max(math.min(window, (now - since) / 1000), 0.5)
  local estimate = seen > 0 and seen / window or 1
  if wait > 0 and wait < 1000 then estimate = math.min(estimate, 1000 / wait) end
  rate = math.max(tonumber(ARGV[2]), estimate)
  if ceiling > 0 then rate = math.min(rate, ceiling) end
  redis.call('HSET', KEYS[1], 'rate', tostring(rate), 'probing', '1', 'slowed_at',
             tostring(now), 'tat', tostring(now), 'sent_tat', tostring(now))
else
  local slow
  local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or 0)
  if ARGV[5] ~= '' then
    -- Only a send that left at the lane's present spacing is news: one gated before
    -- the last slowdown (or never gated) was paced by a rate already given up.
    slow = tonumber(ARGV[5]) == epoch
  else
    local last = tonumber(redis.call('HGET', KEYS[1], 'slowed_at') or 0)
    slow = now - last >= 1000 / rate
  end
  if slow then
    local peak = rate
    -- Never below the rate the merchant let through lately (a 429 from a send that
    -- reached it early proves no lower limit), yet always by some of it.
    local floor = math.min(seen / window, rate * tonumber(ARGV[6]))
    rate = math.max(tonumber(ARGV[2]), rate * tonumber(ARGV[3]), floor)
    -- Slots handed out before (up to a patience ahead) still leave at the old spacing:
    -- the new spacing starts after the last of them, never between them (a send of the
    -- new epoch squeezed next to one of the old would draw a 429 that slows it again).
    local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or 0)
    local sent = tonumber(redis.call('HGET', KEYS[1], 'sent_tat') or 0)
    tat = math.max(tat - 1000 / peak, now) + 1000 / rate
    sent = math.max(sent - 1000 / peak, now) + 1000 / rate
    redis.call('HSET', KEYS[1], 'rate', tostring(rate), 'probing', '0', 'slowed_at',
               tostring(now), 'tat', tostring(tat), 'peak', tostring(peak),
               'sent_tat', tostring(sent), 'epoch', tostring(epoch + 1))
  end
end
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or 0)
local sent = tonumber(redis.call('HGET', KEYS[1], 'sent_tat') or 0)
redis.call('HSET', KEYS[1], 'tat', tostring(math.max(tat, now + wait)),
           'sent_tat', tostring(math.max(sent, now + wait)))
redis.call('PEXPIRE', KEYS[1], 86400000)
return tostring(rate)
"""
)

# KEYS: lane, the order -> merchant hash. ARGV: probe increase, increase, ceiling (0:
# none), recover, order id ('': none; its merchant is noted). Returns the rate ("none":
# no lane).
_SUCCEEDED = (
    _NOW
    + """
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[5], ARGV[6])
end
-- Count the merchant's successes per second (a 429 reads them: a new lane's first rate,
-- a lane's floor).
local sec = math.floor(now / 1000)
local ok_sec = tonumber(redis.call('HGET', KEYS[1], 'ok_sec') or 0)
if ok_sec ~= sec then
  local cur = ok_sec == sec - 1 and (redis.call('HGET', KEYS[1], 'ok_cur') or '0') or '0'
  redis.call('HSET', KEYS[1], 'ok_sec', tostring(sec), 'ok_prev', cur, 'ok_cur', '0')
end
redis.call('HINCRBY', KEYS[1], 'ok_cur', 1)
redis.call('HSETNX', KEYS[1], 'ok_since', tostring(now))
local rate = tonumber(redis.call('HGET', KEYS[1], 'rate') or 0)
if rate <= 0 then
  redis.call('PEXPIRE', KEYS[1], 86400000)
  return 'none'
end
local peak = tonumber(redis.call('HGET', KEYS[1], 'peak') or 0)
if redis.call('HGET', KEYS[1], 'probing') == '1' then
  rate = rate * (1 + tonumber(ARGV[1]))
elseif rate < 0.95 * peak then
  rate = rate + (peak - rate) * tonumber(ARGV[4])
else
  rate = rate * (1 + tonumber(ARGV[2]))
end
local ceiling = tonumber(ARGV[3])
if ceiling > 0 then rate = math.min(rate, ceiling) end
redis.call('HSET', KEYS[1], 'rate', tostring(rate))
return tostring(rate)
"""
)


class FleetPace:
    """Every merchant's lane for app ``app_id``, across the workers sharing this Redis
    and prefix (see the module docstring). ``ceiling`` caps every lane (None: none)."""

    def __init__(
        self,
        redis: Redis,
        app_id: int,
        *,
        prefix: str = DEFAULT_PREFIX,
        ceiling: float | None = None,
    ) -> None:
        self.redis = redis
        self.ceiling = ceiling or 0.0
        self._lane = f"{prefix}:pace:{app_id}:"
        self._learning = f"{prefix}:pace:{app_id}:learning"
        self._merchants = f"{prefix}:merchants:{app_id}"
        self._reserve = redis.register_script(_RESERVE)
        self._limited = redis.register_script(_LIMITED)
        self._succeeded = redis.register_script(_SUCCEEDED)
        self._gate = redis.register_script(_GATE)

    async def merchant_of(self, order_id: int) -> int | None:
        raw = await resolve(self.redis.hget(self._merchants, str(order_id)))
        return int(raw) if raw is not None else None

    async def learn(self, order_id: int, merchant_id: int | None) -> None:
        if merchant_id is not None:
            await resolve(self.redis.hset(self._merchants, str(order_id), str(merchant_id)))

    async def learning(self) -> bool:
        return bool(await resolve(self.redis.exists(self._learning)))

    def queue_learning(self, pipe: Any) -> None:
        """Queue :meth:`learning`'s read on ``pipe``: its answer is non-zero when
        learning."""
        pipe.exists(self._learning)

    def queue_merchant_of(self, pipe: Any, order_id: int) -> None:
        """Queue :meth:`merchant_of`'s read on ``pipe`` (its answer: the raw value)."""
        pipe.hget(self._merchants, str(order_id))

    async def reserve(
        self, merchant_id: int, patience: float, *, order_id: int | None = None
    ) -> float | None:
        """Take the merchant's next send slot if it is within ``patience`` seconds:
        the seconds to wait for it. A negative value: the slot is that far away and
        nothing was taken (come back then). None: the merchant has no lane.
        ``order_id``: an order of the merchant's, noted as :meth:`learn` does, in the
        same round trip."""
        raw = await self._reserve(
            keys=[self._lane + str(merchant_id), self._merchants],
            args=[patience * 1000, "" if order_id is None else str(order_id), str(merchant_id)],
        )
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return None if text == "none" else float(text) / 1000

    async def gate(self, merchant_id: int, limit: float | None = None) -> float | None:
        """Take the merchant's next slot for a request about to leave: the seconds to
        wait before it does (None: the merchant has no lane). Sends through the gate
        leave at most ``rate`` a second, however long each took to get there.
        ``limit``: take no slot further than that many seconds away; a negative value
        says the slot is that far and nothing was taken (the request must not leave)."""
        slot = await self.gate_slot(merchant_id, limit)
        return None if slot is None else slot[0]

    async def gate_slot(
        self, merchant_id: int, limit: float | None = None
    ) -> tuple[float, int] | None:
        """:meth:`gate`, with the lane's epoch the slot was taken in (pass it to
        :meth:`limited` when the send gets a 429)."""
        raw = await self._gate(
            keys=[self._lane + str(merchant_id)],
            args=["" if limit is None else max(limit, 0.0) * 1000],
        )
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        if text == "none":
            return None
        wait, _, epoch = text.partition(" ")
        return float(wait) / 1000, int(epoch or 0)

    async def limited(
        self, merchant_id: int, retry_after: float, *, epoch: int | None = None
    ) -> float:
        """A send for the merchant got a 429; returns the lane's new rate.

        ``epoch``: the lane's epoch the send passed the gate in (:meth:`gate_slot`; -1:
        it passed none). Only a send of the present epoch slows the lane (and starts a
        new epoch): the 429s of sends spaced at a rate already given up are a wave from
        before, as the batch's lanes count them. None: at most once per ``1 / rate``."""
        raw = await self._limited(
            keys=[self._lane + str(merchant_id), self._learning],
            args=[
                max(retry_after, 0.0) * 1000,
                MIN_RATE,
                DECREASE,
                self.ceiling,
                "" if epoch is None else str(epoch),
                KEEP,
            ],
        )
        return float(raw)

    async def succeeded(self, merchant_id: int, order_id: int | None = None) -> None:
        """A send for the merchant succeeded (``order_id``: its order, whose merchant
        is noted as :meth:`learn` does, in the same round trip)."""
        script, keys, args = self.success_call(merchant_id, order_id)
        await script(keys=keys, args=args)

    def success_call(self, merchant_id: int, order_id: int | None = None) -> ScriptCall:
        """:meth:`succeeded` as a script call to queue with others in one round trip
        (:meth:`RedisLedger.mark_applied_and_read`'s ``then``)."""
        return (
            self._succeeded,
            [self._lane + str(merchant_id), self._merchants],
            [
                PROBE_INCREASE,
                INCREASE,
                self.ceiling,
                RECOVER,
                "" if order_id is None else str(order_id),
                str(merchant_id),
            ],
        )

    async def rate(self, merchant_id: int) -> float | None:
        raw = await resolve(self.redis.hget(self._lane + str(merchant_id), "rate"))
        return float(raw) if raw is not None else None
