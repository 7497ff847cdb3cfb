"""Queued mode: a verified event is written to a durable store before the 200, and a
worker runs callbacks from the store, retrying with backoff. An event leaves the store
only after its callback succeeded, so a crash (even ``kill -9`` between the 200 and the
end of the callback) replays it on restart.

:class:`SQLiteEventStore` is the default store: one local file in WAL mode with
``synchronous=FULL`` (a commit is fsynced before the 200), every call run in a thread
(``asyncio.to_thread``). One worker process consumes one file; several processes
sharing a queue need a store of their own (a database table with ``SELECT ... FOR
UPDATE SKIP LOCKED``) implementing :class:`EventStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import attrs
import orjson

from .._files import SQLITE_COMPANIONS, narrow_to_owner, open_owned
from ._receiver import (
    BAG_ID_HEADER,
    EVENT_ID_HEADER,
    ORDER_ID_HEADER,
    TOPIC_HEADER,
    WebhookEvent,
    WebhookReceiver,
)

__all__ = ["EventStore", "SQLiteEventStore", "StoredEvent", "WebhookWorker"]

log = logging.getLogger("violet_async.webhooks")

_KEPT_HEADERS = (EVENT_ID_HEADER, ORDER_ID_HEADER, BAG_ID_HEADER, TOPIC_HEADER)
_T = TypeVar("_T")


@attrs.frozen
class StoredEvent:
    """One verified delivery as the queue keeps it."""

    id_key: str
    """Dedup key of the event id (fixed size)."""
    body_key: str
    """Dedup key of the signed body (fixed size)."""
    headers: dict[str, str]
    """The ``X-Violet-*`` headers needed to rebuild the event (never the signature)."""
    body: bytes
    """The signed body, byte for byte."""
    received_at: float
    """Wall time of the delivery that was kept."""
    seq: int = 0
    """The store's row id (0 before it is stored)."""
    attempts: int = 0
    """Callbacks tried so far."""
    last_error: str | None = None
    """What the last failed callback raised."""

    @classmethod
    def of(cls, event: WebhookEvent, headers: Any, body: bytes, now: float) -> StoredEvent:
        """The record for a verified ``event`` delivered with ``headers`` and ``body``."""
        kept = {name: headers[name] for name in _KEPT_HEADERS if headers.get(name) is not None}
        id_key, body_key = event.dedup_keys
        return cls(id_key=id_key, body_key=body_key, headers=kept, body=body, received_at=now)


class EventStore(Protocol):
    """A durable queue of verified events. ``put`` must be durable when it returns."""

    async def put(self, record: StoredEvent) -> bool:
        """Keep ``record``; False if its id or body is already queued or was handled."""
        ...

    async def due(self, now: float, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` queued events whose next attempt is at or before ``now``."""
        ...

    async def succeeded(self, record: StoredEvent, now: float) -> None:
        """Remove ``record`` and remember its keys as handled."""
        ...

    async def failed(self, record: StoredEvent, next_at: float, error: str) -> None:
        """Keep ``record`` for another attempt at ``next_at``."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id_key TEXT NOT NULL UNIQUE,
    body_key TEXT NOT NULL UNIQUE,
    headers BLOB NOT NULL,
    body BLOB NOT NULL,
    received_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS pending_next_at ON pending (next_at);
CREATE TABLE IF NOT EXISTS done (key TEXT PRIMARY KEY, done_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS done_at ON done (done_at);
"""


def _create_private(path: str) -> None:
    """Create the database file 0600 (and narrow one left wider) before SQLite opens it:
    queued bodies hold customers' emails. SQLite gives its ``-wal`` and ``-shm`` files
    the database file's mode; ones left wider by an older version are narrowed too. A
    ``-journal`` (a hot one is played back into the database on open) is held to the
    same checks: one another user planted would put rows of theirs in the queue."""
    if path in ("", ":memory:") or path.startswith("file:"):
        return
    companions = [(f"{path}{suffix}", False) for suffix in SQLITE_COMPANIONS]
    for name, create in [(path, True), *companions]:
        try:
            fd = open_owned(name, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        except FileNotFoundError:
            continue
        try:
            narrow_to_owner(fd)
        finally:
            os.close(fd)


class SQLiteEventStore:
    """The default :class:`EventStore`: one SQLite file (WAL, fsync on commit).

    Handled keys are remembered for ``done_ttl`` seconds (72 h by default, three times
    Violet's 24 h of retries, and no shorter than a receiver's ``max_age`` if one is
    set), so a redelivery after a restart is still a duplicate. Rows hold fixed-size
    key digests; bodies only while queued.
    """

    def __init__(self, path: str | os.PathLike[str], *, done_ttl: float = 72 * 3600.0) -> None:
        self.path = os.fspath(path)
        self.done_ttl = done_ttl
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads

    def __repr__(self) -> str:
        return f"<SQLiteEventStore {self.path!r}>"

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            _create_private(self.path)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # WAL + FULL: each commit is fsynced
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        def locked() -> _T:
            with self._lock:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result

        return await asyncio.to_thread(locked)

    async def put(self, record: StoredEvent) -> bool:
        """Durable (committed and fsynced) when it returns True."""

        def put(conn: sqlite3.Connection) -> bool:
            seen = conn.execute(
                "SELECT 1 FROM done WHERE key IN (?, ?)", (record.id_key, record.body_key)
            ).fetchone()
            if seen is not None:
                return False
            cursor = conn.execute(
                "INSERT OR IGNORE INTO pending (id_key, body_key, headers, body, received_at,"
                " next_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.id_key,
                    record.body_key,
                    orjson.dumps(record.headers),
                    record.body,
                    record.received_at,
                    record.received_at,
                ),
            )
            return cursor.rowcount == 1

        return await self._run(put)

    async def due(self, now: float, limit: int) -> list[StoredEvent]:
        """Oldest first."""

        def due(conn: sqlite3.Connection) -> list[StoredEvent]:
            rows = conn.execute(
                "SELECT seq, id_key, body_key, headers, body, received_at, attempts, last_error"
                " FROM pending WHERE next_at <= ? ORDER BY next_at, seq LIMIT ?",
                (now, limit),
            ).fetchall()
            return [
                StoredEvent(
                    seq=seq,
                    id_key=id_key,
                    body_key=body_key,
                    headers=orjson.loads(headers),
                    body=bytes(body),
                    received_at=received_at,
                    attempts=attempts,
                    last_error=last_error,
                )
                for seq, id_key, body_key, headers, body, received_at, attempts, last_error in rows
            ]

        return await self._run(due)

    async def succeeded(self, record: StoredEvent, now: float) -> None:
        """Remove the row and remember both keys in one transaction; forget handled keys
        older than ``done_ttl``."""

        def succeeded(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM pending WHERE seq = ?", (record.seq,))
            conn.executemany(
                "INSERT OR REPLACE INTO done (key, done_at) VALUES (?, ?)",
                [(record.id_key, now), (record.body_key, now)],
            )
            conn.execute("DELETE FROM done WHERE done_at < ?", (now - self.done_ttl,))

        await self._run(succeeded)

    async def failed(self, record: StoredEvent, next_at: float, error: str) -> None:
        """Count the attempt and push the row back to ``next_at``."""

        def failed(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE pending SET attempts = attempts + 1, next_at = ?, last_error = ?"
                " WHERE seq = ?",
                (next_at, error[:1000], record.seq),
            )

        await self._run(failed)

    async def pending(self) -> int:
        """How many events wait for a successful callback."""
        return await self._run(
            lambda c: int(c.execute("SELECT count(*) FROM pending").fetchone()[0])
        )

    async def aclose(self) -> None:
        """Close the connection (the file stays)."""

        def close() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.to_thread(close)


Callback = Callable[[WebhookEvent], Awaitable[Any]]


class WebhookWorker:
    """Runs callbacks for queued events, ``concurrency`` at a time, until each
    succeeds: a failure (or a callback over ``callback_timeout``) is retried after
    ``min(backoff_cap, backoff_base * 2**attempts)`` seconds, forever (an event is
    never dropped; failures are logged). ``clock`` is wall time and ``sleep`` waits:
    inject both in tests."""

    def __init__(
        self,
        store: EventStore,
        receiver: WebhookReceiver,
        callback: Callback,
        *,
        concurrency: int = 4,
        callback_timeout: float = 60.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 300.0,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if concurrency < 1 or backoff_base <= 0:
            raise ValueError("concurrency must be at least 1 and backoff_base positive")
        self.store = store
        self.receiver = receiver
        self.callback = callback
        self.concurrency = concurrency
        self.callback_timeout = callback_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.poll_interval = poll_interval
        self._clock = clock
        self._sleep = sleep
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed ones (1 or more)."""
        return float(min(self.backoff_cap, self.backoff_base * 2 ** min(attempts - 1, 62)))

    def wake(self) -> None:
        """A new event was queued: look at once instead of at the next poll."""
        self._wake.set()

    async def run_once(self) -> int:
        """Run every callback due now (``concurrency`` at a time); how many ran."""
        ran = 0
        while True:
            batch = await self.store.due(self._clock(), self.concurrency)
            if not batch:
                return ran
            # Every callback of the batch ends before the next poll: one failing to be
            # recorded (a locked database) must not let the others be started again
            # while they still run.
            outcomes = await asyncio.gather(
                *(self._run(record) for record in batch), return_exceptions=True
            )
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            ran += len(batch)
            if failures:
                raise failures[0]

    async def _run(self, record: StoredEvent) -> None:
        try:
            event = self.receiver.decode(record.headers, record.body)
            await asyncio.wait_for(self.callback(event), self.callback_timeout)
        except Exception as exc:  # any failure keeps the event queued
            attempts = record.attempts + 1
            next_at = self._clock() + self.backoff(attempts)
            log.exception(
                "violet webhook callback failed (attempt %d), retrying in %.0f s",
                attempts,
                next_at - self._clock(),
            )
            await self.store.failed(record, next_at, f"{type(exc).__name__}: {exc}")
            return
        await self.store.succeeded(record, self._clock())

    async def _loop(self) -> None:
        while True:
            try:
                ran = await self.run_once()
            except Exception:  # the store is down: keep trying, never die silently
                log.exception("violet webhook queue unavailable")
                ran = 0
            if ran:
                continue
            self._wake.clear()
            waiter = asyncio.ensure_future(self._wake.wait())
            nap = asyncio.ensure_future(self._sleep(self.poll_interval))
            try:
                await asyncio.wait({waiter, nap}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (waiter, nap):
                    task.cancel()
                await asyncio.gather(waiter, nap, return_exceptions=True)

    def start(self) -> None:
        """Start the background loop (replays whatever a crash left queued)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop; a callback cut short stays queued and runs again later."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
