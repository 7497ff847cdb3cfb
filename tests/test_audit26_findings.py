"""Audit of issue 26 (pace per merchant, a 429 never fails a row): what it found.

Each test runs the real ``FleetWorker`` on a real redis-server against a scripted
aiohttp.web Violet of our own (``tests/hostile.py``, not FakeViolet), on a shared
FakeClock (Redis's own clock runs on; the lanes and the fleet's budget are set in it
directly), and fails on the code before the audit:

- a send resumed from the ledger (a worker died, or its re-send was held) left without
  taking its merchant's turn or passing the send gate;
- the fleet-wide rate limit's wait was bounded by nothing: a re-send after a 429 slept
  for its slot past the call's deadline.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

if not os.environ.get("CI"):
    pytest.importorskip("arq")
    pytest.importorskip("redis")

from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import RefundBagRequest, RetryPolicy, Timeouts
from violet_async._reconcile import KnownRefunds
from violet_async.batch import BatchItem
from violet_async.fleet import (
    BagLocks,
    FleetRateLimit,
    FleetWorker,
    RedisLedger,
    RetryLaterError,
    item_key,
)
from violet_async.testing import FakeClock

from .hostile import APP_ID, BAG_ID, ORDER_ID, VIOLET_500, Hostile, Step, hostile_client

redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for every test here

STRICT = 20001
TOO_MANY = b'{"status": 429, "message": "Too Many Requests", "error_code": 4290}'
# A settle window within the worker's patience: a run waits it out and reads back.
POLICY = RetryPolicy(
    initial_delay=0.5, max_delay=4.0, deadline=300.0, settle_running=0.3, settle_lag=0.2
)
TIMEOUTS = Timeouts(connect=1.0, read=2.0)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushall()
    await RedisLedger(client).new_fleet()  # nothing of this ledger can be in flight
    try:
        yield client
    finally:
        await client.aclose()


async def _redis_ms(redis: Redis) -> float:
    seconds, micros = await redis.time()
    return float(seconds) * 1000 + float(micros) / 1000


async def _until_applied(worker: FleetWorker, key: str, clock: FakeClock) -> dict[str, object]:
    for _ in range(10):
        try:
            return await worker.run(key)
        except RetryLaterError as exc:
            clock.advance(exc.defer)
    pytest.fail("the item never ended")


@pytest.mark.parametrize("held_at", ["turn", "gate"])
async def test_a_send_resumed_from_the_ledger_takes_its_merchants_turn_and_the_gate(
    redis: Redis, held_at: str
) -> None:
    """A run's first send gets a 500 (this server applied nothing) and its re-send is
    held at the gate: the ledger keeps the item sent. The next run resumes it, and its
    merchant's lane is still a half-minute from a free slot: at its turn (the
    reservation) or at the send gate. The resumed run sends nothing and hands the item
    back, still sent (never failed); once the lane is free it reads the bag back, sends
    again through both, and the bag is refunded once.

    Before the audit a resumed send skipped both: it left at once (a second POST into a
    lane the fleet had slowed to one a minute)."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(500, body=VIOLET_500, commit_after=None)])
    item = BatchItem.refund(
        1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300), merchant_id=STRICT
    )
    key = item_key(item)
    async with hostile_client(server, retry=POLICY, timeouts=TIMEOUTS) as client:
        worker = FleetWorker(
            client,
            RedisLedger(redis),
            BagLocks(redis, ttl=1.0, poll=0.02),
            patience=1.0,
            merchant_pace=True,
        )
        await worker.ledger.register(key, item)
        lane = f"{{violet}}:pace:{APP_ID}:{STRICT}"
        await redis.hset(lane, mapping={"rate": str(1 / 60), "tat": "0", "sent_tat": "0"})
        await redis.set(f"{{violet}}:pace:{APP_ID}:learning", "1")
        with pytest.raises(RetryLaterError, match=r"pace.*nothing was sent") as raised:
            await worker.run(key)
        assert server.posts == 1
        record = await worker.ledger.get(key)
        assert record is not None
        assert record.state == "sent"
        clock.advance(raised.value.defer)
        # The lane, half a minute from its next slot: for the item's turn, or its send.
        far = str(await _redis_ms(redis) + 30_000)
        turn, gate = (far, "0") if held_at == "turn" else ("0", far)
        fields = {"tat": turn, "sent_tat": gate}
        await redis.hset(lane, mapping=fields)
        reads = server.reads
        with pytest.raises(RetryLaterError, match=r"pace") as again:
            await worker.run(key)
        assert server.posts == 1  # the resumed send did not leave
        assert again.value.defer > 1.0  # back when its slot is near, not at once
        if held_at == "turn":
            assert server.reads == reads  # held before anything, even a read-back
        else:
            # No gate slot was taken for a send that did not leave.
            assert (await redis.hget(lane, "sent_tat") or b"").decode() == far
        record = await worker.ledger.get(key)
        assert record is not None
        assert (record.state, record.outcome, record.error) == ("sent", None, None)
        # The lane frees up: the resume reads the bag back, finds nothing, sends once,
        # and took a slot of each schedule for it.
        await redis.hset(lane, mapping={"tat": "0", "sent_tat": "0"})
        before = await _redis_ms(redis)
        clock.advance(again.value.defer)
        done = await _until_applied(worker, key, clock)
        assert done["state"] == "applied"
        assert float(await redis.hget(lane, "tat") or 0) >= before + 59_000
        assert float(await redis.hget(lane, "sent_tat") or 0) >= before + 59_000
    assert server.posts == 2
    assert len(server.refunds) == 1


async def test_the_fleet_rate_wait_is_bounded_by_the_calls_deadline(redis: Redis) -> None:
    """Without merchant pace a 429 is retried in place under the fleet's rate limit.
    The fleet's budget is half a minute from a free slot when the re-send is due (a
    backlog), and the call's deadline is 10 s: the re-send takes no slot, does not
    leave, and the item is handed back (new again, never failed, no error: the 429
    proved nothing applied, review 19); its next run sends once.

    Before the audit the re-send slept for its slot, past the deadline."""
    clock = FakeClock()
    limiter = FleetRateLimit(redis, APP_ID, rate=1000.0)
    backlog: list[str] = []

    async def budget_taken() -> None:
        # As the 429 leaves: the fleet's other workers have the next half-minute.
        if not backlog:
            backlog.append(str(await _redis_ms(redis) + 30_000))
            await redis.hset(limiter.key, "tat", backlog[0])

    server = Hostile(
        clock,
        script=[Step(429, body=TOO_MANY, headers={"Retry-After": "1"}, commit_after=None)],
        on_answer=budget_taken,
    )
    item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300))
    key = item_key(item)
    policy = RetryPolicy(
        initial_delay=0.5, max_delay=4.0, deadline=10.0, settle_running=0.3, settle_lag=0.2
    )
    async with hostile_client(server, retry=policy, timeouts=TIMEOUTS) as client:
        worker = FleetWorker(
            client,
            RedisLedger(redis),
            BagLocks(redis, ttl=1.0, poll=0.02),
            limiter,
            patience=1.0,
            merchant_pace=False,
        )
        await worker.ledger.register(key, item)
        # Bounded here only so that the old code fails rather than sleeps ~30 s.
        with pytest.raises(RetryLaterError, match=r"rate limit.*nothing was sent") as raised:
            await asyncio.wait_for(worker.run(key), 5.0)
        assert server.posts == 1  # the 429'd send only
        assert raised.value.defer > 1.0  # back when the budget is near
        record = await worker.ledger.get(key)
        assert record is not None
        # A 429 proves nothing applied: not failed, no error; new again until the
        # re-send leaves (review 19: left "sent", a run after a stop in the wait read
        # the bag back and took another system's refund made meanwhile for its own).
        assert record.state == "new"
        assert (record.outcome, record.error) == (None, None)
        # No slot was taken for the re-send that did not leave (a 429 halving the
        # fleet's rate may have moved it on by one spacing: 2 ms at 500/s).
        tat = float(await redis.hget(limiter.key, "tat") or 0)
        assert float(backlog[0]) <= tat <= float(backlog[0]) + 10
        # The budget frees up: read back, sent once.
        await redis.hset(limiter.key, "tat", "0")
        clock.advance(raised.value.defer)
        done = await _until_applied(worker, key, clock)
        assert done["state"] == "applied"
    assert server.posts == 2
    assert len(server.refunds) == 1


async def test_a_lying_429_handed_back_at_the_fleet_rate_wait_is_never_sent_twice(
    redis: Redis,
) -> None:
    """Attack on the bound above: the platform commits the refund and answers 429
    anyway, and the re-send finds the fleet's budget past its deadline. The item is
    handed back new (the 429 proved nothing applied: review 19); its next run reads the
    bag before its send, finds a refund like it and holds it, as a deferred 429's item
    does: one POST, one refund, never a second send."""
    clock = FakeClock()
    limiter = FleetRateLimit(redis, APP_ID, rate=1000.0)

    async def budget_taken() -> None:
        await redis.hset(limiter.key, "tat", str(await _redis_ms(redis) + 30_000))

    server = Hostile(
        clock,
        script=[Step(429, body=TOO_MANY, headers={"Retry-After": "1"}, commit_after=0.0)],
        on_answer=budget_taken,
    )
    item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300))
    key = item_key(item)
    policy = RetryPolicy(
        initial_delay=0.5, max_delay=4.0, deadline=10.0, settle_running=0.3, settle_lag=0.2
    )
    async with hostile_client(server, retry=policy, timeouts=TIMEOUTS) as client:
        worker = FleetWorker(
            client,
            RedisLedger(redis),
            BagLocks(redis, ttl=1.0, poll=0.02),
            limiter,
            patience=1.0,
            merchant_pace=False,
        )
        await worker.ledger.register(key, item)
        with pytest.raises(RetryLaterError, match=r"rate limit") as raised:
            await asyncio.wait_for(worker.run(key), 5.0)
        record = await worker.ledger.get(key)
        assert record is not None
        assert record.state == "new"
        server.on_answer = None
        await redis.hset(limiter.key, "tat", "0")
        clock.advance(raised.value.defer)
        done = await _until_applied(worker, key, clock)
        assert (done["state"], done["outcome"]) == ("failed", "already_present")
    assert server.posts == 1
    assert len(server.refunds) == 1


async def test_the_fleet_rate_limit_takes_no_slot_past_the_limit(redis: Redis) -> None:
    """``FleetRateLimit.wait(limit=...)``: a slot further than ``limit`` after
    ``earliest`` is not taken (the negative wait says how far); within it, taken."""
    limiter = FleetRateLimit(redis, 12, rate=0.5)  # a slot every 2 s
    assert await limiter.wait(limit=0.0) == 0.0  # free: taken at once
    tat = await redis.hget(limiter.key, "tat")
    waited = await limiter.wait(limit=1.0)
    assert waited < -1.9  # 2 s away, past 1 s: nothing taken
    assert await redis.hget(limiter.key, "tat") == tat
    # From an earliest of 1.5 s, the slot is 0.5 s after it: within a limit of 1 s.
    reserve = limiter._reserve
    got = float(await reserve(keys=[limiter.key], args=[0.5, 1500.0, 1000.0])) / 1000
    assert 0.4 < got <= 0.5
    assert await redis.hget(limiter.key, "tat") != tat


def test_known_refunds_by_bag_and_owner_match_a_scan() -> None:
    """The refunds on a bag and of an owner (asked for every batch and fleet call) are
    kept by index, not scanned: under adds, owner updates and evictions, they answer
    exactly what a scan of every known refund would."""
    rng = random.Random(26)
    known = KnownRefunds(capacity=50)
    for _ in range(2_000):
        refund_id = rng.randrange(300)
        bag = rng.choice([None, 1, 2, 3, 4])
        owner = rng.choice([None, "a", "b", "c"])
        known.add(refund_id, bag, owner)
        ids = known._ids
        for bag_id in (1, 2, 3, 4):
            for besides in (None, "a", "b"):
                scan = frozenset(
                    r
                    for r, (b, o) in ids.items()
                    if b == bag_id and (besides is None or o != besides)
                )
                assert known.on_bag(bag_id, besides=besides) == scan
        for who in ("a", "b", "c"):
            assert known.owned_by(who) == frozenset(r for r, (_, o) in ids.items() if o == who)
        assert len(known) <= 50


async def test_the_run_summary_and_output_count_requests_and_429s_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "Count what a refund costs": a batch across a strict merchant (429s over its
    limit) and a free one. The summary's requests and 429s (total and a row) and the
    output's per-row ``requests`` and ``rate_limited`` are what the server answered:
    every 429 it sent is counted, and every row succeeded (a 429 is never a failure)."""
    from violet_async._batch_cli import BatchOptions, run_file
    from violet_async.testing import FakeViolet

    async with FakeViolet(
        orders=12, seed=26, merchants=2, merchant_limits={STRICT: 8.0}, merchant_limit=1e9
    ) as fake:
        for name, value in {
            "VIOLET_APP_ID": str(fake.app_id),
            "VIOLET_APP_SECRET": fake.app_secret,
            "VIOLET_USERNAME": fake.username,
            "VIOLET_PASSWORD": fake.password,
            "VIOLET_BASE_URL": fake.base_url,
        }.items():
            monkeypatch.setenv(name, value)
        path = tmp_path / "in.csv"
        lines = ["order_id,bag_id,amount_refunded"]
        lines += [f"{order_id},{bag_id},100" for order_id, bag_id in fake.seeded]
        path.write_text("\n".join(lines) + "\n")
        out, err = io.StringIO(), io.StringIO()
        output = tmp_path / "out.jsonl"
        code = await run_file("refund", path, BatchOptions(output=output), out=out, err=err)
        limits = fake.merchant_limits
        assert limits is not None
        answered_429 = limits.limited
        strict = sum(1 for o, b in fake.seeded if fake.bag(o, b).merchant_id == STRICT)
    assert code == 0, err.getvalue()
    assert 0 < strict < 12  # both merchants have rows
    rows = [orjson.loads(x) for x in output.read_bytes().splitlines()]
    assert {r["outcome"] for r in rows} == {"succeeded"}
    assert len(rows) == 12
    requests = sum(r["requests"] for r in rows)
    limited = sum(r["rate_limited"] for r in rows)
    assert limited == answered_429  # every 429 the server sent, on its row
    # A row is a baseline read and a POST at least, plus one POST a 429.
    assert all(r["requests"] >= 2 + r["rate_limited"] for r in rows)
    summary = out.getvalue()
    line = (
        f"requests {requests} ({requests / 12:.2f} a row; 429s {limited}, {limited / 12:.2f} a row)"
    )
    assert line in " ".join(summary.split())


async def test_fake_server_has_a_strict_merchant_to_rehearse_a_run_against() -> None:
    """`fake-server --merchants 2 --strict-merchant RATE` (FakeViolet's per-merchant
    limits, so an operator can see pacing before a real run): the strict merchant's
    second refund within its limit gets Violet's 429 with a Retry-After, nothing
    applied; the other merchant's bags are not limited."""
    import signal
    import sys

    from violet_async import RateLimitError, VioletClient

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "violet_async",
        "fake-server",
        "--port",
        "0",
        "--orders",
        "3",
        "--merchants",
        "2",
        "--strict-merchant",
        "0.01",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        exports: dict[str, str] = {}
        while len(exports) < 5:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, "fake-server ended before its export lines"
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").strip().partition("=")
                exports[name] = value
        once = RetryPolicy(max_attempts=1)
        async with VioletClient(
            int(exports["VIOLET_APP_ID"]),
            exports["VIOLET_APP_SECRET"],
            username=exports["VIOLET_USERNAME"],
            password=exports["VIOLET_PASSWORD"],
            base_url=exports["VIOLET_BASE_URL"],
            retry=once,
        ) as client:
            # Orders 100001 and 100003 are merchant 20001's; 100002 is 20002's.
            first = await client.refund_bag(100001, 200001, RefundBagRequest(amount_refunded=100))
            assert first.amount == 100
            with pytest.raises(RateLimitError) as limited:
                await client.refund_bag(100003, 200003, RefundBagRequest(amount_refunded=100))
            assert limited.value.status == 429
            # The next token, 100 s after the first.
            assert float(limited.value.headers["Retry-After"]) > 50
            other = await client.refund_bag(100002, 200002, RefundBagRequest(amount_refunded=100))
            assert other.amount == 100
            assert list(await client.list_bag_refunds(100003, 200003)) == []  # nothing applied
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--strict-merchant", "0"), ("--merchant-limit", "-1"), ("--merchant-limit", "nan")],
)
def test_fake_server_refuses_a_limit_that_is_not_a_rate(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from violet_async.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["fake-server", "--port", "0", option, value])
    assert exited.value.code == 2
    assert option in capsys.readouterr().err
