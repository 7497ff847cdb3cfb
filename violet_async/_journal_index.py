"""What a resumed batch needs from its journal, read as a stream in bounded memory.

A journal holds a line per state change of every item of every earlier run: millions
of lines for a big batch. Loading it keeps only what a decision needs:

- the **open** items (last state "sent", "pending" or "unknown"), with their protocol
  record: they are read back before anything is re-sent. Few, whatever the size of the
  batch; indexed by bag too (:meth:`JournalIndex.open_on_bag`), as a new item on a bag
  must wait for the open one;
- the **finished** items ("done", "failed", "present", "unsent") without their
  protocol record: in memory up to :data:`SPILL_AT` of them, then in an on-disk SQLite
  index (a private temporary database, deleted when the journal closes).

A line that is not a record (torn by a crash, a field of the wrong type: ``"ts":
"yesterday"``) never stops a load: a torn line is skipped, a bad field read as absent.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import orjson

from ._converter import request_from_dict
from ._item_key import LEGACY_KEY, content_key, legacy_journal_key, numbered
from .models import CancelBagRequest, RefundBagRequest

__all__ = [
    "OPEN_STATES",
    "SPILL_AT",
    "JournalEntry",
    "JournalIndex",
    "LegacyKeys",
    "RepeatCounter",
    "known_key",
    "read_journal",
]

#: States whose item may have applied and must be read back before a re-send.
OPEN_STATES = frozenset({"sent", "pending", "unknown"})
#: Finished entries kept in memory before they move to the on-disk index.
SPILL_AT = 50_000


def money_key(kind: Any, order_id: Any, bag_id: Any, request: Any) -> int | None:
    """What a request moves, as a number: kind, order, bag and the refund's
    amount_refunded, shipping and skus (a cancel moves the bag's rest, whatever it
    says), from the request as the converter unstructures it. Two requests equal in
    these are the same refund however their reason, restock_items or notify_customer
    differ. None: not a request's shape. Python's hash: for this process only (its
    memory and its private scratch database)."""
    if type(request) is not dict:
        return None
    try:
        if kind == "refund":
            parts: tuple[Any, ...] = (
                _money_part(request.get("amount_refunded")),
                _money_part(request.get("shipping")),
                _money_part(request.get("skus")),
            )
        elif kind == "cancel":
            parts = ()
        else:
            return None
        return hash((kind, order_id, bag_id, parts))
    except TypeError:  # a value that is not JSON, or not hashable: not a record of ours
        return None


def money_of(
    kind: Any, order_id: Any, bag_id: Any, request: Any, paid: Any = None
) -> tuple[Any, ...] | None:
    """What a request moves, for :func:`same_money`: (its :func:`money_key`, kind,
    order, the amount it states (None: a whole-bag refund, or one of its lines whose
    amount Violet works out), its lines (skus, hashed; None: none named), and ``paid``:
    the amount the refund it made moved, as Violet answered it (None: not known)).
    None: not a request's shape."""
    exact = money_key(kind, order_id, bag_id, request)
    if exact is None:
        return None
    stated = lines = None
    if kind == "refund":
        stated = request.get("amount_refunded")
        skus = request.get("skus")
        lines = None if skus is None else hash(_money_part(skus))
    return (
        exact,
        kind,
        order_id,
        stated if type(stated) is int else None,
        lines,
        paid if type(paid) is int else None,
    )


def same_money(done: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    """Whether a new request (``new``, :func:`money_of`) asks the same money of its bag
    as a done one (``done``, with the amount its refund moved), so that sending it
    after the done one could refund the bag twice (their reason, restock_items or
    notify_customer aside). The same when:

    - both ask the same amount, shipping and lines (:func:`money_key`);
    - one is a cancel and the other a refund of the bag (a cancel moves the bag's
      rest: after a refund of the whole bag, nothing; a refund after a cancel, again);
    - the done one refunded the whole bag (no amount, no lines): any refund of the
      bag after it is more of the same bag;
    - both are refunds, their lines (when both name some) are the same, and: the new
      one states no amount (the whole bag, or its lines': it may be the done one's), or
      it states the done one's stated amount, or, the done one naming lines and no
      amount, the amount its refund moved (or that amount is not known).

    Shipping does not tell two amounts apart. Another stated amount than a done one
    stated (or moved for its lines), or other lines, is other money."""
    if done[0] == new[0]:
        return True
    _, done_kind, done_order, done_stated, done_lines, paid = done
    _, new_kind, new_order, new_stated, new_lines, _ = new
    if done_order != new_order:
        return False
    if done_kind != new_kind or done_kind != "refund":
        return True  # a cancel and a refund (or two cancels) of one bag
    if fills_bag(done):
        return True  # after the whole bag, any more of it is the same money again
    if done_lines is not None and new_lines is not None and done_lines != new_lines:
        return False
    if new_stated is None:
        return True
    if done_stated is not None:
        return bool(done_stated == new_stated)
    return paid is None or paid == new_stated


def fills_bag(money: tuple[Any, ...]) -> bool:
    """A request (:func:`money_of`) that moves the whole bag: a cancel, or a refund
    stating no amount and naming no lines."""
    return bool(money[1] == "cancel" or (money[3] is None and money[4] is None))


def _money_part(value: Any) -> Any:
    if value is None or type(value) is int:
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


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
    bag_id: int | None = None
    """The bag its protocol record names (None: no record was written)."""


_FIELDS = "state, ts, line, first_sent, refund_id, error, message"


class JournalIndex(Mapping[str, JournalEntry]):
    """The last entry of every item of a journal (a read-only mapping by item key)."""

    def __init__(self, spill_at: int = SPILL_AT) -> None:
        self._spill_at = spill_at
        #: Open items: key -> (sequence number of its line, the line's record).
        self._open: dict[str, tuple[int, dict[str, Any]]] = {}
        self._by_bag: dict[int, set[str]] = {}
        self._bag_of: dict[str, int] = {}
        #: Finished items not yet on disk: key -> (sequence number, state, ts, line,
        #: first_sent, refund_id, error, message, bag, money): the last two for an item
        #: "done" whose protocol record was read (its bag and :func:`money_of`).
        self._done: dict[str, tuple[Any, ...]] = {}
        self._disk: sqlite3.Connection | None = None
        self._on_disk = 0
        #: Entries a run moved on after the load (they win over what was loaded).
        self._later: dict[str, JournalEntry] = {}
        #: bag -> (key, money) of the finished items in memory done on it: built at
        #: the first :meth:`paid_alike`, after the load (none of its cost on a load).
        self._paid: dict[int, list[tuple[str, tuple[Any, ...]]]] | None = None
        self._paid_indexed = False
        #: Any item "done" with a money key at all (else no lookup is worth making).
        self.any_paid = False
        #: Items of a journal written before the one item key read under today's key,
        #: and lines of such a journal kept under their old name (:class:`LegacyKeys`).
        self.renamed = 0
        self.legacy_left = 0

    # -- building ------------------------------------------------------------------

    def add(self, seq: int, record: dict[str, Any]) -> None:
        """Record a journal line as its item's latest state (``seq`` grows line by line;
        a line that names no item is ignored). The hot loop of a load: a few dict
        operations per line, no object built for a finished item."""
        key, state = record.get("key"), record.get("state")
        if type(key) is not str or type(state) is not str:
            return
        if state in OPEN_STATES:
            self._unbag(key)
            self._open[key] = (seq, record)
            ask = record.get("ask")
            bag = ask.get("bag_id") if type(ask) is dict else None
            if type(bag) is int:
                self._by_bag.setdefault(bag, set()).add(key)
                self._bag_of[key] = bag
            return
        opened = self._open.pop(key, None)
        bag = money = None
        if opened is not None:
            self._unbag(key)
            ask = opened[1].get("ask")
            if state == "done" and type(ask) is dict and type(ask.get("bag_id")) is int:
                bag = ask["bag_id"]
                money = money_of(
                    ask.get("kind"),
                    ask.get("order_id"),
                    bag,
                    ask.get("request"),
                    record.get("amount"),
                )
                self.any_paid = self.any_paid or money is not None
        ts, line, first, refund, error, message = (
            record.get("ts"),
            record.get("line"),
            record.get("first_sent"),
            record.get("refund_id"),
            record.get("error"),
            record.get("message"),
        )
        # Only plain values (what SQLite stores); anything else is read as absent.
        self._done[key] = (
            seq,
            state,
            ts if type(ts) is float or type(ts) is int else None,
            line if type(line) is int else None,
            first if type(first) is float or type(first) is int else None,
            refund if type(refund) is int else None,
            error if type(error) is str else None,
            message if type(message) is str else None,
            bag,
            money,
        )
        self._paid = None
        if len(self._done) >= self._spill_at:
            self._spill()

    def forget(self, key: str) -> None:
        """Drop ``key``'s entry (a load only: lines of an old journal's item that a
        later line of it, under today's key, supersedes; see :class:`LegacyKeys`)."""
        self._open.pop(key, None)
        self._unbag(key)
        self._done.pop(key, None)
        if self._disk is not None:
            with self._disk:
                self._disk.execute("DELETE FROM e WHERE key = ?", (key,))
        self._paid = None

    def _unbag(self, key: str) -> None:
        bag = self._bag_of.pop(key, None)
        if bag is not None:
            keys = self._by_bag[bag]
            keys.discard(key)
            if not keys:
                del self._by_bag[bag]

    def _spill(self) -> None:
        if self._disk is None:
            # "": a private temporary database on disk, deleted when it is closed.
            self._disk = _scratch_database()
            self._disk.execute(
                "CREATE TABLE e (key TEXT PRIMARY KEY, seq INTEGER, state TEXT, ts REAL, "
                "line INTEGER, first_sent REAL, refund_id INTEGER, error TEXT, "
                "message TEXT, bag INTEGER, money BLOB) WITHOUT ROWID"
            )
        # In key order: a B-tree takes sorted inserts several times faster.
        rows = (
            (key, *fields[:9], None if fields[9] is None else orjson.dumps(fields[9]))
            for key, fields in sorted(self._done.items())
        )
        with self._disk:
            self._disk.executemany(
                f"INSERT OR REPLACE INTO e (key, seq, {_FIELDS}, bag, money) "  # noqa: S608 - constant
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        self._on_disk += len(self._done)
        self._done.clear()

    def close(self) -> None:
        """Let the on-disk index go (its file is deleted)."""
        if self._disk is not None:
            self._disk.close()
            self._disk = None

    # -- reading -------------------------------------------------------------------

    def _finished(self, key: str) -> tuple[Any, ...] | None:
        found = self._done.get(key)
        if found is not None or self._disk is None:
            return found
        row: tuple[Any, ...] | None = self._disk.execute(
            f"SELECT seq, {_FIELDS} FROM e WHERE key = ?",  # noqa: S608 - constant
            (key,),
        ).fetchone()
        return row

    def update(self, key: str, entry: JournalEntry | None) -> None:
        """What a run recorded about a loaded item since the load."""
        if entry is not None:
            self._later[key] = entry

    def __getitem__(self, key: str) -> JournalEntry:
        later = self._later.get(key)
        if later is not None:
            return later
        opened = self._open.get(key)
        finished = self._finished(key)
        if opened is not None and (finished is None or opened[0] > finished[0]):
            entry = entry_of(opened[1])
            assert entry is not None  # noqa: S101 - only item lines are kept
            return entry
        if finished is None:
            raise KeyError(key)
        _, state, ts, line, first, refund, error, message = finished[:8]
        return JournalEntry(
            key, state, _finite(ts) or 0.0, line, _finite(first), refund, error, message
        )

    def __iter__(self) -> Iterator[str]:
        yield from self._open
        for key in self._done:
            if key not in self._open:
                yield key
        if self._disk is not None:
            for (key,) in self._disk.execute("SELECT key FROM e"):
                if key not in self._open and key not in self._done:
                    yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        return bool(self._open or self._done or self._on_disk)

    def open_on_bag(self, bag_id: int) -> frozenset[str]:
        """Keys of the items on ``bag_id`` whose last state is open (sent, pending,
        unknown): a new item on the bag waits until they are settled."""
        return frozenset(self._by_bag.get(bag_id, ()))

    def paid_alike(self, bag_id: int, money: tuple[Any, ...]) -> list[tuple[str, bool]]:
        """The items loaded "done" on ``bag_id`` whose request moved the same money as
        ``money`` (:func:`money_of`, :func:`same_money`), in the order they were done:
        (key, whether it moved the whole bag (:func:`fills_bag`)). Their state may have
        moved on since the load (read it with ``self[key]``). The first call indexes
        them (a load pays nothing for it)."""
        found: list[tuple[str, bool]] = []
        if self._disk is not None:
            if not self._paid_indexed:
                self._disk.execute(
                    "CREATE INDEX IF NOT EXISTS e_paid ON e (bag) WHERE money IS NOT NULL"
                )
                self._paid_indexed = True
            rows = self._disk.execute(
                "SELECT key, money FROM e WHERE bag = ? AND money IS NOT NULL ORDER BY seq",
                (bag_id,),
            )
            for key, raw in rows:
                done = tuple(orjson.loads(raw))
                if same_money(done, money):
                    found.append((key, fills_bag(done)))
        if self._paid is None:
            self._paid = {}
            for key, fields in self._done.items():
                if fields[9] is not None:
                    self._paid.setdefault(fields[8], []).append((key, fields[9]))
        found.extend(
            (key, fills_bag(done))
            for key, done in self._paid.get(bag_id, ())
            if same_money(done, money)
        )
        return found

    def paid_like(
        self, kind: str, order_id: int, bag_id: int, request: Any
    ) -> list[tuple[str, bool]]:
        """:meth:`paid_alike` for a request (unstructured, as the journal records it)."""
        money = money_of(kind, order_id, bag_id, request)
        return self.paid_alike(bag_id, money) if money is not None else []

    def moved(self, key: str) -> bool:
        """A run recorded a state of this loaded item since the load."""
        return key in self._later

    def open_items(self) -> dict[str, JournalEntry]:
        """Every open item's entry."""
        return {key: self[key] for key in self._open}

    def refund_ids(self) -> Iterator[int]:
        """Every refund id an entry records (one at a time: there may be millions)."""
        for _, record in self._open.values():
            refund_id = record.get("refund_id")
            if type(refund_id) is int:
                yield refund_id
        for fields in self._done.values():
            if fields[5] is not None:
                yield fields[5]
        if self._disk is not None:
            query = "SELECT refund_id FROM e WHERE refund_id IS NOT NULL"
            for (refund_id,) in self._disk.execute(query):
                yield refund_id


def _scratch_database() -> sqlite3.Connection:
    """A private temporary database on disk ("": deleted when it is closed), with a
    page cache of 16 MiB and no rollback journal (nothing in it must survive)."""
    database = sqlite3.connect("", check_same_thread=False)
    database.execute("PRAGMA cache_size = -16384")
    database.execute("PRAGMA journal_mode = OFF")
    return database


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def entry_of(record: dict[str, Any], previous: JournalEntry | None = None) -> JournalEntry | None:
    """The entry a journal line records (None: not an item's line). Fields of the
    wrong type are read as absent, never raised. A line of an open state without a
    protocol record keeps ``previous``'s, so the item can still be read back and its
    bag is known."""
    key, state = record.get("key"), record.get("state")
    if not (isinstance(key, str) and isinstance(state, str)):
        return None
    ask = record.get("ask")
    if not isinstance(ask, dict) and state in OPEN_STATES and previous is not None:
        ask = previous.ask
    bag = ask.get("bag_id") if isinstance(ask, dict) else None
    return JournalEntry(
        key=key,
        state=state,
        ts=_number(record.get("ts")) or 0.0,
        line=_int(record.get("line")),
        first_sent=_number(record.get("first_sent")),
        refund_id=_int(record.get("refund_id")),
        error=_text(record.get("error")),
        message=_text(record.get("message")),
        ask=ask if isinstance(ask, dict) else None,
        bag_id=bag if type(bag) is int else None,
    )


def known_key(index: Mapping[str, Any], legacy_left: int, item: Any, content: str, n: int) -> str:
    """The key a journal knows ``item`` by, the ``n``-th item of content ``content`` of
    its input: today's (:func:`~violet_async._item_key.item_key`), unless the journal
    holds nothing under it and holds a line of an older journal under the item's old
    name that could not be renamed at load (``legacy_left``: one never sent, whose lines
    carry no record): the item then keeps that name, as the run that wrote it knew it."""
    key = numbered(content, n)
    if not legacy_left or key in index:
        return key
    old = legacy_journal_key(item.kind, item.order_id, item.bag_id, item.request, n)
    return old if old in index else key


def read_journal(
    lines: Iterator[bytes], index: JournalIndex
) -> tuple[dict[str, Any] | None, int, int]:
    """Feed a journal's lines into ``index``. Returns (header, bytes up to the end of
    the last whole line, bytes of a torn last line). Lines a journal wrote before the
    one item key are read under their item's key of today (:class:`LegacyKeys`)."""
    header: dict[str, Any] | None = None
    whole = torn = 0
    legacy = LegacyKeys()
    try:
        for seq, raw in enumerate(lines):
            if not raw.endswith(b"\n"):
                torn = len(raw)  # only the last line can lack its newline
                break
            whole += len(raw)
            record: Any = None
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # a line torn by a crash mid-write: its change never happened
            if not isinstance(record, dict):
                continue
            if record.get("type") == "header":
                header = record
                continue
            key = record.get("key")
            if type(key) is str and "#" in key:  # the only keys that may be old ones
                record = legacy.rename(record)
                if legacy.superseded is not None:
                    index.forget(legacy.superseded)
            index.add(seq, record)
    finally:
        index.renamed += legacy.renamed
        index.legacy_left += legacy.left
        legacy.close()
    return header, whole, torn


class LegacyKeys:
    """Renames the lines of a journal written before the one item key
    (``kind:<sha256[:32]>#n``) to their item's key of today
    (:func:`~violet_async._item_key.item_key`), so an item such a journal left sent,
    pending, unknown or done is found (and resumed, or skipped) exactly as before.

    An item is renamed by the first of its lines that proves its name: one holding its
    protocol record (``ask``: kind, order, bag and request; every line written before a
    send holds it) whose content gives the old name back. Its lines before that one
    (an item never sent holds none: ``present``, ``unsent``) are superseded by it (the
    last line of an item is its state): the reader drops them from the index
    (:attr:`superseded`), so an item's lines never live under two names. Its later
    lines (``done``...) follow. A name no line proves (a record edited or planted; an
    item never sent) keeps its name, and a run goes on under it (:func:`known_key`).
    Two old names never become one. The names learnt are held in memory up to
    ``spill_at``, then in a private temporary SQLite table (a journal of millions of
    old items loads in bounded memory)."""

    def __init__(self, spill_at: int = SPILL_AT) -> None:
        self._spill_at = spill_at
        self._names: dict[str, str] = {}
        self._taken: set[str] = set()
        self._disk: sqlite3.Connection | None = None
        #: Old items renamed, and old-style lines kept under their own name.
        self.renamed = 0
        self.left = 0
        #: Set by :meth:`rename` when the line just renamed proved an old name whose
        #: earlier lines were kept under it: that name's entry is superseded.
        self.superseded: str | None = None

    def rename(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` under its item's key of today (itself when it is not an old one,
        or its old name is not proven yet)."""
        self.superseded = None
        key = record["key"]
        match = LEGACY_KEY.fullmatch(key)
        if match is None:
            return record
        new = self._known(key)
        if new is None or (new == key and type(record.get("ask")) is dict):
            proven = self._learn(key, match.group(1), int(match.group(3)), record.get("ask"))
            if new == key and proven != key:
                self.superseded = key  # its lines kept so far: this one supersedes them
            new = proven
        if new == key:
            self.left += 1
            return record
        return {**record, "key": new}

    def _learn(self, key: str, kind: str, occurrence: int, ask: Any) -> str:
        """The name of ``key``'s item from its first line, for all of its lines: today's
        key when that line's record proves it, else ``key`` itself (an item's lines are
        never split between two names)."""
        new = self._proven(key, kind, occurrence, ask)
        if new is not None and self._claimed(new):
            new = None  # another old name became it first: never merge two items
        self._names[key] = new or key  # over what the disk holds, until the next spill
        if new is not None:
            self._taken.add(new)
            self.renamed += 1
        if len(self._names) >= self._spill_at:
            self._spill()
        return new or key

    @staticmethod
    def _proven(key: str, kind: str, occurrence: int, ask: Any) -> str | None:
        if type(ask) is not dict or ask.get("kind") != kind:
            return None
        order_id, bag_id = ask.get("order_id"), ask.get("bag_id")
        if type(order_id) is not int or type(bag_id) is not int:
            return None
        stored = ask.get("request")
        if type(stored) is not dict:
            return None
        # The request as the record holds it: what the release that wrote it hashed.
        if legacy_journal_key(kind, order_id, bag_id, stored, occurrence) != key:
            return None  # its record is not what its name says: kept as it is
        cls: Any = RefundBagRequest if kind == "refund" else CancelBagRequest
        try:
            request = request_from_dict(cls, stored)
        except Exception:  # noqa: BLE001 - a record of any shape keeps its name, never raises
            return None
        return numbered(content_key(kind, order_id, bag_id, request), occurrence)

    def _known(self, key: str) -> str | None:
        new = self._names.get(key)
        if new is None and self._disk is not None:
            row = self._disk.execute("SELECT new FROM r WHERE old = ?", (key,)).fetchone()
            new = row[0] if row is not None else None
        return new

    def _claimed(self, new: str) -> bool:
        if new in self._taken:
            return True
        if self._disk is None:
            return False
        return self._disk.execute("SELECT 1 FROM r WHERE new = ?", (new,)).fetchone() is not None

    def _spill(self) -> None:
        if self._disk is None:
            self._disk = _scratch_database()
            self._disk.execute("CREATE TABLE r (old TEXT PRIMARY KEY, new TEXT UNIQUE)")
        with self._disk:
            self._disk.executemany(
                "INSERT OR REPLACE INTO r (old, new) VALUES (?, ?)", self._names.items()
            )
        self._names.clear()
        self._taken.clear()

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None


class RepeatCounter:
    """How often each content key was seen, in bounded memory: a dict up to
    ``spill_at`` keys, then a private temporary SQLite table on disk. (Identical rows
    are numbered by occurrence; a 10M-row input must not hold 10M keys in memory.)"""

    def __init__(self, spill_at: int = SPILL_AT) -> None:
        self._spill_at = spill_at
        self._counts: dict[str, int] = {}
        self._disk: sqlite3.Connection | None = None

    def seen(self, key: str) -> int:
        """How often ``key`` was seen so far."""
        seen = self._counts.get(key)
        if seen is None and self._disk is not None:
            row = self._disk.execute("SELECT n FROM c WHERE key = ?", (key,)).fetchone()
            seen = row[0] if row is not None else None
        return seen or 0

    def take(self, key: str) -> int:
        """How often ``key`` was seen before (0 the first time); counts this one."""
        seen = self.seen(key)
        self._counts[key] = seen + 1
        counts = self._counts
        if len(counts) >= self._spill_at:
            self._spill()
        return seen

    def _spill(self) -> None:
        if self._disk is None:
            self._disk = _scratch_database()
            self._disk.execute("CREATE TABLE c (key TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID")
        with self._disk:
            self._disk.executemany(
                "INSERT OR REPLACE INTO c (key, n) VALUES (?, ?)", sorted(self._counts.items())
            )
        self._counts.clear()

    def items(self) -> Iterator[tuple[str, int]]:
        """Every key with its count, in no particular order."""
        if self._disk is not None:
            for key, count in self._disk.execute("SELECT key, n FROM c"):
                if key not in self._counts:
                    yield key, count
        yield from self._counts.items()

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None
