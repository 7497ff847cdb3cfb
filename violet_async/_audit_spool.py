"""An audit's rows on disk: spooled into a private SQLite file, then read back grouped
by order and bag, so memory holds one order's rows at a time however long the input.

The journal is streamed into the same file (one line at a time, through the journal's
own parser), keyed as the batch runner keys items: the item's content key plus the
number of identical rows before it in the input (``KEY#n``). A fleet ledger's keys
(``kind:order:bag:digest:n``) are numbered the same way.
"""

from __future__ import annotations

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
from ._journal import _check_version, _parse
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
            " order_id INTEGER, bag_id INTEGER, request BLOB, content TEXT, ledger TEXT)"
        )
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
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT INTO rows (line, kind, order_id, bag_id, request, content, ledger)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            batch,
        )
        self._db.execute("COMMIT")
        self.count += len(batch)
        batch.clear()

    def _row(self, item: BatchItem, ledger: bool) -> tuple[Any, ...]:
        base = None
        if ledger:
            from .fleet._ledger import item_key  # noqa: PLC0415 - the fleet extra, when asked

            key = item_key(item)
            base = key[: key.rfind(":") + 1]
        request = encode_request(item.request)
        return (item.line, item.kind, item.order_id, item.bag_id, request, item.key, base)

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
        Raises JournalMismatchError for another journal version, OSError when it cannot
        be read. Read without its lock: a run still writing it is seen as it was."""
        self._journal = True
        batch: list[tuple[Any, ...]] = []
        with path.open("rb") as handle:
            for raw in handle:
                header, entries = _parse(raw)
                if header is not None:
                    _check_version(path, header)
                for entry in entries.values():
                    batch.append((entry.key, entry.state, entry.refund_id, entry.error))
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
        cursor = self._db.execute(
            """
            WITH numbered AS (
              SELECT *,
                ROW_NUMBER() OVER (PARTITION BY content ORDER BY seq) - 1 AS n,
                ROW_NUMBER() OVER (PARTITION BY ledger ORDER BY seq) - 1 AS ln
              FROM rows)
            SELECT r.line, r.kind, r.order_id, r.bag_id, r.request, r.ledger, r.ln,
                   j.key IS NOT NULL, j.state, j.refund_id, j.error
            FROM numbered r LEFT JOIN journal j ON j.key = r.content || '#' || r.n
            ORDER BY r.order_id, r.bag_id, r.seq
            """
        )
        from .batch import BatchItem  # noqa: PLC0415 - batch imports this module

        current: OrderRows | None = None
        while True:
            fetched = cursor.fetchmany(1_000)
            if not fetched:
                break
            for line, kind, order_id, bag_id, body, base, ln, known, state, rid, err in fetched:
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
                    current.ledger_keys.append(f"{base}{ln}")
        if current is not None:
            yield current
