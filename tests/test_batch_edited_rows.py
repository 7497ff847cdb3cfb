"""Rows edited between runs of a batch (review 6, findings 8 and 9, and their
variations), against review 6's scripted Violet (not FakeViolet): refunds are counted
from that server's own record.

- A row edited after it was done, asking the same money of its bag (only its reason,
  restock_items or notify_customer differ), is not a second refund: already_present,
  naming the earlier refund and line, unless ``allow_repeat``.
- An earlier run's item left open on a bag no row of the input names (the row moved to
  another bag, or was removed) is read back after the input, never sent, and reported
  as a result of its own (``BatchResult.earlier``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async._batch_cli import _fatal, _Progress, _row_out, _Tally
from violet_async._journal import Journal
from violet_async._journal_index import JournalIndex, money_key, money_of, read_journal
from violet_async._redact import Redactor
from violet_async.batch import BatchItem, BatchResult, run_batch
from violet_async.models import CancelBagRequest, RefundBagRequest
from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan

from .test_batch_cli import env_for
from .test_batch_cli import run as run_cli
from .test_review6_findings import (
    BAG,
    BAG2,
    ORDER,
    Violet6,
    _killed_mid_post,
    _results,
    running,
)


def refund(line: int, amount: int = 300, bag: int = BAG, **fields: Any) -> BatchItem:
    return BatchItem.refund(line, ORDER, bag, RefundBagRequest(amount_refunded=amount, **fields))


async def entry_state(path: Path, item: BatchItem, n: int = 0) -> str | None:
    log = await Journal.open(path, input_id=None)
    try:
        entry = log.entry(f"{item.key}:{n}")
        return entry.state if entry is not None else None
    finally:
        await log.aclose()


async def batch(
    server: Violet6, items: list[BatchItem], journal: Path, **options: Any
) -> list[BatchResult]:
    async with running(server) as client:
        return [r async for r in run_batch(client, items, journal=journal, **options)]


def by_line(results: list[BatchResult]) -> list[str]:
    """Outcomes in line order (results come as items end, not in input order)."""
    return [r.outcome for r in sorted(results, key=lambda r: r.item.line)]


def hang_without_commit(server: Violet6) -> Any:
    """A POST that never commits and never answers (until the test ends)."""

    async def step(req: dict[str, Any]) -> web.StreamResponse:
        await server.release.wait()
        return web.Response(status=504)

    return step


# -- finding 9: a done row edited (reason, restock, notify) --------------------------


async def test_a_done_rows_reason_fixed_is_held_naming_the_earlier_refund(
    tmp_path: Path,
) -> None:
    server = Violet6(FakeClock())
    journal = tmp_path / "j.jsonl"
    first = refund(4, reason="Damaged itme")
    done = await batch(server, [first], journal)
    assert by_line(done) == ["succeeded"]
    edited = refund(4, reason="Damaged item", notify_customer=True, restock_items=True)
    again = await batch(server, [edited], journal)
    assert by_line(again) == ["already_present"]
    assert again[0].refund_id == done[0].refund_id == server.made[0]
    assert not again[0].sent
    message = str(again[0].error)
    assert "line 4" in message
    assert "--allow-repeat" in message
    assert str(server.made[0]) in message
    # The journal remembers: the same edited file once more sends nothing either.
    assert await entry_state(journal, edited) == "present"
    third = await batch(server, [edited], journal)
    assert by_line(third) == ["already_present"]
    assert len(server.made) == 1
    assert server.posts == 1


async def test_a_done_rows_reason_fixed_is_sent_with_allow_repeat(tmp_path: Path) -> None:
    """The explicit option still makes a second refund of the same money."""
    server = Violet6(FakeClock())
    journal = tmp_path / "j.jsonl"
    await batch(server, [refund(1, reason="a")], journal)
    again = await batch(server, [refund(1, reason="b")], journal, allow_repeat=True)
    assert by_line(again) == ["succeeded"]
    assert len(server.made) == 2


async def test_a_legit_second_row_after_its_done_neighbour_still_refunds(
    tmp_path: Path,
) -> None:
    """Two rows asking the same 300 of one bag with different reasons (two damaged
    items): a run killed after the first is done still sends the second on resume.
    The done row is in the input (above it): it accounts for itself."""
    server = Violet6(FakeClock())
    journal = tmp_path / "j.jsonl"
    one, two = refund(1, reason="mug broken"), refund(2, reason="plate broken")
    await batch(server, [one], journal)  # the run ended after row 1
    again = await batch(server, [one, two], journal)
    assert by_line(again) == ["already_done", "succeeded"]
    assert len(server.made) == 2


async def test_identical_repeat_rows_still_refund_each(tmp_path: Path) -> None:
    """Identical rows are distinct repeats (documented): the second is sent on resume."""
    server = Violet6(FakeClock())
    journal = tmp_path / "j.jsonl"
    await batch(server, [refund(1)], journal)
    again = await batch(server, [refund(1), refund(2)], journal)
    assert by_line(again) == ["already_done", "succeeded"]
    assert len(server.made) == 2


async def test_two_done_rows_both_edited_each_claim_their_own(tmp_path: Path) -> None:
    server = Violet6(FakeClock())
    journal = tmp_path / "j.jsonl"
    done = await batch(server, [refund(1, reason="x1"), refund(2, reason="y1")], journal)
    assert by_line(done) == ["succeeded", "succeeded"]
    again = await batch(server, [refund(1, reason="x2"), refund(2, reason="y2")], journal)
    assert by_line(again) == ["already_present", "already_present"]
    assert {r.refund_id for r in again} == set(server.made)
    assert len(server.made) == 2
    # A third row of the same money, with both done rows claimed, is a new refund.
    third = await batch(
        server,
        [refund(1, reason="x2"), refund(2, reason="y2"), refund(3, reason="z")],
        journal,
    )
    assert by_line(third) == ["already_present", "already_present", "succeeded"]
    assert len(server.made) == 3


async def test_an_edited_row_above_its_done_original_is_held(tmp_path: Path) -> None:
    """The input is read as a stream: an edited row met before its done original is
    held (the safe side: one refund, and the row names the earlier refund)."""
    server = Violet6(FakeClock())
    journal = tmp_path / "j.jsonl"
    original = refund(2, reason="a")
    await batch(server, [original], journal)
    again = await batch(server, [refund(1, reason="b"), original], journal)
    assert by_line(again) == ["already_present", "already_done"]
    assert len(server.made) == 1


async def test_another_amount_or_bag_is_not_held_by_a_done_row(tmp_path: Path) -> None:
    """Only the same money of the same bag is held: another amount, or another bag,
    asks for another refund (documented)."""
    server = Violet6(FakeClock())
    journal = tmp_path / "j.jsonl"
    await batch(server, [refund(1, reason="a")], journal)
    again = await batch(
        server, [refund(1, amount=350, reason="a"), refund(2, bag=BAG2, reason="a")], journal
    )
    assert by_line(again) == ["succeeded", "succeeded"]
    assert len(server.made) == 3


async def test_a_cancel_edited_after_it_was_done_is_held(tmp_path: Path) -> None:
    server = Violet6(FakeClock())
    server.scripts = [server.cancel_answer(200, lambda r: r)]
    journal = tmp_path / "j.jsonl"
    first = BatchItem.cancel(1, ORDER, BAG, CancelBagRequest(reason_code="CUSTOMER"))
    done = await batch(server, [first], journal)
    assert by_line(done) == ["succeeded"]
    edited = BatchItem.cancel(1, ORDER, BAG, CancelBagRequest(reason_code="OTHER"))
    again = await batch(server, [edited], journal)
    assert by_line(again) == ["already_present"]
    assert server.posts == 1


async def test_reason_edited_after_a_kill_while_the_list_lags(tmp_path: Path) -> None:
    """Run 1 is killed mid-POST (it applied; the list shows it 10 s later). The
    operator fixes the reason and runs again: one refund."""
    server = Violet6(FakeClock())
    server.list_lag = 10.0
    server.scripts = [server.commit_then(200, hang=True)]
    journal = tmp_path / "j.jsonl"
    first = refund(1, reason="Damaged itme")
    async with running(server) as client:
        await _killed_mid_post(client, first, journal, server)
    async with running(server) as client:
        results = await _results(client, [refund(1, reason="Damaged item")], journal)
    assert [r.outcome for r in results] == ["already_present"]
    assert results[0].refund_id == server.made[0]
    assert len(server.made) == 1
    assert await entry_state(journal, first) == "done"


# -- finding 8: an open row moved off its bag, or removed -----------------------------


@pytest.mark.parametrize("lag", [0.0, 10.0])
async def test_a_row_moved_to_another_bag_after_a_kill_reports_the_first(
    tmp_path: Path, lag: float
) -> None:
    """The list may show the first refund only 10 s after it committed: the read-back
    waits its settle window (parked), then finds it."""
    server = Violet6(FakeClock())
    server.list_lag = lag
    server.scripts = [server.commit_then(200, hang=True)]
    journal = tmp_path / "j.jsonl"
    first = refund(7)
    async with running(server) as client:
        await _killed_mid_post(client, first, journal, server)
    async with running(server) as client:
        results = await _results(client, [refund(7, bag=BAG2)], journal)
    mine = [r for r in results if not r.earlier]
    earlier = [r for r in results if r.earlier]
    assert [(r.item.bag_id, r.outcome) for r in mine] == [(BAG2, "succeeded")]
    assert [(r.item.bag_id, r.item.line, r.outcome) for r in earlier] == [(BAG, 7, "already_done")]
    assert earlier[0].refund_id == server.made[0]
    assert not earlier[0].sent
    assert len(server.made) == 2
    assert await entry_state(journal, first) == "done"
    # Settled: the next run reports it no more, and sends nothing.
    async with running(server) as client:
        again = await _results(client, [refund(7, bag=BAG2)], journal)
    assert [(r.outcome, r.earlier) for r in again] == [("already_done", False)]
    assert len(server.made) == 2


async def test_a_removed_row_that_never_applied_is_reported_and_never_sent(
    tmp_path: Path,
) -> None:
    """The killed POST never committed; the operator removed the row: the earlier
    item is proven not applied by read-back, reported not_sent, and not sent."""
    server = Violet6(FakeClock())
    server.scripts = [hang_without_commit(server)]
    journal = tmp_path / "j.jsonl"
    first = refund(3)
    async with running(server) as client:
        await _killed_mid_post(client, first, journal, server)
    posts = server.posts
    async with running(server) as client:
        results = await _results(client, [], journal)
    assert [(r.item.line, r.outcome, r.earlier) for r in results] == [(3, "not_sent", True)]
    assert server.posts == posts
    assert server.made == []
    assert await entry_state(journal, first) == "unsent"


class Unreadable(Violet6):
    """Run 2's reads of BAG fail (500): the earlier item cannot be resolved."""

    failing = False

    async def _list(self, request: web.Request) -> web.Response:
        if self.failing and int(request.match_info["b"]) == BAG:
            return web.Response(status=500, body=b"{}", content_type="application/json")
        return await super()._list(request)


async def test_an_unresolvable_earlier_row_is_reported_unknown(tmp_path: Path) -> None:
    server = Unreadable(FakeClock())
    server.scripts = [server.commit_then(200, hang=True)]
    journal = tmp_path / "j.jsonl"
    first = refund(5)
    async with running(server) as client:
        await _killed_mid_post(client, first, journal, server)
    server.failing = True
    async with running(server) as client:
        results = await _results(client, [refund(5, bag=BAG2)], journal)
    earlier = [r for r in results if r.earlier]
    assert [(r.item.bag_id, r.outcome) for r in earlier] == [(BAG, "unknown")]
    assert len(server.made) == 2
    assert await entry_state(journal, first) == "unknown"  # read back again next run
    server.failing = False
    async with running(server) as client:
        again = await _results(client, [refund(5, bag=BAG2)], journal)
    assert [(r.outcome, r.earlier) for r in again] == [
        ("already_done", False),
        ("already_done", True),
    ]
    assert len(server.made) == 2


async def test_an_open_row_on_a_bag_only_done_rows_name_is_reported(
    tmp_path: Path,
) -> None:
    """Row 1 (BAG) done, row 2 (BAG) killed mid-POST; row 2 is then moved to BAG2. Row
    1 is skipped from the journal and never looks at the bag: row 2's first refund is
    still read back and reported."""
    server = Violet6(FakeClock())
    journal = tmp_path / "j.jsonl"
    one = refund(1, amount=100)
    await batch(server, [one], journal)
    server.post_seen.clear()
    server.release.clear()
    server.scripts = [server.commit_then(200, hang=True)]
    two = refund(2, amount=200)
    async with running(server) as client:
        await _killed_mid_post(client, two, journal, server)
    async with running(server) as client:
        results = await _results(client, [one, refund(2, amount=200, bag=BAG2)], journal)
    assert sorted((r.item.bag_id, r.outcome, r.earlier) for r in results) == [
        (BAG, "already_done", False),
        (BAG, "already_done", True),
        (BAG2, "succeeded", False),
    ]
    assert len(server.made) == 3


async def test_a_stopped_run_leaves_earlier_rows_open_for_the_next(tmp_path: Path) -> None:
    server = Violet6(FakeClock())
    server.scripts = [server.commit_then(200, hang=True)]
    journal = tmp_path / "j.jsonl"
    first = refund(1)
    async with running(server) as client:
        await _killed_mid_post(client, first, journal, server)
    reads = server.reads
    stop = asyncio.Event()
    stop.set()
    async with running(server) as client:
        results = [
            r async for r in run_batch(client, [refund(1, bag=BAG2)], journal=journal, stop=stop)
        ]
    assert results == []
    assert server.reads == reads
    assert await entry_state(journal, first) == "sent"


# -- the index and the command line ---------------------------------------------------


def _line(key: str, state: str, **fields: Any) -> bytes:
    return orjson.dumps({"key": key, "state": state, "ts": 1.0, **fields}) + b"\n"


def test_the_done_index_spills_and_still_finds_every_row_of_the_same_money() -> None:
    request = {"amount_refunded": 300, "reason": "x"}
    ask = {"kind": "refund", "order_id": ORDER, "bag_id": BAG, "request": request}
    other = {**ask, "request": {"amount_refunded": 301}}
    lines = []
    for n in range(5):
        lines.append(_line(f"k{n}", "sent", ask=ask if n != 3 else other))
        lines.append(_line(f"k{n}", "done", refund_id=n))
    lines.append(_line("torn", "sent", ask={"kind": "refund", "bag_id": "nine"}))
    lines.append(_line("torn", "done"))
    index = JournalIndex(spill_at=2)
    try:
        read_journal(iter(lines), index)
        money = money_of("refund", ORDER, BAG, {"amount_refunded": 300, "reason": "y"})
        assert money is not None
        assert index.paid_alike(BAG, money) == [(f"k{n}", False) for n in (0, 1, 2, 4)]
        assert index.paid_alike(BAG2, money) == []
    finally:
        index.close()
    assert money_key("refund", ORDER, BAG, {"amount_refunded": 300}) == money[0]
    assert money_key("other", ORDER, BAG, {}) is None
    assert money_key("refund", ORDER, BAG, [1]) is None
    assert money_key("refund", ORDER, BAG, {"skus": {1, 2}}) is None


def _earlier(outcome: str, refund_id: int | None = None) -> BatchResult:
    return BatchResult(refund(9), outcome, refund_id=refund_id, earlier=True)  # type: ignore[arg-type]


def test_the_command_line_lists_earlier_rows_and_fails_while_one_is_open() -> None:
    redactor = Redactor()
    tally = _Tally()
    tally.problem_file = io.StringIO()
    tally.add(BatchResult(refund(1), "succeeded", refund_id=1), redactor)
    tally.add(_earlier("already_done", 60_001), redactor)
    tally.add(_earlier("not_sent"), redactor)
    assert tally.clean, "a resolved earlier row does not fail the run"
    assert sum(tally.results.values()) == 1, "earlier rows are not rows of this input"
    out = io.StringIO()
    tally.write(1.0, out, Path("p.txt"))
    text = out.getvalue()
    assert "2 row(s) of an earlier run" in text
    assert (
        f"line 9 of an earlier input: refund order {ORDER} bag {BAG}: applied: refund 60001" in text
    )
    assert "not applied (proven by read-back); not sent" in text
    tally.add(_earlier("unknown"), redactor)
    assert not tally.clean
    assert "run the same command again" in tally.problem_file.getvalue()
    assert not _fatal(_earlier("not_sent"), _Tally())
    assert _row_out(_earlier("already_done", 5), redactor)["earlier"] is True
    progress = _Progress(1, io.StringIO())
    progress.tick(_earlier("unknown"))
    assert progress.done == 0
    progress.tick(BatchResult(refund(1), "succeeded"))
    assert progress.done == 1


async def test_a_failed_row_retried_below_its_done_neighbour_is_its_own(
    tmp_path: Path,
) -> None:
    """Rows [B, A] on one bag, same money, other reasons: B is refused (400), A done.
    Run again with retry_failed: B was journaled as it is (not an edited row), so A's
    done refund does not hold it back: two refunds, as the file asks."""
    server = Violet6(FakeClock())
    refused = orjson.dumps({"status": 400, "message": "bad request", "error_code": 4000})
    server.scripts = [server.no_commit(400, refused)]
    journal = tmp_path / "j.jsonl"
    rows = [refund(1, reason="b"), refund(2, reason="a")]
    first = await batch(server, rows, journal)
    assert by_line(first) == ["failed", "succeeded"]
    again = await batch(server, rows, journal, retry_failed=True)
    assert by_line(again) == ["succeeded", "already_done"]
    assert len(server.made) == 2


async def test_an_edited_row_is_held_by_a_done_row_the_journal_spilled_to_disk(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Beyond the in-memory limit, finished entries live in the scratch database: the
    done row is still found there."""
    monkeypatch.setattr(JournalIndex.__init__, "__defaults__", (2,))
    server = Violet6(FakeClock())
    journal = tmp_path / "j.jsonl"
    rows = [refund(n, amount=100 + n, reason="r") for n in range(1, 6)]
    done = await batch(server, rows, journal)
    assert by_line(done) == ["succeeded"] * 5
    again = await batch(server, [refund(9, amount=102, reason="fixed")], journal)
    assert by_line(again) == ["already_present"]
    assert again[0].refund_id == done[1].refund_id
    assert len(server.made) == 5


async def test_two_open_rows_on_two_bags_both_removed_are_both_reported(
    tmp_path: Path,
) -> None:
    """Run 1 is killed with both its rows' POSTs in flight (both applied); the next
    input holds neither: each is read back and reported, nothing is sent."""
    server = Violet6(FakeClock())
    both = asyncio.Event()

    async def commit_and_hang(req: dict[str, Any]) -> web.StreamResponse:
        server.commit(req.get("amount_refunded"), req.get("reason"), bag=req["_bag"])
        if len(server.made) == 2:
            both.set()
        await server.release.wait()
        return web.Response(status=200)

    server.scripts = [commit_and_hang, commit_and_hang]
    journal = tmp_path / "j.jsonl"
    rows = [refund(1), refund(2, bag=BAG2)]
    async with running(server) as client:

        async def consume() -> None:
            async for _ in run_batch(client, rows, journal=journal):
                pass

        run = asyncio.ensure_future(consume())
        await both.wait()
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
    async with running(server) as client:
        results = await _results(client, [], journal)
    assert sorted((r.item.bag_id, r.outcome, r.earlier) for r in results) == [
        (BAG, "already_done", True),
        (BAG2, "already_done", True),
    ]
    assert {r.refund_id for r in results} == set(server.made)
    assert server.posts == 2


async def test_the_command_line_reports_a_row_moved_off_its_bag_after_a_kill(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """End to end: run 1 (Python, same journal) is killed with its POST held open (it
    committed). The file's row is then moved to another order's bag and the command
    runs: the moved row succeeds, the first bag's refund is read back and listed, the
    exit code is 0 (resolved), every row of the file has its result, nothing is sent
    twice."""
    plan = FaultPlan(late_commit_delay=0.0, hang_seconds=600.0)
    async with FakeViolet(orders=2, seed=6, faults=plan) as fake:
        for key, value in env_for(fake).items():
            monkeypatch.setenv(key, value)
        (o1, b1), (o2, b2) = fake.seeded[:2]
        path = tmp_path / "in.csv"
        journal = Path(f"{path}.refund.journal.jsonl")
        fake.script("refund", Fault.TIMEOUT_THEN_COMMIT, bag_id=b1)
        async with fake.client() as client:
            item = BatchItem.refund(1, o1, b1, RefundBagRequest(amount_refunded=100))

            async def consume() -> None:
                async for _ in run_batch(client, [item], journal=journal):
                    pass

            run = asyncio.ensure_future(consume())
            await fake.wait_held(1)
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
        path.write_text(f"order_id,bag_id,amount_refunded\n{o2},{b2},100\n")
        code, out, err = await run_cli("refund", path, output=tmp_path / "out.jsonl")
        assert code == 0, out + err
        assert "succeeded               1" in out
        assert "1 row(s) of an earlier run" in out
        assert f"line 1 of an earlier input: refund order {o1} bag {b1}: applied" in out
        assert "ended without a result" not in err
        lines = [orjson.loads(x) for x in (tmp_path / "out.jsonl").read_bytes().splitlines()]
        assert sorted((x["bag_id"], x["outcome"], x["earlier"]) for x in lines) == sorted(
            [(b2, "succeeded", False), (b1, "already_done", True)]
        )
        assert fake.ledger.refunds_per_bag[b1] == 1
        assert len(fake.ledger.posts_per_bag[b1]) == 1
        assert fake.ledger.refunds_per_bag[b2] == 1
