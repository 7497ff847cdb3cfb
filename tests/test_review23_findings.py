"""Review 23: attacks on the batch command line and the fleet.

Each test scripts what it attacks with: its own server (aiohttp.web on 127.0.0.1, port
0) where Violet is involved, its own environment and files where the command line is."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web
from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import RefundBagRequest, VioletClient
from violet_async.batch import BatchItem, BatchResult, Journal, JournalLockedError, run_batch
from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, item_key

#: A Redis password as people write them, with a character a URL reserves: redis-py,
#: arq and urllib quote what they could not read of the URL, which is this password
#: (or the rest of it after the '/').
PASSWORD = "Pa55w0rdSecretTail"
BAD_URLS = (
    f"redis://default:{PASSWORD}?x@redis.internal:6379/0",
    f"redis://:{PASSWORD}#frag@redis.internal:6379",
    f"redis://:head/{PASSWORD}@127.0.0.1:6390/0",
)


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - this interpreter, fixed arguments
        [sys.executable, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIOLET_", "PYTHONWARNINGS"))}
    env.update(
        VIOLET_APP_ID="11",
        VIOLET_APP_SECRET="review23-app-secret-0123",
        VIOLET_USERNAME="review23",
        VIOLET_PASSWORD="review23-password-0123",
        # Nothing listens on port 9: a run that got past its checks would stop there.
        VIOLET_BASE_URL="http://127.0.0.1:9/v1",
        VIOLET_FLEET_KEY="review23-fleet-key-0123456789",
    )
    env.update(extra)
    return env


def _leaks(text: str) -> bool:
    return PASSWORD in text or PASSWORD[:8] in text


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_redis_url_that_cannot_be_read_stops_no_batch_and_shows_no_password(
    url: str, tmp_path: Path
) -> None:
    """Every ``violet-async`` command imports the fleet, and ``WorkerSettings`` read
    VIOLET_REDIS_URL as the package was imported: a password holding '?', '#' or '/'
    (not percent-encoded) made ``violet-async refund FILE`` (no fleet at all) die with a
    traceback ending in the password, on the terminal and in every CI log."""
    rows = tmp_path / "rows.csv"
    rows.write_text("order_id,bag_id,amount_refunded\n31,301,300\n", encoding="utf-8")
    env = _env(VIOLET_REDIS_URL=url)

    batch = _run(["-m", "violet_async", "refund", str(rows), "--dry-run"], env, tmp_path)
    assert not _leaks(batch.stdout + batch.stderr), batch.stderr
    assert batch.returncode == 0, batch.stderr
    assert "Traceback" not in batch.stderr

    for command in (["status"], ["enqueue", str(rows)], ["worker", "--burst"]):
        fleet = _run(["-m", "violet_async", *command], env, tmp_path)
        assert not _leaks(fleet.stdout + fleet.stderr), (command, fleet.stderr)
        assert fleet.returncode == 2, (command, fleet.stderr)
        assert "VIOLET_REDIS_URL" in fleet.stderr
        assert "percent-encoded" in fleet.stderr
        assert "Traceback" not in fleet.stderr

    # arq's own entry point (``arq violet_async.fleet.WorkerSettings``): an error that
    # names the variable, never the URL.
    arq = _run(["-c", "import violet_async.fleet as f; f.WorkerSettings"], env, tmp_path)
    assert arq.returncode != 0
    assert not _leaks(arq.stdout + arq.stderr), arq.stderr
    assert "VIOLET_REDIS_URL" in arq.stderr


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_store_or_audit_redis_url_that_cannot_be_read_shows_no_password(
    url: str, tmp_path: Path
) -> None:
    """``VIOLET_STORE`` (read by every batch run's client) and ``audit --redis`` quoted
    the same part of the URL (the password) in a traceback."""
    rows = tmp_path / "rows.csv"
    rows.write_text("order_id,bag_id,amount_refunded\n31,301,300\n", encoding="utf-8")

    batch = _run(["-m", "violet_async", "refund", str(rows)], _env(VIOLET_STORE=url), tmp_path)
    assert not _leaks(batch.stdout + batch.stderr), batch.stderr
    assert batch.returncode == 2, batch.stderr
    assert "VIOLET_STORE" in batch.stderr
    assert "Traceback" not in batch.stderr

    audit = _run(
        ["-m", "violet_async", "audit", str(rows), "--ledger", "--redis", url], _env(), tmp_path
    )
    assert not _leaks(audit.stdout + audit.stderr), audit.stderr
    assert audit.returncode == 2, audit.stderr
    assert "Traceback" not in audit.stderr


def test_a_redis_url_that_can_be_read_still_makes_worker_settings(tmp_path: Path) -> None:
    """The settings arq reads are made as before from a URL that can be read."""
    code = (
        "import violet_async.fleet as f\n"
        "s = f.WorkerSettings\n"
        "assert s is f.WorkerSettings\n"
        "print(s.redis_settings.host, s.redis_settings.port, s.redis_settings.password,"
        " s.max_jobs, s.__module__, s.__qualname__)\n"
    )
    env = _env(
        VIOLET_REDIS_URL="redis://:pa%3Fss@redis.internal:6380/2", VIOLET_FLEET_CONCURRENCY="7"
    )
    done = _run(["-c", code], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "redis.internal",
        "6380",
        "pa?ss",
        "7",
        "violet_async.fleet._arq",
        "WorkerSettings",
    ]


# -- two runs on one open Journal ---------------------------------------------------


class _Bags:
    """One order with one bag of 1000 cents: every refund POST commits and is answered
    with its record (Violet's documented payload); the list shows what committed."""

    ORDER, BAG = 31, 301

    def __init__(self) -> None:
        self.refunds: list[dict[str, Any]] = []
        self.posts = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"token": "review23-token-0123456789", "refresh_token": "review23-refresh-0123"}
        )

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        await asyncio.sleep(0.02)  # Violet takes a moment: the other run reads meanwhile
        record = {
            "id": 70000 + len(self.refunds) + 1,
            "order_id": self.ORDER,
            "bag_id": self.BAG,
            "merchant_id": 9,
            "amount": body["amount_refunded"],
            "reason": body.get("reason"),
            "status": "COMPLETED",
            "date_created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self.refunds.append(record)
        return web.json_response(record)

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response(self.refunds)


@contextlib.asynccontextmanager
async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


def _client(url: str) -> VioletClient:
    return VioletClient(
        11, "review23-app-secret-0123", username="u", password="pw-0123456789", base_url=url
    )


_ROW = BatchItem.refund(
    1, _Bags.ORDER, _Bags.BAG, RefundBagRequest(amount_refunded=300, reason="damaged")
)


async def _batch(
    client: VioletClient, journal: Journal | Path, **options: Any
) -> list[BatchResult]:
    return [result async for result in run_batch(client, [_ROW], journal=journal, **options)]


async def test_two_runs_at_once_on_one_open_journal_refund_a_row_once(tmp_path: Path) -> None:
    """``run_batch`` takes an open :class:`Journal`; the file lock keeps one run per
    file, but two runs given the same open Journal at once (a web app holding it open,
    a retry wrapper starting a run while the first still runs) each read the row as not
    done and each sent it: two refunds for one row of one journal. The second run is
    now refused (``JournalLockedError``, this pid) before it reads or sends anything."""
    bags = _Bags()
    async with _serve(bags.app()) as url:
        journal = await Journal.open(tmp_path / "rows.journal.jsonl", input_id="rows")
        try:
            async with _client(url) as first, _client(url) as second:
                outcomes = await asyncio.gather(
                    _batch(first, journal), _batch(second, journal), return_exceptions=True
                )
        finally:
            await journal.aclose()
        assert len(bags.refunds) == 1, bags.refunds
        done = [o for o in outcomes if isinstance(o, list)]
        refused = [o for o in outcomes if isinstance(o, JournalLockedError)]
        assert [[(r.outcome, r.refund_id) for r in d] for d in done] == [[("succeeded", 70001)]]
        assert len(refused) == 1
        assert refused[0].pid == os.getpid()
        # The file, opened again, knows the row: nothing more is sent.
        async with _client(url) as again:
            later = await _batch(again, tmp_path / "rows.journal.jsonl")
        assert [(r.outcome, r.refund_id) for r in later] == [("already_done", 70001)]
    assert bags.posts == 1


async def test_a_second_run_on_an_open_journal_never_sends_the_first_runs_rows(
    tmp_path: Path,
) -> None:
    """One after the other on the same open Journal and client: the Journal keeps in
    memory what the file held when it was opened, not the rows a run wrote since, so the
    second run read the first run's row as never sent; the bag's read before the send
    showed the first run's refund, which this client had handed to that run's call (not
    the row's to take, nor a stranger's to hold it back): sent again, two refunds for
    one row (measured on main, with and without ``read_before_send``). A Journal now
    serves one run; the next opens the file again."""
    bags = _Bags()
    async with _serve(bags.app()) as url:
        journal = await Journal.open(tmp_path / "rows.journal.jsonl", input_id="rows")
        try:
            async with _client(url) as client:
                first = await _batch(client, journal)
                assert [(r.outcome, r.refund_id) for r in first] == [("succeeded", 70001)]
                with pytest.raises(JournalLockedError, match="open it again"):
                    await _batch(client, journal)
        finally:
            await journal.aclose()
        assert len(bags.refunds) == 1, bags.refunds
        async with _client(url) as client:
            again = await _batch(client, tmp_path / "rows.journal.jsonl", read_before_send=False)
        assert [(r.outcome, r.refund_id) for r in again] == [("already_done", 70001)]
    assert bags.posts == 1


async def test_the_same_client_running_a_file_again_with_a_new_journal_refunds_nothing_twice(
    tmp_path: Path,
) -> None:
    """The bag is the batch's last guard: a row whose bag already holds a refund of
    exactly its request, which neither the run nor its journal accounts for, is held
    (``already_present``). A new process holds it; the same client did not: the guard
    left out every refund the client had handed to any call, so a service that keeps
    one client and runs an uploaded file again under a new journal (or none, or after
    losing the journal) refunded every row a second time. Refunds handed out before
    the run, and not in its journal, now count as unaccounted for the guard (still
    never claimed as a row's own)."""
    bags = _Bags()
    async with _serve(bags.app()) as url:
        async with _client(url) as client:
            first = await _batch(client, tmp_path / "first.jsonl")
            assert [(r.outcome, r.refund_id) for r in first] == [("succeeded", 70001)]
            again = await _batch(client, tmp_path / "second.jsonl")
            assert [(r.outcome, r.refund_id) for r in again] == [("already_present", 70001)]
            none = [result async for result in run_batch(client, [_ROW])]
            assert [(r.outcome, r.refund_id) for r in none] == [("already_present", 70001)]
            assert len(bags.refunds) == 1, bags.refunds
            # Two identical rows are two refunds: the one on the bag accounts for one
            # row, the other is sent (as in a new process).
            twice = [
                result
                async for result in run_batch(
                    client,
                    [_ROW, attrs.evolve(_ROW, line=2)],
                    journal=tmp_path / "third.jsonl",
                )
            ]
            assert sorted((r.outcome, r.refund_id) for r in twice) == [
                ("already_present", 70001),
                ("succeeded", 70002),
            ]
            # The first journal again, with a second identical row added: the first is
            # done; the second is a second refund asked for, and the bag holds one its
            # journal does not account for (the third run's): held, as a new process
            # holds it.
            more = [
                result
                async for result in run_batch(
                    client, [_ROW, attrs.evolve(_ROW, line=2)], journal=tmp_path / "first.jsonl"
                )
            ]
            assert sorted((r.outcome, r.refund_id) for r in more) == [
                ("already_done", 70001),
                ("already_present", 70002),
            ]
            # With that journal, once the bag holds no refund it does not account for,
            # an identical row added again is sent.
            third = [
                result
                async for result in run_batch(
                    client,
                    [_ROW, attrs.evolve(_ROW, line=2), attrs.evolve(_ROW, line=3)],
                    journal=tmp_path / "third.jsonl",
                )
            ]
            assert sorted((r.outcome, r.refund_id) for r in third) == [
                ("already_done", 70002),
                ("already_present", 70001),
                ("succeeded", 70003),
            ]
    assert [r["id"] for r in bags.refunds] == [70001, 70002, 70003]


async def test_a_direct_refund_of_the_same_client_holds_a_batch_row_asking_it_again(
    tmp_path: Path,
) -> None:
    """The same with a refund the client made directly (``refund_bag``, answered 2xx
    at once: its refund is known with no owner, as a journal's are): a batch row asking
    exactly it was sent again."""
    bags = _Bags()
    async with _serve(bags.app()) as url, _client(url) as client:
        made = await client.refund_bag(_ROW.order_id, _ROW.bag_id, _ROW.request)
        assert made.id == 70001
        rows = await _batch(client, tmp_path / "rows.journal.jsonl")
        assert [(r.outcome, r.refund_id) for r in rows] == [("already_present", 70001)]
    assert [r["id"] for r in bags.refunds] == [70001]


redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for the fleet test


async def test_a_fleet_worker_whose_client_refunded_the_bag_directly_sends_no_second(
    redis_url: str, fleet_key: str
) -> None:
    """A ``FleetWorker`` given a client the program also refunds with directly: an item
    asking exactly a refund that client made was sent again (the guard left out every
    refund the client had handed to a call), where a worker with another client holds
    it (``already_present``). Counted on the server's own list, real redis-server."""
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    ledger = RedisLedger(redis)
    await ledger.new_fleet()  # nothing of this ledger can be in flight
    bags = _Bags()
    key = item_key(_ROW)
    try:
        async with _serve(bags.app()) as url, _client(url) as client:
            await client.refund_bag(_ROW.order_id, _ROW.bag_id, _ROW.request)
            await ledger.register(key, _ROW)
            worker = FleetWorker(client, ledger, BagLocks(redis))
            summary = await worker.run(key, _ROW, ledger.sign(key, _ROW))
    finally:
        await redis.flushall()
        await redis.aclose()
    assert (summary["state"], summary["outcome"]) == ("failed", "already_present")
    assert [r["id"] for r in bags.refunds] == [70001]
