"""Issue 25, one item key: the batch journal and the fleet ledger name an item alike
(:func:`violet_async._item_key.item_key`). A journal written before (``kind:<sha256
[:32]>#n``) must be resumed by today's code without a second refund and without losing
an item in flight; a fleet ledger written before keeps its names. Every resume runs
against a server scripted here (``Bags``: refunds counted by its own record) on a
virtual clock. The old format is written by this file's own code
(:func:`_old_key`), pinned to what the previous release computed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async import RefundBagRequest, RetryPolicy, VioletClient
from violet_async._ask import sent_once
from violet_async._converter import converter, encode_request
from violet_async._item_key import item_key as one_key
from violet_async._journal_index import JournalIndex, LegacyKeys, read_journal
from violet_async._transport import Timeouts
from violet_async.batch import BatchItem, BatchResult, Journal, JournalMismatchError, run_batch
from violet_async.fleet import item_key, keyed_items
from violet_async.testing import FakeClock

from .conftest import serve
from .samples import refund_body

ORDER = 1001


def _old_key(item: BatchItem, n: int) -> str:
    """The name the previous release's journal gave an item (written out here, not
    taken from the package): SHA-256 of [kind, order, bag, request], ``#n``."""
    body = orjson.dumps(
        [item.kind, item.order_id, item.bag_id, converter.unstructure(item.request)],
        option=orjson.OPT_SORT_KEYS,
    )
    return f"{item.kind}:{hashlib.sha256(body).hexdigest()[:32]}#{n}"


def _old_ledger_key(item: BatchItem, n: int) -> str:
    """The name the previous release's fleet ledger gave an item (written out here)."""
    digest = hashlib.blake2b(encode_request(item.request), digest_size=10).hexdigest()
    return f"{item.kind}:{item.order_id}:{item.bag_id}:{digest}:{n}"


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class Bags:
    """Violet for one order's bags. A POST makes the refund at once; on a bag in
    ``hang`` it then never answers (the run is killed with the POST in flight). The
    list shows every refund made on the bag. ``made`` is the server's own record."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.hang: set[int] = set()
        self.posts: list[int] = []
        self.made: dict[int, list[dict[str, Any]]] = {}
        self._never = asyncio.Event()
        self.hung_until = 0
        self.all_hung = asyncio.Event()  # set once ``hung_until`` POSTs arrived, one hung

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    def release(self) -> None:
        """Let the hung handlers end (their callers are gone)."""
        self.hang.clear()
        self._never.set()

    def on(self, bag: int) -> int:
        return len(self.made.get(bag, []))

    def _headers(self) -> dict[str, str]:
        return {"Date": formatdate(self.clock.time(), usegmt=True)}

    async def _login(self, request: web.Request) -> web.Response:
        data = {"token": "audit25-token-0123456789", "refresh_token": "audit25-refresh-01"}
        return web.json_response(data, headers=self._headers())

    async def _list(self, request: web.Request) -> web.Response:
        shown = self.made.get(int(request.match_info["b"]), [])
        return web.Response(
            body=orjson.dumps(shown), content_type="application/json", headers=self._headers()
        )

    async def _refund(self, request: web.Request) -> web.Response:
        bag = int(request.match_info["b"])
        self.posts.append(bag)
        body = await request.json()
        now = self.clock.time()
        made = refund_body(
            id=70_000 + sum(len(v) for v in self.made.values()),
            order_id=int(request.match_info["o"]),
            bag_id=bag,
            amount=body.get("amount_refunded", 1000),
            reason=body.get("reason", ""),
            status="COMPLETED",
            skus=[],
            errors=[],
            date_created=_stamp(now),
            date_last_modified=_stamp(now),
        )
        self.made.setdefault(bag, []).append(made)
        if bag in self.hang:
            if len(self.posts) >= self.hung_until:
                self.all_hung.set()
            await self._never.wait()  # answered never: the caller is killed first
        return web.json_response(made, headers=self._headers())


@contextlib.asynccontextmanager
async def _running(server: Bags) -> AsyncIterator[VioletClient]:
    async with serve(server.app()) as base:
        client = VioletClient(
            2525,
            "audit25-app-secret-0123456789abcdef",
            username="audit25-user",
            password="audit25-password-0123",
            base_url=base + "/v1",
            clock=server.clock,
            retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=60.0),
            timeouts=Timeouts(connect=1.0, read=2.0),
        )
        async with client:
            yield client


def _refund(line: int, bag: int, amount: int = 500, reason: str = "damaged") -> BatchItem:
    return BatchItem.refund(
        line, ORDER, bag, RefundBagRequest(amount_refunded=amount, reason=reason)
    )


async def _drain(client: VioletClient, rows: list[BatchItem], journal: Path) -> list[BatchResult]:
    return [r async for r in run_batch(client, rows, journal=journal)]


def _to_old_format(journal: Path, rows: list[BatchItem]) -> int:
    """Rewrite ``journal`` as the previous release wrote it: every key of ``rows`` (with
    its occurrence) under its old name, the header as it was. Returns lines renamed."""
    names: dict[str, str] = {}
    seen: dict[str, int] = {}
    for row in rows:
        n = seen.get(row.key, 0)
        seen[row.key] = n + 1
        names[one_key(row, n)] = _old_key(row, n)
    out, renamed = [], 0
    for raw in journal.read_bytes().splitlines():
        record = orjson.loads(raw)
        if record.get("key") in names:
            record["key"] = names[record["key"]]
            renamed += 1
        out.append(orjson.dumps(record))
    journal.write_bytes(b"\n".join(out) + b"\n")
    return renamed


def _keys(journal: Path) -> list[str]:
    return [
        k
        for k in (orjson.loads(r).get("key") for r in journal.read_bytes().splitlines())
        if isinstance(k, str)
    ]


# -- the names ------------------------------------------------------------------------


def test_the_old_names_are_the_previous_releases() -> None:
    """The fixtures' old names are what the previous release computed (its
    ``BatchItem.key`` and the fleet's ``item_key``, run on that release's code)."""
    refund = BatchItem.refund(
        3, 1001, 2002, RefundBagRequest(amount_refunded=500, reason="damaged")
    )
    cancel = BatchItem.cancel(4, 1001, 2003)
    assert _old_key(refund, 0) == "refund:014e8db0e6fa2d27bd275a56a504aea3#0"
    assert _old_key(cancel, 0) == "cancel:48136b5f5e0579ac60752a3d09047674#0"
    assert _old_ledger_key(refund, 1) == "refund:1001:2002:b4707994883c3bf634d6:1"
    assert _old_ledger_key(cancel, 0) == "cancel:1001:2003:4ae4acf2f802f6f5210f:0"


def test_one_name_for_the_journal_and_the_ledger() -> None:
    """One function names an item for both: the fleet's ``item_key`` is it, the
    ledger's names of the previous release are unchanged (a ledger in Redis needs no
    migration), ``BatchItem.key`` is its content part, and neither the line nor the
    merchant is part of it; identical rows are numbered by occurrence."""
    a = _refund(3, 2002)
    moved = _refund(99, 2002)
    assert item_key is one_key
    assert one_key(a, 1) == _old_ledger_key(a, 1) == "refund:1001:2002:b4707994883c3bf634d6:1"
    assert one_key(a, 0) == one_key(moved, 0) == f"{a.key}:0"
    other = BatchItem.refund(
        3, ORDER, 2002, RefundBagRequest(amount_refunded=500, reason="damaged"), merchant_id=77
    )
    assert one_key(other) == one_key(a)
    rows = [a, _refund(4, 2002, amount=501), moved]
    assert [k for k, _ in keyed_items(rows)] == [
        _old_ledger_key(a, 0),
        _old_ledger_key(rows[1], 0),
        _old_ledger_key(a, 1),
    ]


def test_legacy_keys_rename_only_what_their_record_proves() -> None:
    """An old line is renamed from its item's record; a later line without one follows
    its name; a line whose record is not its name's content, or carries none, keeps
    its name (read as the previous release read it)."""
    a, b = _refund(1, 2002), _refund(2, 2003)
    ask_a = {
        "kind": "refund",
        "order_id": ORDER,
        "bag_id": 2002,
        "request": {"amount_refunded": 500, "reason": "damaged"},
    }
    legacy = LegacyKeys()
    sent = legacy.rename({"key": _old_key(a, 0), "state": "sent", "ask": ask_a})
    done = legacy.rename({"key": _old_key(a, 0), "state": "done", "refund_id": 7})
    assert sent["key"] == done["key"] == one_key(a, 0)
    # b's name with a's record: a planted or edited line is not a's, nor b's renamed
    planted = {"key": _old_key(b, 0), "state": "sent", "ask": ask_a}
    assert legacy.rename(planted) is planted
    bare = {"key": _old_key(b, 1), "state": "present", "refund_id": 8}
    assert legacy.rename(bare) is bare
    garbled = {"key": _old_key(b, 2), "state": "sent", "ask": {**ask_a, "request": {"x": 1}}}
    assert legacy.rename(garbled) is garbled
    new = {"key": one_key(b, 0), "state": "sent"}
    assert legacy.rename(new) is new
    assert (legacy.renamed, legacy.left) == (1, 3)


def test_two_old_names_never_become_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were two old names ever to give one new name, the second keeps its own: two
    items are never merged (one's state taken for the other's)."""
    import violet_async._journal_index as index_module

    monkeypatch.setattr(index_module, "content_key", lambda *_: "refund:1:2:same")
    a, b = _refund(1, 2002), _refund(2, 2002, amount=700)
    legacy = LegacyKeys()
    asks = [
        {
            "kind": "refund",
            "order_id": ORDER,
            "bag_id": 2002,
            "request": converter.unstructure(r.request),
        }
        for r in (a, b)
    ]
    first = legacy.rename({"key": _old_key(a, 0), "state": "sent", "ask": asks[0]})
    second = {"key": _old_key(b, 0), "state": "sent", "ask": asks[1]}
    assert first["key"] == "refund:1:2:same:0"
    assert legacy.rename(second) is second


def test_an_old_journal_of_many_items_renames_them_in_bounded_memory(tmp_path: Path) -> None:
    """The names learnt move to disk beyond the bound; every later line still follows."""
    rows = [_refund(i, 3000 + i) for i in range(7)]
    lines: list[bytes] = []
    for row in rows:
        ask = {
            "kind": "refund",
            "order_id": ORDER,
            "bag_id": row.bag_id,
            "request": converter.unstructure(row.request),
        }
        lines.append(
            orjson.dumps({"key": _old_key(row, 0), "state": "sent", "ask": ask, "ts": 1.0})
        )
    done = [{"key": _old_key(r, 0), "state": "done", "refund_id": r.bag_id} for r in rows]
    lines += [orjson.dumps(record) for record in done]
    legacy = LegacyKeys(spill_at=3)
    try:
        renamed = [legacy.rename(orjson.loads(line))["key"] for line in lines]
    finally:
        legacy.close()
    assert renamed == [one_key(r, 0) for r in rows] * 2
    index = JournalIndex()
    try:
        read_journal(iter(line + b"\n" for line in lines), index)
        assert {k: index[k].refund_id for k in index} == {one_key(r, 0): r.bag_id for r in rows}
        assert index.renamed == 7
    finally:
        index.close()


# -- an old journal, resumed ------------------------------------------------------------


async def _killed_run(
    client: VioletClient, server: Bags, rows: list[BatchItem], journal: Path, posts: int
) -> None:
    """Run ``rows`` and kill the run once ``posts`` POSTs arrived (those on ``hang``
    bags applied and were never answered)."""
    server.hung_until = posts
    run = asyncio.ensure_future(_drain(client, rows, journal))
    hung = asyncio.ensure_future(server.all_hung.wait())
    await asyncio.wait({run, hung}, return_when=asyncio.FIRST_COMPLETED)
    hung.cancel()
    assert not run.done()  # killed with its POSTs in flight
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    server.release()


async def test_an_old_journal_with_items_in_flight_is_resumed_with_one_refund_each(
    tmp_path: Path,
) -> None:
    """A run of the previous release is killed: bag 21's POST applied and was never
    answered (sent), bag 22 ended done, bag 23's two identical rows (two refunds asked)
    ended done and in flight. The journal is in the old names. Today's code resumes it:
    the items in flight are read back (found applied, never sent again), the done ones
    skipped; one refund per row asked, and a third run sends nothing."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Bags(clock)
    journal = tmp_path / "run.jsonl"
    rows = [_refund(1, 22), _refund(2, 23), _refund(3, 21), _refund(4, 23)]
    async with _running(server) as client:
        # rows 1, 2 answered; 3 and 4 hang on bags 21 and 23 after they applied
        done = await _drain(client, rows[:2], journal)
        assert [r.outcome for r in done] == ["succeeded", "succeeded"]
        server.hang = {21, 23}
        await _killed_run(client, server, rows, journal, posts=4)
    assert (server.on(21), server.on(22), server.on(23)) == (1, 1, 2)
    assert _to_old_format(journal, rows) >= 4
    assert not any(one_key(r, 0) in _keys(journal) for r in rows)
    made = len(server.posts)

    clock.advance(600.0)
    # the same rows, moved: line numbers are not part of an item's name
    moved = [_refund(10, 21), _refund(11, 23), _refund(12, 22), _refund(13, 23)]
    async with _running(server) as client:
        results = await _drain(client, moved, journal)
        again = await _drain(client, moved, journal)
    by_line = {r.item.line: r for r in results}
    assert by_line[12].outcome == "already_done"
    assert by_line[11].outcome == "already_done"
    assert by_line[10].outcome == by_line[13].outcome == "succeeded"  # read back
    assert len(server.posts) == made  # nothing sent again
    assert (server.on(21), server.on(22), server.on(23)) == (1, 1, 2)
    assert {r.outcome for r in again} == {"already_done"}
    assert not any(r.earlier for r in results + again)
    index = Journal.peek(journal)
    try:
        assert index.renamed >= 3
        assert set(index) == {
            one_key(moved[0], 0),
            one_key(moved[1], 0),
            one_key(moved[1], 1),
            one_key(moved[2], 0),
        }
    finally:
        index.close()


def _ask(row: BatchItem, at: float, baseline: frozenset[int] = frozenset()) -> dict[str, Any]:
    """The protocol record a journal's "sent" line holds (a send at ``at``)."""
    return sent_once(
        row.kind, row.order_id, row.bag_id, row.request, at, baseline=baseline
    ).to_dict()


def _old_journal(journal: Path, lines: list[dict[str, Any]]) -> None:
    """A journal as the previous release wrote it (header v2, the lines given)."""
    head = {"type": "header", "v": 2, "input": "rows.csv", "ts": 1.0}
    journal.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in [head, *lines]))
    journal.chmod(0o600)


async def test_an_old_items_lost_post_is_sent_once_and_its_held_row_stays_held(
    tmp_path: Path,
) -> None:
    """An old journal: row 1 (bag 51) sent, its POST lost before Violet; row 2 (bag 52)
    held "present" (no protocol record: never sent) for refund 999 already on the bag;
    row 3 (bag 53) "unsent". Today: row 1 is read back (absent) and sent once; row 2
    stays held (its old name is kept: nothing in its lines says what it asked), nothing
    sent; row 3 is sent once."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Bags(clock)
    server.made[52] = [refund_body(id=999, order_id=ORDER, bag_id=52, amount=500, skus=[])]
    rows = [_refund(1, 51), _refund(2, 52), _refund(3, 53)]
    journal = tmp_path / "run.jsonl"
    t = clock.time() - 100.0
    _old_journal(
        journal,
        [
            {
                "key": _old_key(rows[0], 0),
                "line": 1,
                "state": "sent",
                "ts": t,
                "ask": _ask(rows[0], t),
            },
            {
                "key": _old_key(rows[1], 0),
                "line": 2,
                "state": "present",
                "ts": t,
                "refund_id": 999,
                "refunds": [999],
                "error": "RefundAlreadyPresentError",
                "message": "bag 52 already holds refund 999",
            },
            {
                "key": _old_key(rows[2], 0),
                "line": 3,
                "state": "unsent",
                "ts": t,
                "error": "AuthenticationError",
                "message": "refused",
            },
        ],
    )
    clock.advance(600.0)
    async with _running(server) as client:
        results = await _drain(client, rows, journal)
        again = await _drain(client, rows, journal)
    outcomes = {r.item.line: r.outcome for r in results}
    assert outcomes == {1: "succeeded", 2: "already_present", 3: "succeeded"}
    assert results[[r.item.line for r in results].index(2)].refund_id == 999
    assert sorted(server.posts) == [51, 53]
    assert (server.on(51), server.on(52), server.on(53)) == (1, 1, 1)
    assert {r.item.line: r.outcome for r in again} == {
        1: "already_done",
        2: "already_present",
        3: "already_done",
    }
    assert len(server.posts) == 2
    index = Journal.peek(journal)
    try:
        # row 3 went on under its old name; its send's line proved it, and renamed it
        assert index.renamed == 2
        assert index[_old_key(rows[1], 0)].state == "present"
        assert index[one_key(rows[0], 0)].state == "done"
        assert index[one_key(rows[2], 0)].state == "done"
        assert _old_key(rows[2], 0) not in index  # never under two names
    finally:
        index.close()


async def test_an_old_line_planted_under_a_rows_name_does_not_make_it_sent_twice(
    tmp_path: Path,
) -> None:
    """An old journal's line for row 1 (bag 61, which applied: the refund is on the
    bag) was edited: its record now asks 900, not 500. It keeps its old name (its
    record is not its name's content), and the row is known by that name as the
    previous release knew it: read back, never sent again."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Bags(clock)
    row = _refund(1, 61)
    t = clock.time() - 100.0
    server.made[61] = [
        refund_body(
            id=4242,
            order_id=ORDER,
            bag_id=61,
            amount=500,
            reason="damaged",
            skus=[],
            date_created=_stamp(t + 1),
            date_last_modified=_stamp(t + 1),
            status="COMPLETED",
        )
    ]
    edited = _ask(_refund(1, 61, amount=900), t)
    journal = tmp_path / "run.jsonl"
    _old_journal(
        journal, [{"key": _old_key(row, 0), "line": 1, "state": "sent", "ts": t, "ask": edited}]
    )
    clock.advance(600.0)
    async with _running(server) as client:
        results = await _drain(client, [row], journal)
    assert server.posts == []
    assert server.on(61) == 1
    assert [r.outcome for r in results] == ["unknown"]  # not proven: never guessed


async def test_the_audit_reads_an_old_journal_as_a_batch_does(tmp_path: Path) -> None:
    """``audit --journal`` with a journal of the previous release: its rows are matched
    to their old entries (renamed as a batch renames them), so the verdicts are the same
    as with today's journal: "ours" for the refund it recorded, the loud alarm for a
    row it says succeeded that Violet does not have."""
    from violet_async._batch_cli import read_items

    from .test_audit import EXPECTED, ROWS, run_rows, six_cases, write_rows

    rows = write_rows(tmp_path / "rows.csv", ROWS)
    items = {i.line: i for i in read_items(rows, "refund") if isinstance(i, BatchItem)}
    lines: list[dict[str, Any]] = []
    for line, state, refund_id in ((2, "done", 9001), (4, "done", 9999), (5, "failed", None)):
        item = items[line]
        lines.append(
            {
                "key": _old_key(item, 0),
                "line": line,
                "state": "sent",
                "ts": 1.5,
                "ask": _ask(item, 1.5),
            }
        )
        lines.append(
            {
                "key": _old_key(item, 0),
                "line": line,
                "state": state,
                "ts": 2.0,
                "refund_id": refund_id,
                "error": "BadRequestError" if refund_id is None else None,
            }
        )
    journal = tmp_path / "old.jsonl"
    _old_journal(journal, lines)
    server = six_cases()
    async with serve(server.app()) as url:
        got = await run_rows(f"{url}/v1", rows, journal=journal, concurrency=3)
    assert {line: (r.audit, list(r.refund_ids)) for line, r in got.items()} == EXPECTED
    assert got[2].ours is True
    assert got[4].loud
    assert "THE JOURNAL SAYS SUCCEEDED (refund 9999)" in got[4].detail
    assert "Violet refused it" in got[5].detail
    assert server.posts == 0


async def test_a_dry_run_counts_an_old_journals_rows_as_the_run_would(tmp_path: Path) -> None:
    """``--dry-run`` against an old journal: row 1 (done under its old name) is counted
    done, row 2 (held, never sent: its old name kept) present, row 3 new."""
    from .test_batch_cli_operator import cli

    rows = [_refund(2, 71), _refund(3, 72), _refund(4, 73)]
    csv = tmp_path / "rows.csv"
    csv.write_text(
        "order_id,bag_id,amount_refunded,reason\n"
        + "".join(f"{ORDER},{r.bag_id},500,damaged\n" for r in rows)
    )
    journal = tmp_path / "old.jsonl"
    _old_journal(
        journal,
        [
            {
                "key": _old_key(rows[0], 0),
                "line": 2,
                "state": "sent",
                "ts": 1.5,
                "ask": _ask(rows[0], 1.5),
            },
            {"key": _old_key(rows[0], 0), "line": 2, "state": "done", "ts": 2.0, "refund_id": 5},
            {"key": _old_key(rows[1], 0), "line": 3, "state": "present", "ts": 2.0, "refund_id": 6},
        ],
    )
    code, out, err = await cli(None, "refund", str(csv), "--dry-run", "--journal", str(journal))
    assert code == 0, err
    assert f"journal {journal}: 1 done, 1 new, 1 present" in out


async def test_an_old_journal_is_marked_v3_before_a_line_under_the_new_names(
    tmp_path: Path,
) -> None:
    """Today's code opens a v2 journal: a v3 header is appended before anything else
    (the input it names kept), so the previous release, which reads only v2 and takes a
    file's last header, refuses the file rather than miss items named the new way. A
    journal of any other version is refused, nothing read."""
    row = _refund(1, 81)
    journal = tmp_path / "old.jsonl"
    _old_journal(
        journal,
        [{"key": _old_key(row, 0), "line": 1, "state": "present", "ts": 2.0, "refund_id": 3}],
    )
    log = await Journal.open(journal, input_id="other.csv")
    try:
        assert log.input_changed
        await log.record(one_key(row, 1), 2, "unsent")
    finally:
        await log.aclose()
    records = [orjson.loads(line) for line in journal.read_bytes().splitlines()]
    assert [r.get("v") for r in records] == [2, None, 3, None]
    assert records[2]["input"] == "rows.csv"
    index = JournalIndex()
    try:
        header, _, _ = read_journal(iter(journal.read_bytes().splitlines(keepends=True)), index)
    finally:
        index.close()
    assert header is not None
    assert header["v"] == 3
    again = await Journal.open(journal, input_id="rows.csv")  # marked once, not again
    await again.aclose()
    assert journal.read_bytes().count(b'"type":"header"') == 2
    stranger = tmp_path / "v9.jsonl"
    stranger.write_bytes(orjson.dumps({"type": "header", "v": 9, "ts": 1.0}) + b"\n")
    stranger.chmod(0o600)
    with pytest.raises(JournalMismatchError, match="reads v2 and v3"):
        await Journal.open(stranger, input_id=None)


def test_an_old_name_is_proven_by_the_request_its_record_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old name is checked against the request as the old record holds it (what the
    release that wrote it hashed), not as today's model would spell it: a model that
    has gained a field since still renames the old item."""
    import violet_async._item_key as key_module

    row = _refund(1, 2002)
    old = _old_key(row, 0)
    ask = {
        "kind": "refund",
        "order_id": ORDER,
        "bag_id": 2002,
        "request": converter.unstructure(row.request),
    }

    class Grown:
        """Today's converter, had the model gained a field since."""

        @staticmethod
        def unstructure(value: Any) -> Any:
            return {**converter.unstructure(value), "added_since": None}

    monkeypatch.setattr(key_module, "converter", Grown())
    assert key_module.legacy_journal_key("refund", ORDER, 2002, row.request, 0) != old
    assert LegacyKeys().rename({"key": old, "state": "sent", "ask": ask})["key"] == one_key(row)


@pytest.mark.parametrize("spill_at", [1, 50_000])
def test_an_old_name_proven_late_supersedes_its_earlier_lines(spill_at: int) -> None:
    """An old item first journaled without a record (``unsent``), then sent (a line
    with its record) and done: the sent line proves the name, the item is renamed from
    there, and its earlier entry is dropped (its lines never live under two names),
    in memory or spilled to disk."""
    row, other = _refund(1, 2002), _refund(2, 2003)
    old = _old_key(row, 0)
    ask = {
        "kind": "refund",
        "order_id": ORDER,
        "bag_id": 2002,
        "request": converter.unstructure(row.request),
    }
    lines = [
        {"key": _old_key(other, 0), "state": "present", "refund_id": 1, "ts": 1.0},
        {"key": old, "state": "unsent", "error": "AuthenticationError", "ts": 1.0},
        {"key": old, "state": "sent", "ask": ask, "ts": 2.0},
        {"key": old, "state": "done", "refund_id": 77, "amount": 500, "ts": 3.0},
    ]
    legacy = LegacyKeys(spill_at=spill_at)
    try:
        named = [(legacy.rename(record)["key"], legacy.superseded) for record in lines]
    finally:
        legacy.close()
    assert named == [
        (_old_key(other, 0), None),
        (old, None),
        (one_key(row), old),
        (one_key(row), None),
    ]
    index = JournalIndex(spill_at=spill_at)
    try:
        read_journal(iter(orjson.dumps(x) + b"\n" for x in lines), index)
        assert set(index) == {_old_key(other, 0), one_key(row)}
        assert index[one_key(row)].refund_id == 77
        assert index.paid_like("refund", ORDER, 2002, ask["request"]) == [(one_key(row), False)]
    finally:
        index.close()


async def test_an_old_item_sent_after_an_unrecorded_line_counts_as_its_own_row(
    tmp_path: Path,
) -> None:
    """An old journal: row 1 of bag 91 was first refused before sending (``unsent``, no
    record), then sent and done. Row 2 asks the same money of the bag with another
    reason (a second refund asked). Row 1's refund is its own row's, met first in the
    input: row 2 is not held for it, it is sent once (not held already_present for a
    refund its own row accounts for)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Bags(clock)
    first, second = _refund(1, 91), _refund(2, 91, reason="second parcel")
    t = clock.time() - 100.0
    server.made[91] = [
        refund_body(
            id=5151,
            order_id=ORDER,
            bag_id=91,
            amount=500,
            reason="damaged",
            skus=[],
            status="COMPLETED",
            date_created=_stamp(t),
            date_last_modified=_stamp(t),
        )
    ]
    old = _old_key(first, 0)
    journal = tmp_path / "run.jsonl"
    _old_journal(
        journal,
        [
            {"key": old, "line": 1, "state": "unsent", "ts": t - 5, "error": "AuthenticationError"},
            {"key": old, "line": 1, "state": "sent", "ts": t, "ask": _ask(first, t)},
            {"key": old, "line": 1, "state": "done", "ts": t + 1, "refund_id": 5151, "amount": 500},
        ],
    )
    clock.advance(600.0)
    async with _running(server) as client:
        results = await _drain(client, [first, second], journal)
    assert {r.item.line: r.outcome for r in results} == {1: "already_done", 2: "succeeded"}
    assert server.posts == [91]
    assert server.on(91) == 2
