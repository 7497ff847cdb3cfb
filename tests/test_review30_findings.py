"""Review 30: the late answer's wait and write-through, and the bag marked by a call cut
in a 429 wait (``PendingAsks.cut_while_absent``), against hostile servers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from violet_async import AmbiguousOutcomeError, OrderRefund, RateLimitError, RetryPolicy
from violet_async._protocol import Phase
from violet_async.stores import MemoryStore, SQLiteStore
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, VIOLET_500, Hostile, Step, hostile_client, serve
from .test_cancelled_answer import KEEP, KEY, RETRY, Held, _cut, _landed
from .test_review27_findings import AMOUNT, NoDate, _client


async def _until(check: object, clock: FakeClock) -> None:
    for _ in range(2000):
        if callable(check) and check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("never happened")


async def test_a_repeat_cut_before_its_read_keeps_the_bag_marked() -> None:
    """A call cut in a 429 wait marks its bag; the repeat of its request spends the
    mark as it begins, before its read. Cut by its caller during that read (or before
    it), nothing it did is pending: the mark was gone, and the next repeat was sent
    with no baseline, answered 500, and took another system's identical refund made
    in the first wait for its own."""
    clock = FakeClock()
    script = [
        Step(429, commit_after=None, headers={"Retry-After": "20"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    server = NoDate(clock, script=script)
    async with serve(server) as url, _client(url, clock, MemoryStore()) as client:
        call = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        clock.call_later(3.0, lambda: server.add_refund(AMOUNT))
        clock.call_later(5.0, call.cancel)
        with pytest.raises(asyncio.CancelledError):
            await call
        assert server.posts == 1
        other = server.refunds[0]["id"]
        # The repeat: its read hangs, and its caller cuts it there.
        server.hang_reads = True
        repeat = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        await _until(lambda: server.reads >= 1, clock)
        repeat.cancel()
        with pytest.raises(asyncio.CancelledError):
            await repeat
        assert server.posts == 1
        server.hang_reads = False
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund handed over as the repeat's own"
    )


async def test_a_resume_of_a_record_handed_out_before_the_late_429_was_written_through(
    tmp_path: Path,
) -> None:
    """Two processes share the key's store (one SQLite file). The cancelled keyed call's
    POST is still being answered when the key's repeat in the other process takes the
    key over, reads the bag (nothing yet) and ends pending, its deadline first: the
    caller holds that record ("sent, may have applied"). Another system then makes an
    identical refund, and the late 429 lands and is written through the key's entry
    (proven not applied). The caller resumes the record it holds: merged with the
    key's entry, the copy that never saw the 429 won (its settle window is later), the
    bag was read back over the send's window, and the other system's refund returned
    as this ask's own."""
    clock = FakeClock()
    held = Held()
    server = Hostile(
        clock,
        script=[Step(429, commit_after=None, headers={"Retry-After": "1"})],
        on_answer=held,
    )
    path = tmp_path / "keys.db"
    short = RetryPolicy(max_attempts=3, deadline=10.0, jitter=False)
    async with (
        SQLiteStore(path, lease=5.0) as one_store,
        hostile_client(server, **KEEP, retry=RETRY, store=one_store) as one,
    ):
        await _cut(one, server, idempotency_key=KEY)
        clock.advance(6.0)  # the cut call's lease has run out
        async with (
            SQLiteStore(path, lease=5.0) as two_store,
            hostile_client(server, retry=short, store=two_store) as two,
        ):
            with pytest.raises(AmbiguousOutcomeError) as caught:
                await two.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
            pending = caught.value.pending
            assert pending is not None
            assert server.posts == 1
            other = server.add_refund(AMOUNT)["id"]  # another system's identical refund
            await _landed(one, held, server)
            entry = await two_store.load(f"{two._key_path().scope} {KEY}")
            assert entry is not None
            assert entry.ask.phase is Phase.ABSENT, "the late 429 written through"
            clock.advance(1.0)
            try:
                got: OrderRefund | AmbiguousOutcomeError = await two.resume(pending)
            except AmbiguousOutcomeError as exc:
                got = exc
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund handed over as this call's"
    )
    if isinstance(got, OrderRefund):
        assert server.ours == [got.id], "the ask's own refund, made once"


async def test_a_repeat_after_a_call_ended_by_429s_never_takes_anothers_refund() -> None:
    """Seed 1216220's class with the call not cut but ended: it waited out 429s until
    its deadline left no room for the next ``Retry-After`` and raised RateLimitError
    (every send proven not applied; nothing pending). Its caller repeated it, as a
    RateLimitError asks: sent with no baseline, answered 500, the read-back took
    another system's identical refund made during the first call's waits (no ``Date``
    to date it by) for its own. The bag is marked as a cut call's is: the repeat reads
    it first."""
    clock = FakeClock()
    script = [Step(429, commit_after=None, headers={"Retry-After": "100"}) for _ in range(8)]
    server = NoDate(clock, script=script)
    async with serve(server) as url, _client(url, clock, MemoryStore()) as client:
        clock.call_later(60.0, lambda: server.add_refund(AMOUNT))
        with pytest.raises(RateLimitError):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        other = server.refunds[0]["id"]
        server.script[:] = [Step(500, body=VIOLET_500, commit_after=None)]
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund handed over as the repeat's own"
    )
