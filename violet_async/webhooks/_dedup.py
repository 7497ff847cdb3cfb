"""Deduplication of webhook deliveries: a claim while a callback runs, a mark once it
succeeded, a release when it failed.

An event is *claimed* (with an expiry, so a crashed process does not hold it forever)
while its callback runs, marked *done* only after the callback succeeded, and
*released* when it failed, so Violet's next delivery runs it again. Keys are fixed-size
digests (the receiver hashes the event id and the body before calling the store), so a
store's memory is bounded by its entry count however long the ids a sender makes up.

The protocol maps onto Redis one command per method::

    claim(key, ttl)  SET key "running" NX PX ttl  -> OK: NEW; else GET key: "done" -> DONE,
                     anything else -> RUNNING (or one Lua script for both steps)
    done(key)        SET key "done" PX retention
    release(key)     Lua: if GET key == "running" then DEL key end
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

__all__ = ["ClaimResult", "DedupStore", "InMemoryDedupStore"]


class ClaimResult(enum.Enum):
    """What :meth:`DedupStore.claim` found."""

    NEW = "new"
    """Nobody holds the key: the caller now does and must call ``done`` or ``release``."""
    RUNNING = "running"
    """Another delivery holds an unexpired claim: do not run, do not drop (answer 503)."""
    DONE = "done"
    """Handled before: acknowledge without a callback."""


class DedupStore(Protocol):
    """Where claims and handled keys live. ``claim`` must be atomic: of concurrent
    callers on one key exactly one gets NEW. Share one store (Redis, a database unique
    key) between processes that serve the same webhook URL."""

    async def claim(self, key: str, ttl: float) -> ClaimResult:
        """Claim ``key`` for ``ttl`` seconds unless it is claimed or done."""
        ...

    async def done(self, key: str) -> None:
        """Mark ``key`` handled (kept for the store's retention, well past Violet's
        24 h of retries: this is what keeps replays out)."""
        ...

    async def release(self, key: str) -> None:
        """Drop a claim (the callback failed), so the next delivery runs again. A key
        already done stays done."""
        ...


class InMemoryDedupStore:
    """Claims and handled keys in this process.

    Each key is kept as a 16-byte BLAKE2b digest with a float expiry, whatever the key's
    length: at most ``max_entries`` handled keys (oldest dropped first) for ``ttl``
    seconds, and at most ``max_entries`` claims. The retention is what keeps a replay
    out (the receiver refuses nothing by age unless given ``max_age``, which must not
    exceed it); the default, 72 h, outlasts Violet's 24 h of retries three times.
    """

    digest_size = 16

    def __init__(
        self,
        *,
        ttl: float = 72 * 3600.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl and max_entries must be positive")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._done: OrderedDict[bytes, float] = OrderedDict()  # digest -> expiry
        self._claims: dict[bytes, float] = {}  # digest -> claim expiry

    def __len__(self) -> int:
        return len(self._done) + len(self._claims)

    def _digest(self, key: str) -> bytes:
        return hashlib.blake2b(key.encode(), digest_size=self.digest_size).digest()

    def _prune(self, now: float) -> None:
        while self._done:
            oldest, expires = next(iter(self._done.items()))
            if expires > now and len(self._done) < self.max_entries:
                break
            del self._done[oldest]
        if len(self._claims) >= self.max_entries:
            self._claims = {k: exp for k, exp in self._claims.items() if exp > now}

    async def claim(self, key: str, ttl: float) -> ClaimResult:
        """Atomic in one event loop: no await between the check and the write."""
        now = self._clock()
        self._prune(now)
        digest = self._digest(key)
        if digest in self._done:
            return ClaimResult.DONE
        held = self._claims.get(digest)
        if held is not None and held > now:
            return ClaimResult.RUNNING
        if len(self._claims) >= self.max_entries:
            return ClaimResult.RUNNING  # full of live claims: the sender retries later
        self._claims[digest] = now + ttl
        return ClaimResult.NEW

    async def done(self, key: str) -> None:
        """Mark handled; the claim, if any, is dropped."""
        now = self._clock()
        digest = self._digest(key)
        self._claims.pop(digest, None)
        self._done.pop(digest, None)
        self._prune(now)  # makes room for one
        self._done[digest] = now + self.ttl

    async def release(self, key: str) -> None:
        """Drop a claim; a done key stays done."""
        self._claims.pop(self._digest(key), None)

    async def first_time(self, key: str) -> bool:
        """The 0.x interface: claim and mark done in one step (True exactly once).
        Prefer ``claim`` / ``done`` / ``release``, which never lose a failed event."""
        if await self.claim(key, self.ttl) is not ClaimResult.NEW:
            return False
        await self.done(key)
        return True
