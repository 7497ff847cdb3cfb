"""A batch row edited between runs from a whole-bag refund to the amount it refunded
written out (or back), to or from a cancel, or from lines to an amount: the same money
of the bag, never a second refund (remaining risk (f), closed).

The server is scripted here (review 6's one-bag Violet, not FakeViolet) with the fault
that made this a double refund: its bag status LAGS (it reads COMPLETED after the bag
was refunded, as a platform can for minutes) and it applies a second whole-bag refund
happily, refunding the bag's total again. Refunds are counted from its own record.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async._batch_cli import EXIT_FAILED, BatchOptions, run_file
from violet_async._journal_index import (
    JournalIndex,
    fills_bag,
    money_of,
    read_journal,
    same_money,
)
from violet_async.batch import BatchItem, run_batch
from violet_async.models import CancelBagRequest, RefundBagRequest, ShippingRefund, SkuRefund
from violet_async.testing import FakeClock

from .test_review6_findings import (
    APP,
    BAG,
    BAG2,
    ORDER,
    SECRET,
    Violet6,
    _killed_mid_post,
    _results,
    running,
)

TOTAL = 1000


class Lagging(Violet6):
    """Its bag status never moves (COMPLETED after every refund, as a platform lagging
    by minutes shows it), and a whole-bag refund or a cancel refunds the bag's total
    whatever was refunded before: the server that takes a second refund."""

    def commit(self, amount: int | None, reason: str | None = None, **kw: Any) -> dict[str, Any]:
        return super().commit(self.total if amount is None else amount, reason, **kw)

    async def _order(self, request: web.Request) -> web.Response:
        bags = [{"id": b, "status": "COMPLETED", "total": self.total} for b in (BAG, BAG2)]
        return web.json_response({"id": ORDER, "bags": bags})

    def refunded(self, bag: int = BAG) -> int:
        return sum(r["amount"] for r in self.refunds if r["bag_id"] == bag)


def whole(line: int = 1, **fields: Any) -> BatchItem:
    return BatchItem.refund(line, ORDER, BAG, RefundBagRequest(**fields))


def amount(value: int, line: int = 1, **fields: Any) -> BatchItem:
    return BatchItem.refund(line, ORDER, BAG, RefundBagRequest(amount_refunded=value, **fields))


def cancel(line: int = 1, code: str = "CUSTOMER") -> BatchItem:
    return BatchItem.cancel(line, ORDER, BAG, CancelBagRequest(reason_code=code))


async def batch(
    server: Violet6, items: list[BatchItem], journal: Path, **options: Any
) -> list[str]:
    async with running(server) as client:
        results = [r async for r in run_batch(client, items, journal=journal, **options)]
    return [r.outcome for r in sorted(results, key=lambda r: r.item.line)]


def entries(journal: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in journal.read_bytes().splitlines()]


# -- whole bag <-> the amount written out, after the first run was done -------------


async def test_whole_bag_edited_to_the_amount_it_refunded_is_not_sent(tmp_path: Path) -> None:
    server = Lagging(FakeClock(), total=TOTAL)
    journal = tmp_path / "j.jsonl"
    assert await batch(server, [whole(reason="broken")], journal) == ["succeeded"]
    done = [e for e in entries(journal) if e.get("state") == "done"]
    assert done[0]["amount"] == TOTAL, "the done record carries the refund's amount"
    async with running(server) as client:
        again = await _results(client, [amount(TOTAL, reason="broken")], journal)
    assert [r.outcome for r in again] == ["already_present"]
    assert again[0].refund_id == server.made[0]
    assert not again[0].sent
    assert "--allow-repeat" in str(again[0].error)
    assert len(server.made) == 1
    assert server.posts == 1
    assert server.refunded() == TOTAL
    # Journaled present: the same edited file once more sends nothing either.
    assert await batch(server, [amount(TOTAL, reason="broken")], journal) == ["already_present"]
    assert server.posts == 1


async def test_the_amount_edited_to_a_whole_bag_refund_is_not_sent(tmp_path: Path) -> None:
    server = Lagging(FakeClock(), total=TOTAL)
    journal = tmp_path / "j.jsonl"
    assert await batch(server, [amount(TOTAL)], journal) == ["succeeded"]
    assert await batch(server, [whole()], journal) == ["already_present"]
    assert len(server.made) == 1
    assert server.posts == 1


async def test_a_partial_amount_edited_to_the_whole_bag_is_held_too(tmp_path: Path) -> None:
    """The whole bag's amount is not known from the journal: a whole-bag row after a
    done row of 300 may be it, edited. Held (check the bag; --allow-repeat sends)."""
    server = Lagging(FakeClock(), total=TOTAL)
    journal = tmp_path / "j.jsonl"
    assert await batch(server, [amount(300)], journal) == ["succeeded"]
    assert await batch(server, [whole()], journal) == ["already_present"]
    assert server.posts == 1
    assert await batch(server, [whole()], tmp_path / "j.jsonl", allow_repeat=True) == ["succeeded"]
    assert len(server.made) == 2


async def test_a_whole_bag_refund_split_into_two_amounts_is_not_sent(tmp_path: Path) -> None:
    """After a done whole-bag refund nothing of the bag is left to refund: the row
    edited into two rows of 600 and 400 (or another amount) is held, both of them,
    though one done row accounts for one row elsewhere."""
    server = Lagging(FakeClock(), total=TOTAL)
    journal = tmp_path / "j.jsonl"
    assert await batch(server, [whole(1)], journal) == ["succeeded"]
    split = [amount(600, 1), amount(400, 2)]
    assert await batch(server, split, journal) == ["already_present", "already_present"]
    assert await batch(server, [amount(300, 3)], journal) == ["already_present"]
    assert server.posts == 1
    assert len(server.made) == 1


async def test_another_amount_after_a_done_amount_is_other_money(tmp_path: Path) -> None:
    """A done row stating 300; a row stating 350 asks other money (as before: an amount
    changed is a new refund). The boundary, pinned."""
    server = Lagging(FakeClock(), total=TOTAL)
    journal = tmp_path / "j.jsonl"
    assert await batch(server, [amount(300)], journal) == ["succeeded"]
    assert await batch(server, [amount(350)], journal) == ["succeeded"]
    assert len(server.made) == 2


async def test_lines_refunded_then_another_amount_is_other_money(tmp_path: Path) -> None:
    """A done refund of one line (no amount; it moved 1000 here) and a row stating
    300: other money (the bag may hold more lines)."""
    server = Lagging(FakeClock(), total=TOTAL)
    journal = tmp_path / "j.jsonl"
    sku = SkuRefund(order_sku_id=77, quantity_refunded=1)
    assert await batch(server, [whole(skus=[sku])], journal) == ["succeeded"]
    assert await batch(server, [amount(300)], journal) == ["succeeded"]
    assert len(server.made) == 2


async def test_a_whole_bag_done_record_without_its_amount_holds_any_amount(
    tmp_path: Path,
) -> None:
    """A journal written before done records carried the amount: what the whole-bag
    refund moved is unknown, so any amount edited in is held (never sent blind)."""
    server = Lagging(FakeClock(), total=TOTAL)
    journal = tmp_path / "j.jsonl"
    assert await batch(server, [whole()], journal) == ["succeeded"]
    lines = []
    for raw in journal.read_bytes().splitlines():
        record = orjson.loads(raw)
        record.pop("amount", None)
        lines.append(orjson.dumps(record))
    journal.write_bytes(b"\n".join(lines) + b"\n")
    assert await batch(server, [amount(300)], journal) == ["already_present"]
    assert server.posts == 1


async def test_lines_edited_to_the_amount_they_refunded_is_not_sent(tmp_path: Path) -> None:
    server = Lagging(FakeClock(), total=TOTAL)
    journal = tmp_path / "j.jsonl"
    sku = SkuRefund(order_sku_id=77, quantity_refunded=1)
    assert await batch(server, [whole(skus=[sku])], journal) == ["succeeded"]
    assert await batch(server, [amount(TOTAL)], journal) == ["already_present"]
    assert server.posts == 1


async def test_other_lines_are_other_money(tmp_path: Path) -> None:
    server = Lagging(FakeClock(), total=TOTAL)
    journal = tmp_path / "j.jsonl"
    one = SkuRefund(order_sku_id=77, quantity_refunded=1)
    two = SkuRefund(order_sku_id=78, quantity_refunded=1)
    assert await batch(server, [amount(300, skus=[one])], journal) == ["succeeded"]
    assert await batch(server, [amount(300, skus=[two])], journal) == ["succeeded"]
    assert len(server.made) == 2


async def test_edited_rows_in_another_order_with_a_new_reason_each_claim_one(
    tmp_path: Path,
) -> None:
    """Two bags, each refunded whole; run 2 holds both rows edited (amount written out,
    new reasons) in the other order: each is held for its own bag's refund."""
    server = Lagging(FakeClock(), total=TOTAL)
    journal = tmp_path / "j.jsonl"
    rows = [whole(1, reason="a"), BatchItem.refund(2, ORDER, BAG2, RefundBagRequest(reason="b"))]
    assert await batch(server, rows, journal) == ["succeeded", "succeeded"]
    edited = [
        BatchItem.refund(1, ORDER, BAG2, RefundBagRequest(amount_refunded=TOTAL, reason="B")),
        amount(TOTAL, 2, reason="A"),
    ]
    assert await batch(server, edited, journal) == ["already_present", "already_present"]
    assert len(server.made) == 2


# -- cancels -------------------------------------------------------------------------


async def test_a_whole_bag_refund_edited_to_a_cancel_is_not_sent(tmp_path: Path) -> None:
    server = Lagging(FakeClock(), total=TOTAL)
    journal = tmp_path / "j.jsonl"
    assert await batch(server, [whole()], journal) == ["succeeded"]
    assert await batch(server, [cancel()], journal) == ["already_present"]
    assert server.posts == 1
    assert len(server.made) == 1


@pytest.mark.parametrize("row", ["whole", "amount"])
async def test_a_cancel_edited_to_a_refund_is_not_sent(tmp_path: Path, row: str) -> None:
    server = Lagging(FakeClock(), total=TOTAL)
    server.scripts = [server.cancel_answer(200, lambda r: r)]
    journal = tmp_path / "j.jsonl"
    assert await batch(server, [cancel()], journal) == ["succeeded"]
    edited = whole() if row == "whole" else amount(TOTAL)
    assert await batch(server, [edited], journal) == ["already_present"]
    assert server.posts == 1
    assert len(server.made) == 1


# -- a pending whole-bag row (killed after its send) edited to an amount -----------------


@pytest.mark.parametrize("lag", [0.0, 10.0])
async def test_a_pending_whole_bag_row_edited_to_an_amount_is_read_back_not_sent(
    tmp_path: Path, lag: float
) -> None:
    """Run 1 is killed with its whole-bag POST in flight (it applied; the list shows it
    ``lag`` seconds after it committed). The row is edited to the amount written out:
    the open entry is read back first, never re-sent, and the edited row is held."""
    server = Lagging(FakeClock(), total=TOTAL)
    server.list_lag = lag
    server.scripts = [server.commit_then(200, hang=True)]
    journal = tmp_path / "j.jsonl"
    first = whole(reason="x")
    async with running(server) as client:
        await _killed_mid_post(client, first, journal, server)
    async with running(server) as client:
        results = await _results(client, [amount(TOTAL, reason="x")], journal)
    assert [r.outcome for r in results] == ["already_present"]
    assert results[0].refund_id == server.made[0]
    assert len(server.made) == 1
    assert server.posts == 1
    states = {e["key"]: e["state"] for e in entries(journal) if "key" in e}
    assert states[f"{first.key}:0"] == "done"


async def test_a_pending_whole_bag_row_that_never_applied_lets_the_edit_go(
    tmp_path: Path,
) -> None:
    """The killed POST never committed: the read-back proves it absent (after its
    settle window), the earlier row is not re-sent, and the edited row is sent: one
    refund."""
    server = Lagging(FakeClock(), total=TOTAL)

    async def hang(req: dict[str, Any]) -> web.StreamResponse:
        await server.release.wait()
        return web.Response(status=504)

    server.scripts = [hang]
    journal = tmp_path / "j.jsonl"
    async with running(server) as client:
        await _killed_mid_post(client, whole(), journal, server)
    async with running(server) as client:
        results = await _results(client, [amount(TOTAL)], journal)
    assert [r.outcome for r in results] == ["succeeded"]
    assert len(server.made) == 1
    assert server.posts == 2


# -- the index on its own, spilled to disk -------------------------------------------


def test_same_money_rules() -> None:
    def money(kind: str, request: dict[str, Any], paid: int | None = None) -> tuple[Any, ...]:
        found = money_of(kind, ORDER, BAG, request, paid)
        assert found is not None
        return found

    whole_done = money("refund", {}, paid=TOTAL)
    assert same_money(whole_done, money("refund", {"amount_refunded": TOTAL}))
    assert same_money(whole_done, money("refund", {"amount_refunded": 300}))
    assert fills_bag(whole_done)
    assert fills_bag(money("cancel", {}))
    assert not fills_bag(money("refund", {"amount_refunded": TOTAL}))
    assert same_money(money("refund", {}), money("refund", {"amount_refunded": 300}))
    assert same_money(money("refund", {"amount_refunded": 300}, 300), money("refund", {}))
    assert not same_money(
        money("refund", {"amount_refunded": 300}, 300), money("refund", {"amount_refunded": 301})
    )
    assert same_money(money("cancel", {}), money("refund", {"amount_refunded": 5}))
    assert same_money(money("refund", {"amount_refunded": 5}, 5), money("cancel", {}))
    sku = {"order_sku_id": 1, "quantity_refunded": 1}
    other = {"order_sku_id": 2, "quantity_refunded": 1}
    assert not same_money(money("refund", {"skus": [sku]}), money("refund", {"skus": [other]}))
    assert same_money(
        money("refund", {"skus": [sku]}, 40), money("refund", {"amount_refunded": 40})
    )
    assert not same_money(
        money("refund", {"skus": [sku]}, 40), money("refund", {"amount_refunded": 41})
    )
    # Another order's bag (a journal line naming another order) is never the same.
    elsewhere = money_of("refund", ORDER + 1, BAG, {"amount_refunded": TOTAL})
    assert elsewhere is not None
    assert not same_money(whole_done, elsewhere)
    assert money_of("refund", ORDER, BAG, {"amount_refunded": "x"}) is not None


def test_the_index_finds_a_lines_refund_by_its_amount_in_memory_and_on_disk() -> None:
    def line(key: str, state: str, **fields: Any) -> bytes:
        return orjson.dumps({"key": key, "state": state, "ts": 1.0, **fields}) + b"\n"

    sku = {"order_sku_id": 1, "quantity_refunded": 1}
    ask = {"kind": "refund", "order_id": ORDER, "bag_id": BAG, "request": {"skus": [sku]}}
    lines = []
    for n in range(4):
        lines.append(line(f"k{n}", "sent", ask=ask))
        lines.append(line(f"k{n}", "done", refund_id=n, amount=TOTAL if n != 2 else 10))
    whole = {**ask, "request": {}}
    lines.append(line("w", "sent", ask=whole))
    lines.append(line("w", "done", refund_id=9, amount=TOTAL))
    for spill in (100, 2):
        index = JournalIndex(spill_at=spill)
        try:
            read_journal(iter(lines), index)
            asked = money_of("refund", ORDER, BAG, {"amount_refunded": TOTAL})
            assert asked is not None
            assert sorted(index.paid_alike(BAG, asked)) == [
                ("k0", False),
                ("k1", False),
                ("k3", False),
                ("w", True),
            ]
            assert index.paid_like("refund", ORDER, BAG2, {"amount_refunded": TOTAL}) == []
            assert index.paid_like("refund", ORDER, BAG, ["not a request"]) == []
        finally:
            index.close()


# -- the command line, with a real journal file ---------------------------------------


@contextlib.asynccontextmanager
async def serving(server: Violet6, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    for key, value in {
        "VIOLET_APP_ID": str(APP),
        "VIOLET_APP_SECRET": SECRET,
        "VIOLET_USERNAME": "r6-user",
        "VIOLET_PASSWORD": "r6-password-xyz",
        "VIOLET_BASE_URL": f"http://127.0.0.1:{port}/v1",
    }.items():
        monkeypatch.setenv(key, value)
    try:
        yield
    finally:
        server.release.set()
        await runner.cleanup()


async def cli(path: Path, **options: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run_file("refund", path, BatchOptions(**options), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def test_the_command_line_holds_a_full_row_edited_to_its_amount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As an operator runs it: a file refunding the whole bag ("full"), run; the row is
    edited to the amount written out, with the reason fixed; a dry run says the row
    would be held (nothing sent), the run holds it: one refund on the server."""
    server = Lagging(FakeClock(), total=TOTAL)
    path = tmp_path / "in.csv"
    path.write_text(f"order_id,bag_id,amount_refunded,reason\n{ORDER},{BAG},full,Damaged itme\n")
    async with serving(server, monkeypatch):
        code, out, err = await cli(path)
        assert code == 0, out + err
        assert "succeeded               1" in out
        path.write_text(
            f"order_id,bag_id,amount_refunded,reason\n{ORDER},{BAG},{TOTAL},Damaged item\n"
        )
        posts, reads = server.posts, server.reads
        code, out, err = await cli(path, dry_run=True)
        assert code == 0, out + err
        assert "1 held (already_present)" in out
        assert "new" not in out.split("journal ")[-1]
        note = f"line 2: refund order {ORDER} bag {BAG}: bag {BAG} already holds refund"
        assert f"{note} {server.made[0]}" in out
        assert (server.posts, server.reads) == (posts, reads), "a dry run sends nothing"
        code, out, err = await cli(path, output=tmp_path / "out.jsonl")
        assert code == EXIT_FAILED, out + err  # a held row needs attention
        assert "already_present         1" in out
        assert "sent                    0" in out
    rows = [orjson.loads(x) for x in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert [r["outcome"] for r in rows] == ["already_present"]
    assert rows[0]["refund_id"] == server.made[0]
    assert len(server.made) == 1
    assert server.posts == 1


# -- --dry-run: what the run would do with each row, from the journal alone --------------


def csv_of(path: Path, *rows: str) -> Path:
    path.write_text("order_id,bag_id,amount_refunded,reason\n" + "".join(f"{r}\n" for r in rows))
    return path


async def test_a_dry_run_names_a_row_that_waits_for_an_open_entry_on_its_bag(
    tmp_path: Path,
) -> None:
    """Run 1 (the file's own journal) is killed with its whole-bag POST in flight; the
    row is edited to an amount. The dry run counts it as waiting for the read-back
    (not new), names the earlier row, and sends nothing; the run then holds it."""
    server = Lagging(FakeClock(), total=TOTAL)
    server.scripts = [server.commit_then(200, hang=True)]
    path = tmp_path / "in.csv"
    journal = Path(f"{path}.refund.journal.jsonl")
    async with running(server) as client:
        await _killed_mid_post(client, whole(3), journal, server)
    csv_of(path, f"{ORDER},{BAG},{TOTAL},x", f"{ORDER},{BAG2},250,y")
    posts, reads = server.posts, server.reads
    code, out, err = await cli(path, dry_run=True)
    assert code == 0, out + err
    assert ": 1 new, 1 waits for a read-back (done rows are skipped)" in out
    assert f"line 2: refund order {ORDER} bag {BAG}: waits: an earlier run's row" in out
    assert "(line 3, sent)" in out
    assert (server.posts, server.reads) == (posts, reads)
    async with running(server) as client:
        results = await _results(client, [amount(TOTAL, 2, reason="x")], journal)
    assert [r.outcome for r in results] == ["already_present"]
    assert len(server.made) == 1


async def test_a_dry_run_counts_held_rows_as_the_run_would(tmp_path: Path) -> None:
    """Two rows of 1000 done on one bag (two refunds asked for); the file then holds
    three rows stating that amount: two are held (one for each done row), the third is
    new. With --allow-repeat all three are new. A row held before (present) keeps its
    refund: the next dry run counts it present, and the others as before."""
    server = Lagging(FakeClock(), total=TOTAL)
    path = tmp_path / "in.csv"
    journal = Path(f"{path}.refund.journal.jsonl")
    done = [amount(TOTAL, 2), amount(TOTAL, 3)]
    assert await batch(server, done, journal) == ["succeeded", "succeeded"]
    csv_of(path, *[f"{ORDER},{BAG},{TOTAL},r{n}" for n in range(3)])
    code, out, _ = await cli(path, dry_run=True)
    assert code == 0
    assert ": 2 held (already_present), 1 new (done rows are skipped)" in out
    assert out.count("already holds refund") == 2
    for refund_id in server.made:
        assert f"already holds refund {refund_id}," in out
    code, out, _ = await cli(path, dry_run=True, allow_repeat=True)
    assert ": 3 new (done rows are skipped)" in out
    assert "already holds" not in out
    # The first edited row is held by a run (journaled present); the file keeps it.
    assert await batch(server, [amount(TOTAL, 2, reason="r0")], journal) == ["already_present"]
    code, out, _ = await cli(path, dry_run=True)
    assert ": 1 held (already_present), 1 new, 1 present (done rows are skipped)" in out
    assert server.posts == 2


def test_a_dry_run_says_a_row_on_a_bag_with_an_unreadable_record_is_not_sent(
    tmp_path: Path,
) -> None:
    path = csv_of(tmp_path / "in.csv", f"{ORDER},{BAG},300,x")
    journal = Path(f"{path}.refund.journal.jsonl")
    ask = {"kind": "refund", "bag_id": BAG, "sends": "many"}
    journal.write_bytes(
        orjson.dumps({"key": "refund:zz#0", "line": 7, "state": "sent", "ask": ask}) + b"\n"
    )
    out, err = io.StringIO(), io.StringIO()
    code = asyncio.run(run_file("refund", path, BatchOptions(dry_run=True), out=out, err=err))
    assert code == 0, err.getvalue()
    text = out.getvalue()
    assert ": 1 not_sent (done rows are skipped)" in text
    assert "(line 7, sent) may have applied and its journal record cannot be read" in text


SHIP = {"shipping": ShippingRefund(amount=150)}
EDITS: dict[str, tuple[list[BatchItem], list[list[BatchItem]]]] = {
    "whole, then shipping added": ([whole()], [[whole(**SHIP)], [amount(TOTAL, **SHIP)]]),
    "amount, then shipping added": ([amount(300)], [[amount(300, **SHIP)]]),
    "cancel, then two refunds": ([cancel()], [[whole(1), amount(5, 2)]]),
    "whole, then a cancel and a refund": ([whole()], [[cancel(1), amount(TOTAL, 2)]]),
    "whole, edited in three runs": (
        [whole(reason="a")],
        [[amount(TOTAL, reason="b")], [whole(reason="c")], [amount(TOTAL, 4, reason="d")]],
    ),
    "whole, repeated twice edited": ([whole()], [[amount(TOTAL, 1), amount(TOTAL, 2)]]),
    "lines, then no lines and no amount": (
        [whole(skus=[SkuRefund(order_sku_id=77, quantity_refunded=1)])],
        [[whole()]],
    ),
}


@pytest.mark.parametrize("case", sorted(EDITS))
async def test_edits_between_runs_never_refund_a_bag_twice(tmp_path: Path, case: str) -> None:
    """Attacks on the rule: a row done whole (or as a cancel, or an amount), then edited
    between runs in ways that ask no new money of the bag: one POST in all."""
    first, runs = EDITS[case]
    server = Lagging(FakeClock(), total=TOTAL)
    if first[0].kind == "cancel":
        server.scripts = [server.cancel_answer(200, lambda r: r)]
    journal = tmp_path / "j.jsonl"
    assert await batch(server, first, journal) == ["succeeded"]
    for rows in runs:
        assert set(await batch(server, rows, journal)) == {"already_present"}
    assert server.posts == 1
    assert len(server.made) == 1
