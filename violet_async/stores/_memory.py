"""MemoryStore: keys kept in this process (the default store)."""

from __future__ import annotations

import heapq

import attrs

from ._base import DEFAULT_LEASE, DEFAULT_RETENTION, Claim, KeyEntry, check_seconds, decide

__all__ = ["MemoryStore"]


class MemoryStore:
    """Idempotency keys in a dict: one process, gone with it. A repeat of a call in the
    same process (a double click, a handler retried after a timeout) is answered from
    here; a restarted process or another worker is not. Use :class:`SQLiteStore` or
    :class:`RedisStore` for those.

    ``retention``: seconds a finished key is kept (default 24 h); ``max_finished``
    bounds how many finished keys are kept at once (oldest dropped first). Unfinished
    keys are never dropped.
    """

    def __init__(
        self,
        *,
        retention: float = DEFAULT_RETENTION,
        max_finished: int = 100_000,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        check_seconds("retention", retention)
        check_seconds("lease", lease)
        self.retention = retention
        self.lease = lease
        self._max_finished = max_finished
        self._entries: dict[str, KeyEntry] = {}
        # (finished_at, key) of finished entries, oldest first (lazily cleaned).
        self._finished: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._entries)

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        self._prune(now)
        current = self._entries.get(fresh.key)
        claim, entry, write = decide(current, fresh, now=now, retention=self.retention)
        if write is not None:
            self._put(write)
        return claim, entry

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        current = self._entries.get(entry.key)
        if current is None or current.owner != owner:
            return False
        self._put(entry)
        return True

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        current = self._entries.get(key)
        if current is None or current.owner != owner:
            return False
        self._entries[key] = attrs.evolve(current, lease_until=lease_until)
        return True

    async def load(self, key: str) -> KeyEntry | None:
        return self._entries.get(key)

    async def aclose(self) -> None:
        return None

    def _put(self, entry: KeyEntry) -> None:
        self._entries[entry.key] = entry
        if entry.finished_at is not None:
            heapq.heappush(self._finished, (entry.finished_at, entry.key))
            if len(self._finished) > self._max_finished:
                self._prune(None)

    def _prune(self, now: float | None) -> None:
        """Drop finished entries past retention (or the oldest, over the bound)."""
        heap = self._finished
        while heap and (
            len(heap) > self._max_finished
            or (now is not None and heap[0][0] + self.retention <= now)
        ):
            finished_at, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.finished_at == finished_at:
                del self._entries[key]
