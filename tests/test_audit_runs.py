"""An audit after a real run: the batch journal's and the fleet ledger's keys line up
with the audit's (repeats of an identical row included), on FakeViolet."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from violet_async import RefundBagRequest, RetryPolicy
from violet_async.batch import AuditRow, BatchItem, audit, run_batch
from violet_async.testing import FakeViolet

from .conftest import TEST_POLICY


def _items(fake: FakeViolet) -> list[BatchItem]:
    (o1, b1), (o2, b2), (o3, b3) = fake.seeded[:3]
    ask = RefundBagRequest(amount_refunded=100, reason="incident")
    return [
        BatchItem.refund(2, o1, b1, ask),
        BatchItem.refund(3, o2, b2, ask),
        BatchItem.refund(4, o1, b1, ask),  # the same refund of the same bag, again
        BatchItem.refund(5, o3, b3, RefundBagRequest(amount_refunded=50)),
    ]


def _by_line(rows: list[AuditRow]) -> dict[int, tuple[str, bool | None]]:
    return {r.item.line: (r.audit, r.ours) for r in rows}


async def test_after_a_batch_every_row_is_as_asked_and_made_by_its_journal(
    tmp_path: Path,
) -> None:
    """run_batch with a journal, then audit with it: every row as_asked and ours (the
    repeated row's second refund is the #1 entry's); another system's refund on a bag
    afterwards makes that bag's row extra, and a row never run is missing."""
    journal = tmp_path / "run.jsonl"
    async with FakeViolet(orders=4, seed=2) as fake:
        items = _items(fake)
        async with fake.client(retry=TEST_POLICY) as client:
            outcomes = [r.outcome async for r in run_batch(client, items, journal=journal)]
            assert outcomes == ["succeeded"] * 4
            rows = [r async for r in audit(client, items, journal=journal)]
            assert _by_line(rows) == {
                2: ("as_asked", True),
                3: ("as_asked", True),
                4: ("as_asked", True),
                5: ("as_asked", True),
            }
            order_id, bag_id = fake.seeded[1]
            external = fake.another_actor_refund(order_id, bag_id, 700, status="EXTERNAL")
            (o4, b4) = fake.seeded[3]
            never = BatchItem.refund(6, o4, b4, RefundBagRequest(amount_refunded=10))
            rows = [r async for r in audit(client, [*items, never], journal=journal)]
        judged = {r.item.line: r for r in rows}
        assert judged[3].audit == "extra"
        assert judged[3].refund_ids[1:] == (external["id"],)
        assert judged[3].money == 700
        assert judged[6].audit == "missing"
        assert "the journal never sent it" in judged[6].detail
        assert judged[6].money == 10


if not os.environ.get("CI"):
    pytest.importorskip("redis")

from redis.asyncio import Redis  # noqa: E402 - after the optional-extra check

from tests import _fleet_redis  # noqa: E402
from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, keyed_items  # noqa: E402

redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for every test here


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushall()
    await RedisLedger(client).new_fleet()  # nothing of this ledger can be in flight
    try:
        yield client
    finally:
        await client.aclose()


async def test_after_a_fleet_run_the_ledger_says_who_made_each_refund(redis: Redis) -> None:
    """Items run by a FleetWorker: audit(ledger=...) finds every row as_asked and made
    by the ledger (the repeat's key is occurrence 1); an item the fleet registered but
    never ran is missing, the ledger's view said."""
    async with FakeViolet(orders=4, seed=2) as fake:
        items = _items(fake)
        policy = RetryPolicy(settle_running=0.5, settle_lag=0.2, settle_delay=0.05)
        async with fake.client(retry=policy) as client:
            ledger = RedisLedger(redis)
            worker = FleetWorker(client, ledger, BagLocks(redis), None)
            for key, item in keyed_items(items):
                await ledger.register(key, item)
                assert (await worker.run(key, item))["state"] == "applied"
            (o4, b4) = fake.seeded[3]
            never = BatchItem.refund(6, o4, b4, RefundBagRequest(amount_refunded=10))
            [(key, _)] = list(keyed_items([never]))
            await ledger.register(key, never)
            rows = [r async for r in audit(client, [*items, never], ledger=ledger)]
    assert _by_line(rows) == {
        2: ("as_asked", True),
        3: ("as_asked", True),
        4: ("as_asked", True),
        5: ("as_asked", True),
        6: ("missing", None),
    }
    missing = next(r for r in rows if r.item.line == 6)
    assert "the ledger never sent it" in missing.detail


async def test_a_ledger_that_cannot_be_read_leaves_violet_s_verdicts_standing() -> None:
    """Redis refusing connections while rows are read: each row keeps Violet's verdict,
    its ledger view says the ledger could not be read; the CLI's --redis at a dead
    Redis exits 2 having read nothing."""
    async with FakeViolet(orders=2, seed=2) as fake:
        (order_id, bag_id), _ = fake.seeded
        fake.another_actor_refund(order_id, bag_id, 100, reason="incident")
        item = BatchItem.refund(
            2, order_id, bag_id, RefundBagRequest(amount_refunded=100, reason="incident")
        )
        dead = Redis.from_url("redis://127.0.0.1:1/0")
        try:
            async with fake.client(retry=TEST_POLICY) as client:
                [row] = [r async for r in audit(client, [item], ledger=RedisLedger(dead))]
        finally:
            await dead.aclose()
        assert row.audit == "as_asked"
        assert row.journal is not None
        assert row.journal.state == "unreadable"
        assert "the ledger could not be read (ConnectionError)" in row.detail


async def test_the_cli_refuses_a_dead_redis_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--redis pointing nowhere, and --ledger without VIOLET_REDIS_URL: exit 2."""
    import io

    from violet_async._audit_cli import AuditOptions, run_audit

    rows = tmp_path / "rows.csv"
    rows.write_text("order_id,bag_id,amount_refunded\n100001,200001,100\n")
    async with FakeViolet(orders=1, seed=2) as fake:
        for name, value in {
            "VIOLET_APP_ID": str(fake.app_id),
            "VIOLET_APP_SECRET": fake.app_secret,
            "VIOLET_USERNAME": fake.username,
            "VIOLET_PASSWORD": fake.password,
            "VIOLET_BASE_URL": fake.base_url,
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("VIOLET_REDIS_URL", raising=False)
        err = io.StringIO()
        options = AuditOptions(redis="redis://127.0.0.1:1/0")
        assert await run_audit(rows, options, io.StringIO(), err) == 2
        assert "cannot reach the fleet's Redis" in err.getvalue()
        err = io.StringIO()
        assert await run_audit(rows, AuditOptions(redis=""), io.StringIO(), err) == 2
        assert "VIOLET_REDIS_URL" in err.getvalue()
        assert fake.ledger.requests["login"] == 0


async def test_the_console_script_reads_the_ledger_from_the_environment(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """`violet-async audit FILE --ledger` with VIOLET_REDIS_URL (no URL on the command
    line): the fleet-made refunds are as asked and made by the ledger; exit 0."""
    import asyncio
    import sys

    import orjson

    async with FakeViolet(orders=4, seed=2) as fake:
        items = _items(fake)
        policy = RetryPolicy(settle_running=0.5, settle_lag=0.2, settle_delay=0.05)
        async with fake.client(retry=policy) as client:
            ledger = RedisLedger(redis)
            worker = FleetWorker(client, ledger, BagLocks(redis), None)
            for key, item in keyed_items(items):
                await ledger.register(key, item)
                await worker.run(key, item)
        rows = tmp_path / "rows.jsonl"
        rows.write_bytes(
            b"".join(
                orjson.dumps({"order_id": i.order_id, "bag_id": i.bag_id, **_body(i)}) + b"\n"
                for i in items
            )
        )
        output = tmp_path / "out.jsonl"
        env = {
            **os.environ,
            "VIOLET_APP_ID": str(fake.app_id),
            "VIOLET_APP_SECRET": fake.app_secret,
            "VIOLET_USERNAME": fake.username,
            "VIOLET_PASSWORD": fake.password,
            "VIOLET_BASE_URL": fake.base_url,
            "VIOLET_REDIS_URL": redis_url,
        }
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("violet-async")),
            "audit",
            str(rows),
            "--ledger",
            "--output",
            str(output),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
    assert proc.returncode == 0, (out + err).decode()
    lines = [orjson.loads(x) for x in output.read_bytes().splitlines()]
    assert sorted((x["line"], x["audit"], x["ours"], x["journal"]) for x in lines) == [
        (1, "as_asked", True, "applied"),
        (2, "as_asked", True, "applied"),
        (3, "as_asked", True, "applied"),
        (4, "as_asked", True, "applied"),
    ]


def _body(item: BatchItem) -> dict[str, object]:
    from violet_async._converter import converter

    body: dict[str, object] = converter.unstructure(item.request)
    return body
