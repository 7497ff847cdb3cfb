"""Exactly once across processes: three ``violet-async worker`` subprocesses (arq) on a
real redis-server, FakeViolet in this process (its ledger counts every refund), two
producers at once, the same file enqueued again, and one worker killed with SIGKILL in
the middle of the run. Then the shared rate limit against FakeViolet's own limit."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from arq.connections import ArqRedis

from tests import _fleet_redis
from violet_async import _batch_cli
from violet_async.batch import BatchItem
from violet_async.fleet import RedisLedger, create_fleet_pool, enqueue
from violet_async.fleet import _cli as fleet_cli
from violet_async.testing import FakeViolet, FaultPlan

redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for every test here


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[ArqRedis]:
    arq = await create_fleet_pool(redis_url)
    await arq.flushall()
    await RedisLedger(arq).new_fleet()  # nothing of this ledger can be in flight
    try:
        yield arq
    finally:
        await arq.aclose()


def _write_rows(path: Path, first_order: int, count: int) -> Path:
    lines = ["order_id,bag_id,amount_refunded,reason"]
    lines += [
        f"{order},{order + 100_000},500,fleet test"
        for order in range(first_order, first_order + count)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def _start_worker(
    fake: FakeViolet, url: str, *extra: str, log: Path | None = None
) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "VIOLET_APP_ID": str(fake.app_id),
        "VIOLET_APP_SECRET": fake.app_secret,
        "VIOLET_USERNAME": fake.username,
        "VIOLET_PASSWORD": fake.password,
        "VIOLET_BASE_URL": fake.base_url,
    }
    for name in ("VIOLET_TOKEN", "VIOLET_REFRESH_TOKEN", "VIOLET_ENV"):
        env.pop(name, None)
    fd = None if log is None else _log_fd(log)
    try:
        return await _spawn_worker(env, url, fake.base_url, extra, fd)
    finally:
        if fd is not None:
            os.close(fd)


async def _spawn_worker(
    env: dict[str, str], url: str, base_url: str, extra: tuple[str, ...], fd: int | None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "violet_async",
        "worker",
        "--redis",
        url,
        "--base-url",
        base_url,
        *extra,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL if fd is None else fd,
    )


def _log_fd(path: Path) -> int:
    # A raw descriptor the child inherits; this process closes its copy at once.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def _until(check: object, timeout: float, what: str, *, explain: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            detail = await explain() if explain is not None else ""
            pytest.fail(f"timed out waiting for {what}{detail}")
        await asyncio.sleep(0.1)


def _items(path: Path) -> list[BatchItem]:
    return [i for i in _batch_cli.read_items(path, "refund") if isinstance(i, BatchItem)]


async def test_three_workers_one_killed_every_bag_once(
    pool: ArqRedis,
    redis_url: str,
    tmp_path: Path,
) -> None:
    bags = 240
    # The chaos plan with Violet's own dates (UTC, to the second): with naive dates a
    # refund found after a failure in flight can never be placed after the send, and
    # such items end for review, not applied (tests/test_batch.py runs that case).
    chaos = FaultPlan.chaos(3)
    plan = attrs.evolve(chaos, quirks=attrs.evolve(chaos.quirks, naive_dates=False))
    async with FakeViolet(orders=bags, seed=3, faults=plan) as fake:
        rows = _write_rows(tmp_path / "refunds.csv", 100001, bags)
        options = (
            "--settle",
            "1",
            "--timeout",
            "2",
            "--lock-ttl",
            "3",
            "--job-timeout",
            "4",
            "--concurrency",
            "16",
        )
        logs = [tmp_path / f"worker{n}.log" for n in range(3)]
        workers = [await _start_worker(fake, redis_url, *options, log=log) for log in logs]
        try:
            # Two producers at once (the CLI and this process), then the file again.
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "violet_async",
                "enqueue",
                str(rows),
                "--redis",
                redis_url,
                stdout=asyncio.subprocess.PIPE,
            )
            here = await enqueue(pool, _items(rows), source=str(rows))
            out, _ = await cli.communicate()
            assert cli.returncode == 0
            assert f"{bags} item(s)" in out.decode()
            assert here.total == bags
            again = await enqueue(pool, _items(rows), source=str(rows))
            assert again.total == bags
            # No bound on again.queued: an item whose job ends between the ledger's read
            # and the enqueue (arq keeps no result) is queued once more, and which items
            # do is up to the scheduler. That job finds the item applied and sends
            # nothing (every job may run twice); the refund counts below prove no bag
            # was refunded twice.
            ledger = RedisLedger(pool)

            async def some_done() -> bool:
                return fake.ledger.total_refunds >= bags // 4

            await _until(some_done, 30, "the first refunds")
            workers[0].kill()  # SIGKILL: its jobs in flight are re-run by arq elsewhere
            await workers[0].wait()

            async def all_finished() -> bool:
                counts = await ledger.counts()
                return counts["applied"] + counts["failed"] >= bags

            async def explain() -> str:
                # What a timeout leaves to read: the ledger by state, the items not
                # finished, and the end of each worker's log.
                counts = await ledger.counts()
                open_items = await ledger.keys_in("new", "sent", "pending")
                tails = [log.read_text(errors="replace")[-3000:] for log in logs]
                return f": {dict(counts)}; open {open_items[:20]}\n" + "\n---\n".join(tails)

            # A bound, not a wait: on a loaded machine (two cores shared) the workers take
            # longer; the test ends as soon as every item has.
            await _until(all_finished, 120, "every item to finish", explain=explain)
        finally:
            await _stop(workers)
        counts = await ledger.counts()
        assert counts["applied"] == bags, counts
        assert sum(counts.values()) == bags
        fake.settle()
        assert fake.ledger.double_refunds() == {}
        for order in range(100001, 100001 + bags):
            assert fake.ledger.refunds_per_bag[order + 100_000] == 1, order
        # The producer reads results from the ledger: status, by state and progress.
        out_text = io.StringIO()
        args = argparse.Namespace(redis=redis_url, prefix="{violet}", json=False)
        assert await fleet_cli._status(args, out_text) == 0
        assert f"{bags} item(s): new 0, sent 0, pending 0, applied {bags}, failed 0" in (
            out_text.getvalue()
        )
        # Enqueued once more after the end: every item is already finished.
        late = await enqueue(pool, _items(rows))
        assert (late.queued, late.already_finished) == (0, bags)


async def test_fleet_rate_limit_is_shared(
    pool: ArqRedis,
    redis_url: str,
    tmp_path: Path,
) -> None:
    rate, bags = 40.0, 160
    async with FakeViolet(orders=bags, seed=4, rate_limit=rate) as fake:
        rows = _write_rows(tmp_path / "rate.csv", 100001, bags)
        report = await enqueue(pool, _items(rows))
        assert report.queued == bags
        workers = [
            await _start_worker(fake, redis_url, "--rate", str(rate), "--concurrency", "16")
            for _ in range(3)
        ]
        ledger = RedisLedger(pool)
        try:

            async def all_finished() -> bool:
                return (await ledger.counts())["applied"] >= bags

            await _until(all_finished, 40, "every item to finish")
        finally:
            await _stop(workers)
        limiter = fake.rate_limit
        assert limiter is not None
        assert fake.ledger.double_refunds() == {}
        assert limiter.allowed == bags
        # Together under the app's limit. Three workers each at the rate would draw a
        # 429 for about two sends in three (over a hundred here); a shared budget draws
        # a few at most, when a loaded machine delivers sends to the fake in bursts.
        assert limiter.limited <= bags // 5, limiter.limited
        assert limiter.max_in_window(1.0) <= rate + limiter.burst
        # How close to the rate the fleet runs is measured in benchmarks/, never asserted
        # as a timing here (a loaded machine is slower, not wrong).


async def test_arq_worker_in_process_and_cli(
    pool: ArqRedis,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same job function and settings in this process (burst mode), the CLI's
    strict input, and ``status --json`` with a failure and its line."""
    from arq.worker import Worker

    from violet_async.fleet._arq import FleetConfig, close_worker, worker_settings

    bad = tmp_path / "bad.csv"
    bad.write_text("order_id,bag_id,amount_refunded\n100001,200001,-5\nx,1,1\n")
    err = io.StringIO()
    args = argparse.Namespace(redis=redis_url, prefix="{violet}", file=bad, kind="refund")
    assert await fleet_cli._enqueue(args, io.StringIO(), err) == 2
    assert f"{bad}:line 2:" in err.getvalue()
    assert "nothing was queued" in err.getvalue()
    args.file = tmp_path / "missing.csv"
    assert await fleet_cli._enqueue(args, io.StringIO(), io.StringIO()) == 2

    async with FakeViolet(orders=6, seed=5) as fake:
        rows = tmp_path / "few.jsonl"
        rows.write_text(
            "".join(
                f'{{"order_id": {o}, "bag_id": {o + 100_000}, "amount_refunded": 500}}\n'
                for o in range(100001, 100006)
            )
            # More than the bag holds: Violet refuses it, a definite failure.
            + '{"order_id": 100006, "bag_id": 200006, "amount_refunded": 99999999}\n'
        )
        args.file = rows
        out = io.StringIO()
        assert await fleet_cli._enqueue(args, out, io.StringIO()) == 0
        assert "6 item(s): 6 queued" in out.getvalue()
        for name, value in (
            ("VIOLET_APP_ID", str(fake.app_id)),
            ("VIOLET_APP_SECRET", fake.app_secret),
            ("VIOLET_USERNAME", fake.username),
            ("VIOLET_PASSWORD", fake.password),
            ("VIOLET_FLEET_RATE", "200"),
            ("VIOLET_FLEET_CONCURRENCY", "4"),
        ):
            monkeypatch.setenv(name, value)
        config = FleetConfig.from_env(redis_url=redis_url, base_url=fake.base_url)
        assert (config.rate, config.concurrency) == (200.0, 4)
        worker = Worker(**worker_settings(config), burst=True, handle_signals=False)
        try:
            await worker.main()
        finally:
            await close_worker(worker)
        assert fake.ledger.total_refunds == 5
    status = io.StringIO()
    args = argparse.Namespace(redis=redis_url, prefix="{violet}", json=True)
    assert await fleet_cli._status(args, status) == 1  # one failed item
    import orjson

    report = orjson.loads(status.getvalue())
    assert report["counts"]["applied"] == 5
    assert report["finished"] == report["total"] == 6
    (failure,) = report["problems"]
    assert (failure["line"], failure["outcome"], failure["source"]) == (6, "failed", str(rows))
    text = io.StringIO()
    args.json = False
    assert await fleet_cli._status(args, text) == 1
    assert f"{rows}:line 6: failed: order 100006 bag 200006" in text.getvalue()


async def test_status_names_open_items_that_no_job_will_finish(
    pool: ArqRedis, redis_url: str, tmp_path: Path
) -> None:
    """An open item whose arq job is gone (arq gave up on it, or it expired unrun) is
    never finished by any worker: ``status`` says so and how to fix it, and enqueuing
    the file again queues exactly those items."""
    from violet_async.fleet import item_key

    rows = _items(_write_rows(tmp_path / "rows.csv", 100001, 3))
    assert (await enqueue(pool, rows, source="rows.csv")).queued == 3
    lost = item_key(rows[1])
    assert await pool.delete(f"arq:job:violet_async:{lost}") == 1  # the job is gone
    text = io.StringIO()
    args = argparse.Namespace(redis=redis_url, prefix="{violet}", json=False)
    assert await fleet_cli._status(args, text) == 0
    assert "1 open item(s) have no job queued" in text.getvalue()
    assert f"  {lost}\n" in text.getvalue()
    args.json = True
    report = io.StringIO()
    await fleet_cli._status(args, report)
    import orjson

    assert orjson.loads(report.getvalue())["without_job"] == [lost]
    again = await enqueue(pool, rows, source="rows.csv")
    assert (again.queued, again.already_queued) == (1, 2)
    text = io.StringIO()
    args.json = False
    await fleet_cli._status(args, text)
    assert "no job queued" not in text.getvalue()


def test_cli_reports_redis_down_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    from violet_async.__main__ import main

    assert main(["status", "--redis", "redis://127.0.0.1:1/0"]) == 2
    assert capsys.readouterr().err.startswith("violet-async: cannot reach Redis (")
    assert main(["worker", "--redis", "redis://127.0.0.1:1/0", "--rate", "0"]) == 2


class _Planted:
    """A pickle that runs code when it is unpickled (what a Redis writer could plant)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


async def _burst_worker(fake: FakeViolet, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from arq.worker import Worker

    from violet_async.fleet._arq import FleetConfig, close_worker, worker_settings

    for name, value in (
        ("VIOLET_APP_ID", str(fake.app_id)),
        ("VIOLET_APP_SECRET", fake.app_secret),
        ("VIOLET_USERNAME", fake.username),
        ("VIOLET_PASSWORD", fake.password),
    ):
        monkeypatch.setenv(name, value)
    config = FleetConfig.from_env(redis_url=redis_url, base_url=fake.base_url)
    worker = Worker(**worker_settings(config), burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await close_worker(worker)


async def test_a_pickled_job_is_refused_without_running(
    pool: ArqRedis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job pickled straight into Redis (arq's default serializer) is never unpickled
    by a worker: the code it carries does not run, nothing is sent; and ``enqueue``
    refuses a pool that would write pickles."""
    from arq.connections import RedisSettings, create_pool

    from violet_async.fleet import JOB_NAME, QUEUE_NAME

    marker = tmp_path / "ran"
    pickling = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        await pickling.enqueue_job(JOB_NAME, _Planted(marker), _queue_name=QUEUE_NAME)
        with pytest.raises(ValueError, match="JSON jobs"):
            await enqueue(pickling, _items(_write_rows(tmp_path / "r.csv", 100001, 1)))
    finally:
        await pickling.aclose()
    async with FakeViolet(orders=2, seed=3) as fake:
        await _burst_worker(fake, redis_url, monkeypatch)
        assert fake.ledger.total_refunds == 0
    assert not marker.exists()


async def test_unsigned_or_altered_items_are_refused_before_any_send(
    pool: ArqRedis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items a producer with the fleet key did not sign as they read now (a job written
    straight into Redis, a ledger record planted with its job, a signed record whose
    amount was changed afterwards, a signed job replayed as another repeat) are refused
    before any send, and ``status`` says so; the signed item beside them applies."""
    from violet_async.fleet import JOB_NAME, QUEUE_NAME, item_key

    forged = {"line": 1, "kind": "refund", "order_id": 100001, "bag_id": 200001}
    await pool.enqueue_job(
        JOB_NAME,
        "refund:100001:200001:x:0",
        {**forged, "request": {"amount_refunded": 999999}},
        _queue_name=QUEUE_NAME,
    )
    planted = "refund:100002:200002:y:0"
    await pool.hset(
        f"{{violet}}:item:{planted}",
        mapping={
            "state": "new",
            "kind": "refund",
            "order_id": 100002,
            "bag_id": 200002,
            "request": '{"amount_refunded":777}',
            "line": 2,
            "sig": "0" * 64,
        },
    )
    await pool.enqueue_job(JOB_NAME, planted, _queue_name=QUEUE_NAME)
    rows = _write_rows(tmp_path / "rows.csv", 100003, 2)
    assert (await enqueue(pool, _items(rows), source=str(rows))).queued == 2
    altered = item_key(_items(rows)[0])
    await pool.hset(f"{{violet}}:item:{altered}", "request", '{"amount_refunded":999999}')
    # The second row's signed job, replayed under the key of a second repeat.
    second = _items(rows)[1]
    job = await pool.enqueue_job(
        JOB_NAME,
        item_key(second, 1),
        {
            "sig": RedisLedger(pool).sign(item_key(second), second),
            "line": 3,
            "kind": "refund",
            "order_id": second.order_id,
            "bag_id": second.bag_id,
            "request": {"amount_refunded": 500, "reason": "fleet test"},
        },
        _queue_name=QUEUE_NAME,
    )
    assert job is not None
    async with FakeViolet(orders=6, seed=3) as fake:
        await _burst_worker(fake, redis_url, monkeypatch)
        assert fake.ledger.total_refunds == 1  # the one signed, unaltered item
    status = io.StringIO()
    args = argparse.Namespace(redis=redis_url, prefix="{violet}", json=False)
    assert await fleet_cli._status(args, status) == 1
    text = status.getvalue()
    assert text.count(": refused: order") == 4, text
    assert "not signed with this fleet's key" in text
    assert "applied 1" in text


def test_every_fleet_command_reads_the_redis_url_from_the_environment(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Round 2, row 9: ``status``, ``enqueue`` and ``worker`` take VIOLET_REDIS_URL (a
    password in ``--redis`` shows in ``ps``), help says so; none runs without a URL,
    and producers and workers refuse to start without a fleet key."""
    from violet_async.__main__ import main

    monkeypatch.delenv("VIOLET_REDIS_URL", raising=False)
    assert main(["status"]) == 2
    assert "set VIOLET_REDIS_URL" in capsys.readouterr().err
    import redis

    with redis.Redis.from_url(redis_url) as sync_redis:
        sync_redis.flushall()
    monkeypatch.setenv("VIOLET_REDIS_URL", redis_url)
    assert main(["status"]) == 0
    assert "item(s)" in capsys.readouterr().out
    monkeypatch.delenv("VIOLET_FLEET_KEY")
    assert main(["worker", "--burst"]) == 2
    assert "VIOLET_FLEET_KEY" in capsys.readouterr().err
    monkeypatch.setenv("VIOLET_FLEET_KEY", "short")
    assert main(["enqueue", "rows.csv"]) == 2
    assert "at least 16" in capsys.readouterr().err
    for command in ("status", "enqueue", "worker"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "VIOLET_REDIS_URL" in capsys.readouterr().out
