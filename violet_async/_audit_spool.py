"""An audit's rows on disk: spooled into a private SQLite file, then read back grouped
by order and bag, so memory holds one order's rows at a time however long the input.

The journal is streamed into the same file (one line at a time, through the journal's
own parser), keyed as the batch runner keys items: the item's content key plus the
number of identical rows before it in the input (``KEY:n``,
:func:`~violet_async._item_key.item_key`, the fleet ledger's keys too). A journal
written before that key (``kind:<sha256>#n``) is read under it, as a batch reads it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from ._audit_judge import Asked, JournalView
from ._converter import encode_request, request_from_dict
from ._files import NONBLOCK, open_owned
from ._item_key import numbered
from ._journal import _check_version, _parse
from ._journal_index import LegacyKeys
from .models import CancelBagRequest, RefundBagRequest

if TYPE_CHECKING:
    from .batch import BatchItem

__all__ = ["OrderRows", "Spool"]

_CHUNK = 5_000


@attrs.frozen
class OrderRows:
    """One order's rows, by bag (bags and rows in input order)."""

    order_id: int
    bags: list[tuple[int, list[Asked]]]
    ledger_keys: list[str] = attrs.Factory(list)
    """Per row, in bag order then row order: the fleet ledger's key (when asked for)."""

    @property
    def rows(self) -> int:
        return sum(len(rows) for _, rows in self.bags)


class Spool:
    """A scratch SQLite file in a private temporary directory, removed on :meth:`close`."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="violet-audit-", dir=directory)
        path = Path(self._dir.name) / "audit.sqlite3"
        self._db = sqlite3.connect(path, isolation_level=None)
        for pragma in (
            "journal_mode=OFF",  # scratch: a crash loses nothing worth keeping
            "synchronous=OFF",
            "temp_store=FILE",  # the sorts spill to disk, not to memory
            "cache_size=-8192",  # 8 MiB of page cache
        ):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute(
            "CREATE TABLE rows (seq INTEGER PRIMARY KEY, line INTEGER, kind TEXT,"
            " order_id INTEGER, bag_id INTEGER, request BLOB, key TEXT, ledger TEXT)"
        )
        # Identical rows seen so far, per content key: the n of KEY:n, counted on disk.
        self._db.execute("CREATE TABLE seen (content TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID")
        self._db.execute(
            "CREATE TABLE journal (key TEXT PRIMARY KEY, state TEXT, refund_id INTEGER, error TEXT)"
        )
        self.count = 0
        self._journal = False
        self._ledger = False

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    def _insert(self, batch: list[tuple[Any, ...]]) -> None:
        db = self._db
        db.execute("BEGIN")
        rows = []
        for line, kind, order_id, bag_id, request, content, ledger in batch:
            key = numbered(content, self._next(content))
            ledger_key = key if ledger else None  # one item key for journal and ledger
            rows.append((line, kind, order_id, bag_id, request, key, ledger_key))
        db.executemany(
            "INSERT INTO rows (line, kind, order_id, bag_id, request, key, ledger)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.execute("COMMIT")
        self.count += len(batch)
        batch.clear()

    def _next(self, content: str) -> int:
        """How many identical rows came before this one (0 for the first)."""
        (n,) = self._db.execute(
            "INSERT INTO seen VALUES (?, 0) ON CONFLICT (content) DO UPDATE SET n = n + 1"
            " RETURNING n",
            (content,),
        ).fetchone()
        return int(n)

    def _row(self, item: BatchItem, ledger: bool) -> tuple[Any, ...]:
        request = encode_request(item.request)
        return (item.line, item.kind, item.order_id, item.bag_id, request, item.key, ledger)

    def add_items(self, items: Iterable[BatchItem], *, ledger: bool = False) -> None:
        """Spool ``items`` (consumed lazily); ``ledger`` keeps fleet ledger keys too."""
        self._ledger = ledger
        batch: list[tuple[Any, ...]] = []
        for item in items:
            batch.append(self._row(item, ledger))
            if len(batch) >= _CHUNK:
                self._insert(batch)
        if batch:
            self._insert(batch)

    async def add_async_items(self, items: AsyncIterable[BatchItem], *, ledger: bool) -> None:
        self._ledger = ledger
        batch: list[tuple[Any, ...]] = []
        async for item in items:
            batch.append(self._row(item, ledger))
            if len(batch) >= _CHUNK:
                self._insert(batch)
        if batch:
            self._insert(batch)

    def add_journal(self, path: Path) -> None:
        """Stream a batch journal in, one line at a time, the last line of a key winning.
        Raises JournalMismatchError for another journal version, UnsafeFileError for a
        file another user could have written (see :func:`open_owned`), OSError when it
        cannot be read. Read without its lock: a run still writing it is seen as it was."""
        self._journal = True
        batch: list[tuple[Any, ...]] = []
        # Held to the batch's checks (UnsafeFileError): a journal another user planted
        # or may write could make a refund "ours", or raise a false alarm.
        fd = open_owned(path, os.O_RDONLY)
        legacy = LegacyKeys()  # a journal written before the one item key
        with os.fdopen(fd, "rb") as handle, contextlib.closing(legacy):
            if NONBLOCK:  # Windows has no O_NONBLOCK (nor, before 3.12, set_blocking)
                os.set_blocking(fd, True)
            for raw in handle:
                header, entries = _parse(raw, legacy)
                if header is not None:
                    _check_version(path, header)
                batch.extend((e.key, e.state, e.refund_id, e.error) for e in entries.values())
                if len(batch) >= _CHUNK:
                    self._journal_insert(batch)
        if batch:
            self._journal_insert(batch)

    def _journal_insert(self, batch: list[tuple[Any, ...]]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR REPLACE INTO journal VALUES (?, ?, ?, ?)", batch)
        self._db.execute("COMMIT")
        batch.clear()

    def orders(self) -> Iterator[OrderRows]:
        """Every spooled row, one order at a time (orders by id, bags by id, rows in
        input order), each with what the journal says of it."""
        # An index walked in order: no sort of the whole input, in memory or on disk.
        self._db.execute("CREATE INDEX IF NOT EXISTS by_bag ON rows (order_id, bag_id, seq)")
        cursor = self._db.execute(
            "SELECT r.line, r.kind, r.order_id, r.bag_id, r.request, r.ledger,"
            " j.key IS NOT NULL, j.state, j.refund_id, j.error"
            " FROM rows r INDEXED BY by_bag LEFT JOIN journal j ON j.key = r.key"
            " ORDER BY r.order_id, r.bag_id, r.seq"
        )
        from .batch import BatchItem  # noqa: PLC0415 - batch imports this module

        current: OrderRows | None = None
        while True:
            fetched = cursor.fetchmany(1_000)
            if not fetched:
                break
            for line, kind, order_id, bag_id, body, ledger_key, known, state, rid, err in fetched:
                cls = CancelBagRequest if kind == "cancel" else RefundBagRequest
                request: Any = request_from_dict(cls, orjson.loads(body))
                item = BatchItem(line, kind, order_id, bag_id, request)
                view = None
                if self._journal:
                    view = JournalView("journal", state if known else None, rid, err)
                if current is None or current.order_id != order_id:
                    if current is not None:
                        yield current
                    current = OrderRows(order_id, [])
                if not current.bags or current.bags[-1][0] != bag_id:
                    current.bags.append((bag_id, []))
                current.bags[-1][1].append(Asked(item, view))
                if self._ledger:
                    current.ledger_keys.append(ledger_key)
        if current is not None:
            yield current
