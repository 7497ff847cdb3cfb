"""Review 26: the batch journal, the fleet ledger and the record stores, attacked with a
real journal file, a real redis-server and a hostile Violet scripted here.

- a batch journal is bound to the Violet it was written against (app id and host, as
  keys in a record store are): a file run against the sandbox (the default) and then
  against production with the default journal skipped every row as ``already_done``,
  naming the sandbox's refunds, and refunded nobody;
- a journal is locked by the file itself too, not only by its ``.lock`` sidecar: a
  run whose sidecar was deleted (taken for a stale lock) let a second run open the
  journal, and both sent the row neither had recorded yet (two refunds);
- a ``SQLiteStore`` whose file was removed or replaced while a process had it open
  went on with the old file: a process opening the new one and the old process each
  owned one key, and each sent its ask (two refunds under one key).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web

from violet_async import RecordStoreError, RefundBagRequest, VioletClient
from violet_async._batch_cli import EXIT_BAD_INPUT, EXIT_OK, BatchOptions, run_file
from violet_async._journal import lock_path
from violet_async.batch import (
    BatchItem,
    Journal,
    JournalLockedError,
    JournalMismatchError,
    run_batch,
)
from violet_async.stores import SQLiteStore
from violet_async.testing import FakeClock

from .hostile import APP_ID, BAG_ID, ORDER_ID, SECRET, Hostile


@contextlib.asynccontextmanager
async def client_on(server: Hostile, host: str, **options: Any) -> AsyncIterator[VioletClient]:
    """``server`` on 127.0.0.1 (port 0), reached by the name ``host`` (127.0.0.1 for the
    "sandbox", localhost for "production": two hosts, one machine)."""
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            options.pop("app_id", APP_ID),
            SECRET,
            username="hostile-user",
            password="hostile-password-0123",
            base_url=f"http://{host}:{port}/v1",
            **{"clock": server.clock, **options},
        ) as client:
            yield client
    finally:
        server._stopping.set()
        await runner.cleanup()


ROW = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=500))


async def _run(client: VioletClient, journal: Path | Journal) -> list[str]:
    return [r.outcome async for r in run_batch(client, [ROW], journal=journal)]


# -- a journal written against another Violet ------------------------------------


async def test_a_journal_of_the_sandbox_does_not_skip_production_rows(tmp_path: Path) -> None:
    clock = FakeClock()
    journal = tmp_path / "refunds.csv.refund.journal.jsonl"
    sandbox, production = Hostile(clock), Hostile(clock)
    async with client_on(sandbox, "127.0.0.1") as client:
        assert await _run(client, journal) == ["succeeded"]
    assert sandbox.posts == 1
    async with client_on(production, "localhost") as client:
        with pytest.raises(JournalMismatchError, match="another Violet"):
            await _run(client, journal)
    # Not "already_done" with the sandbox's refund: nothing claimed, nothing sent.
    assert production.posts == 0
    # The same Violet still resumes it (the journal is its own): already_done.
    async with client_on(Hostile(clock), "127.0.0.1") as client:
        assert await _run(client, journal) == ["already_done"]


async def test_a_journal_of_another_app_is_refused(tmp_path: Path) -> None:
    clock = FakeClock()
    journal = tmp_path / "j.jsonl"
    async with client_on(Hostile(clock), "127.0.0.1") as client:
        assert await _run(client, journal) == ["succeeded"]
    other = Hostile(clock)
    async with client_on(other, "127.0.0.1", app_id=APP_ID + 1) as client:
        with pytest.raises(JournalMismatchError, match="another Violet"):
            await _run(client, journal)
        # An open Journal given to the run is checked as well.
        log = await Journal.open(journal, input_id=None)
        try:
            with pytest.raises(JournalMismatchError, match="another Violet"):
                await _run(client, log)
        finally:
            await log.aclose()
    assert other.posts == 0


@contextlib.asynccontextmanager
async def on_env(
    server: Hostile, host: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    """``server`` as the command line's Violet, reached by the name ``host``."""
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    for key, value in {
        "VIOLET_APP_ID": str(APP_ID),
        "VIOLET_APP_SECRET": SECRET,
        "VIOLET_USERNAME": "hostile-user",
        "VIOLET_PASSWORD": "hostile-password-0123",
        "VIOLET_BASE_URL": f"http://{host}:{port}/v1",
    }.items():
        monkeypatch.setenv(key, value)
    try:
        yield
    finally:
        server._stopping.set()
        await runner.cleanup()


async def test_the_command_line_refuses_the_sandbox_journal_for_production(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = tmp_path / "refunds.csv"
    rows.write_text(f"order_id,bag_id,amount_refunded\n{ORDER_ID},{BAG_ID},500\n")
    sandbox, production = Hostile(FakeClock()), Hostile(FakeClock())
    out, err = io.StringIO(), io.StringIO()
    async with on_env(sandbox, "127.0.0.1", monkeypatch):
        assert await run_file("refund", rows, BatchOptions(), out=out, err=err) == EXIT_OK
    assert sandbox.posts == 1
    out, err = io.StringIO(), io.StringIO()
    async with on_env(production, "localhost", monkeypatch):
        code = await run_file("refund", rows, BatchOptions(), out=out, err=err)
    assert code == EXIT_BAD_INPUT, out.getvalue()
    assert "another Violet" in err.getvalue()
    assert production.posts == 0
    # Named a journal of its own, production refunds the row.
    async with on_env(production, "localhost", monkeypatch):
        options = BatchOptions(journal=tmp_path / "production.journal.jsonl")
        assert await run_file("refund", rows, options, out=out, err=err) == EXIT_OK
    assert production.posts == 1


# -- a journal whose .lock sidecar was deleted under its run -------------------------


@attrs.define
class FirstHeld(Hostile):
    """Its first POST is held, before it commits, until ``gate`` opens."""

    gate: asyncio.Event = attrs.Factory(asyncio.Event)
    held: int = 0

    async def _post(self, request: web.Request, *, cancel: bool) -> web.StreamResponse:
        if self.held == 0:
            self.held = 1
            self.post_arrived.set()
            await self.gate.wait()
        return await super()._post(request, cancel=cancel)


async def test_a_deleted_lock_file_does_not_let_a_second_run_in(tmp_path: Path) -> None:
    journal = tmp_path / "j.jsonl"
    server = FirstHeld(FakeClock())
    async with client_on(server, "127.0.0.1") as client:
        first = asyncio.ensure_future(_run(client, journal))
        await server.post_arrived.wait()  # the row is journaled sent; its POST runs
        lock_path(journal).unlink()  # "in use by process N": taken for a stale lock
        try:
            with pytest.raises(JournalLockedError, match="in use"):
                await _run(client, journal)
        finally:
            server.gate.set()
            assert await first == ["succeeded"]
    assert server.posts == 1
    assert len(server.refunds) == 1


# -- two runs of one file, each with its own journal, on one client ---------------------


async def test_two_runs_with_two_journals_on_one_client_refund_a_row_once(
    tmp_path: Path,
) -> None:
    server = FirstHeld(FakeClock())
    async with client_on(server, "127.0.0.1") as client:
        first = asyncio.ensure_future(_run(client, tmp_path / "a.jsonl"))
        await server.post_arrived.wait()  # its POST is held before it commits
        # The same file run again with another journal (a second task, a --journal
        # typo) while the first is in flight: its row waits for the bag, then reads it.
        second = asyncio.ensure_future(_run(client, tmp_path / "b.jsonl"))
        await asyncio.sleep(0.05)
        server.gate.set()
        assert await first == ["succeeded"]
        # The first run's refund, handed out after the second began, is nothing the
        # second run's journal or items account for: it holds the row, as it does in
        # another process.
        assert await second == ["already_present"]
    assert server.posts == 1
    assert len(server.refunds) == 1


# -- a SQLiteStore file replaced under a process that has it open ----------------------


async def test_a_replaced_store_file_is_refused_by_the_process_that_had_the_old(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.db"
    server = Hostile(FakeClock())
    async with (
        SQLiteStore(path) as old_store,
        client_on(server, "127.0.0.1", store=old_store) as old,
    ):
        await old.refund_bag(ORDER_ID, BAG_ID, amount_refunded=100, idempotency_key="k-1")
        # "Reset" by an operator (or a backup restored): the file and its WAL go.
        for name in ("keys.db", "keys.db-wal", "keys.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        async with (
            SQLiteStore(path) as new_store,
            VioletClient(  # a process started after it
                APP_ID,
                SECRET,
                username="hostile-user",
                password="hostile-password-0123",
                base_url=old._shared.base_url,
                clock=server.clock,
                store=new_store,
            ) as new,
        ):
            await new.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250, idempotency_key="k-2")
        # The same call with the same key in the process that had the old file: it
        # cannot see the new file's keys, and must not send blind.
        with pytest.raises(RecordStoreError, match="replaced or removed"):
            await old.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250, idempotency_key="k-2")
    assert [r["amount"] for r in server.refunds] == [100, 250]
