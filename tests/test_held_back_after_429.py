"""A keyed ask whose only send was answered 429 (proven not applied), held back from its
re-send by another ask of this client parked for review on the bag, is parked for
review itself. Its record must not then say "sent, may have applied": resumed (in
another process, or here), it read the bag back over the 429'd send's window and took
another system's identical refund, made during the 429's wait, for its own (simulator
seed 1202091).

The server is scripted here (tests/hostile.py) on a FakeClock shared with the clients."""

from __future__ import annotations

import asyncio

import pytest

from violet_async import AmbiguousOutcomeError, RetryPolicy
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, Hostile, Step, hostile_client

RETRY = RetryPolicy(max_attempts=3, deadline=120.0, jitter=False)
AMOUNT = 2500
KEY = "rma-held-back-after-429"


async def _until(ready: object, what: str) -> None:
    """Let the loop run until ``ready()`` (bounded: a few thousand loop steps)."""
    for _ in range(5000):
        if ready():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never reached: {what}")


async def test_a_429d_ask_held_back_for_review_never_claims_a_refund_made_in_the_wait() -> None:
    clock = FakeClock()
    other: dict[str, int] = {}

    async def meanwhile() -> None:
        # While the 429 is on its way back: the caller's wait has begun, and another
        # system refunds the same amount on the bag 5 s after this ask's send.
        server.on_answer = None
        clock.advance(5.0)
        other["id"] = server.add_refund(AMOUNT)["id"]

    server = Hostile(
        clock,
        total=10_000,
        script=[
            Step(429, commit_after=None, headers={"Retry-After": "1"}),
            # The other ask's 2xx cannot be read (it applied), and no refund for it
            # ever shows: a person has to look (review).
            Step(200, garbled=True, commit_after=None),
        ],
        on_answer=meanwhile,
    )
    async with hostile_client(server, retry=RETRY, store=MemoryStore()) as client:
        first = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        )
        await _until(lambda: server.posts == 1, "the first POST")
        # Another ask on the bag waits for it (this client sends one ask a bag at a time).
        second = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=100))
        # The keyed call waits out the 429 and reads the bag before its re-send: that
        # read hangs, and its caller cancels it there (nothing of it may have applied).
        server.hang_reads = True
        await _until(lambda: server.reads >= 1, "the read before the re-send")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        server.hang_reads = False
        with pytest.raises(AmbiguousOutcomeError) as reviewed:
            await asyncio.wait_for(second, 5.0)
        assert reviewed.value.pending is not None
        assert reviewed.value.pending.needs_review
        assert server.posts == 2
        # The key's repeat: proven not applied, it would send again, but the other ask
        # is parked for review on the bag: it is parked for review too, nothing sent.
        with pytest.raises(AmbiguousOutcomeError) as held:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        parked = held.value.pending
        assert parked is not None
        assert parked.needs_review
        assert server.posts == 2
    # Its record resumed in another process: nothing of this ask can have applied, so
    # nothing on the bag is its refund.
    async with hostile_client(server, retry=RETRY) as elsewhere:
        try:
            got = await elsewhere.resume(parked)
        except AmbiguousOutcomeError as again:
            reviewed_again = again.pending
        else:
            assert got.id != other["id"], "another system's refund handed over as this ask's"
            raise AssertionError(f"refund {got.id} handed over for an ask that never applied")
        assert reviewed_again is not None
        assert reviewed_again.needs_review
        assert reviewed_again.note.count("parked for review before") == 1
        # And again (a job delivered twice): the same, its note said once.
        with pytest.raises(AmbiguousOutcomeError) as twice:
            await elsewhere.resume(reviewed_again)
        assert twice.value.pending is not None
        assert twice.value.pending.note.count("parked for review before") == 1
    assert server.posts == 2, "never sent again while a person has to look"
