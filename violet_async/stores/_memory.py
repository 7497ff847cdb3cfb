"""MemoryStore: keys kept in this process (the default store)."""

from __future__ import annotations

import heapq
from collections.abc import Callable

import attrs

from ..exceptions import RecordStoreError
from ._base import (
    DEFAULT_LEASE,
    DEFAULT_RETENTION,
    Claim,
    KeyEntry,
    SweepClock,
    check_seconds,
    decide,
)

__all__ = ["MemoryStore"]


class MemoryStore:
    """Idempotency keys in a dict: one process, gone with it. A repeat of a call in the
    same process (a double click, a handler retried after a timeout) is answered from
    here; a restarted process or another worker is not. Use :class:`SQLiteStore` or
    :class:`RedisStore` for those.

    ``retention``: seconds a finished key is kept (default 24 h). No key is dropped
    before its retention ends (a key dropped early could send its refund again):
    ``max_finished`` bounds how many finished keys within their retention are kept at
    once, and a call with a **new** key while that many are kept fails closed with
    ``RecordStoreError`` (nothing sent); keys already stored still answer. Raise it,
    shorten ``retention``, or use :class:`SQLiteStore` for more. Retention is counted
    on the wall clock and on this process's monotonic clock at once (``monotonic``:
    default ``time.monotonic``, from when the key finished), so a wall clock stepped
    forward, or stepped back while a key finished and put right since, never drops a
    key early or frees it for another request.
    """

    def __init__(
        self,
        *,
        retention: float = DEFAULT_RETENTION,
        max_finished: int = 100_000,
        lease: float = DEFAULT_LEASE,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        check_seconds("retention", retention)
        check_seconds("lease", lease)
        self.retention = retention
        self.lease = lease
        self._max_finished = max_finished
        self._sweep = SweepClock(monotonic)
        self._entries: dict[str, KeyEntry] = {}
        # (finished_at, key) of finished entries, oldest first (lazily cleaned).
        self._finished: list[tuple[float, str]] = []
        # When each finished key finished, on the monotonic clock: a key goes only once
        # retention has passed on it too (its ``finished_at`` is wall time, stamped on
        # a clock that may have been stepped back then and put right since: review 14).
        self._done: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        # The claimed key is read before the sweep: retention is wall-clock time, which
        # can step, and a finished key asked again for its own request answers with its
        # refund however old (``decide``); the sweep only drops the others.
        current = self._entries.get(fresh.key)
        self._prune(now)
        if current is not None and fresh.key not in self._entries:
            self._put(current)
        if current is None and len(self._finished) >= self._max_finished and self._full():
            key = fresh.key.split(" ", 2)[-1]  # the caller's key, without its scope
            raise RecordStoreError(
                f"MemoryStore holds max_finished={self._max_finished} finished keys "
                f"within their retention ({self.retention:g}s): refusing the new key "
                f"{key!r} rather than dropping a key early; nothing was sent. "
                "Raise max_finished, shorten retention, or use SQLiteStore",
                key=key,
            )
        claim, entry, write = decide(
            current,
            fresh,
            now=now,
            retention=self.retention,
            expired=current is not None and self._expired(current, now),
        )
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
        previous = self._entries.get(entry.key)
        self._entries[entry.key] = entry
        if entry.finished_at is None:
            self._done.pop(entry.key, None)
            return
        if previous is None or previous.finished_at != entry.finished_at:
            self._done[entry.key] = self._sweep.monotonic()
        heapq.heappush(self._finished, (entry.finished_at, entry.key))

    async def expired(self, key: str, now: float) -> bool:
        """Whether the finished entry under ``key`` is past retention by the store's
        clocks: False for an entry not finished, or none."""
        entry = self._entries.get(key)
        return entry is not None and self._expired(entry, now)

    def _expired(self, entry: KeyEntry, now: float) -> bool:
        """Finished, and past retention by the wall clock (guarded against forward
        steps) and by the monotonic clock since it finished here."""
        if entry.finished_at is None or entry.finished_at > self._sweep.cutoff(now, self.retention):
            return False
        done = self._done.get(entry.key)
        return done is None or self._sweep.monotonic() - done >= self.retention

    def _full(self) -> bool:
        """True when ``max_finished`` finished keys are kept (the heap, cleaned of the
        stale places of keys finished again, counts them exactly)."""
        entries = self._entries
        live = [
            (at, key)
            for at, key in self._finished
            if (entry := entries.get(key)) is not None and entry.finished_at == at
        ]
        heapq.heapify(live)
        self._finished = live
        return len(live) >= self._max_finished

    def _prune(self, now: float) -> None:
        """Drop finished entries past retention (never one within it)."""
        heap = self._finished
        cutoff = self._sweep.cutoff(now, self.retention)
        mono = self._sweep.monotonic()
        young: list[tuple[float, str]] = []
        while heap and heap[0][0] <= cutoff:
            finished_at, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is None or entry.finished_at != finished_at:
                continue
            done = self._done.get(key)
            if done is not None and mono - done < self.retention:
                young.append((finished_at, key))  # stamped on a clock stepped back
                continue
            del self._entries[key]
            self._done.pop(key, None)
        for kept in young:
            heapq.heappush(heap, kept)
