"""Idempotency keys: at most once per key. Same key and request: the same outcome
(returned again with no request, resumed, or joined); same key and another request:
IdempotencyKeyReusedError with nothing sent. On our hostile server and FakeViolet,
over MemoryStore and SQLiteStore, including stores that fail."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    BadRequestError,
    BagPendingError,
    IdempotencyKeyReusedError,
    PendingRefund,
    RecordStoreError,
    RefundBagRequest,
    RequestValidationError,
    RetryPolicy,
    VioletClient,
)
from violet_async._ask import Phase
from violet_async.stores import Claim, KeyEntry, MemoryStore, RecordStore, SQLiteStore
from violet_async.testing import FakeClock, FakeViolet

from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client

ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)


@attrs.define
class Gated(Hostile):
    """The hostile server with every POST held (once arrived) until a gate opens."""

    post_gate: asyncio.Event | None = None

    async def _post(self, request: web.Request, *, cancel: bool) -> web.StreamResponse:
        if self.post_gate is not None:
            self.post_arrived.set()
            await self.post_gate.wait()
        return await super()._post(request, cancel=cancel)


async def _until(predicate: Any, within: float = 30.0) -> None:
    """Wait for ``predicate`` (a SQLite store works in a thread: its progress is real
    time, not loop turns, so a loaded machine is given up to ``within`` seconds)."""
    give_up = time.monotonic() + within
    turns = 0
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError("never happened")
        turns += 1
        await asyncio.sleep(0 if turns < 1_000 else 0.001)


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    made: RecordStore = (
        MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "k.db")
    )
    yield made
    await made.aclose()


async def test_a_finished_key_returns_its_refund_again_with_no_request(store: RecordStore) -> None:
    """Same key, same request, after it applied: the same refund, nothing sent or read."""
    server = Hostile(FakeClock())
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        first = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="k1")
        seen = (server.posts, server.reads)
        again = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="k1")
    assert again == first
    assert (server.posts, server.reads) == seen == (1, 0)


async def test_a_finished_key_is_answered_from_the_store_in_a_new_client(tmp_path: Path) -> None:
    """A new client (a restarted process) on the same SQLite file: the refund again,
    with no request to Violet."""
    server = Hostile(FakeClock())
    path = tmp_path / "k.db"
    async with SQLiteStore(path) as store, hostile_client(server, retry=ROOMY, store=store) as c:
        first = await c.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="rma-1")
    async with SQLiteStore(path) as store, hostile_client(server, retry=ROOMY, store=store) as c:
        again = await c.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="rma-1")
    assert again == first
    assert server.posts == 1


@pytest.mark.parametrize(
    "other",
    [
        {"amount_refunded": 301},
        {"amount_refunded": 300, "reason": "other"},
        {"bag_id": BAG_ID + 1},
        {"order_id": ORDER_ID + 1},
        {"kind": "cancel"},
    ],
)
async def test_the_same_key_for_another_request_is_refused(
    store: RecordStore, other: dict[str, Any]
) -> None:
    """Same key, another request (amount, reason, bag, order, kind): refused, nothing
    sent, and the first refund stands."""
    server = Hostile(FakeClock())
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="k")
        order_id = other.pop("order_id", ORDER_ID)
        bag_id = other.pop("bag_id", BAG_ID)
        if other.pop("kind", None) == "cancel":
            call = client.cancel_bag(order_id, bag_id, idempotency_key="k")
        else:
            call = client.refund_bag(order_id, bag_id, **other, idempotency_key="k")
        with pytest.raises(IdempotencyKeyReusedError) as info:
            await call
    assert info.value.key == "k"
    assert "Nothing was sent" in str(info.value)
    assert server.posts == 1
    assert server.reads == 0


async def test_a_double_click_is_joined_into_one_post(store: RecordStore) -> None:
    """Two identical calls with one key at once: one POST, both get the same refund."""
    gate = asyncio.Event()
    server = Gated(FakeClock(), post_gate=gate)
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        calls = [
            asyncio.ensure_future(
                client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="dbl")
            )
            for _ in range(3)
        ]
        await server.post_arrived.wait()
        gate.set()
        first, second, third = await asyncio.gather(*calls)
    assert first == second == third
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_a_joined_call_with_another_request_is_refused() -> None:
    """While a keyed call runs, the key with another request: refused at once."""
    gate = asyncio.Event()
    server = Gated(FakeClock(), post_gate=gate)
    async with hostile_client(server, retry=ROOMY) as client:
        first = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="k")
        )
        await server.post_arrived.wait()
        with pytest.raises(IdempotencyKeyReusedError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=1, idempotency_key="k")
        gate.set()
        await first
    assert server.posts == 1


async def test_a_cancelled_keyed_call_is_resumed_by_its_repeat(store: RecordStore) -> None:
    """The caller cancels with the POST held; the repeat with the same key resumes the
    ask (reads back, finds the refund), never a second POST."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(hang=True, commit_after=2.0)])
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="c")
        )
        await server.post_arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # Without the key, the bag is pending: refused.
        with pytest.raises(BagPendingError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="c")
        again = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="c")
    assert refund.reconciled
    assert again == refund
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_a_cancelled_owner_hands_its_joiners_the_ask() -> None:
    """The first of two joined calls is cancelled with the POST held: the other takes
    the ask over and resumes it: one POST, one refund."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(hang=True, commit_after=2.0)])
    async with hostile_client(server, retry=ROOMY) as client:
        owner = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="j")
        )
        await server.post_arrived.wait()
        joiner = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="j")
        )
        await asyncio.sleep(0)
        owner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await owner
        refund = await joiner
    assert refund.reconciled
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_a_pending_keyed_call_is_resumed_by_its_repeat(store: RecordStore) -> None:
    """The deadline ends before the settle window: pending; the repeat with the key
    later resumes it to the one refund."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=50.0)])
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0), store=store) as client:
        with pytest.raises(AmbiguousOutcomeError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="p")
        clock.advance(60.0)
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="p")
    assert refund.reconciled
    assert server.posts == 1


async def test_a_definite_failure_frees_the_key(store: RecordStore) -> None:
    """Violet refused the request (400): nothing applied, so the key may be used again
    with the same request; both joined callers got the refusal."""
    server = Hostile(FakeClock(), total=100)
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        calls = [
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="f")
            for _ in range(2)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, BadRequestError) for r in results)
        assert server.posts == 1
        server.total = 1000
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="f")
    assert refund.amount == 300
    assert server.posts == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "a\nb", 42, b"bytes"])
async def test_a_bad_key_is_refused_before_anything(key: Any) -> None:
    """A key that is empty, too long, holds a control character or is not a str: a
    RequestValidationError naming it, nothing sent."""
    server = Hostile(FakeClock())
    async with hostile_client(server, retry=ROOMY) as client:
        with pytest.raises(RequestValidationError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=1, idempotency_key=key)
    assert info.value.field == "idempotency_key"
    assert server.posts == 0


async def test_a_bad_bag_id_with_a_key_is_refused_before_the_store() -> None:
    """Bad ids are refused before the key is claimed (the key stays free)."""
    store = MemoryStore()
    server = Hostile(FakeClock())
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        with pytest.raises(RequestValidationError):
            await client.refund_bag(ORDER_ID, 0, amount_refunded=1, idempotency_key="k")
    assert len(store) == 0


async def test_a_keyed_call_on_a_bag_pending_from_another_call_is_refused() -> None:
    """An unkeyed call left the bag pending: a keyed call on it is refused (nothing
    sent) and its key is released: after resuming the bag, the key works."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=50.0)])
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        with pytest.raises(BagPendingError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=200, idempotency_key="n")
        clock.advance(60.0)
        assert info.value.pending is not None
        await client.resume(info.value.pending)
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=200, idempotency_key="n")
    assert refund.amount == 200
    assert server.posts == 2


# -- stores that fail ---------------------------------------------------------------


@attrs.define
class Failing:
    """A MemoryStore whose chosen operations raise (a full disk, Redis gone) or report
    the key taken by someone else."""

    inner: MemoryStore = attrs.Factory(MemoryStore)
    fail: set[str] = attrs.Factory(set)
    fail_sent_save: int = 0
    """Fail the N-th save of a SENT record (0: none)."""
    sent_saves: int = 0
    lost: bool = False
    saves: list[KeyEntry] = attrs.Factory(list)

    @property
    def lease(self) -> float:
        return self.inner.lease

    @property
    def retention(self) -> float:
        return self.inner.retention

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        if "claim" in self.fail:
            raise OSError("disk full")
        return await self.inner.claim(fresh, now)

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        phase = entry.ask.phase.value if entry.refund is None else "finished"
        if phase in self.fail:
            raise OSError("disk full")
        if phase == "sent":
            self.sent_saves += 1
            if self.sent_saves == self.fail_sent_save:
                raise OSError("disk full")
        if self.lost:
            return False
        self.saves.append(entry)
        return await self.inner.save(entry, owner)

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        return await self.inner.renew(key, owner, lease_until)

    async def load(self, key: str) -> KeyEntry | None:
        return await self.inner.load(key)

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("where", ["claim", "sent"])
async def test_a_store_write_that_fails_before_the_send_sends_nothing(where: str) -> None:
    """The claim or the record of the send cannot be written: RecordStoreError, no POST."""
    store = Failing(fail={where})
    server = Hostile(FakeClock())
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        with pytest.raises(RecordStoreError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="s")
        assert "nothing was sent" in str(info.value)
        assert server.posts == 0
        store.fail.clear()
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="s")
    assert refund.amount == 300
    assert server.posts == 1


async def test_a_key_taken_over_elsewhere_sends_nothing() -> None:
    """The record of the send is refused (another process took the key): no POST."""
    store = Failing(lost=True)
    server = Hostile(FakeClock())
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        with pytest.raises(RecordStoreError, match="taken over"):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="t")
    assert server.posts == 0


async def test_a_failed_final_write_still_returns_the_refund_and_never_resends() -> None:
    """The POST applied but the store cannot record it: the caller gets the refund; a
    repeat in this process gets it again with no request (a resume here could not
    claim a refund this client already returned, and would send again)."""
    store = Failing(fail={"finished"})
    server = Hostile(FakeClock())
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        first = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="w")
        again = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="w")
    assert again == first
    assert server.posts == 1


async def test_a_failed_pending_write_still_raises_the_ambiguous_outcome() -> None:
    """The end of a pending ask cannot be written: the caller still gets
    AmbiguousOutcomeError (not a store error), and the repeat resumes from the record
    of the send."""
    clock = FakeClock()
    store = Failing(fail={"pending"})
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=50.0)])
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0), store=store) as client:
        with pytest.raises(AmbiguousOutcomeError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="q")
        clock.advance(60.0)
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="q")
    assert refund.reconciled
    assert server.posts == 1


async def test_the_record_of_the_send_is_written_before_it_leaves() -> None:
    """The store holds a SENT record by the time the POST reaches Violet."""
    gate = asyncio.Event()
    store = MemoryStore()
    server = Gated(FakeClock(), post_gate=gate)
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="b")
        )
        await server.post_arrived.wait()
        entry = await store.load(f"{client._key_scope()} b")  # keys are scoped by app and host
        assert entry is not None
        assert entry.ask.phase.value == "sent"
        assert entry.ask.sends == 1
        gate.set()
        await call
        entry = await store.load(f"{client._key_scope()} b")
    assert entry is not None
    assert entry.refund is not None
    assert entry.finished


# -- FakeViolet ---------------------------------------------------------------------


async def test_fake_violet_double_click_and_repeat() -> None:
    """On FakeViolet: a double click with one key, then a repeat: one refund on the bag,
    every caller the same one."""
    async with FakeViolet(orders=1) as fake:
        order_id, bag_id = fake.seeded[0]
        async with fake.client() as client:
            calls = [
                client.refund_bag(order_id, bag_id, amount_refunded=100, idempotency_key="rr")
                for _ in range(2)
            ]
            one, two = await asyncio.gather(*calls)
            three = await client.refund_bag(
                order_id, bag_id, amount_refunded=100, idempotency_key="rr"
            )
        assert one == two == three
        assert fake.ledger.refunds_per_bag[bag_id] == 1
        assert len(fake.ledger.posts_per_bag[bag_id]) == 1


async def test_with_options_clones_share_the_key_path() -> None:
    """A with_options clone answers a key its parent finished (one key path per client)."""
    server = Hostile(FakeClock())
    async with hostile_client(server, retry=ROOMY) as client:
        first = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=1, idempotency_key="o")
        clone = client.with_options(retry=RetryPolicy(max_attempts=2))
        again = await clone.refund_bag(ORDER_ID, BAG_ID, amount_refunded=1, idempotency_key="o")
    assert again == first
    assert server.posts == 1


def test_from_env_reads_violet_store(tmp_path: Path) -> None:
    """VIOLET_STORE=sqlite:///path makes an SQLiteStore the client closes itself; a bad
    value is refused naming the variable."""
    env = {"VIOLET_APP_ID": "1", "VIOLET_APP_SECRET": "s", "VIOLET_TOKEN": "t"}
    client = VioletClient.from_env({**env, "VIOLET_STORE": f"sqlite:///{tmp_path}/k.db"})
    assert isinstance(client._store, SQLiteStore)
    assert client._store.path == tmp_path / "k.db"
    assert client._owns_store
    given = MemoryStore()
    client = VioletClient.from_env({**env, "VIOLET_STORE": "memory"}, store=given)
    assert client._store is given
    assert not client._owns_store
    with pytest.raises(RequestValidationError) as info:
        VioletClient.from_env({**env, "VIOLET_STORE": "postgres://x"})
    assert info.value.field == "VIOLET_STORE"


@pytest.mark.parametrize("how", ["cancelled", "pending"])
async def test_a_keyed_ask_resumed_outside_its_key_is_not_sent_again(
    store: RecordStore, how: str
) -> None:
    """A keyed call left its ask pending (cancelled, or AmbiguousOutcomeError); the
    caller resumes the pending record with client.resume (as the errors say), then
    repeats the keyed call: the same refund, no second POST (a resume under the key
    could not claim a refund this client already handed out)."""
    clock = FakeClock()
    if how == "cancelled":
        server = Hostile(clock, script=[Step(hang=True, commit_after=2.0)])
        policy = ROOMY
    else:
        server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=50.0)])
        policy = RetryPolicy(deadline=20.0)
    async with hostile_client(server, retry=policy, store=store) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="x")
        )
        if how == "cancelled":
            await server.post_arrived.wait()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            with pytest.raises(BagPendingError) as refused:
                await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
            pending = refused.value.pending[0]
        else:
            with pytest.raises(AmbiguousOutcomeError) as info:
                await call
            assert info.value.pending is not None
            pending = info.value.pending
        clock.advance(ROOMY.settle_running)
        resumed = await client.with_options(retry=ROOMY).resume(pending)
        clock.advance(600.0)
        again = await client.with_options(retry=ROOMY).refund_bag(
            ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="x"
        )
    assert again == resumed
    assert server.posts == 1
    assert len(server.ours) == 1


# -- cancelled at each await of the key path ---------------------------------------------


@attrs.define
class Slow(Failing):
    """A store whose chosen operation ('claim', 'sent', 'finished') waits for a gate."""

    gate: asyncio.Event = attrs.Factory(asyncio.Event)
    slow: str = ""
    waiting: bool = False

    async def _maybe_wait(self, what: str) -> None:
        if what == self.slow and not self.gate.is_set():
            self.waiting = True
            await self.gate.wait()

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        await self._maybe_wait("claim")
        return await super().claim(fresh, now)

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        await self._maybe_wait(entry.ask.phase.value if entry.refund is None else "finished")
        return await super().save(entry, owner)


@pytest.mark.parametrize("where", ["claim", "sent", "finished"])
async def test_a_keyed_call_cancelled_at_each_store_await_never_refunds_twice(
    where: str,
) -> None:
    """Cancelled while the store claims the key, records the send, or records the end:
    the repeat with the key ends with one refund, and gets it. Cancelled while the end
    is recorded, the refund applied: the call returns it (the write goes on)."""
    clock = FakeClock()
    store = Slow(slow=where)
    server = Hostile(clock)
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="z")
        )
        await _until(lambda: store.waiting)
        call.cancel()
        if where == "finished":
            first = await call
        else:
            with pytest.raises(asyncio.CancelledError):
                await call
        store.gate.set()
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="z")
        again = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="z")
    if where == "finished":
        assert first == refund
    assert again == refund
    assert len(server.ours) == 1
    assert server.posts == 1


async def test_a_cancelled_joiner_leaves_the_owner_alone() -> None:
    """A joined caller that gives up does not disturb the call it joined."""
    gate = asyncio.Event()
    server = Gated(FakeClock(), post_gate=gate)
    async with hostile_client(server, retry=ROOMY) as client:
        owner = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="g")
        )
        await server.post_arrived.wait()
        joiner = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="g")
        )
        await asyncio.sleep(0)
        joiner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await joiner
        gate.set()
        refund = await owner
    assert not refund.reconciled
    assert server.posts == 1


async def test_two_clients_on_one_store_wait_for_each_other() -> None:
    """Two clients (two owners, as two processes would be) on one store and one key:
    the second waits for the first's outcome and returns the same refund, one POST."""
    gate = asyncio.Event()
    store = MemoryStore()
    server = Gated(FakeClock(), post_gate=gate)
    async with (
        hostile_client(server, retry=ROOMY, store=store) as first,
        hostile_client(server, retry=ROOMY, store=store) as second,
    ):
        one = asyncio.ensure_future(
            first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="two")
        )
        await server.post_arrived.wait()
        two = asyncio.ensure_future(
            second.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="two")
        )
        for _ in range(5):
            await asyncio.sleep(0)
        assert not two.done()
        gate.set()
        assert await one == await two
    assert server.posts == 1


async def test_waiting_on_another_owner_ends_at_the_deadline_sending_nothing() -> None:
    """The other owner holds the key past this call's deadline: AmbiguousOutcomeError
    saying to call again with the key; this call sent nothing."""
    clock = FakeClock()
    store = MemoryStore()
    now = clock.time()
    server = Hostile(clock)
    async with hostile_client(server, retry=RetryPolicy(deadline=5.0), store=store) as client:
        wanted = KeyEntry(
            f"{client._key_scope()} busy",
            PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300)),
            owner="another-process",
            lease_until=now + 10_000,
        )
        await store.claim(wanted, now)
        with pytest.raises(AmbiguousOutcomeError, match="same key") as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="busy")
    assert info.value.pending is None
    assert server.posts == 0


@pytest.mark.parametrize("store", ["refunds.db", object()])
def test_a_store_that_is_not_one_is_refused(store: Any) -> None:
    """store= takes a record store; a path or anything else is refused at once."""
    with pytest.raises(RequestValidationError) as info:
        VioletClient(1, "s", token="t", store=store)
    assert info.value.field == "store"


async def test_a_failed_restamp_before_the_send_sends_nothing_and_reads_nothing() -> None:
    """A slow login comes first, and the record is saved as sent right before the
    POST (after it: review 19); that save fails: RecordStoreError at once, no POST, and
    no read-back (the send never left, so there is nothing to settle)."""
    store = Failing(fail_sent_save=1)
    server = Hostile(FakeClock(), login_delay=10.0)
    async with hostile_client(server, retry=ROOMY, store=store) as client:
        with pytest.raises(RecordStoreError, match="nothing was sent"):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="r")
        assert (server.posts, server.reads) == (0, 0)
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="r")
    assert refund.amount == 300
    assert server.posts == 1


async def test_a_keyed_call_that_waited_for_another_process_keeps_its_deadline() -> None:
    """Another process holds the key (it sent, then stopped renewing its lease): this
    call waits for the lease to run out, takes the ask over and reads it back. The wait
    counts against the call's deadline: it ends pending by its deadline, not a whole
    deadline after the wait (found by the simulator, two_clients_one_store, seed
    300550 in direct mode), and sends nothing inside the window."""
    clock = FakeClock()
    store = MemoryStore(lease=20.0)
    now = clock.time()
    server = Hostile(clock)
    sent = attrs.evolve(
        PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300)),
        phase=Phase.SENT,
        sends=1,
        first_sent_at=now,
        last_sent_at=now,
    )
    async with hostile_client(server, retry=RetryPolicy(deadline=30.0), store=store) as client:
        held = KeyEntry(
            f"{client._key_scope()} slow", sent, owner="another-process", lease_until=now + 20.0
        )
        await store.claim(held, now)
        began = clock.monotonic()
        with pytest.raises(AmbiguousOutcomeError) as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="slow")
        took = clock.monotonic() - began
    assert 20.0 <= took <= 30.0 + 1e-6, took
    assert info.value.pending is not None
    assert server.posts == 0
