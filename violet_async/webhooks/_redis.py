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
import secrets
from typing import TYPE_CHECKING

from ._dedup import ClaimResult

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisDedupStore"]

# A claim's value names its owner ("running:<token>"), so that a receiver whose claim
# expired (a callback that outlived it) cannot release another receiver's claim.
_CLAIM = """
if redis.call('SET', KEYS[1], 'running:' .. ARGV[2], 'NX', 'PX', ARGV[1]) then
  return 'new'
end
return redis.call('GET', KEYS[1]) or 'running'
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == 'running:' .. ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisDedupStore:
    """Claims and handled keys in Redis, shared by every receiver that uses it.

    ``retention`` (seconds a handled key is remembered) is what keeps replays out (the
    receiver refuses nothing by age unless given ``max_age``, which it must outlast);
    the default, 72 h, is three times Violet's 24 h of retries.
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
        self._tokens: dict[str, str] = {}  # key -> the token of this store's live claim

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}"

    async def claim(self, key: str, ttl: float) -> ClaimResult:
        """Atomic across hosts: of concurrent callers on one key exactly one gets NEW."""
        token = secrets.token_hex(8)
        found = await self._claim(keys=[self._key(key)], args=[max(int(ttl * 1000), 1), token])
        text = found.decode() if isinstance(found, bytes) else str(found)
        if text == "new":
            self._tokens[key] = token
            return ClaimResult.NEW
        return ClaimResult.DONE if text == "done" else ClaimResult.RUNNING

    async def done(self, key: str) -> None:
        """Mark handled (the claim, if any, becomes the mark)."""
        self._tokens.pop(key, None)
        await self.redis.set(self._key(key), "done", px=int(self.retention * 1000))

    async def release(self, key: str) -> None:
        """Drop this store's own claim; a done key, or another receiver's claim, stays."""
        token = self._tokens.pop(key, None)
        if token is not None:
            await self._release(keys=[self._key(key)], args=[token])
