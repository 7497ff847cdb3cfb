"""The batch journal: append-only JSON lines, durable (fsynced) at every state change.

Line shapes::

    {"type": "header", "v": 3, "input": "<what the input was, informational>", "ts": ...}
    {"key": "refund:1001:2002:1f0c...:0", "line": 3, "state": "sent", "ask": {...}, ...}
    {"key": ..., "line": 3, "state": "pending", "ask": {...}, ...}
    {"key": ..., "line": 3, "state": "done", "refund_id": 400001, "amount": 1000, ...}
    {"key": ..., "line": 3, "state": "failed", "error": "BadRequestError", "message": ...}
    {"key": ..., "line": 3, "state": "unknown", "error": "AmbiguousOutcomeError", ...}
    {"key": ..., "line": 3, "state": "present", "refund_id": 400007, "refunds": [...]}
    {"key": ..., "line": 3, "state": "unsent", "error": "AuthenticationError", ...}

An item is identified by its **content**, not its place in the input: ``key`` is
:func:`~violet_async._item_key.item_key` (the fleet ledger's name for it too): kind,
order, bag, a digest of the canonical request, and ``:n`` for the n-th repeat of an
identical row. Editing a row makes a new item; moving rows changes nothing. ``line`` is
only for people. A journal written before this name (``kind:<sha256>#n``) is read under
it (:class:`~violet_async._journal_index.LegacyKeys`), and appended to under it.

``ask`` is the refund protocol's record of the item (``PendingRefund.to_dict()``): its
sends, settle window and baseline. An item with no line was never started. "sent" is
written, and fsynced, *before* every send leaves: a crash can never leave a sent
request out of the journal. "sent", "pending" and "unknown" items are read back by the
protocol's rule (``client.resume``) before anything is re-sent on resume; "failed"
means the request definitely did not apply; "present" that it was not sent because the
bag already held exactly this refund; "unsent" that it never reached Violet (sent anew
next time, after the usual read of the bag).

Loading streams the file and keeps only what a decision needs
(:mod:`violet_async._journal_index`): open items with their records, finished ones
compactly (on disk beyond a bound), so a resume of millions of rows stays small.

The journal and its lock are opened with :func:`~violet_async._files.open_owned`: a
symlink, or a file another user owns or may write, is refused (:class:`UnsafeFileError`)
before a line is read.

One run at a time: :meth:`Journal.open` takes an exclusive file lock on a sidecar
``JOURNAL.lock`` (released by the kernel when the process ends, even by ``kill -9``)
and raises :class:`JournalLockedError` naming the holder's pid; on POSIX the journal
file itself is locked too, so a sidecar deleted under a run (taken for stale) lets no
second run in. A last line torn by a crash mid-write is cut off before anything is
appended.

Writes are group-committed: every state change waits until its line is on disk, but
concurrent changes share one fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import orjson
import portalocker

from ._files import UnsafeFileError, open_owned
from ._journal_index import (
    OPEN_STATES,
    JournalEntry,
    JournalIndex,
    LegacyKeys,
    entry_of,
    known_key,
    read_journal,
)
from ._redact import Redactor
from .exceptions import VioletError

__all__ = [
    "Journal",
    "JournalEntry",
    "JournalLockedError",
    "JournalMismatchError",
    "JournalWriteError",
    "UnsafeFileError",
]

#: The journal version this release writes: 3 names items by the one item key
#: (:func:`~violet_async._item_key.item_key`). A v2 journal (the sha256 names) is read
#: too, and marked v3 by a header line appended at its first open by this release,
#: before anything else is: a release that reads only v2 (the last header of a file
#: decides) then refuses it instead of missing the items named the new way.
VERSION = 3
READS = frozenset({2, VERSION})
_T = TypeVar("_T")


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


class Journal:
    """One batch run's journal file. Open with :meth:`open`, close with :meth:`aclose`."""

    def __init__(
        self,
        path: Path,
        entries: JournalIndex,
        fd: int,
        lock_fd: int | None = None,
        *,
        input_changed: bool = False,
        repaired: int = 0,
        header: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        # The Violet its items were sent to (app id and host, as a record store scopes
        # keys): None until a run of this release binds it (:meth:`bind`).
        self._header = header
        self.scope: str | None = None
        if header is not None and isinstance(header.get("scope"), str):
            self.scope = header["scope"]
        self._entries = entries
        # Items an earlier run left sent, pending or unknown, by bag: a new item on the
        # bag waits until they are resolved (read back), or it could be a second refund.
        self._open: dict[int, set[str]] = {}
        for entry in entries.open_items().values():
            if entry.bag_id is not None:
                self._open.setdefault(entry.bag_id, set()).add(entry.key)
        self._in_flight: dict[str, float] = {}
        self._fd = fd
        self._lock_fd = lock_fd
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._closed = False
        loop = asyncio.get_running_loop()
        #: Done once the file and its lock are let go (no task: nothing cancels it).
        self._released: asyncio.Future[None] = loop.create_future()
        self._closing: asyncio.Future[None] | None = None
        self._flusher = loop.create_task(self._flush_forever())
        # However the writer task ends (closed, or cancelled with every task of a
        # program on its way out, even before its first step), this runs: it is what
        # lets the file and the lock go, once no write runs in a thread.
        self._flusher.add_done_callback(self._release)
        self.fsyncs = 0
        #: The header names another input than this run's (informational: items are
        #: matched by content).
        self.input_changed = input_changed
        #: Bytes of a torn last line cut off at open.
        self.repaired = repaired
        self._broken: JournalWriteError | None = None
        #: Hides the client's secrets in the text a record keeps (``message``); set by
        #: the batch that writes it.
        self.redactor: Redactor | None = None
        # Whether a run (run_batch) was given this journal: an open Journal serves one.
        # Its memory holds what the file held when it was opened (and what became of
        # those entries), not the items a run wrote anew: a second run given the same
        # object, during the first or after it, read the first run's rows as never sent
        # and sent them again.
        self._served = False

    def take_run(self) -> None:
        """Give the journal to a run; raises :class:`JournalLockedError` (this process's
        pid) when a run had it already: open the file again for the next run."""
        if self._served:
            raise JournalLockedError(
                f"journal {self.path} was given to another run of this process already "
                "(run_batch with the same open Journal): an open Journal serves one run, "
                "as it knows what the file held when it was opened, not what a run wrote "
                "since; open it again, or pass its path; nothing was sent",
                pid=os.getpid(),
            )
        self._served = True

    async def bind(self, scope: str) -> None:
        """Bind the journal to the Violet a run sends to (``scope``: the client's app id
        and host). A journal bound to another is refused (:class:`JournalMismatchError`):
        its "done" rows are refunds of that Violet, and taken as this one's they would
        skip every row (the sandbox's refunds reported as production's). A journal not
        bound yet (new, or written before journals were) is bound by a header line."""
        if self.scope == scope:
            return
        if self.scope is not None:
            self.mismatch(scope)
        header = self._header or {}
        await self._append(
            {
                "type": "header",
                "v": VERSION,
                "input": header.get("input"),
                "scope": scope,
                "ts": time.time(),
            }
        )
        self.scope = scope

    def mismatch(self, scope: str) -> NoReturn:
        """Refuse this journal to a run sending to ``scope``: it is bound to another."""
        raise JournalMismatchError(
            f"{self.path} records refunds and cancels sent to another Violet "
            f"(app and host {self.scope!r}; this run sends to {scope!r}: another app id, "
            "or sandbox and production); its rows are not this one's, and nothing was "
            "sent: name another journal (--journal) for this one"
        )

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, input_id: str | None, scope: str | None = None
    ) -> Journal:
        """Open (or create) the journal, holding its lock until :meth:`aclose`.

        Raises :class:`JournalLockedError` at once when another run holds it, and
        :class:`JournalMismatchError` for a journal of another format version. ``scope``
        (the Violet a run sends to: app id and host) goes in a new journal's header; a
        run binds the journal to its client's (:meth:`bind`) either way.
        """
        target = Path(path)
        lock_fd = _lock(target)
        try:
            # Created 0600, appended to only; read once from the start here.
            fd = open_owned(target, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                _lock_journal(fd, target)
                loading = _in_thread(_load_and_repair, fd)
                # A cancelled open keeps the lock until the load has ended: its thread
                # cannot be stopped, and it may be cutting a torn tail.
                await _until_done(loading)
                header, entries, repaired = loading.result()
            except BaseException:
                os.close(fd)
                raise
            try:
                _check_version(target, header)
            except BaseException:
                entries.close()
                os.close(fd)
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        changed = header is not None and header.get("input") != input_id
        journal = cls(
            target, entries, fd, lock_fd, input_changed=changed, repaired=repaired, header=header
        )
        if scope is not None and journal.scope not in (None, scope):
            await journal.aclose()
            journal.mismatch(scope)
        if header is None or header.get("v") != VERSION:
            # A new journal, or one of v2 marked v3 (its input kept) before any line
            # under the new names is appended.
            given = input_id if header is None else header.get("input")
            line: dict[str, Any] = {"type": "header", "v": VERSION, "input": given}
            bound = journal.scope if header is not None else scope
            if bound is not None:
                line["scope"] = bound
            try:
                await journal._append({**line, "ts": time.time()})
                journal.scope, journal._header = bound, line
            except BaseException:
                await journal.aclose()  # a cancelled or failed open lets the file go
                raise
        return journal

    @staticmethod
    def peek(path: str | os.PathLike[str]) -> JournalIndex:
        """The entries of a journal, read without its lock and without repairing it
        (for a dry run's forecast). Empty when there is no journal. Close it when done
        (a big journal's index is a temporary file)."""
        index = JournalIndex()
        try:
            fd = open_owned(path, os.O_RDONLY)
        except FileNotFoundError:
            return index
        try:
            with open(fd, "rb", closefd=False) as handle:
                read_journal(iter(handle), index)
        finally:
            os.close(fd)
        return index

    def refund_ids(self) -> Iterator[int]:
        """Refunds that items of earlier runs ended with (or found already on their bag):
        a resumed run must never take one of them for another item's."""
        return self._entries.refund_ids()

    def entry(self, key: str) -> JournalEntry | None:
        """The recorded state of the item with this content key."""
        return self._entries.get(key)

    def key_of(self, item: Any, content: str, n: int) -> str:
        """The key this journal knows ``item`` by (the ``n``-th of content ``content``
        in the input): :func:`~violet_async._journal_index.known_key`."""
        return known_key(self._entries, self._entries.legacy_left, item, content, n)

    def open_on_bag(self, bag_id: int) -> frozenset[str]:
        """Keys of items on ``bag_id`` an earlier run left open (sent, pending or
        unknown) and this run has not settled yet: read back before anything else on
        the bag is sent."""
        return frozenset(self._open.get(bag_id, ()))

    def paid_alike(
        self, kind: str, order_id: int, bag_id: int, request: Any
    ) -> list[tuple[str, bool]]:
        """Items an earlier run ended "done" on ``bag_id`` whose request moved the same
        money as ``request`` (unstructured): its reason, restock_items or
        notify_customer aside, and a whole-bag refund the same as one stating the
        amount it refunded (:func:`~violet_async._journal_index.same_money`). Each as
        (key, whether it moved the whole bag)."""
        return self._entries.paid_like(kind, order_id, bag_id, request)

    @property
    def any_paid(self) -> bool:
        """An earlier run ended an item "done" whose request :meth:`paid_alike` knows."""
        return self._entries.any_paid

    def left_open(self) -> list[JournalEntry]:
        """The entries an earlier run left open (sent, pending, unknown) that this run
        has recorded nothing about: no item of its input has resolved them."""
        keys = sorted(k for keys in self._open.values() for k in keys)
        found = (
            self._entries.get(k)
            for k in keys
            if not self._entries.moved(k) and k not in self._in_flight
        )
        return [entry for entry in found if entry is not None]

    async def record(self, key: str, line: int, state: str, **fields: Any) -> None:
        """Append a state change and return once it is on disk."""
        now = time.time()
        first_sent = self._in_flight.get(key)
        if first_sent is None:
            previous = self._entries.get(key)
            first_sent = previous.first_sent if previous is not None else None
        if state == "sent" and first_sent is None:
            first_sent = now
        message = fields.get("message")
        if self.redactor is not None and isinstance(message, str):
            fields["message"] = self.redactor.text(message)  # a server may echo a secret
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
        previous = self._entries.get(key)
        if previous is not None:
            # An entry loaded at open moved on: what it says now is what counts (an item
            # resolved on another item's behalf is then skipped, never resumed again).
            self._entries.update(key, entry_of(record, previous))
            if state not in OPEN_STATES and previous.bag_id is not None:
                keys = self._open.get(previous.bag_id)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._open[previous.bag_id]

    async def _append(self, record: dict[str, Any]) -> None:
        if self._closed:
            raise JournalWriteError("the journal is closed")
        if self._broken is not None:
            # A failed write may have left part of a line: anything appended after it
            # would be glued onto that fragment and lost. Nothing more is written.
            raise self._broken
        if self._flusher.done():  # and its done-callback has not run yet
            raise JournalWriteError(f"the journal {self.path} stopped writing")
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
            writing: asyncio.Future[None] | None = None
            try:
                writing = _in_thread(self._write_durably, data)
                # Even when the writer is cancelled, the write ends first: its lines'
                # waiters learn the truth, and the file is never closed under a
                # running write (its descriptor number could be reused).
                await _until_done(writing)
            finally:
                self._ended(batch, writing)

    def _ended(
        self,
        batch: list[tuple[bytes, asyncio.Future[None]]],
        writing: asyncio.Future[None] | None,
    ) -> None:
        """Tell the waiters of a batch how its write ended (``None``: it never started)."""
        if writing is None:
            error: BaseException | None = RuntimeError("no thread took the write")
        elif writing.cancelled():
            error = asyncio.CancelledError()
        else:
            error = writing.exception()
        if error is None:
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
            return
        # A failed write may have left part of a line: nothing more is written.
        self._broken = JournalWriteError(f"could not write the journal {self.path}: {error}")
        _fail(batch, self._broken)
        self._fail_pending(self._broken)

    def _fail_pending(self, error: JournalWriteError) -> None:
        pending, self._pending = self._pending, []
        _fail(pending, error)

    def _release(self, flusher: asyncio.Future[None]) -> None:
        """The writer has ended, and with it any write in a thread: nothing queued will
        be written, and the file and its lock go."""
        if not flusher.cancelled():
            flusher.exception()  # what stopped it: its waiters were told
        if self._broken is None:
            self._broken = JournalWriteError(f"the journal {self.path} stopped writing")
        self._fail_pending(self._broken)
        try:
            self._entries.close()
            os.close(self._fd)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
            if not self._released.done():
                self._released.set_result(None)

    def _write_durably(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.fsyncs += 1

    async def aclose(self) -> None:
        """Flush what is pending, close the file and release the lock.

        Closes once, however often it is called; a cancelled ``aclose`` still closes,
        as soon as a write running in its thread has ended."""
        if not self._closed:
            self._closed = True  # nothing more is taken
            # Batches are flushed in order: once this empty write is durable, so is
            # everything queued before it.
            marker: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._pending.append((b"", marker))
            self._wake.set()
            self._closing = asyncio.ensure_future(self._flushed(marker))
            # Whatever happens to that task (cancelled before it ran, even), the writer
            # is stopped, and its end lets the file go.
            self._closing.add_done_callback(lambda _: self._flusher.cancel())
        await asyncio.shield(self._released)

    async def _flushed(self, marker: asyncio.Future[None]) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({marker, self._flusher}, return_when=asyncio.FIRST_COMPLETED)


def _fail(waiters: list[tuple[bytes, asyncio.Future[None]]], error: JournalWriteError) -> None:
    """Tell the waiters of lines that were not written; a close's marker (no line) is
    cancelled instead, as its close may never have run to read an error."""
    for line, future in waiters:
        if future.done():
            continue
        if line:
            future.set_exception(error)
        else:
            future.cancel()


def _in_thread(fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
    """Run ``fn`` in the default executor. The future is no task: cancelling every task
    of a program never reaches it, so it is done exactly when the thread is."""
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _until_done(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` (a thread's work) is done, never cancelling it: a thread
    cannot be stopped, and what it works on must not be let go under it. A
    cancellation of this wait is raised once the work has ended. What the work raised
    stays in ``future`` for the caller (marked retrieved: a caller that was cancelled
    never reads it)."""
    interrupted: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError as exc:
            interrupted = exc
    if not future.cancelled():
        future.exception()
    if interrupted is not None:
        raise interrupted


def _check_version(target: Path, header: dict[str, Any] | None) -> None:
    if header is not None and header.get("v") not in READS:
        raise JournalMismatchError(
            f"{target} was written by another version of violet-async (journal "
            f"v{header.get('v')}, this one reads v2 and v{VERSION}); keep it for the record "
            "and name a new file with --journal: every bag's refunds are read "
            "before a send, so rows that already applied are reported "
            "already_present or refused by Violet, never sent again"
        )


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _lock(path: Path) -> int:
    """Take the journal's exclusive lock (a sidecar file holding the holder's pid).

    The operating system's own file lock (``flock`` on POSIX,
    ``msvcrt.locking`` on Windows, through portalocker): the kernel releases it when
    the holder exits, ``kill -9`` included."""
    where = lock_path(path)
    fd = open_owned(where, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o600)
    try:
        portalocker.lock(fd, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING)
    except portalocker.AlreadyLocked:
        holder = _holder(fd)
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
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)  # a full disk: the lock goes with the refusal
        raise
    return fd


def _lock_journal(fd: int, path: Path) -> None:
    """Lock the journal file itself too (POSIX ``flock``; on Windows a lock would keep
    its lines from being read): the sidecar is only a name, and a run whose ``.lock``
    was deleted under it (a lock file taken for stale) must still hold the next run
    off, or both would send the rows neither had recorded yet."""
    if os.name == "nt":  # pragma: no cover - the sidecar alone there
        return
    try:
        portalocker.lock(fd, portalocker.LockFlags.EXCLUSIVE | portalocker.LockFlags.NON_BLOCKING)
    except portalocker.AlreadyLocked:
        raise JournalLockedError(
            f"{path} is in use by another process (a run of violet-async on the same "
            f"journal, whose {lock_path(path).name} was removed); wait for it to finish: "
            "two runs on one journal could send the same row twice",
            pid=None,
        ) from None


def _unlock(fd: int) -> None:
    """Let the journal's lock go without closing its file (what a process's death does)."""
    portalocker.unlock(fd)


def _holder(fd: int) -> str:
    """The pid the lock's holder wrote, or "" (Windows refuses to read a locked range)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return ""


def _load_and_repair(fd: int) -> tuple[dict[str, Any] | None, JournalIndex, int]:
    """Read the journal (streamed); cut a torn last line (a crash mid-write) so that
    the next record starts on a line of its own. Returns (header, entries, bytes cut)."""
    index = JournalIndex()
    try:
        with open(fd, "rb", closefd=False, buffering=1 << 20) as handle:
            header, whole, torn = read_journal(iter(handle), index)
        if torn:
            os.ftruncate(fd, whole)
            os.fsync(fd)
    except BaseException:
        index.close()
        raise
    return header, index, torn


def _parse(
    data: bytes, legacy: LegacyKeys | None = None
) -> tuple[dict[str, Any] | None, dict[str, JournalEntry]]:
    """Journal bytes (whole lines) as (header, the last entry of each key): for a few
    lines at a time (a load streams through :func:`read_journal` instead). A line that
    is not a record is skipped; a field of the wrong type is read as absent. With
    ``legacy`` (one for the whole stream), lines of a journal written before the one
    item key are read under today's key, as a load reads them."""
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
        key = record.get("key")
        if legacy is not None and type(key) is str and "#" in key:
            record = legacy.rename(record)
            if legacy.superseded is not None:
                entries.pop(legacy.superseded, None)
        entry = entry_of(record, entries.get(str(record.get("key"))))
        if entry is not None:
            entries[entry.key] = entry
    return header, entries
