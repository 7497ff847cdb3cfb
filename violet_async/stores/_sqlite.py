"""SQLiteStore: keys in one SQLite file, shared by the processes of one machine."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs

from .._files import SQLITE_COMPANIONS, open_owned
from ._base import (
    DEFAULT_LEASE,
    DEFAULT_RETENTION,
    Claim,
    KeyEntry,
    SweepClock,
    check_seconds,
    decide,
)

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS violet_keys (
    key TEXT PRIMARY KEY,
    entry BLOB NOT NULL,
    owner TEXT,
    lease_until REAL,
    finished_at REAL,
    finished_steady REAL
);
CREATE INDEX IF NOT EXISTS violet_keys_finished ON violet_keys (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS violet_clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    wall REAL NOT NULL,
    mono REAL NOT NULL
);
"""


class StoreFileReplacedError(OSError):
    """The store's path names another file than the one it opened (removed, or
    replaced): the store refuses every call from then on."""


#: Seconds between two sweeps of finished keys past retention.
_SWEEP_EVERY = 60.0


class SQLiteStore:
    """Idempotency keys in a SQLite file: every process on the machine that opens the
    same file shares them (a web app's workers, a cron job and its retry).

    The file is created readable by its owner only (0600). A file that exists must be
    a regular file (not a symlink) of this user that no one else may write, and so must
    its ``-wal`` and ``-shm`` files: otherwise every call with a key raises
    ``RecordStoreError`` naming the path (``UnsafeFileError``), before anything is read
    or sent (another local user could plant a finished key). It runs in WAL mode with
    ``synchronous=FULL``: the record of a send is on disk before the request leaves,
    so a process killed with its POST in flight leaves a record that the next call
    with the same key resumes (reading the bag back, never sending blind). Calls run
    ``sqlite3`` in a worker thread, one statement at a time per store.

    ``retention``: seconds a finished key is kept (default 24 h). ``lease``: seconds a
    process owns a key it stopped renewing (default 30; a live call renews it every
    third of that). ``timeout``: seconds to wait for another process's write lock.
    Retention is counted on the wall clock and on the machine's monotonic clock at
    once (``monotonic``: default ``time.monotonic``), from when this process first
    swept and from when the file was first swept (read together with the wall clock
    and kept in the file): a wall clock stepped forward never sweeps keys early, in a
    process started before the step or after it (unless the machine rebooted in
    between: the file then takes the clock as it is).
    A store whose path comes to name another file than the one it opened (the file
    removed or replaced under a running process) refuses every call from then on
    (``RecordStoreError``, nothing sent): its keys are not in the new file.
    Close it with :meth:`aclose` (or ``async with``) when done.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention: float = DEFAULT_RETENTION,
        lease: float = DEFAULT_LEASE,
        timeout: float = 10.0,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        check_seconds("retention", retention)
        check_seconds("lease", lease)
        check_seconds("timeout", timeout)
        self.path = Path(path)
        self.retention = retention
        self.lease = lease
        self._timeout = timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        # (device, inode) of the file the connection opened.
        self._file: tuple[int, int] = (0, 0)
        self._closed = False
        self._swept_at = float("-inf")
        self._sweep = SweepClock(monotonic)

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r}>"

    async def __aenter__(self) -> SQLiteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the store protocol ---------------------------------------------------------

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        return await self._run(lambda conn: self._claim(conn, fresh, now))

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        return await self._run(lambda conn: self._save(conn, entry, owner))

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        def renew(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE violet_keys SET lease_until = ? WHERE key = ? AND owner = ?",
                (lease_until, key, owner),
            )
            return cursor.rowcount == 1

        return await self._run(renew)

    async def load(self, key: str) -> KeyEntry | None:
        def load(conn: sqlite3.Connection) -> KeyEntry | None:
            return _read(conn, key)

        return await self._run(load)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Close the file (idempotent); the store cannot be used after."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- in the worker thread -------------------------------------------------------

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            # busy_timeout covers most waits for another process; a few (turning on
            # WAL, creating the table, recovering a WAL a killed process left) answer
            # "locked" at once: each unit of work is one transaction, so run it again.
            give_up = time.monotonic() + self._timeout
            while True:
                try:
                    with self._lock:
                        return work(self._connection())
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > give_up:
                        raise
                time.sleep(0.005)

        return await asyncio.to_thread(locked)

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise sqlite3.ProgrammingError(f"{self!r} is closed")
        if self._conn is not None:
            self._still_the_file()
        if self._conn is None:
            # Created by us: owner only (SQLite gives its -wal and -shm files the
            # same mode). A file that exists is trusted as the journal is: a regular
            # file of this user that no one else may write, not a symlink; and so are
            # its -wal, -shm and -journal files (a planted WAL is read as part of the
            # database, and a hot rollback journal is played back into it on open, in
            # WAL mode too). Anything else raises UnsafeFileError, naming the path,
            # before a key is read or written.
            fd = open_owned(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                info = os.fstat(fd)
            finally:
                os.close(fd)
            for suffix in SQLITE_COMPANIONS:
                companion = self.path.with_name(self.path.name + suffix)
                try:
                    fd = open_owned(companion, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                os.close(fd)
            conn = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(violet_keys)")}
                if "finished_steady" not in columns:  # a file of an earlier release
                    conn.execute("ALTER TABLE violet_keys ADD COLUMN finished_steady REAL")
                conn.execute(
                    "CREATE INDEX IF NOT EXISTS violet_keys_unstamped ON violet_keys (key)"
                    " WHERE finished_at IS NOT NULL AND finished_steady IS NULL"
                )
            except BaseException:
                conn.close()
                raise
            self._conn, self._file = conn, (info.st_dev, info.st_ino)
        return self._conn

    def _still_the_file(self) -> None:
        """Refuse to go on when the path no longer names the file this store opened (it
        was removed, or replaced: a backup restored, a "reset"): a process opening the
        path now would not see this one's keys, nor this one its, and each would send
        the ask of a key the other holds. Every call raises from then on (the engine's
        ``RecordStoreError``, nothing sent); a store made anew takes the new file."""
        try:
            info = os.stat(self.path, follow_symlinks=False)
            same = (info.st_dev, info.st_ino) == self._file
        except FileNotFoundError:
            same = False
        if not same:
            raise StoreFileReplacedError(
                f"{self.path} was replaced or removed since this store opened it: its "
                "keys are not in the file the path names now, and a process using that "
                "file does not see them; make the store again (restart) once no process "
                "uses the old file"
            )

    def _claim(
        self, conn: sqlite3.Connection, fresh: KeyEntry, now: float
    ) -> tuple[Claim, KeyEntry]:
        # BEGIN IMMEDIATE takes the write lock before reading: two processes claiming
        # one key run one after the other, the second sees the first's entry.
        conn.execute("BEGIN IMMEDIATE")
        try:
            steady, cutoff = self._clocks(conn, now)
            if now - self._swept_at >= _SWEEP_EVERY:
                # Finished rows without a steady stamp (written by an earlier release)
                # get one now: each is kept a whole retention from when this release
                # first saw it (review 15: a file of the previous release first opened
                # after a step, its keys taken for 30 h old). Then never the key being
                # claimed: ``decide`` answers a finished key asked again for its own
                # request however old; it frees it only for another request.
                conn.execute(
                    "UPDATE violet_keys SET finished_steady = ?"
                    " WHERE finished_at IS NOT NULL AND finished_steady IS NULL",
                    (steady,),
                )
                conn.execute(
                    "DELETE FROM violet_keys WHERE finished_at IS NOT NULL"
                    " AND finished_at <= ? AND finished_steady <= ? AND key != ?",
                    (cutoff, steady - self.retention, fresh.key),
                )
                self._swept_at = now
            found = self._stamped_row(conn, fresh.key, steady)
            current = None if found is None else found[0]
            expired = found is not None and self._past(found, cutoff, steady)
            claim, entry, write = decide(
                current, fresh, now=now, retention=self.retention, expired=expired
            )
            if write is not None:
                _upsert(conn, write, steady)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return claim, entry

    async def expired(self, key: str, now: float) -> bool:
        """Whether the finished entry under ``key`` is past retention by the store's
        clocks (the wall clock, this process's monotonic clock and the file's steady
        clock): False for an entry not finished, or none."""

        def expired(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            try:
                steady, cutoff = self._clocks(conn, now)
                found = self._stamped_row(conn, key, steady)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return found is not None and self._past(found, cutoff, steady)

        return await self._run(expired)

    def _clocks(self, conn: sqlite3.Connection, now: float) -> tuple[float, float]:
        """The file's steady clock now, and the wall-clock cutoff at or before which a
        finished key may be past retention (guarded by both monotonic readings)."""
        steady = self._steady(conn, now)
        return steady, min(self._sweep.cutoff(now, self.retention), steady - self.retention)

    def _past(self, found: tuple[KeyEntry, float | None], cutoff: float, steady: float) -> bool:
        entry, stamp = found
        return (
            entry.finished_at is not None
            and entry.finished_at <= cutoff
            and stamp is not None
            and stamp <= steady - self.retention
        )

    @staticmethod
    def _stamped_row(
        conn: sqlite3.Connection, key: str, steady: float
    ) -> tuple[KeyEntry, float | None] | None:
        """The row under ``key``; a finished one without a steady stamp (an earlier
        release wrote it) is stamped now."""
        found = _read_row(conn, key)
        if found is not None and found[0].finished_at is not None and found[1] is None:
            conn.execute("UPDATE violet_keys SET finished_steady = ? WHERE key = ?", (steady, key))
            found = (found[0], steady)
        return found

    def _steady(self, conn: sqlite3.Connection, now: float) -> float:
        """The wall clock as the file's first sweep read it, moved on by the machine's
        monotonic clock since (``violet_clock``: wall and monotonic time read together
        then, shared by every process that opens the file). Retention is counted on it
        as well as on the wall clock and this process's own monotonic clock: a process
        started after a step of the wall clock has nothing of its own to tell the step
        by (simulator seed 853436: after two steps of 15 h, a process started later
        swept a key finished minutes before, and the same request under it was sent
        again); the file's reading does. And a key finishing is stamped with it
        (``finished_steady``), so a key that finished while the wall clock was stepped
        back, put right since, is not taken for old (review 14). Monotonic time is the
        machine's since boot: a reading lower than the file's means a reboot, and the
        file takes the clock as it is then."""
        mono = self._sweep.monotonic()
        row = conn.execute("SELECT wall, mono FROM violet_clock WHERE id = 1").fetchone()
        if row is None or not all(isinstance(one, float) for one in row) or mono < row[1]:
            conn.execute(
                "INSERT OR REPLACE INTO violet_clock (id, wall, mono) VALUES (1, ?, ?)",
                (now, mono),
            )
            return now
        return float(row[0]) + (mono - float(row[1]))

    def _save(self, conn: sqlite3.Connection, entry: KeyEntry, owner: str) -> bool:
        finished = entry.finished_at
        steady = None if finished is None else self._steady(conn, finished)
        # A key finishing is stamped on the file's steady clock; finished again at the
        # same time (its record rewritten), it keeps its stamp.
        cursor = conn.execute(
            "UPDATE violet_keys SET entry = ?, owner = ?, lease_until = ?, finished_at = ?, "
            "finished_steady = CASE WHEN ? IS NULL THEN NULL"
            " WHEN finished_at IS ? AND finished_steady IS NOT NULL THEN finished_steady"
            " ELSE ? END "
            "WHERE key = ? AND owner = ?",
            (
                entry.to_json(),
                entry.owner,
                entry.lease_until,
                finished,
                finished,
                finished,
                steady,
                entry.key,
                owner,
            ),
        )
        return cursor.rowcount == 1


def _read(conn: sqlite3.Connection, key: str) -> KeyEntry | None:
    found = _read_row(conn, key)
    return None if found is None else found[0]


def _read_row(conn: sqlite3.Connection, key: str) -> tuple[KeyEntry, float | None] | None:
    """The entry under ``key`` and when it finished on the file's steady clock."""
    row = conn.execute(
        "SELECT entry, owner, lease_until, finished_steady FROM violet_keys WHERE key = ?",
        (key,),
    ).fetchone()
    if row is None:
        return None
    # The lease lives in its columns (renewals touch only them).
    entry = attrs.evolve(KeyEntry.from_json(row[0]), owner=row[1], lease_until=row[2])
    steady = row[3]
    return entry, float(steady) if isinstance(steady, (int, float)) else None


def _upsert(conn: sqlite3.Connection, entry: KeyEntry, steady: float) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO violet_keys"
        " (key, entry, owner, lease_until, finished_at, finished_steady)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            entry.key,
            entry.to_json(),
            entry.owner,
            entry.lease_until,
            entry.finished_at,
            None if entry.finished_at is None else steady,
        ),
    )
