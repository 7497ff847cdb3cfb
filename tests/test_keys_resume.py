"""One record per ask across the key path and ``client.resume``: a pending record of a
keyed call carries its key (through JSON, as a job queue would carry it), and resuming
it goes through the key's own entry in the store. A resume in one client and a repeat
of the keyed call in another (two engines on one SQLite file, as two processes would
be) are one ask under one lease: one re-send at most, one refund, and both callers get
it. Refunds are counted from the scripted server's own record (tests/hostile.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from violet_async import (
    AmbiguousOutcomeError,
    APIConnectionError,
    APITimeoutError,
    BagPendingError,
    OrderRefund,
    PendingRefund,
    RecordStoreError,
    RefundBagRequest,
    RequestValidationError,
    RetryPolicy,
    VioletClient,
)
from violet_async._ask import Phase, merged
from violet_async._engine import resumable
from violet_async.stores import Claim, KeyEntry, MemoryStore, RedisStore, SQLiteStore
from violet_async.testing import FakeClock

from ._fleet_redis import redis_url  # noqa: F401 - the fixture
from .hostile import (
    APP_ID,
    BAG_ID,
    GATEWAY_504,
    ORDER_ID,
    SECRET,
    Hostile,
    Step,
    hostile_client,
)
from .test_keys import Gated, _until

SHORT = RetryPolicy(deadline=20.0)
ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
KEY = "rma-25"


def _json(record: PendingRefund) -> PendingRefund:
    """The record as a job queue hands it back."""
    return PendingRefund.from_json(record.to_json())


async def _pending(call: Awaitable[OrderRefund]) -> PendingRefund:
    with pytest.raises(AmbiguousOutcomeError) as info:
        await call
    assert info.value.pending is not None
    return info.value.pending


def _keyed(client: VioletClient) -> Awaitable[OrderRefund]:
    return client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key=KEY)


@contextlib.asynccontextmanager
async def _two(
    server: Hostile, path: Path, **options: Any
) -> AsyncIterator[tuple[VioletClient, VioletClient]]:
    """Two clients, each with its own engine and its own SQLiteStore on one file."""
    async with (
        SQLiteStore(path) as one_store,
        SQLiteStore(path) as two_store,
        hostile_client(server, store=one_store, **options) as one,
        hostile_client(server, store=two_store, **options) as two,
    ):
        yield one, two


_ASK_AGAIN = (AmbiguousOutcomeError, RecordStoreError, APIConnectionError)


def _told_to_ask_again(exc: BaseException) -> bool:
    """Pending, "taken over by another process: call again with the same key", or a
    deadline passed before anything was sent (two callers on one virtual clock: one's
    waits are instant and move the other's deadline while it waits on SQLite's thread),
    here or in the ask the resume finds ended so: each tells the caller to ask again
    with the key, which is what a caller does."""
    if isinstance(exc, APIConnectionError) and exc.request_sent:
        return False
    return isinstance(exc, _ASK_AGAIN)


async def _again(
    exc: BaseException, again: Callable[[], Awaitable[OrderRefund]], clock: FakeClock | None
) -> OrderRefund:
    """The outcome of calling ``again()`` until it is known (five tries), after a call
    that ended with ``exc``. ``clock``: a caller told to resume later does so later (30 s
    before each try): a call that parks at once, its deadline short of the settle
    window, moves no virtual time."""
    if not _told_to_ask_again(exc):
        raise exc
    for _ in range(5):
        if clock is not None:
            clock.advance(30.0)
        with contextlib.suppress(AmbiguousOutcomeError, RecordStoreError, APITimeoutError):
            return await again()
    raise exc


async def _settled(
    call: Awaitable[OrderRefund],
    again: Callable[[], Awaitable[OrderRefund]],
    clock: FakeClock | None = None,
) -> OrderRefund:
    """The call's refund; if it ended pending (its deadline came while another owner
    held the ask), the outcome of calling ``again()`` until it is known."""
    try:
        return await call
    except _ASK_AGAIN as exc:
        return await _again(exc, again, clock)


async def _race(
    *calls: tuple[Awaitable[OrderRefund], Callable[[], Awaitable[OrderRefund]]],
    clock: FakeClock | None = None,
) -> list[OrderRefund]:
    """Every call at once (the race under test); then each caller told to ask again
    does so, one caller at a time. Two callers retrying at once on one virtual clock
    move each other's deadlines and leases (one's instant waits advance the clock the
    other is mid-write on, on SQLite's thread), round after round: a livelock of the
    harness's shared clock, which callers on a real clock do not share."""

    async def first(call: Awaitable[OrderRefund]) -> OrderRefund | BaseException:
        try:
            return await call
        except _ASK_AGAIN as exc:
            return exc

    firsts = await asyncio.gather(*(first(call) for call, _ in calls))
    return [
        got if isinstance(got, OrderRefund) else await _again(got, again, clock)
        for got, (_, again) in zip(firsts, calls, strict=True)
    ]


# -- the record carries its key ------------------------------------------------------


async def test_a_keyed_calls_pending_record_carries_its_key_through_json() -> None:
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    async with hostile_client(server, retry=SHORT) as client:
        pending = await _pending(_keyed(client))
    assert pending.idempotency_key == KEY
    assert _json(pending).idempotency_key == KEY
    assert _json(pending) == pending


def test_a_record_without_a_key_writes_and_reads_as_before() -> None:
    record = PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=1))
    assert "idempotency_key" not in record.to_dict()
    assert PendingRefund.from_dict(record.to_dict()).idempotency_key is None


@pytest.mark.parametrize("bad", [7, "", "x" * 256, "a\nb"])
def test_a_record_with_a_bad_key_is_refused_naming_the_field(bad: object) -> None:
    data = PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest()).to_dict()
    data["idempotency_key"] = bad
    with pytest.raises(RequestValidationError) as info:
        PendingRefund.from_dict(data)
    assert info.value.field == "pending.idempotency_key"


async def test_resume_refuses_a_record_built_with_a_bad_key_sending_nothing() -> None:
    server = Hostile(FakeClock())
    record = attrs.evolve(
        PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(), phase=Phase.PENDING),
        idempotency_key="a\x00b",
    )
    async with hostile_client(server) as client:
        with pytest.raises(RequestValidationError) as info:
            await client.resume(record)
    assert info.value.field == "pending.idempotency_key"
    assert (server.posts, server.reads) == (0, 0)


def test_merged_keeps_the_key_either_record_has() -> None:
    base = PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(), phase=Phase.PENDING)
    keyed = attrs.evolve(base, idempotency_key=KEY, sends=2)
    assert merged(base, keyed).idempotency_key == KEY
    assert merged(keyed, base).idempotency_key == KEY


# -- a resume and a repeat of the keyed call: one ask ------------------------------------


@pytest.mark.parametrize("resend", ["answered", "dropped"])
async def test_a_resume_and_a_keyed_repeat_in_two_clients_refund_once(
    tmp_path: Path, resend: str
) -> None:
    """The keyed call ends pending (its POST never committed). Past the settle window,
    client one resumes the record (through JSON) while client two repeats the keyed
    call, at once: one re-send, one refund, and both get it. ``dropped``: the re-send
    commits and its answer is lost (a 504), so it is found by reading back."""
    clock = FakeClock()
    second = Step() if resend == "answered" else Step(504, GATEWAY_504, commit_after=0.0)
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None), second])
    async with _two(server, tmp_path / "k.db", retry=SHORT) as (one, two):
        pending = await _pending(_keyed(one))
        clock.advance(120.0)
        record = _json(pending)
        got = await _race(
            # A resume told its ask ended not sent (two's deadline ran out before its
            # re-send left, moved by one's polls on the shared virtual clock) asks again
            # with the key, as a caller does: resumed again, it is told so again.
            (one.resume(record), lambda: _keyed(one)),
            (_keyed(two), lambda: _keyed(two)),
        )
        again = await _settled(_keyed(one), lambda: _keyed(one)), await two.resume(record)
    assert len(server.ours) == 1, f"{len(server.ours)} refunds, {server.posts} POSTs"
    assert server.posts == 2
    assert {r.id for r in (*got, *again)} == {server.ours[0]}


async def test_over_redis_a_resume_and_a_keyed_repeat_refund_once(
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """The same race with the key's record in a real redis-server (two RedisStores)."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    prefix = "test-keys-resume:"
    async with (
        RedisStore(redis_url, prefix=prefix) as one_store,
        RedisStore(redis_url, prefix=prefix) as two_store,
        hostile_client(server, store=one_store, retry=SHORT) as one,
        hostile_client(server, store=two_store, retry=SHORT) as two,
    ):
        pending = await _pending(_keyed(one))
        clock.advance(120.0)
        record = _json(pending)
        got = await _race(
            # A resume told its ask ended not sent (two's deadline ran out before its
            # re-send left, moved by one's polls on the shared virtual clock) asks again
            # with the key, as a caller does: resumed again, it is told so again.
            (one.resume(record), lambda: _keyed(one)),
            (_keyed(two), lambda: _keyed(two)),
        )
        entry = await two_store.load(f"{two._key_scope()} {KEY}")
        keys = await one_store._redis.keys(f"{prefix}*")
    assert len(server.ours) == 1, f"{len(server.ours)} refunds, {server.posts} POSTs"
    assert {r.id for r in got} == {server.ours[0]}
    assert entry is not None
    assert entry.refund is not None
    assert entry.refund.id == server.ours[0]
    # One record: the key's, none under the ask's id (besides the store's epoch).
    assert len(set(keys) - {one_store.epoch_key.encode()}) == 1


@pytest.mark.parametrize("first", ["keyed", "resume"])
async def test_whichever_comes_first_the_other_waits_for_its_outcome(
    tmp_path: Path, first: str
) -> None:
    """One client's re-send is held at Violet (it holds the key's lease); the other
    client, with the resume or the keyed repeat, sends nothing while it runs and ends
    pending with the holder's record (its second send), then gets the holder's refund
    with no request of its own."""
    clock = FakeClock()
    server = Gated(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    async with _two(server, tmp_path / "k.db", retry=SHORT) as (one, two):
        pending = await _pending(_keyed(one))
        clock.advance(120.0)
        record = _json(pending)
        gate = server.post_gate = asyncio.Event()
        server.post_arrived.clear()
        if first == "keyed":
            holder = asyncio.ensure_future(_keyed(two))
            waiter: Any = lambda: one.resume(record)  # noqa: E731
        else:
            holder = asyncio.ensure_future(one.resume(record))
            waiter = lambda: _keyed(two)  # noqa: E731
        await server.post_arrived.wait()
        try:
            with pytest.raises(AmbiguousOutcomeError) as info:
                await waiter()
            assert server.posts == 1  # the held re-send is counted once it is let in
        finally:
            gate.set()
        held = await _settled(holder, waiter)
        got = await waiter()
    if first == "keyed":
        # The resume's wait ends with the record: it carries the key and the re-send.
        waited = info.value.pending
        assert waited is not None
        assert waited.idempotency_key == KEY
        assert waited.sends == 2
    assert server.posts == 2
    assert len(server.ours) == 1
    assert held.id == got.id == server.ours[0]


async def test_a_cancelled_keyed_calls_bag_pending_record_is_resumed_under_its_key(
    tmp_path: Path,
) -> None:
    """The keyed call is cancelled with its POST held (it commits); the record the bag's
    next call is refused with carries the key; resumed in client one while client two
    repeats the keyed call: the one refund, found by reading back, for both."""
    clock = FakeClock()
    server = Gated(clock)
    server.post_gate = gate = asyncio.Event()
    async with _two(server, tmp_path / "k.db", retry=ROOMY) as (one, two):
        call = asyncio.ensure_future(_keyed(one))
        await server.post_arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(BagPendingError) as refused:
            await one.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        record = _json(refused.value.pending[0])
        assert record.idempotency_key == KEY
        gate.set()
        await _until(lambda: server.ours)
        clock.advance(ROOMY.settle_running + 1.0)
        got = await asyncio.gather(one.resume(record), _keyed(two))
    assert server.posts == 1
    assert {r.id for r in got} == {server.ours[0]}


async def test_a_keyed_record_naming_another_request_is_refused_sending_nothing(
    tmp_path: Path,
) -> None:
    """A record carrying a key the store holds for another request (written by someone
    else, or a key reused once its retention ended: review 14): nothing sent or read,
    and for review, never a definite failure (its own request may have applied)."""
    clock = FakeClock()
    server = Hostile(clock)
    async with _two(server, tmp_path / "k.db", retry=SHORT) as (one, two):
        await _keyed(one)
        seen = (server.posts, server.reads)
        forged = attrs.evolve(
            PendingRefund(
                "refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=999), phase=Phase.SENT
            ),
            idempotency_key=KEY,
            sends=1,
            first_sent_at=clock.time(),
            last_sent_at=clock.time(),
        )
        with pytest.raises(AmbiguousOutcomeError) as info:
            await two.resume(forged)
    assert info.value.pending is not None
    assert info.value.pending.needs_review
    assert info.value.pending.ask_id == forged.ask_id
    assert (server.posts, server.reads) == seen


# -- cancelled at each await, and a store that fails -------------------------------------


@attrs.define
class Paused:
    """A store (here: an SQLiteStore) whose chosen step waits at a gate, before or after
    the store does it, or raises instead: 'claim', or a save of a 'sent', 'pending' or
    'failed' record, or the 'finished' one (with its refund)."""

    inner: Any
    where: str = ""
    after: bool = False
    fail: bool = False
    gate: asyncio.Event = attrs.Factory(asyncio.Event)
    waiting: bool = False

    @property
    def lease(self) -> float:
        return float(self.inner.lease)

    @property
    def retention(self) -> float:
        return float(self.inner.retention)

    async def _at(self, what: str, work: Callable[[], Awaitable[Any]]) -> Any:
        if what != self.where or self.gate.is_set():
            return await work()
        if self.fail:
            raise OSError("disk full")
        if self.after:
            done = await work()
        self.waiting = True
        await self.gate.wait()
        return done if self.after else await work()

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        return await self._at("claim", lambda: self.inner.claim(fresh, now))  # type: ignore[no-any-return]

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        what = entry.ask.phase.value if entry.refund is None else "finished"
        return await self._at(what, lambda: self.inner.save(entry, owner))  # type: ignore[no-any-return]

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        return await self.inner.renew(key, owner, lease_until)  # type: ignore[no-any-return]

    async def load(self, key: str) -> KeyEntry | None:
        return await self.inner.load(key)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await self.inner.aclose()


CANCEL_AT = [
    ("claim", False),
    ("claim", True),
    ("sent", False),
    ("sent", True),
    ("post", False),
    ("finished", False),
]


@pytest.mark.parametrize(("where", "after"), CANCEL_AT)
async def test_a_keyed_resume_cancelled_at_each_await_then_repeated_refunds_once(
    tmp_path: Path, where: str, after: bool
) -> None:
    """Client one resumes the keyed call's record and is cancelled at one await: the
    store's claim (before or after it wrote), the save of the re-send (before or after
    it wrote), the re-send in flight at Violet (which commits), or the save of the
    end. Then both clients ask again at once (the resume, and the keyed call): one
    refund, every caller gets it."""
    clock = FakeClock()
    server = Gated(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    path = tmp_path / "k.db"
    paused = Paused(SQLiteStore(path), after=after)
    async with (
        SQLiteStore(path) as two_store,
        hostile_client(server, store=paused, retry=SHORT) as one,
        hostile_client(server, store=two_store, retry=SHORT) as two,
    ):
        pending = await _pending(_keyed(one))
        clock.advance(120.0)
        record = _json(pending)
        paused.where = where
        if where == "post":
            server.post_gate = asyncio.Event()
            server.post_arrived.clear()
        call = asyncio.ensure_future(one.resume(record))
        if where == "post":
            await server.post_arrived.wait()
        else:
            await _until(lambda: paused.waiting)
        call.cancel()
        if where == "finished":
            first = await call  # the refund applied: the call returns it
        else:
            # Cancelled at the gate; rarely (a loaded machine, SQLite's thread) the call
            # has already ended pending by then, also a true outcome: what follows holds
            # either way (one refund, every caller gets it).
            with pytest.raises((asyncio.CancelledError, AmbiguousOutcomeError)):
                await call
        paused.gate.set()
        if server.post_gate is not None:
            server.post_gate.set()
            await _until(lambda: server.ours)
        # Past a cancelled holder's lease (another process cannot tell it is gone).
        clock.advance(paused.lease + ROOMY.settle_running + 1.0)
        got = await _race(
            # A resume told its ask ended not sent (the other caller's deadline ran out
            # on the shared virtual clock) asks again with the key, as a caller does.
            (one.resume(record), lambda: _keyed(one)),
            (_keyed(two), lambda: _keyed(two)),
            clock=clock,
        )
        again = await _settled(_keyed(one), lambda: _keyed(one), clock)
    assert len(server.ours) == 1, f"{len(server.ours)} refunds, {server.posts} POSTs"
    assert server.posts == 2
    assert {r.id for r in (*got, again)} == {server.ours[0]}
    if where == "finished":
        assert first.id == server.ours[0]


async def _given_back(store: Paused, key: str, within: float = 30.0) -> None:
    """Wait until the cancelled call's give-back of ``key`` has landed (SQLite's thread:
    real time). Before it, the entry still names that call as its owner, mid-send."""
    give_up = time.monotonic() + within
    while (entry := await store.load(key)) is None or entry.owner is not None:
        if time.monotonic() > give_up:
            raise AssertionError(f"never given back: {entry!r}")
        await asyncio.sleep(0.001)


async def _fail_the_ask_in_two(two: Awaitable[OrderRefund], held: Paused, clock: FakeClock) -> None:
    """``two`` (a keyed call whose client's store is ``held``, gated at the save of its
    re-send) takes the key's ask over, proves it absent, and its deadline passes while
    that write is held: it ends before its re-send leaves, the ask definitely not
    applied (the key's entry: FAILED)."""
    held.where = "sent"
    call = asyncio.ensure_future(two)
    await _until(lambda: held.waiting)
    clock.advance(SHORT.deadline + 1.0)
    held.gate.set()
    with pytest.raises(APITimeoutError) as failed:
        await call
    assert not failed.value.request_sent


async def test_a_keyed_repeat_after_its_ask_ended_elsewhere_is_a_new_ask_not_refused(
    tmp_path: Path,
) -> None:
    """Client one's keyed call ends pending (record A, which holds its bag in client
    one). Client two repeats the keyed call: it takes A over, proves it absent, and
    its deadline passes before the re-send leaves: A ended, definitely not applied, and
    the key lists it among its earlier asks. Client one repeats the keyed call, as it
    was told to: the key's new ask, sent once (reading the bag first: it was in play
    while A's end was not known here), never BagPendingError for A (every repeat was
    refused so, and a resume of A only answered that it had ended). One refund."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    path = tmp_path / "k.db"
    held = Paused(SQLiteStore(path))
    async with (
        SQLiteStore(path) as one_store,
        hostile_client(server, store=one_store, retry=SHORT) as one,
        hostile_client(server, store=held, retry=SHORT) as two,
    ):
        await _pending(_keyed(one))
        clock.advance(120.0)
        await _fail_the_ask_in_two(_keyed(two), held, clock)
        assert server.posts == 1
        reads = server.reads
        refund = await _keyed(one)
        assert server.reads > reads
        again = await _keyed(two), await _keyed(one)
        assert not one._shared.unsettled.on_bag(BAG_ID)
    assert server.posts == 2
    assert server.ours == [refund.id]
    assert again == (refund, refund)


async def test_a_cancelled_resume_then_a_pending_one_while_the_other_client_ends_the_ask(
    tmp_path: Path,
) -> None:
    """The race of the cancelled resume above (at the save of its re-send, after it
    wrote), in the order a loaded machine once gave it: client one resumes the record
    again while client two's keyed call holds the key; one's deadline ends first
    (pending, record A kept on its bag), and its polls move the shared clock past two's
    deadline before two's re-send leaves (A ended, not applied). Client one's caller
    asks again with the key: the key's new ask, one refund for every caller."""
    clock = FakeClock()
    server = Gated(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    path = tmp_path / "k.db"
    paused = Paused(SQLiteStore(path), after=True)
    held = Paused(SQLiteStore(path))
    async with (
        hostile_client(server, store=paused, retry=SHORT) as one,
        hostile_client(server, store=held, retry=SHORT) as two,
    ):
        pending = await _pending(_keyed(one))
        clock.advance(120.0)
        record = _json(pending)
        paused.where = "sent"
        call = asyncio.ensure_future(one.resume(record))
        await _until(lambda: paused.waiting)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        paused.gate.set()
        await _given_back(held, f"{one._key_scope()} {KEY}")
        clock.advance(paused.lease + ROOMY.settle_running + 1.0)
        held.where = "sent"
        repeat = asyncio.ensure_future(_keyed(two))
        await _until(lambda: held.waiting)
        with pytest.raises(AmbiguousOutcomeError, match="another process is still resuming"):
            await one.resume(record)
        held.gate.set()
        with pytest.raises(APITimeoutError):
            await repeat
        got = await _keyed(one), await _keyed(two), await one.resume(record)
    assert server.posts == 2
    assert len(server.ours) == 1
    assert {r.id for r in got} == {server.ours[0]}


@pytest.mark.parametrize("where", ["claim", "sent"])
async def test_a_keyed_resume_whose_store_write_fails_sends_nothing(
    tmp_path: Path, where: str
) -> None:
    """The store fails claiming the key or saving the re-send: RecordStoreError naming
    the key, nothing sent; the keyed repeat in the other client then refunds once."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    path = tmp_path / "k.db"
    paused = Paused(SQLiteStore(path), fail=True)
    async with (
        SQLiteStore(path) as two_store,
        hostile_client(server, store=paused, retry=SHORT) as one,
        hostile_client(server, store=two_store, retry=SHORT) as two,
    ):
        pending = await _pending(_keyed(one))
        clock.advance(120.0)
        paused.where = where
        with pytest.raises(RecordStoreError, match="nothing was sent") as info:
            await one.resume(_json(pending))
        assert info.value.key == KEY
        assert server.posts == 1
        clock.advance(paused.lease + 1.0)
        refund = await _keyed(two)
        paused.gate.set()
        assert await one.resume(_json(pending)) == refund
    assert len(server.ours) == 1
    assert server.posts == 2


# -- a process killed between the store write and the POST --------------------------------

_RESUMER = """
import asyncio, sys, time
from violet_async import PendingRefund, RetryPolicy, VioletClient
from violet_async.stores import SQLiteStore
from violet_async.testing import FakeClock

class Stops(SQLiteStore):
    async def save(self, entry, owner):
        saved = await super().save(entry, owner)
        if sys.argv[4] == "after-save" and entry.ask.phase.value == "sent":
            print("saved", flush=True)
            time.sleep(3600)  # killed here: the record is written, the POST never left
        return saved

async def main():
    url, path, wall = sys.argv[1], sys.argv[2], float(sys.argv[3])
    record = PendingRefund.from_json(sys.stdin.readline())
    async with Stops(path, lease=2.0) as store, VioletClient(
        {app_id}, {secret!r}, username="u", password="p", base_url=url, store=store,
        retry=RetryPolicy(deadline=60.0), clock=FakeClock(wall_start=wall),
    ) as client:
        print("resuming", flush=True)
        await client.resume(record)
        print("returned", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("where", ["after-save", "post-in-flight"])
async def test_a_process_killed_resuming_a_keyed_record_leaves_one_ask(
    tmp_path: Path, where: str
) -> None:
    """Another process resumes the keyed call's record and is killed (SIGKILL) after
    the store recorded its re-send and before the POST left, or with the POST at Violet
    (it commits). The keyed repeat here waits out the dead process's lease, then
    resumes the one record: reads back first, re-sends only what never left. One
    refund."""
    clock = FakeClock()
    post = Step() if where == "after-save" else Step(hang=True, commit_after=0.0)
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None), post])
    path = tmp_path / "k.db"
    async with (
        SQLiteStore(path, lease=2.0) as store,
        hostile_client(server, store=store, retry=SHORT) as client,
    ):
        pending = await _pending(_keyed(client))
        clock.advance(120.0)
        script = _RESUMER.format(app_id=APP_ID, secret=SECRET)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            client.base_url,
            str(path),
            repr(clock.time()),
            where,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(pending.to_json().encode() + b"\n")
        await proc.stdin.drain()
        assert (await proc.stdout.readline()).strip() == b"resuming"
        server.post_arrived.clear()
        if where == "after-save":
            line = await proc.stdout.readline()
            assert line.strip() == b"saved", (await proc.communicate())[1].decode()
        else:
            await server.post_arrived.wait()
        proc.send_signal(signal.SIGKILL)
        await proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        entry = await store.load(f"{client._key_scope()} {KEY}")
        assert entry is not None
        assert entry.ask.phase is Phase.SENT
        assert entry.ask.sends == 2
        posts = server.posts
        clock.advance(store.lease + 1.0)
        if where == "after-save":
            # The dead process's re-send may still be running at Violet for all this
            # one knows: it reads back and waits that window out before re-sending.
            with pytest.raises(AmbiguousOutcomeError):
                await _keyed(client)
            assert server.posts == posts
            clock.advance(200.0)
        refund = await _keyed(client)
        assert await client.resume(pending) == refund
    assert len(server.ours) == 1, f"{len(server.ours)} refunds, {server.posts} POSTs"
    assert refund.id == server.ours[0]
    assert server.posts == posts + (1 if where == "after-save" else 0)


async def test_a_key_whose_record_never_left_resumes_the_callers_record() -> None:
    """The store's record under the key is an ask that never left (claimed and given up
    unsent, here written into another client's store); the caller's record was sent
    and applied (its answer lost). The resume reads back and finds it: no new send."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=50.0)])
    other = MemoryStore()
    async with hostile_client(server, retry=SHORT) as one:
        pending = await _pending(_keyed(one))
    clock.advance(120.0)
    assert len(server.ours) == 1
    async with hostile_client(server, retry=SHORT, store=other) as two:
        now = clock.time()
        never = PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300))
        await other.claim(
            KeyEntry(f"{two._key_scope()} {KEY}", never, owner="gone", lease_until=now - 1), now
        )
        refund = await two.resume(_json(pending))
        again = await _keyed(two)
    assert refund.reconciled
    assert refund.id == again.id == server.ours[0]
    assert server.posts == 1


async def test_in_one_client_a_resume_and_the_keyed_repeat_join(tmp_path: Path) -> None:
    """In one client at once: the resume and the keyed repeat are one flight."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    async with (
        SQLiteStore(tmp_path / "k.db") as store,
        hostile_client(server, store=store, retry=SHORT) as client,
    ):
        pending = await _pending(_keyed(client))
        clock.advance(120.0)
        # The repeat's deadline runs on the virtual clock its own waits move (a poll at
        # a time) while the flight it joined waits on SQLite's thread: on a loaded
        # machine it can end first (pending), or move the flight's deadline past
        # before its re-send leaves (not sent). Either caller then asks again with the
        # key, as a caller does (one at a time: ``_race``).
        got = await _race(
            (client.resume(_json(pending)), lambda: _keyed(client)),
            (_keyed(client), lambda: _keyed(client)),
        )
    assert server.posts == 2
    assert {r.id for r in got} == {server.ours[0]}


# -- the one resume rule (the record store seam's first piece) ---------------------------


def test_resumable_is_one_rule_for_a_record_loaded_by_its_key() -> None:
    """What a driver resumes from a record loaded by its item's key: nothing for one
    never sent, sent/pending as they are, any other phase pending and doubted with its
    evidence kept, and no record (or one of another request) as sent once, outcome
    unknown, at the time the edge gives."""
    wanted = PendingRefund(
        "refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300), idempotency_key=KEY
    )
    assert resumable(wanted, wanted, sent_at=5.0) is None
    for phase in (Phase.SENT, Phase.PENDING):
        record = attrs.evolve(wanted, phase=phase, sends=2)
        assert resumable(record, wanted, sent_at=5.0) is record
    for phase in (Phase.APPLIED, Phase.ABSENT, Phase.FAILED):
        record = attrs.evolve(wanted, phase=phase, sends=3, seen=frozenset({9}))
        got = resumable(record, wanted, sent_at=5.0)
        assert got == attrs.evolve(record, phase=Phase.PENDING, doubted=True)
    other = attrs.evolve(wanted, request=RefundBagRequest(amount_refunded=301), phase=Phase.SENT)
    for stored in (None, other):
        got = resumable(stored, wanted, sent_at=5.0)
        assert got is not None
        assert (got.phase, got.sends, got.first_sent_at) == (Phase.SENT, 1, 5.0)
        assert (got.request, got.idempotency_key) == (wanted.request, KEY)
