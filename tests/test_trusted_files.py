"""Files a run trusts (journal, its lock, the problems file, ``--output``) that another
local user planted: symlinks to a victim's file, files of another owner, files others
may write, records of another row; and a journal read as a stream.

Files of another owner are made with ``os.chown(path, 65534, 65534)``, which needs
root: without it, only that part of a test is skipped (and says so)."""

from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path

import orjson
import pytest

from tests.test_batch_cli import env_for, run
from violet_async import RefundBagRequest, RetryPolicy
from violet_async._ask import sent_once
from violet_async._files import UnsafeFileError, open_owned
from violet_async._journal import Journal, lock_path
from violet_async._journal_index import JournalIndex, read_journal
from violet_async.batch import BatchItem, run_batch
from violet_async.testing import FakeViolet

NOBODY = 65534
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
WHY_NOT_ROOT = "chown to another uid needs root; the mode and symlink parts ran"


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("the victim's data\n")
    victim.chmod(0o644)
    return victim


def _unchanged(victim: Path) -> bool:
    return victim.read_text() == "the victim's data\n" and stat.S_IMODE(victim.stat().st_mode) == (
        0o644
    )


def test_open_owned_refuses_what_another_user_could_plant(tmp_path: Path) -> None:
    """A symlink, a FIFO, a directory, a file others may write, and (as root) a file of
    another owner are refused before anything is read or written; a private file of
    ours opens."""
    victim = _victim(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        open_owned(link, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    assert _unchanged(victim)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        open_owned(fifo, os.O_RDONLY)  # never blocks waiting for a writer
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        open_owned(fifo, os.O_WRONLY)  # no reader: refused, never blocks
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        open_owned(tmp_path, os.O_RDONLY)
    shared = tmp_path / "shared"
    shared.write_text("x")
    shared.chmod(0o666)
    with pytest.raises(UnsafeFileError, match="others may write it"):
        open_owned(shared, os.O_RDONLY)
    mine = tmp_path / "mine"
    os.close(open_owned(mine, os.O_WRONLY | os.O_CREAT, 0o600))
    assert stat.S_IMODE(mine.stat().st_mode) == 0o600
    if not ROOT:
        pytest.skip(WHY_NOT_ROOT)
    theirs = tmp_path / "theirs"
    theirs.write_text("x")
    theirs.chmod(0o644)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafeFileError, match="another user"):
        open_owned(theirs, os.O_RDONLY)


@pytest.mark.parametrize("which", ["journal", "lock", "problems", "output"])
async def test_planted_symlinks_are_refused_and_victims_untouched(
    which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 2, row 4: a journal, lock, problems file or ``--output`` that is a symlink
    to a victim's file ends the run with exit 2 before any send; the victim keeps its
    bytes and its mode."""
    async with FakeViolet(orders=2, seed=1) as fake:
        for key, value in env_for(fake).items():
            monkeypatch.setenv(key, value)
        source = tmp_path / "in.csv"
        order_id, bag_id = fake.seeded[0]
        # More than the bag holds: a row that fails, so a problems file is written.
        source.write_text(f"order_id,bag_id,amount_refunded\n{order_id},{bag_id},99999999\n")
        journal = tmp_path / "j.jsonl"
        victim = _victim(tmp_path)
        planted = {
            "journal": journal,
            "lock": lock_path(journal),
            "problems": journal.with_name(journal.name + ".problems.txt"),
            "output": tmp_path / "out.jsonl",
        }[which]
        planted.symlink_to(victim)
        code, _, err = await run("refund", source, journal=journal, output=tmp_path / "out.jsonl")
        assert code == 2, err
        assert "symbolic link" in err
        if which in ("journal", "lock"):
            assert fake.ledger.total_refunds == 0
            assert not fake.ledger.commits_per_bag
    assert _unchanged(victim)


async def test_a_journal_of_another_user_or_writable_by_others_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 2, row 3: a journal others may write (0666), or (as root) one another user
    owns, holding a forged "sent" line, is refused with exit 2; nothing is sent, in a
    dry run or a run."""
    async with FakeViolet(orders=2, seed=1) as fake:
        for key, value in env_for(fake).items():
            monkeypatch.setenv(key, value)
        order_id, bag_id = fake.seeded[0]
        source = tmp_path / "in.csv"
        source.write_text(f"order_id,bag_id,amount_refunded\n{order_id},{bag_id},100\n")
        journal = tmp_path / "j.jsonl"
        item = BatchItem.refund(1, order_id, bag_id, RefundBagRequest(amount_refunded=100))
        forged = sent_once("refund", order_id, bag_id, item.request, time.time() - 3600)
        journal.write_bytes(
            orjson.dumps({"type": "header", "v": 2, "input": "x", "ts": 1.0})
            + b"\n"
            + orjson.dumps(
                {
                    "key": f"{item.key}:0",
                    "line": 1,
                    "state": "sent",
                    "ask": forged.to_dict(),
                    "ts": 2.0,
                }
            )
            + b"\n"
        )
        journal.chmod(0o666)
        for dry_run in (True, False):
            code, _, err = await run("refund", source, journal=journal, dry_run=dry_run)
            assert code == 2, err
            assert "others may write it" in err
        assert fake.ledger.total_refunds == 0
        if not ROOT:
            pytest.skip(WHY_NOT_ROOT)
        journal.chmod(0o644)
        os.chown(journal, NOBODY, NOBODY)
        code, _, err = await run("refund", source, journal=journal)
        assert code == 2, err
        assert "owned by another user (uid 65534)" in err
        lock = lock_path(journal)
        lock.unlink(missing_ok=True)
        journal.unlink()
        lock.write_text("")
        os.chown(lock, NOBODY, NOBODY)
        code, _, err = await run("refund", source, journal=journal)
        assert code == 2, err
        assert "another user" in err
        assert fake.ledger.total_refunds == 0


async def test_a_journal_record_of_another_row_is_not_trusted(tmp_path: Path) -> None:
    """Round 2, row 3: a "sent" line under a row's key whose record describes another
    request (amount 999) is read as a torn line: the row is read back by its own
    request, finds the refund its first send made, and is not refunded twice."""
    async with FakeViolet(orders=2, seed=1) as fake:
        order_id, bag_id = fake.seeded[0]
        request = RefundBagRequest(amount_refunded=100, reason="batch")
        policy = RetryPolicy(settle_running=0.3, settle_lag=0.1, settle_delay=0.02)
        async with fake.client() as first:
            await first.refund_bag(order_id, bag_id, request)  # the first run's send
        async with fake.client(retry=policy) as client:
            item = BatchItem.refund(1, order_id, bag_id, request)
            other = RefundBagRequest(amount_refunded=999, reason="batch")
            forged = sent_once("refund", order_id, bag_id, other, time.time() - 30)
            journal = tmp_path / "j.jsonl"
            journal.write_bytes(
                orjson.dumps({"type": "header", "v": 2, "input": None, "ts": 1.0})
                + b"\n"
                + orjson.dumps(
                    {
                        "key": f"{item.key}:0",
                        "line": 1,
                        "state": "sent",
                        "ask": forged.to_dict(),
                        "ts": time.time() - 30,
                        "first_sent": time.time() - 30,
                    }
                )
                + b"\n"
            )
            journal.chmod(0o600)
            results = [r async for r in run_batch(client, [item], journal=journal, patience=5)]
    assert [r.outcome for r in results] == ["succeeded"]
    assert results[0].reconciled
    assert fake.ledger.total_refunds == 1


def _journal_lines(count: int, *, open_every: int = 0) -> list[bytes]:
    lines = [orjson.dumps({"type": "header", "v": 2, "input": None, "ts": 1.0}) + b"\n"]
    for n in range(count):
        key = f"refund:{n:032x}#0"
        if open_every and n % open_every == 0:
            ask = {"bag_id": 500 + n}
            record = {"key": key, "line": n, "state": "sent", "ask": ask, "ts": 2.0}
        else:
            record = {"key": key, "line": n, "state": "done", "refund_id": n + 1, "ts": 2.0}
        lines.append(orjson.dumps(record) + b"\n")
    return lines


def test_the_journal_index_spills_finished_items_to_disk_and_keeps_open_ones() -> None:
    """Finished items beyond the bound move to the on-disk index and read back the same;
    open items stay in memory, indexed by bag; a later line wins over an earlier one
    wherever the earlier one is kept."""
    index = JournalIndex(spill_at=10)
    lines = _journal_lines(95, open_every=7)
    # Item 1 is sent again after it was done (a --retry-failed run), item 7 ends done.
    lines.append(
        orjson.dumps(
            {"key": f"refund:{1:032x}#0", "state": "sent", "ask": {"bag_id": 42}, "ts": 3.0}
        )
        + b"\n"
    )
    lines.append(
        orjson.dumps({"key": f"refund:{7:032x}#0", "state": "done", "refund_id": 7000, "ts": 3.0})
        + b"\n"
    )
    header, whole, torn = read_journal(iter(lines), index)
    try:
        assert header is not None
        assert header["v"] == 2
        assert (whole, torn) == (sum(map(len, lines)), 0)
        assert index._disk is not None  # spilled
        assert index[f"refund:{2:032x}#0"].refund_id == 3
        assert index[f"refund:{1:032x}#0"].state == "sent"
        assert index[f"refund:{7:032x}#0"].refund_id == 7000
        assert index.open_on_bag(42) == {f"refund:{1:032x}#0"}
        assert index.open_on_bag(507) == frozenset()  # item 7 is done now
        assert index.open_on_bag(514) == {f"refund:{14:032x}#0"}
        opened = index.open_items()
        assert f"refund:{1:032x}#0" in opened
        assert opened[f"refund:{14:032x}#0"].ask == {"bag_id": 514}
        assert f"refund:{7:032x}#0" not in opened
        assert len(index) == 95
        assert set(index) == {f"refund:{n:032x}#0" for n in range(95)}
        assert 7000 in set(index.refund_ids())
        assert index.get("refund:missing#0") is None
    finally:
        index.close()


async def test_a_bad_field_or_a_torn_tail_never_stops_a_load(tmp_path: Path) -> None:
    """A journal line with ``"ts": "yesterday"`` (and other fields of the wrong type)
    is read with those fields absent, a dry run's forecast too; a torn last line is
    cut at open."""
    journal = tmp_path / "j.jsonl"
    lines = _journal_lines(3)
    lines.append(
        orjson.dumps(
            {
                "key": "refund:x#0",
                "state": "done",
                "ts": "yesterday",
                "line": "one",
                "refund_id": "7",
                "first_sent": [],
                "message": 5,
            }
        )
        + b"\n"
    )
    journal.write_bytes(b"".join(lines) + b'{"key": "refund:torn')
    journal.chmod(0o600)
    peeked = Journal.peek(journal)
    try:
        entry = peeked["refund:x#0"]
        assert (entry.ts, entry.line, entry.refund_id, entry.first_sent) == (0.0, None, None, None)
    finally:
        peeked.close()
    opened = await Journal.open(journal, input_id=None)
    try:
        assert opened.repaired == len(b'{"key": "refund:torn')
        assert opened.entry("refund:x#0") is not None
        assert sorted(opened.refund_ids()) == [1, 2, 3]
        assert opened.open_on_bag(1) == frozenset()
    finally:
        await opened.aclose()
    assert journal.read_bytes().endswith(b"\n")


async def test_a_dry_run_over_a_journal_with_a_bad_timestamp_exits_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journal line with ``"ts": "yesterday"`` used to kill every run, dry runs
    included, with a traceback."""
    source = tmp_path / "in.csv"
    source.write_text("order_id,bag_id,amount_refunded\n1,2,100\n")
    journal = tmp_path / "j.jsonl"
    item = BatchItem.refund(2, 1, 2, RefundBagRequest(amount_refunded=100))
    journal.write_bytes(
        orjson.dumps({"type": "header", "v": 2, "input": None, "ts": "yesterday"})
        + b"\n"
        + orjson.dumps({"key": f"{item.key}:0", "state": "done", "refund_id": 9, "ts": "yesterday"})
        + b"\n"
    )
    journal.chmod(0o600)
    monkeypatch.setenv("VIOLET_APP_ID", "1")
    out = io.StringIO()
    code, text, err = await run("refund", source, journal=journal, dry_run=True)
    assert code == 0, err
    assert "1 done" in text
    assert out.getvalue() == ""


def test_repeat_counts_move_to_disk_and_stay_exact() -> None:
    """Identical rows are numbered by occurrence with the counter on disk beyond its
    bound, exactly as in memory."""
    from violet_async._journal_index import RepeatCounter

    counter = RepeatCounter(spill_at=4)
    try:
        taken = [counter.take(key) for key in "abcabcdefgaa"]
        assert taken == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 2, 3]
        assert dict(counter.items()) == {"a": 4, "b": 2, "c": 2, "d": 1, "e": 1, "f": 1, "g": 1}
    finally:
        counter.close()
