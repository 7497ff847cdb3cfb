"""A resume job delivered again (at-least-once queues): with the record it was first
given, several times, in reversed order, at once, through JSON, and (with a shared
record store) to two clients, as two processes would be. Refunds are counted from the
scripted server's own record (tests/test_review6_findings.py's Violet6)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import attrs
import pytest

from tests.test_review6_findings import BAG, ORDER, Violet6, pending_of, running
from violet_async import (
    AmbiguousOutcomeError,
    BagPendingError,
    PendingRefund,
    RecordStoreError,
    RequestValidationError,
    RetryPolicy,
)
from violet_async._ask import Phase, merged
from violet_async._engine import resume_key
from violet_async.models import RefundBagRequest
from violet_async.stores import KeyEntry, MemoryStore, SQLiteStore
from violet_async.testing import FakeClock

SHORT = RetryPolicy(deadline=20.0)


def _json(record: PendingRefund) -> PendingRefund:
    return PendingRefund.from_json(record.to_json())


async def _went_pending_twice(
    server: Violet6, clock: FakeClock, client: Any
) -> tuple[PendingRefund, PendingRefund]:
    """The call ends pending (never applied); resume 1 proves it absent and re-sends;
    that re-send answers 504 and commits 30 s later: resume 1 ends pending again."""
    server.scripts = [server.no_commit(), server.late_commit(30.0)]
    first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
    clock.advance(120.0)
    again = await pending_of(client.resume(first))
    assert again.sends == 2
    return first, again


# -- the merged record ----------------------------------------------------------------


def _record(**fields: Any) -> PendingRefund:
    base = PendingRefund("refund", ORDER, BAG, RefundBagRequest(amount_refunded=300))
    return attrs.evolve(base, ask_id="a1", phase=Phase.PENDING, **fields)


def test_merged_keeps_what_either_record_knows() -> None:
    old = _record(
        sends=1, first_sent_at=100.0, last_sent_at=100.0, settle_until=170.0, seen=frozenset({1})
    )
    new = _record(
        sends=2,
        first_sent_at=100.0,
        last_sent_at=300.0,
        settle_until=360.0,
        others=frozenset({7}),
        baseline=frozenset({7}),
        needs_review=True,
    )
    for one, other in ((old, new), (new, old)):
        both = merged(one, other)
        assert both.sends == 2
        assert (both.first_sent_at, both.last_sent_at, both.settle_until) == (100.0, 300.0, 360.0)
        assert both.seen == {1}
        assert both.others == {7}
        assert both.baseline == {7}
        assert both.needs_review
        assert not both.answered


def test_merged_takes_the_later_window_and_every_doubt_whichever_is_the_base() -> None:
    # Same sends: the later send is the base; a window and a doubt of the other stay.
    one = _record(sends=2, last_sent_at=300.0, settle_until=900.0, answered=True)
    other = _record(sends=2, last_sent_at=310.0, settle_until=370.0, refused_after_doubt=True)
    both = merged(one, other)
    assert both.last_sent_at == 310.0
    assert both.settle_until == 900.0
    assert both.answered
    assert both.refused_after_doubt


@pytest.mark.parametrize(("one_clock", "other_clock"), [("p1@box", "p2@box"), ("p1", "p1")])
def test_merged_moves_a_copy_written_before_a_step_on_this_machine(
    one_clock: str, other_clock: str
) -> None:
    """Simulator seed 931888: a resume job carries a copy of a record written before
    the wall clock stepped +1350 s; another process on the machine resumed the record
    since, moving its times by the step. Merged, the job's copy kept its earlier send
    time (the earliest first send wins) unless it is moved by the step between the two
    writes, which the machine's shared monotonic clock measures: the window opened
    1350 s before the send, and another system's refund made then was claimed."""
    job = _record(
        sends=1,
        first_sent_at=100.0,
        last_sent_at=100.0,
        settle_until=160.0,
        clock=one_clock,
        wall_mono=(110.0, 10.0),
    )
    moved = _record(
        sends=1,
        first_sent_at=1450.0,
        last_sent_at=1450.0,
        settle_until=1510.0,
        clock=other_clock,
        wall_mono=(1650.0, 200.0),  # 190 s of monotonic time, 1540 s of wall time
    )
    for one, other in ((job, moved), (moved, job)):
        both = merged(one, other)
        assert (both.first_sent_at, both.last_sent_at) == (1450.0, 1450.0)


def test_merged_never_mixes_two_asks() -> None:
    one = _record(sends=1)
    other = attrs.evolve(_record(sends=3), ask_id="b2")
    assert merged(one, other) is one


# -- one client: deliveries again, in order, reversed, at once -------------------------


@pytest.mark.parametrize("through_json", [False, True])
async def test_three_deliveries_of_the_first_record_refund_once(through_json: bool) -> None:
    clock = FakeClock()
    server = Violet6(clock)
    async with running(server, retry=SHORT) as client:
        first, _ = await _went_pending_twice(server, clock, client)
        for _ in range(3):
            record = _json(first) if through_json else first
            with contextlib.suppress(AmbiguousOutcomeError):
                await client.resume(record)
        clock.advance(120.0)
        # After the re-send committed and shows: the ask's own refund, no third POST.
        refund = await client.resume(_json(first) if through_json else first)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert server.posts == 2
    assert refund.id == server.made[0]


async def test_deliveries_in_reversed_order_refund_once() -> None:
    """The first record, then the fresher one, then the first again."""
    clock = FakeClock()
    server = Violet6(clock)
    async with running(server, retry=SHORT) as client:
        first, again = await _went_pending_twice(server, clock, client)
        for record in (first, _json(again), _json(first)):
            try:
                refund = await client.resume(record)
            except AmbiguousOutcomeError as exc:
                # Still settling: pending, with what every record of the ask knew.
                pending = exc.pending
                assert pending is not None
                assert pending.sends == 2
                assert pending.settle_until is not None
                assert pending.settle_until >= (again.settle_until or 0.0)
            else:
                # Each resume waits up to its deadline: the re-send committed meanwhile.
                assert refund.id == server.made[0]
        clock.advance(120.0)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert server.posts == 2


@pytest.mark.parametrize("stale_first", [False, True])
async def test_three_deliveries_at_once_refund_once(stale_first: bool) -> None:
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit(), server.late_commit(30.0)]
    async with running(server, retry=SHORT) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        records = [first, _json(first), _json(first)]
        if stale_first:
            records.reverse()
        outcomes = await asyncio.gather(
            *(client.resume(r) for r in records), return_exceptions=True
        )
        assert all(isinstance(o, AmbiguousOutcomeError) for o in outcomes), outcomes
        clock.advance(120.0)
        refund = await client.resume(first)
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert refund.id == server.made[0]


async def test_delivered_again_after_a_cancelled_resend_then_after_it_shows() -> None:
    """Resume 1 is cancelled while its re-send is in flight (it commits, listed 10 s
    later); the first record delivered twice more: no second POST, and once the list
    shows the refund, it is returned as this ask's."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit(), server.commit_then(200, hang=True)]
    async with running(server, retry=SHORT) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        server.list_lag = 10.0
        server.post_seen.clear()
        job = asyncio.ensure_future(client.resume(_json(first)))
        await server.post_seen.wait()
        await asyncio.sleep(0.05)
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        for _ in range(2):
            with contextlib.suppress(AmbiguousOutcomeError, BagPendingError):
                await client.resume(_json(first))
        clock.advance(120.0)
        refund = await client.resume(_json(first))
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert refund.id == server.made[0]


# -- a shared store: two clients (two processes) ---------------------------------------


async def test_one_pending_record_resumed_by_two_workers_sharing_a_store() -> None:
    """Review 6 finding 4 with the store the fix needs: worker 1 resumes and re-sends
    (listed 3 s late); worker 2 resumes the first record from the same store a moment
    later and gets worker 1's refund back with no request."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit()]
    store = MemoryStore()
    async with running(server, retry=SHORT, store=store) as one:
        first = await pending_of(one.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        server.list_lag = 3.0
        got = await one.resume(first)
        async with running(server, retry=SHORT, store=store) as two:
            again = await two.resume(_json(first))
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert server.posts == 2
    assert got.id == again.id == server.made[0]


async def test_two_workers_sharing_a_sqlite_file(tmp_path: Any) -> None:
    """The same across two SQLiteStore objects on one file (two processes' view), with
    worker 1's re-send ending pending: worker 2 resumes the merged record."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit(), server.late_commit(30.0)]
    path = tmp_path / "records.sqlite"
    one_store, two_store = SQLiteStore(path), SQLiteStore(path)
    try:
        async with running(server, retry=SHORT, store=one_store) as one:
            first = await pending_of(one.refund_bag(ORDER, BAG, amount_refunded=300))
            clock.advance(120.0)
            again = await pending_of(one.resume(first))
            assert again.sends == 2
            async with running(server, retry=SHORT, store=two_store) as two:
                # Worker 1's window, not the first record's: no POST from worker 2 (it
                # ends pending, or finds the re-send once it committed at 30 s).
                with contextlib.suppress(AmbiguousOutcomeError):
                    await two.resume(_json(first))
                assert server.posts == 2
                clock.advance(120.0)
                refund = await two.resume(_json(first))
    finally:
        await one_store.aclose()
        await two_store.aclose()
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert server.posts == 2
    assert refund.id == server.made[0]


async def test_a_second_worker_waits_while_the_first_holds_the_record() -> None:
    """Worker 1's re-send hangs in flight (it has committed) holding the record's lease;
    worker 2 resumes the same record meanwhile: it waits, sends nothing, and ends
    pending with worker 1's record when its deadline comes first."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit(), server.commit_then(200, hang=True)]
    store = MemoryStore()
    async with running(server, retry=SHORT, store=store) as one:
        first = await pending_of(one.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        server.post_seen.clear()
        job = asyncio.ensure_future(one.resume(first))
        await server.post_seen.wait()
        async with running(server, retry=SHORT, store=store) as two:
            with pytest.raises(AmbiguousOutcomeError) as info:
                await two.resume(_json(first))
        assert info.value.pending is not None
        assert info.value.pending.sends == 2
        assert server.posts == 2
        server.release.set()
        # Worker 2's wait ran the fake clock past worker 1's deadline too: it may end
        # pending (its 200 had no body); the next resume, anywhere, finds the refund.
        with contextlib.suppress(AmbiguousOutcomeError):
            await job
        clock.advance(120.0)
        async with running(server, retry=SHORT, store=store) as two:
            refund = await two.resume(_json(first))
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert refund.id == server.made[0]
    assert server.posts == 2


async def test_with_a_store_a_second_delivery_joins_the_running_one() -> None:
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit(), server.late_commit(30.0)]
    async with running(server, retry=SHORT, store=MemoryStore()) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        outcomes = await asyncio.gather(
            client.resume(first), client.resume(_json(first)), return_exceptions=True
        )
        assert all(isinstance(o, AmbiguousOutcomeError) for o in outcomes), outcomes
        assert server.posts == 2  # joined: one resume ran, one re-send
        clock.advance(120.0)
        refund = await client.resume(first)
        assert refund.id == server.made[0]
        assert await client.resume(_json(first)) == refund  # finished: no request
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert server.posts == 2


async def test_a_stored_record_of_another_request_under_the_ask_id_is_refused() -> None:
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit()]
    store = MemoryStore()
    async with running(server, retry=SHORT, store=store) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        other = attrs.evolve(first, request=RefundBagRequest(amount_refunded=900))
        key = resume_key(client._key_scope(), first.ask_id)
        # The call kept its own record there (review 18): someone else's write replaces it.
        store._entries.pop(key)
        await store.claim(KeyEntry(key, other, scope=client._key_scope()), clock.time())
        clock.advance(120.0)
        posts = server.posts
        with pytest.raises(RequestValidationError, match="ask_id"):
            await client.resume(first)
    assert server.posts == posts
    assert server.made == []


class _Broken(MemoryStore):
    async def claim(self, fresh: KeyEntry, now: float) -> Any:
        raise OSError("disk gone")


async def test_a_store_that_fails_sends_nothing() -> None:
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit()]
    async with running(server, retry=SHORT, store=_Broken()) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        with pytest.raises(RecordStoreError, match="nothing was sent"):
            await client.resume(first)
    assert server.posts == 1
    assert server.made == []


async def test_a_joined_delivery_takes_over_when_the_first_is_cancelled_mid_resend() -> None:
    """With a store: delivery 2 joins delivery 1; delivery 1's caller cancels it while
    its re-send is in flight (it commits, listed 10 s later). Delivery 2 takes the ask
    over from the stored record: no second POST."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit(), server.commit_then(200, hang=True)]
    async with running(server, retry=SHORT, store=MemoryStore()) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        server.list_lag = 10.0
        server.post_seen.clear()
        one = asyncio.ensure_future(client.resume(first))
        await server.post_seen.wait()
        two = asyncio.ensure_future(client.resume(_json(first)))
        await asyncio.sleep(0.05)
        one.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await one
        with contextlib.suppress(AmbiguousOutcomeError, BagPendingError):
            await two
        assert server.posts == 2
        clock.advance(120.0)
        refund = await client.resume(_json(first))
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert refund.id == server.made[0]


async def test_a_record_naming_another_request_under_a_settled_ask_id_is_refused() -> None:
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit()]
    async with running(server, retry=SHORT, store=MemoryStore()) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        await client.resume(first)
        forged = attrs.evolve(first, request=RefundBagRequest(amount_refunded=900))
        with pytest.raises(RequestValidationError, match="ask_id"):
            await client.resume(forged)
    assert len(server.made) == 1
    assert server.posts == 2


async def test_a_stored_refund_of_another_bag_is_not_returned() -> None:
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit()]
    store = MemoryStore()
    async with running(server, retry=SHORT, store=store) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        elsewhere = await client.refund_bag(ORDER, BAG + 1, amount_refunded=100)
        key = resume_key(client._key_scope(), first.ask_id)
        done = attrs.evolve(first, phase=Phase.APPLIED, refund_id=elsewhere.id)
        entry = KeyEntry(key, done, refund=elsewhere, finished_at=clock.time())
        store._entries.pop(key)  # the call kept its record there: replaced by someone else
        await store.claim(attrs.evolve(entry, scope=client._key_scope()), clock.time())
        posts = server.posts
        with pytest.raises(RecordStoreError, match="another bag"):
            await client.resume(first)
    assert server.posts == posts


@pytest.mark.parametrize("store", [False, True])
async def test_deliveries_at_once_get_the_one_refund(store: bool) -> None:
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit()]
    options: dict[str, Any] = {"store": MemoryStore()} if store else {}
    async with running(server, retry=SHORT, **options) as client:
        first = await pending_of(client.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        refunds = await asyncio.gather(*(client.resume(_json(first)) for _ in range(3)))
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert server.posts == 2
    assert {r.id for r in refunds} == {server.made[0]}


async def test_a_worker_cut_off_mid_resend_is_taken_over_after_its_lease() -> None:
    """Worker 1 is cut off while its re-send is in flight (it commits, listed 60 s
    later) and its lease runs out; worker 2 takes the record over from the store: the
    request may still be running, so it reads, never re-sends, and later finds it."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit(), server.commit_then(200, hang=True)]
    store = MemoryStore()
    async with running(server, retry=SHORT, store=store) as one:
        first = await pending_of(one.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        server.list_lag = 60.0
        server.post_seen.clear()
        job = asyncio.ensure_future(one.resume(first))
        await server.post_seen.wait()
        await asyncio.sleep(0.05)
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
    clock.advance(store.lease + 1.0)
    async with running(server, retry=SHORT, store=store) as two:
        with contextlib.suppress(AmbiguousOutcomeError):
            await two.resume(_json(first))
        assert server.posts == 2
        clock.advance(120.0)
        refund = await two.resume(_json(first))
    assert len(server.made) == 1, f"{len(server.made)} refunds, {server.posts} POSTs"
    assert refund.id == server.made[0]


async def test_a_record_settled_by_another_worker_frees_the_bag_here() -> None:
    """Client 1 left the ask pending; worker 2 (same store) settles it. Client 1's own
    resume gets that refund with no request, and its bag is free again."""
    clock = FakeClock()
    server = Violet6(clock)
    server.scripts = [server.no_commit()]
    store = MemoryStore()
    async with running(server, retry=SHORT, store=store) as one:
        first = await pending_of(one.refund_bag(ORDER, BAG, amount_refunded=300))
        clock.advance(120.0)
        async with running(server, retry=SHORT, store=store) as two:
            got = await two.resume(_json(first))
        posts = server.posts
        assert (await one.resume(first)).id == got.id
        assert server.posts == posts
        more = await one.refund_bag(ORDER, BAG, amount_refunded=100)
    assert server.made == [got.id, more.id]
