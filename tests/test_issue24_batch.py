"""Never twice in the batch runner, against our own hostile server: an edited row
whose earlier version may have applied, a Ctrl-C with only parked rows left, and an
attempt budget that a revisit of a parked row must not start again."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson

from violet_async import PendingRefund, RefundBagRequest, RetryPolicy, Timeouts
from violet_async.batch import BatchItem, BatchResult, Journal, run_batch
from violet_async.testing import FakeClock

from .hostile import (
    APP_ID,
    BAG_ID,
    GATEWAY_504,
    ORDER_ID,
    SECRET,
    VIOLET_500,
    Hostile,
    Step,
    hostile_client,
    serve,
)

ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)


async def _drain(results: AsyncIterator[BatchResult]) -> list[BatchResult]:
    return [r async for r in results]


def _refund(line: int, reason: str, amount: int = 300) -> BatchItem:
    return BatchItem.refund(
        line, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=amount, reason=reason)
    )


async def _killed_mid_post(client: object, item: BatchItem, server: Hostile, journal: Path) -> None:
    """Run ``item`` and kill the run while its POST is in flight (it commits)."""
    first = asyncio.ensure_future(_drain(run_batch(client, [item], journal=journal)))  # type: ignore[arg-type]
    await server.post_arrived.wait()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    (entry,) = Journal.peek(journal).values()
    assert entry.state == "sent"


async def test_row10_an_edited_row_waits_for_its_earlier_version(tmp_path: Path) -> None:
    """A run is killed while a row's POST is in flight (it applied); the operator fixes a
    typo in the row's reason and runs again. The edited row is a new item, but the
    earlier one is read back first: it applied, so the edited row is not sent (one
    refund, not two) and says so; a third run changes nothing."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200, commit_after=0.0, hang=True)])
    journal = tmp_path / "run.jsonl"
    timeouts = Timeouts(connect=1.0, read=2.0)
    async with hostile_client(server, retry=ROOMY, timeouts=timeouts) as client:
        await _killed_mid_post(client, _refund(1, "Customer requsted"), server, journal)
        edited = _refund(1, "Customer requested")
        results = await _drain(run_batch(client, [edited], journal=journal))
        assert server.posts == 1
        assert [r.outcome for r in results] == ["already_present"]
        assert results[0].refund_id == server.ours[0]
        assert "--allow-repeat" in str(results[0].error)
        again = await _drain(run_batch(client, [edited], journal=journal))
    assert [r.outcome for r in again] == ["already_present"]
    assert server.posts == 1
    assert len(server.ours) == 1
    states = {e.state for e in Journal.peek(journal).values()}
    assert states == {"done", "present"}


async def test_row10_an_earlier_row_that_never_applied_frees_its_bag(tmp_path: Path) -> None:
    """The killed row's POST never committed: read back over its settle window it is
    proven absent, it is not sent again (its row is gone), and the edited row is sent:
    one refund, the edited one."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, body=GATEWAY_504, commit_after=None, hang=True)])
    journal = tmp_path / "run.jsonl"
    timeouts = Timeouts(connect=1.0, read=2.0)
    async with hostile_client(server, retry=ROOMY, timeouts=timeouts) as client:
        await _killed_mid_post(client, _refund(1, "typo"), server, journal)
        results = await _drain(run_batch(client, [_refund(1, "fixed")], journal=journal))
    assert [r.outcome for r in results] == ["succeeded"]
    assert server.posts == 2
    assert len(server.ours) == 1
    assert server.refunds[0]["reason"] == "fixed"
    states = sorted(e.state for e in Journal.peek(journal).values())
    assert states == ["done", "unsent"]


async def test_row10_the_earlier_row_itself_later_in_the_input_is_done(tmp_path: Path) -> None:
    """The earlier row is still in the input, after a new row on its bag: it is resolved
    for the new row, found applied, and reported already_done when its turn comes (not
    resumed a second time, where its refund would count as someone else's)."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200, commit_after=0.0, hang=True)])
    journal = tmp_path / "run.jsonl"
    timeouts = Timeouts(connect=1.0, read=2.0)
    original = _refund(2, "first")
    async with hostile_client(server, retry=ROOMY, timeouts=timeouts) as client:
        await _killed_mid_post(client, original, server, journal)
        new = _refund(1, "second", amount=200)
        results = await _drain(run_batch(client, [new, original], journal=journal))
    outcomes = {r.item.line: r.outcome for r in results}
    assert outcomes == {1: "already_present", 2: "already_done"}
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_row15_revisits_of_a_parked_row_share_one_attempt_budget(tmp_path: Path) -> None:
    """Every POST gets Violet's own 500 and never applies: each is proven absent after
    its settle window (longer than the batch's patience, so the row parks each time),
    and re-sent on the next revisit. The run's sends stop at the policy's attempt
    budget (they restarted it at every revisit: one POST per revisit), and the row ends
    failed, which is true: nothing applied."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(500, body=VIOLET_500, commit_after=None)] * 20)
    policy = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0, max_attempts=3)
    async with hostile_client(server, retry=policy) as client:
        results = await _drain(run_batch(client, [_refund(1, "r")], journal=tmp_path / "run.jsonl"))
    assert server.posts == 3
    assert [r.outcome for r in results] == ["failed"]
    assert "attempt" in str(results[0].error)
    assert server.refunds == []


async def test_row14_ctrl_c_with_only_parked_rows_exits_130_at_once(tmp_path: Path) -> None:
    """The console script with ``--settle 120``: the one row's POST gets a gateway 504
    and parks for the settle window. Ctrl-C then stops the run within a second or two,
    exit 130, the row journaled unknown with its record (resumable); it used to wait
    out the window."""
    server = Hostile(FakeClock(), script=[Step(504, body=GATEWAY_504, commit_after=None)])
    async with serve(server) as base_url:
        source = tmp_path / "in.csv"
        source.write_text(f"order_id,bag_id,amount_refunded,reason\n{ORDER_ID},{BAG_ID},300,r\n")
        journal = tmp_path / "in.csv.refund.journal.jsonl"
        env = {
            **os.environ,
            "VIOLET_APP_ID": str(APP_ID),
            "VIOLET_APP_SECRET": SECRET,
            "VIOLET_USERNAME": "hostile-user",
            "VIOLET_PASSWORD": "hostile-password-0123",
            "VIOLET_BASE_URL": base_url,
        }
        command = [sys.executable, "-m", "violet_async", "refund", str(source)]
        proc = await asyncio.create_subprocess_exec(
            *command, "--settle", "120", env=env, stdout=asyncio.subprocess.PIPE
        )
        try:
            for _ in range(400):  # up to 20 s for the row to park
                await asyncio.sleep(0.05)
                if journal.exists() and b'"state":"pending"' in journal.read_bytes():
                    break
            assert b'"state":"pending"' in journal.read_bytes()
            await asyncio.sleep(0.3)  # parked: only the settle window is left
            asked = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, _ = await asyncio.wait_for(proc.communicate(), 10.0)
            took = time.monotonic() - asked
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 130, out
    assert took < 10.0, took  # the settle window is 120 s; a loaded machine is slower
    assert b"interrupted" in out
    assert server.posts == 1
    (entry,) = Journal.peek(journal).values()
    assert entry.state == "unknown"
    assert entry.ask is not None
    assert orjson.loads(orjson.dumps(entry.ask))["phase"] == "pending"


async def test_row10_two_killed_rows_on_a_bag_then_both_edited(tmp_path: Path) -> None:
    """Two rows on one bag were each killed with their POST in flight (both applied),
    over two runs; both rows are edited, and a third row on the bag added. Every
    earlier entry is read back first: two refunds, one per POST, and no row of the
    edited input is sent."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200, commit_after=0.0, hang=True)] * 2)
    journal = tmp_path / "run.jsonl"
    a, b = _refund(1, "typo", 300), _refund(2, "typo", 200)
    async with hostile_client(
        server, retry=ROOMY, timeouts=Timeouts(connect=1.0, read=2.0)
    ) as client:
        for items in ([a], [a, b]):
            server.post_arrived.clear()
            first = asyncio.ensure_future(_drain(run_batch(client, items, journal=journal)))
            await asyncio.wait_for(server.post_arrived.wait(), 5)
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
        edited = [_refund(1, "fixed", 300), _refund(2, "fixed", 200), _refund(3, "other", 100)]
        results = await _drain(run_batch(client, edited, journal=journal))
    assert [r.outcome for r in results] == ["already_present"] * 3
    assert server.posts == 2
    assert len(server.ours) == 2
    states = sorted(e.state for e in Journal.peek(journal).values())
    assert states == ["done", "done", "present", "present", "present"]


async def test_an_unresolved_row_keeps_later_rows_on_its_bag_from_sending(
    tmp_path: Path,
) -> None:
    """In one run, a row's POST gets a gateway 504 and another actor's refund of the same
    amount (another reason) shows up: a near match, parked for review, the row ends
    unknown. The next row on the bag is not sent (not_sent, naming the row), and the
    journal lets the next run resolve the first one before it."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, body=GATEWAY_504, commit_after=None)])

    async def other_actor() -> None:
        server.add_refund(300, reason="someone else")

    server.on_answer = other_actor
    rows = [_refund(1, "mine"), _refund(2, "second", amount=100)]
    async with hostile_client(server, retry=ROOMY, timeouts=Timeouts(connect=1.0, read=2.0)) as c:
        results = await _drain(run_batch(c, rows, journal=tmp_path / "run.jsonl"))
    outcomes = {r.item.line: r.outcome for r in results}
    assert outcomes == {1: "unknown", 2: "not_sent"}
    assert "line 1" in str(results[1].error)
    assert server.posts == 1


async def test_an_earlier_entry_journaled_before_its_first_send_is_never_sent(
    tmp_path: Path,
) -> None:
    """A journal whose open entry on the bag holds a record that never left (phase new):
    it is recorded unsent, and the new row on the bag goes out once."""
    clock = FakeClock()
    server = Hostile(clock)
    journal = tmp_path / "run.jsonl"
    old = _refund(1, "typo")
    ask = PendingRefund("refund", ORDER_ID, BAG_ID, old.request).to_dict()
    journal.write_bytes(
        orjson.dumps({"type": "header", "v": 2, "input": None, "ts": 1.0})
        + b"\n"
        + orjson.dumps({"key": f"{old.key}:0", "line": 1, "state": "sent", "ts": 2.0, "ask": ask})
        + b"\n"
    )
    async with hostile_client(server, retry=ROOMY) as client:
        results = await _drain(run_batch(client, [_refund(1, "fixed")], journal=journal))
    assert [r.outcome for r in results] == ["succeeded"]
    assert server.posts == 1
    assert Journal.peek(journal)[f"{old.key}:0"].state == "unsent"
