"""The batch journal: append-only JSON lines, durable (fsynced) at every state change.

Line shapes::

    {"type": "header", "v": 2, "input": "<what the input was, informational>", "ts": ...}
    {"key": "refund:1f0c...#0", "line": 3, "state": "sent", "ask": {...}, "ts": ...}
    {"key": ..., "line": 3, "state": "pending", "ask": {...}, ...}
    {"key": ..., "line": 3, "state": "done", "refund_id": 400001, "reconciled": false, ...}
    {"key": ..., "line": 3, "state": "failed", "error": "BadRequestError", "message": ...}
    {"key": ..., "line": 3, "state": "unknown", "error": "AmbiguousOutcomeError", ...}
    {"key": ..., "line": 3, "state": "present", "refund_id": 400007, "refunds": [...]}
    {"key": ..., "line": 3, "state": "unsent", "error": "AuthenticationError", ...}

An item is identified by its **content**, not its place in the input: ``key`` is a
digest of the kind, order, bag and canonical request, plus ``#n`` for the n-th repeat
of an identical row. Editing a row makes a new item; moving rows changes nothing.
``line`` is only for people.

``ask`` is the refund protocol's record of the item (``PendingRefund.to_dict()``): its
sends, settle window and baseline. An item with no line was never started. "sent" is
written, and fsynced, *before* every send leaves: a crash can never leave a sent
request out of the journal. "sent", "pending" and "unknown" items are read back by the
protocol's rule (``client.resume``) before anything is re-sent on resume; "failed"
means the request definitely did not apply; "present" that it was not sent because the
bag already held exactly this refund; "unsent" that it never reached Violet (sent anew
next time, after the usual read of the bag).

One run at a time: :meth:`Journal.open` takes an exclusive ``flock`` on a sidecar
``JOURNAL.lock`` (released by the kernel when the process ends, even by ``kill -9``)
and raises :class:`JournalLockedError` naming the holder's pid. A last line torn by a
crash mid-write is cut off before anything is appended.

Writes are group-committed: every state change waits until its line is on disk, but
concurrent changes share one fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Any

import attrs
import orjson

from .exceptions import VioletError

__all__ = [
    "Journal",
    "JournalEntry",
    "JournalLockedError",
    "JournalMismatchError",
    "JournalWriteError",
]

VERSION = 2


class JournalMismatchError(VioletError):
    """The journal cannot be used for this run (written by another journal version)."""


class JournalWriteError(VioletError):
    """The journal could not be written (a full disk, a closed journal): the batch stops,
    since a send it cannot record first must not happen."""


class JournalLockedError(VioletError):
    """Another run holds the journal. ``pid`` is the holder's process id, if known."""

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


@attrs.frozen
class JournalEntry:
    """The last known state of one item."""

    key: str
    state: str
    ts: float
    line: int | None = None
    first_sent: float | None = None
    refund_id: int | None = None
    error: str | None = None
    message: str | None = None
    ask: dict[str, Any] | None = None
    """The protocol record written with "sent" / "pending" / "unknown"."""


class Journal:
    """One batch run's journal file. Open with :meth:`open`, close with :meth:`aclose`."""

    def __init__(
        self,
        path: Path,
        entries: dict[str, JournalEntry],
        fd: int,
        lock_fd: int | None = None,
        *,
        input_changed: bool = False,
        repaired: int = 0,
    ) -> None:
        self.path = path
        self._entries = entries
        self._in_flight: dict[str, float] = {}
        self._fd = fd
        self._lock_fd = lock_fd
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._writing: asyncio.Future[None] | None = None
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())
        self.fsyncs = 0
        #: The header names another input than this run's (informational: items are
        #: matched by content).
        self.input_changed = input_changed
        #: Bytes of a torn last line cut off at open.
        self.repaired = repaired
        self._broken: JournalWriteError | None = None

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, input_id: str | None) -> Journal:
        """Open (or create) the journal, holding its lock until :meth:`aclose`.

        Raises :class:`JournalLockedError` at once when another run holds it, and
        :class:`JournalMismatchError` for a journal of another format version.
        """
        target = Path(path)
        lock_fd = _lock(target)
        try:
            loading = asyncio.ensure_future(asyncio.to_thread(_load_and_repair, target))
            try:
                header, entries, repaired = await asyncio.shield(loading)
            except asyncio.CancelledError:
                # A thread cannot be stopped and this one may still cut a torn tail:
                # the lock is held until it has finished.
                await _settled(loading)
                raise
            _check_version(target, header)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except BaseException:
            os.close(lock_fd)
            raise
        changed = header is not None and header.get("input") != input_id
        journal = cls(target, entries, fd, lock_fd, input_changed=changed, repaired=repaired)
        if header is None:
            try:
                await journal._append(
                    {"type": "header", "v": VERSION, "input": input_id, "ts": time.time()}
                )
            except BaseException:
                await journal.aclose()  # a cancelled or failed open lets the file go
                raise
        return journal

    @staticmethod
    def peek(path: str | os.PathLike[str]) -> dict[str, JournalEntry]:
        """The entries of a journal, read without its lock and without repairing it
        (for a dry run's forecast). Empty when there is no journal."""
        target = Path(path)
        if not target.exists():
            return {}
        return _parse(target.read_bytes())[1]

    def refund_ids(self) -> list[int]:
        """Refunds that items of earlier runs ended with (or found already on their bag):
        a resumed run must never take one of them for another item's."""
        return [e.refund_id for e in self._entries.values() if isinstance(e.refund_id, int)]

    def entry(self, key: str) -> JournalEntry | None:
        """The recorded state of the item with this content key."""
        return self._entries.get(key)

    async def record(self, key: str, line: int, state: str, **fields: Any) -> None:
        """Append a state change and return once it is on disk."""
        now = time.time()
        first_sent = self._in_flight.get(key)
        if first_sent is None:
            previous = self._entries.get(key)
            first_sent = previous.first_sent if previous is not None else None
        if state == "sent" and first_sent is None:
            first_sent = now
        record = {"key": key, "line": line, "state": state, "ts": now, **fields}
        if first_sent is not None:
            record["first_sent"] = first_sent
        await self._append(record)
        # Only what resume needs stays in memory: entries read from disk at open, and
        # the first send time of items in flight. A long run's memory stays flat.
        if state == "sent":
            self._in_flight[key] = first_sent  # type: ignore[assignment]
        else:
            self._in_flight.pop(key, None)

    async def _append(self, record: dict[str, Any]) -> None:
        if self._closed:
            raise JournalWriteError("the journal is closed")
        if self._broken is not None:
            # A failed write may have left part of a line: anything appended after it
            # would be glued onto that fragment and lost. Nothing more is written.
            raise self._broken
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((orjson.dumps(record) + b"\n", future))
        self._wake.set()
        await future

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            data = b"".join(line for line, _ in batch)
            writing = asyncio.ensure_future(asyncio.to_thread(self._write_durably, data))
            self._writing = writing
            try:
                await asyncio.shield(writing)
            except asyncio.CancelledError:
                # Cancelling cannot stop the thread: the write ends first, so that its
                # lines' waiters learn the truth and the file is never closed under it.
                await _settled(writing)
                self._ended(batch, writing)
                raise
            except Exception:  # noqa: BLE001, S110 - _ended reports it to every waiter
                pass
            self._ended(batch, writing)

    def _ended(
        self, batch: list[tuple[bytes, asyncio.Future[None]]], writing: asyncio.Future[None]
    ) -> None:
        """Tell the waiters of a written batch how its write ended."""
        error = asyncio.CancelledError() if writing.cancelled() else writing.exception()
        if error is None:
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
            return
        broken = JournalWriteError(f"could not write the journal {self.path}: {error}")
        self._broken = broken
        for _, future in (*batch, *self._pending):
            if not future.done():
                future.set_exception(broken)
        self._pending = []

    def _write_durably(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.fsyncs += 1

    async def aclose(self) -> None:
        """Flush what is pending, close the file and release the lock."""
        if self._closed:
            return
        # Batches are flushed in order: once this empty write is durable, so is
        # everything queued before it.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((b"", future))
        self._wake.set()
        try:
            await asyncio.gather(future, return_exceptions=True)
        finally:
            # Even when the close is cancelled, the file and its lock go; but only once
            # no write runs in a thread (a closed descriptor's number can be reused).
            self._closed = True
            self._flusher.cancel()
            await _settled(self._flusher)
            if self._writing is not None:
                await _settled(self._writing)
            for _, waiter in self._pending:  # queued after a cancelled close: never written
                if not waiter.done():
                    waiter.set_exception(JournalWriteError("the journal is closed"))
            self._pending = []
            os.close(self._fd)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock


async def _settled(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, without cancelling it if this wait is cancelled,
    and take its outcome (what it raised is dealt with by whoever awaited it first)."""
    await asyncio.wait({future})
    if not future.cancelled():
        future.exception()


def _check_version(target: Path, header: dict[str, Any] | None) -> None:
    if header is not None and header.get("v") != VERSION:
        raise JournalMismatchError(
            f"{target} was written by another version of violet-async (journal "
            f"v{header.get('v')}, this one reads v{VERSION}); keep it for the record "
            "and name a new file with --journal: every bag's refunds are read "
            "before a send, so rows that already applied are reported "
            "already_present or refused by Violet, never sent again"
        )


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _lock(path: Path) -> int:
    """Take the journal's exclusive lock (a sidecar file holding the holder's pid)."""
    where = lock_path(path)
    fd = os.open(where, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        pid = int(holder) if holder.isdigit() else None
        who = f"process {pid}" if pid is not None else "another process"
        raise JournalLockedError(
            f"{path} is in use by {who} (a run of violet-async on the same journal); "
            "wait for it to finish: two runs on one journal could send the same row twice",
            pid=pid,
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _load_and_repair(
    path: Path,
) -> tuple[dict[str, Any] | None, dict[str, JournalEntry], int]:
    """Read the journal; cut a torn last line (a crash mid-write) so that the next
    record starts on a line of its own. Returns (header, entries, bytes cut)."""
    if not path.exists():
        return None, {}, 0
    data = path.read_bytes()
    cut = 0
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        cut = len(data) - keep
        with path.open("r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        data = data[:keep]
    header, entries = _parse(data)
    return header, entries, cut


def _parse(data: bytes) -> tuple[dict[str, Any] | None, dict[str, JournalEntry]]:
    header: dict[str, Any] | None = None
    entries: dict[str, JournalEntry] = {}
    for raw in data.splitlines():
        record: Any = None
        with contextlib.suppress(orjson.JSONDecodeError):
            record = orjson.loads(raw)
        if not isinstance(record, dict):
            continue  # a line torn by a crash mid-write: its change never happened
        if record.get("type") == "header":
            header = record
            continue
        key, state = record.get("key"), record.get("state")
        if not (isinstance(key, str) and isinstance(state, str)):
            continue
        line = record.get("line")
        refund_id = record.get("refund_id")
        entries[key] = JournalEntry(
            key=key,
            state=state,
            ts=float(record.get("ts", 0.0)),
            line=line if isinstance(line, int) else None,
            first_sent=record.get("first_sent"),
            refund_id=refund_id if isinstance(refund_id, int) else None,
            error=record.get("error"),
            message=record.get("message") if isinstance(record.get("message"), str) else None,
            ask=record.get("ask") if isinstance(record.get("ask"), dict) else None,
        )
    return header, entries
