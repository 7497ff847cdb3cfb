"""The batch journal: append-only JSON lines, durable (fsynced) at every state change.

Line shapes::

    {"type": "header", "v": 1, "input": "<sha256 of the input, or null>", "ts": ...}
    {"key": "3:100001:200001:500", "line": 3, "state": "sent", "ask": {...}, "ts": ...}
    {"key": ..., "line": 3, "state": "pending", "ask": {...}, ...}
    {"key": ..., "line": 3, "state": "done", "refund_id": 400001, "reconciled": false, ...}
    {"key": ..., "line": 3, "state": "failed", "error": "BadRequestError", "message": ...}
    {"key": ..., "line": 3, "state": "unknown", "error": "AmbiguousOutcomeError", ...}

``ask`` is the refund protocol's record of the item (``PendingRefund.to_dict()``): its
sends, settle window and baseline. An item with no line was never started. "sent" is
written, and fsynced, *before* every send leaves: a crash can never leave a sent
request out of the journal. "sent", "pending" and "unknown" items are read back by the
protocol's rule (``client.resume``) before anything is re-sent on resume; "failed"
means the request definitely did not apply.

Writes are group-committed: every state change waits until its line is on disk, but
concurrent changes share one fsync.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import attrs
import orjson

from .exceptions import VioletError

__all__ = ["Journal", "JournalEntry", "JournalMismatchError"]


class JournalMismatchError(VioletError):
    """The journal belongs to a different input (or a different command)."""


@attrs.frozen
class JournalEntry:
    """The last known state of one item."""

    key: str
    state: str
    ts: float
    first_sent: float | None = None
    refund_id: int | None = None
    error: str | None = None
    ask: dict[str, Any] | None = None
    """The protocol record written with "sent" / "pending" / "unknown"."""


class Journal:
    """One batch run's journal file. Open with :meth:`open`, close with :meth:`aclose`."""

    def __init__(self, path: Path, entries: dict[int, JournalEntry], fd: int) -> None:
        self.path = path
        self._entries = entries
        self._in_flight: dict[int, float] = {}
        self._fd = fd
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())
        self.fsyncs = 0

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, input_id: str | None) -> Journal:
        """Open (or create) the journal. An existing journal made for another input is
        refused with :class:`JournalMismatchError`."""
        target = Path(path)
        entries: dict[int, JournalEntry] = {}
        header: dict[str, Any] | None = None
        if target.exists():  # noqa: ASYNC240 - before any request is in flight
            header, entries = await asyncio.to_thread(_load, target)
            if header is not None and header.get("input") != input_id:
                raise JournalMismatchError(
                    f"{target} was written for a different input file; use another "
                    "--journal or restore the original input"
                )
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        journal = cls(target, entries, fd)
        if header is None:
            await journal._append({"type": "header", "v": 1, "input": input_id, "ts": time.time()})
        return journal

    def refund_ids(self) -> list[int]:
        """Refunds that items of earlier runs ended with: a resumed run must never take
        one of them for another item's."""
        return [e.refund_id for e in self._entries.values() if isinstance(e.refund_id, int)]

    def entry(self, line: int, key: str) -> JournalEntry | None:
        """The recorded state of the item on ``line``; a different key for the same line
        means the input changed."""
        found = self._entries.get(line)
        if found is not None and found.key != key:
            raise JournalMismatchError(
                f"line {line} was {found.key!r} in the journal but is {key!r} now: "
                "the input changed since this journal was written"
            )
        return found

    async def record(self, line: int, key: str, state: str, **fields: Any) -> None:
        """Append a state change and return once it is on disk."""
        now = time.time()
        first_sent = self._in_flight.get(line)
        if first_sent is None:
            previous = self._entries.get(line)
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
            self._in_flight[line] = first_sent  # type: ignore[assignment]
        else:
            self._in_flight.pop(line, None)

    async def _append(self, record: dict[str, Any]) -> None:
        if self._closed:
            raise VioletError("the journal is closed")
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
            try:
                await asyncio.to_thread(self._write_durably, data)
            except OSError as exc:
                error = VioletError(f"could not write the journal {self.path}: {exc}")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def _write_durably(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.fsyncs += 1

    async def aclose(self) -> None:
        """Flush what is pending and close the file."""
        if self._closed:
            return
        # Batches are flushed in order: once this empty write is durable, so is
        # everything queued before it.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((b"", future))
        self._wake.set()
        await asyncio.gather(future, return_exceptions=True)
        self._closed = True
        self._flusher.cancel()
        await asyncio.gather(self._flusher, return_exceptions=True)
        os.close(self._fd)


def _load(path: Path) -> tuple[dict[str, Any] | None, dict[int, JournalEntry]]:
    header: dict[str, Any] | None = None
    entries: dict[int, JournalEntry] = {}
    with path.open("rb") as handle:
        for raw in handle:
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # a line torn by a crash mid-write: its change never happened
            if not isinstance(record, dict):
                continue
            if record.get("type") == "header":
                header = record
                continue
            line, key, state = record.get("line"), record.get("key"), record.get("state")
            if not (isinstance(line, int) and isinstance(key, str) and isinstance(state, str)):
                continue
            entries[line] = JournalEntry(
                key=key,
                state=state,
                ts=float(record.get("ts", 0.0)),
                first_sent=record.get("first_sent"),
                refund_id=record.get("refund_id"),
                error=record.get("error"),
                ask=record.get("ask") if isinstance(record.get("ask"), dict) else None,
            )
    return header, entries
