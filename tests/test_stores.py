"""The record stores: the claim rule every store shares, SQLiteStore's file (0600, WAL,
retention, a record someone else wrote), RedisStore on a real redis-server, and two
processes on one SQLite file: one POST; a process killed with its POST in flight
leaves a record the next process resumes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from violet_async import IdempotencyKeyReusedError, RecordStoreError, RefundBagRequest, RetryPolicy
from violet_async._ask import PendingRefund, Phase, sent_once
from violet_async._converter import structure
from violet_async.models import OrderRefund
from violet_async.stores import (
    DEFAULT_RETENTION,
    Claim,
    KeyEntry,
    MemoryStore,
    RecordStore,
    RedisStore,
    SQLiteStore,
    store_from_url,
)
from violet_async.stores._base import decide
from violet_async.testing import FakeClock

from ._fleet_redis import redis_url  # noqa: F401 - the fixture
from .hostile import APP_ID, BAG_ID, ORDER_ID, SECRET, Hostile, Step, hostile_client
from .samples import refund_body

ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
NOW = 1_700_000_000.0


def _ask(amount: int = 300, phase: Phase = Phase.NEW) -> PendingRefund:
    return PendingRefund(
        "refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=amount), phase=phase
    )


def _refund() -> OrderRefund:
    return structure(refund_body(), OrderRefund, body=b"", status=200, method="", path="")


class Steady:
    """A monotonic clock the test sets (the stores count retention on it and on the
    wall clock their calls pass, at once)."""

    def __init__(self, at: float = NOW) -> None:
        self.at = at

    def monotonic(self) -> float:
        return self.at


def _fresh(owner: str = "me", amount: int = 300) -> KeyEntry:
    return KeyEntry("k", _ask(amount), owner=owner, lease_until=NOW + 30)


# -- the rule -----------------------------------------------------------------------


def test_decide_table() -> None:
    """Every case of the claim rule: what a call finds, and what is written."""
    fresh = _fresh()
    sent = KeyEntry("k", sent_once("refund", ORDER_ID, BAG_ID, fresh.ask.request, NOW))

    def run(current: KeyEntry | None, *, now: float = NOW) -> tuple[Claim, bool]:
        claim, _, write = decide(current, fresh, now=now, retention=60)
        return claim, write is not None

    assert run(None) == (Claim.OWNED, True)
    assert run(KeyEntry("k", _ask(999))) == (Claim.REUSED, False)
    applied = KeyEntry("k", _ask(phase=Phase.APPLIED), refund=_refund(), finished_at=NOW)
    assert run(applied) == (Claim.FINISHED, False)
    # Past retention (wall-clock time, which can step): the same request still gets
    # its refund; only another request under the key finds it free.
    assert run(applied, now=NOW + 61) == (Claim.FINISHED, False)
    other = attrs.evolve(applied, ask=_ask(999, Phase.APPLIED))
    assert run(other, now=NOW + 61) == (Claim.OWNED, True)
    assert run(other, now=NOW + 59) == (Claim.REUSED, False)
    failed = KeyEntry("k", _ask(phase=Phase.FAILED), finished_at=NOW)
    assert run(failed) == (Claim.OWNED, True)
    assert run(attrs.evolve(failed, ask=_ask(999, Phase.FAILED))) == (Claim.REUSED, False)
    live = attrs.evolve(sent, owner="other", lease_until=NOW + 1)
    assert run(live) == (Claim.BUSY, False)
    assert run(attrs.evolve(live, lease_until=NOW)) == (Claim.OWNED, True)  # lease over
    assert run(attrs.evolve(live, owner="me")) == (Claim.OWNED, True)  # our own, dead call
    assert run(sent) == (Claim.OWNED, True)
    _, taken, _ = decide(sent, fresh, now=NOW, retention=60)
    assert taken.ask == sent.ask  # resumed, never replaced by a NEW ask
    assert taken.owner == "me"


def test_entries_round_trip_through_json() -> None:
    """An entry with its refund (reconciled, request id) reads back equal."""
    refund = attrs.evolve(_refund(), reconciled=True, request_id="req-1")
    entry = KeyEntry(
        "k", _ask(phase=Phase.APPLIED), refund=refund, owner=None, finished_at=NOW + 0.5
    )
    assert KeyEntry.from_json(entry.to_json()) == entry


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[]", b'{"v": 2, "key": "k"}', b'{"v": 1, "key": "k", "ask": {}}'],
)
def test_an_entry_someone_else_wrote_is_refused(raw: bytes) -> None:
    """Anything in a shared file may have been written by someone else: a ValueError."""
    with pytest.raises(ValueError):  # noqa: PT011 - RequestValidationError is one too
        KeyEntry.from_json(raw)


def test_store_from_url() -> None:
    """VIOLET_STORE values: sqlite:/// (relative or absolute), redis://, memory."""
    assert isinstance(store_from_url("memory"), MemoryStore)
    relative = store_from_url("sqlite:///keys.db")
    assert isinstance(relative, SQLiteStore)
    assert relative.path == Path("keys.db")
    absolute = store_from_url("sqlite:////var/lib/keys.db")
    assert isinstance(absolute, SQLiteStore)
    assert absolute.path == Path("/var/lib/keys.db")
    assert isinstance(store_from_url("redis://127.0.0.1:1/0"), RedisStore)
    with pytest.raises(ValueError, match="VIOLET_STORE"):
        store_from_url("sqlite:///")


@pytest.mark.parametrize("value", [0, -1, True, "60"])
def test_store_settings_are_checked(value: Any) -> None:
    """retention and lease must be positive numbers of seconds."""
    with pytest.raises(ValueError, match="retention"):
        MemoryStore(retention=value)
    with pytest.raises(ValueError, match="lease"):
        SQLiteStore("x.db", lease=value)


def test_the_default_retention_is_a_day() -> None:
    """Documented: finished keys are kept 24 hours by default."""
    assert DEFAULT_RETENTION == 86_400
    assert MemoryStore().retention == SQLiteStore("x.db").retention == DEFAULT_RETENTION


async def test_memory_store_never_drops_a_finished_key_before_its_retention_ends() -> None:
    """Finished keys go after retention, never before (a key dropped early would send
    its refund again). Full of finished keys within retention, the store refuses a NEW
    key (fail closed, a typed error naming max_finished); stored keys still answer, and
    a key is accepted again once one has passed its retention."""
    steady = Steady()
    store = MemoryStore(retention=10, max_finished=2, monotonic=steady.monotonic)
    for n in range(2):
        await store.claim(attrs.evolve(_fresh(), key=f"f{n}"), NOW)
        await store.save(KeyEntry(f"f{n}", _ask(phase=Phase.FAILED), finished_at=NOW + n), "me")
    with pytest.raises(RecordStoreError, match="max_finished=2") as caught:
        await store.claim(attrs.evolve(_fresh(), key="new"), NOW + 2)
    assert caught.value.key == "new"
    assert await store.load("new") is None
    assert await store.load("f0") is not None  # within retention: kept
    # f0 passes its retention: it goes, and a new key fits again.
    steady.at = NOW + 10
    assert (await store.claim(attrs.evolve(_fresh(), key="open"), NOW + 10))[0] is Claim.OWNED
    assert await store.load("f0") is None
    assert await store.load("f1") is not None
    steady.at = NOW + 100
    await store.claim(attrs.evolve(_fresh(), key="x"), NOW + 100)
    assert await store.load("f1") is None  # past retention
    assert await store.load("open") is not None  # never finished: kept


async def test_memory_store_counts_a_key_finished_again_once() -> None:
    """A key saved finished twice (a pending ask settled later) takes one place."""
    store = MemoryStore(retention=10, max_finished=2)
    await store.claim(attrs.evolve(_fresh(), key="a"), NOW)
    await store.save(KeyEntry("a", _ask(phase=Phase.FAILED), finished_at=NOW), "me")
    await store.save(KeyEntry("a", _ask(phase=Phase.FAILED), finished_at=NOW + 1), "me")
    assert (await store.claim(attrs.evolve(_fresh(), key="b"), NOW + 1))[0] is Claim.OWNED


# -- SQLite -------------------------------------------------------------------------


async def test_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    """The file is created 0600 and runs in WAL mode with full sync."""
    path = tmp_path / "keys.db"
    async with SQLiteStore(path) as store:
        await store.claim(_fresh(), NOW)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        wal = path.with_name("keys.db-wal")
        assert wal.exists()
        assert stat.S_IMODE(os.stat(wal).st_mode) == 0o600
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_sqlite_sweeps_finished_keys_past_retention(tmp_path: Path) -> None:
    """A finished key past retention is deleted by a later claim; a repeat then starts
    a fresh ask."""
    steady = Steady()
    async with SQLiteStore(tmp_path / "k.db", retention=10, monotonic=steady.monotonic) as store:
        await store.claim(_fresh(), NOW)
        done = KeyEntry("k", _ask(phase=Phase.APPLIED), refund=_refund(), finished_at=NOW)
        assert await store.save(done, "me")
        assert (await store.claim(_fresh(), NOW + 5))[0] is Claim.FINISHED
        steady.at = NOW + 100
        await store.claim(attrs.evolve(_fresh(), key="sweep"), NOW + 100)
        assert await store.load("k") is None


async def test_sqlite_renew_moves_only_the_lease(tmp_path: Path) -> None:
    """renew touches the lease, only for its owner."""
    fresh = _fresh()  # every record has its own identity (ask_id): build it once
    async with SQLiteStore(tmp_path / "k.db") as store:
        await store.claim(fresh, NOW)
        assert await store.renew("k", "me", NOW + 99)
        assert not await store.renew("k", "someone", NOW + 999)
        entry = await store.load("k")
        assert entry is not None
        assert entry.lease_until == NOW + 99
        assert entry.ask == fresh.ask


async def test_a_record_someone_else_wrote_is_a_store_error(tmp_path: Path) -> None:
    """A corrupt row under the key: RecordStoreError, nothing sent."""
    path = tmp_path / "k.db"
    async with SQLiteStore(path) as store:
        await store.claim(_fresh(), NOW)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE violet_keys SET entry = ?", (b"garbage",))
    server = Hostile(FakeClock())
    async with SQLiteStore(path) as store, hostile_client(server, store=store) as client:
        with pytest.raises(RecordStoreError, match="nothing was sent"):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="k")
    assert server.posts == 0


async def test_a_closed_sqlite_store_is_a_store_error(tmp_path: Path) -> None:
    """A store closed under the client: RecordStoreError, nothing sent."""
    server = Hostile(FakeClock())
    store = SQLiteStore(tmp_path / "k.db")
    await store.aclose()
    async with hostile_client(server, store=store) as client:
        with pytest.raises(RecordStoreError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="k")
    assert server.posts == 0


# -- Redis --------------------------------------------------------------------------


async def test_redis_store_keys(redis_url: str) -> None:  # noqa: F811 - the fixture
    """On a real redis-server: the key path end to end (one POST, the refund again, a
    reused key refused) and a finished key expiring after retention."""
    server = Hostile(FakeClock())
    async with (
        RedisStore(redis_url, prefix="test-keys:", retention=600) as store,
        hostile_client(server, retry=ROOMY, store=store) as client,
    ):
        first = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="r")
        again = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="r")
        assert again == first
        with pytest.raises(IdempotencyKeyReusedError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=1, idempotency_key="r")
        stored = f"{client._key_scope()} r"  # keys are scoped by app and host
        ttl = await store._redis.pttl(f"test-keys:{stored}")
        assert 0 < ttl <= 600_000
        entry = await store.load(stored)
        assert entry is not None
        assert entry.refund == first
        assert not await store.renew(stored, "nobody", NOW)
    assert server.posts == 1


async def test_redis_store_claims_are_atomic(redis_url: str) -> None:  # noqa: F811
    """Twenty owners claim one key at once: exactly one owns it, the rest are busy."""
    stores = [RedisStore(redis_url, prefix="test-atomic:") for _ in range(20)]
    try:
        claims = await asyncio.gather(
            *(s.claim(_fresh(owner=f"o{n}"), NOW) for n, s in enumerate(stores))
        )
    finally:
        for s in stores:
            await s.aclose()
    assert sorted(c.value for c, _ in claims) == ["busy"] * 19 + ["owned"]


# -- processes ----------------------------------------------------------------------

_CALLER = """
import asyncio, sys
from violet_async import VioletClient, RetryPolicy
from violet_async.stores import SQLiteStore

async def main():
    url, path, key, lease = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    async with SQLiteStore(path, lease=lease) as store, VioletClient(
        {app_id}, {secret!r}, username="u", password="p", base_url=url, store=store,
        retry=RetryPolicy(deadline=60.0),
    ) as client:
        print("calling", flush=True)
        refund = await client.refund_bag({order}, {bag}, amount_refunded=300, idempotency_key=key)
        print("refund", refund.id, flush=True)

asyncio.run(main())
"""


async def _caller(url: str, path: Path, key: str, lease: float) -> asyncio.subprocess.Process:
    script = _CALLER.format(app_id=APP_ID, secret=SECRET, order=ORDER_ID, bag=BAG_ID)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        url,
        str(path),
        key,
        str(lease),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_two_processes_one_sqlite_file_one_key_one_post(tmp_path: Path) -> None:
    """Two processes call with one key on one file, the first's POST held while the
    second starts: one POST, and both print the same refund."""
    gate = asyncio.Event()
    server = _GatedPosts(FakeClock(), gate=gate)
    path = tmp_path / "shared.db"
    async with hostile_client(server) as client:
        url = client.base_url
        procs = [await _caller(url, path, "two-procs", 30.0) for _ in range(2)]
        for proc in procs:
            assert proc.stdout is not None
            assert (await proc.stdout.readline()).strip() == b"calling"
        await server.post_arrived.wait()
        gate.set()
        outputs = [await proc.communicate() for proc in procs]
    lines = [out.decode().strip() for out, _ in outputs]
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in outputs]
    assert lines[0] == lines[1] == f"refund {server.ours[0]}"
    assert server.posts == 1


async def test_a_process_killed_with_its_post_in_flight_is_resumed_by_the_next(
    tmp_path: Path,
) -> None:
    """A process is killed (SIGKILL) with its POST held at Violet; the next one with the
    same key waits out the dead one's lease, then resumes the ask: reads back, finds
    the refund once it commits. One POST, one refund."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(hang=True, commit_after=5.0)])
    path = tmp_path / "shared.db"
    async with hostile_client(server) as client:
        proc = await _caller(client.base_url, path, "killed", 2.0)
        await server.post_arrived.wait()
        proc.kill()
        await proc.communicate()
    async with (
        SQLiteStore(path, lease=2.0) as store,
        hostile_client(server, retry=ROOMY, store=store) as client,
    ):
        entry = await store.load(f"{client._key_scope()} killed")
        assert entry is not None
        assert entry.ask.phase is Phase.SENT
        refund = await client.refund_bag(
            ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="killed"
        )
    assert refund.reconciled
    assert refund.id == server.ours[0]
    assert server.posts == 1
    assert len(server.ours) == 1


@attrs.define
class _GatedPosts(Hostile):
    gate: asyncio.Event = attrs.Factory(asyncio.Event)

    async def _post(self, request: Any, *, cancel: bool) -> Any:
        self.post_arrived.set()
        await self.gate.wait()
        return await super()._post(request, cancel=cancel)


def _unused(store: RecordStore) -> None:
    """Every store is a RecordStore (checked by mypy on this file)."""


_unused(MemoryStore())
_unused(SQLiteStore("never-opened.db"))


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_wall_clock_stepped_past_retention_sweeps_nothing(kind: str, tmp_path: Any) -> None:
    """The wall clock steps forward past the retention (two +15 h NTP steps, simulator
    seed 606320) while no real time passes: no finished key is swept, by this claim or
    any other's, so the same request under a key gets its refund again, sending
    nothing. Once retention has passed on the monotonic clock too, finished keys go,
    except the one being claimed (its own request answers however old)."""
    steady = Steady()
    store: Any = (
        MemoryStore(retention=60, monotonic=steady.monotonic)
        if kind == "memory"
        else SQLiteStore(tmp_path / "k.db", retention=60, monotonic=steady.monotonic)
    )
    try:
        applied = KeyEntry("k", _ask(phase=Phase.APPLIED), refund=_refund(), finished_at=NOW)
        gone = KeyEntry("g", _ask(phase=Phase.APPLIED), refund=_refund(), finished_at=NOW)
        for entry in (applied, gone):
            mine = KeyEntry(entry.key, _ask(), owner="me", lease_until=NOW + 30)
            claim, _ = await store.claim(mine, NOW)
            assert claim is Claim.OWNED
            assert await store.save(entry, "me")
        stepped = NOW + 30 * 3_600.0
        other = KeyEntry("o", _ask(), owner="me", lease_until=stepped + 30)
        assert (await store.claim(other, stepped))[0] is Claim.OWNED  # another key first
        claim, entry = await store.claim(_fresh(), stepped + 60)
        assert claim is Claim.FINISHED
        assert entry.refund == applied.refund
        assert await store.load("g") is not None  # nothing swept on a stepped clock
        steady.at = NOW + 120  # real time passes the retention too
        claim, entry = await store.claim(_fresh(), stepped + 120)
        assert claim is Claim.FINISHED  # the claimed key: its own request, however old
        assert await store.load("g") is None  # swept now
    finally:
        await store.aclose()


async def test_a_process_started_after_a_step_sweeps_nothing_early(tmp_path: Path) -> None:
    """Two processes on one SQLite file (one machine, one monotonic clock). The first
    finishes a key; the wall clock then steps forward past the retention (two +15 h
    steps, simulator seed 853436); a second process opened only after the steps has no
    reading of its own from before them, so by its own clocks the key looks old. The
    file's reading (wall and monotonic time together, from its first sweep) tells it
    otherwise: nothing is swept until retention has passed on the monotonic clock."""
    steady = Steady()
    path = tmp_path / "k.db"
    async with SQLiteStore(path, retention=60, monotonic=steady.monotonic) as first:
        done = KeyEntry("k", _ask(phase=Phase.APPLIED), refund=_refund(), finished_at=NOW)
        mine = KeyEntry("k", _ask(), owner="me", lease_until=NOW + 30)
        assert (await first.claim(mine, NOW))[0] is Claim.OWNED
        assert await first.save(done, "me")
    stepped = NOW + 30 * 3_600.0
    steady.at += 5  # five real seconds later
    async with SQLiteStore(path, retention=60, monotonic=steady.monotonic) as second:
        other = KeyEntry("o", _ask(), owner="you", lease_until=stepped + 30)
        assert (await second.claim(other, stepped))[0] is Claim.OWNED  # sweeps first
        assert await second.load("k") is not None, "a finished key swept on a stepped clock"
        claim, entry = await second.claim(_fresh(), stepped + 1)
        assert claim is Claim.FINISHED
        assert entry.refund == done.refund
    steady.at += 120  # retention passes on the monotonic clock too
    async with SQLiteStore(path, retention=60, monotonic=steady.monotonic) as third:
        other = KeyEntry("o2", _ask(), owner="them", lease_until=stepped + 200)
        await third.claim(other, stepped + 125)
        assert await third.load("k") is None  # swept now


async def test_a_reboot_reanchors_the_files_clock(tmp_path: Path) -> None:
    """Monotonic time lower than the file's reading: the machine rebooted; the file
    takes the clock as it is (the wall clock alone then counts retention from here)."""
    steady = Steady()
    path = tmp_path / "k.db"
    async with SQLiteStore(path, retention=60, monotonic=steady.monotonic) as first:
        done = KeyEntry("k", _ask(phase=Phase.APPLIED), refund=_refund(), finished_at=NOW)
        mine = KeyEntry("k", _ask(), owner="me", lease_until=NOW + 30)
        await first.claim(mine, NOW)
        assert await first.save(done, "me")
    steady.at = 3.0  # after a reboot
    async with SQLiteStore(path, retention=60, monotonic=steady.monotonic) as second:
        other = KeyEntry("o", _ask(), owner="you", lease_until=NOW + 3_600)
        await second.claim(other, NOW + 3_000)
        assert await second.load("k") is None  # an hour of wall time: swept
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT wall, mono FROM violet_clock").fetchone() == (NOW + 3_000, 3.0)
