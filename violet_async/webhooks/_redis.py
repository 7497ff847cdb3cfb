"""A :class:`~violet_async.webhooks.DedupStore` in Redis, for receivers on several hosts
(extra: ``fleet``, for redis-py)::

    from redis.asyncio import Redis
    from violet_async.webhooks._redis import RedisDedupStore

    store = RedisDedupStore(Redis.from_url("redis://..."))

Keys are ``PREFIX:<blake2b digest>`` (fixed size whatever the event id), holding
``running`` (with the claim's expiry) or ``done`` (kept ``retention`` seconds)::

    claim(key, ttl)  Lua: SET NX PX ttl -> NEW; else GET: "done" -> DONE, else RUNNING
    done(key)        SET key "done" PX retention
    release(key)     Lua: if GET key == "running" then DEL key end
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from ._dedup import ClaimResult

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisDedupStore"]

_CLAIM = """
if redis.call('SET', KEYS[1], 'running', 'NX', 'PX', ARGV[1]) then
  return 'new'
end
return redis.call('GET', KEYS[1]) or 'running'
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == 'running' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisDedupStore:
    """Claims and handled keys in Redis, shared by every receiver that uses it.

    ``retention`` (seconds a handled key is remembered) must outlast the receiver's
    ``max_age`` (48 h by default); the default is 72 h.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "{violet}:webhook",
        retention: float = 72 * 3600.0,
    ) -> None:
        if retention <= 0:
            raise ValueError("retention must be positive")
        self.redis = redis
        self.prefix = prefix
        self.retention = retention
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}"

    async def claim(self, key: str, ttl: float) -> ClaimResult:
        """Atomic across hosts: of concurrent callers on one key exactly one gets NEW."""
        found = await self._claim(keys=[self._key(key)], args=[max(int(ttl * 1000), 1)])
        text = found.decode() if isinstance(found, bytes) else str(found)
        if text == "new":
            return ClaimResult.NEW
        return ClaimResult.DONE if text == "done" else ClaimResult.RUNNING

    async def done(self, key: str) -> None:
        """Mark handled (the claim, if any, becomes the mark)."""
        await self.redis.set(self._key(key), "done", px=int(self.retention * 1000))

    async def release(self, key: str) -> None:
        """Drop a claim; a done key stays done."""
        await self._release(keys=[self._key(key)])
