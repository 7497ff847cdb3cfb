"""A keyed call's POST answered 429 (proven not applied) after its lease ran out while
the answer was on its way: another process sharing the key's store had taken the key
over, read the bag and parked the ask for review ("sent, may have applied"). The first
call's save of the proof (ABSENT) was refused (RecordStoreError: nothing sent by this
step), and the proof was lost: another system's identical refund made after it was
handed to the key's next call in that process as its own, with no POST at all
(simulator seed 1561189). The proof is kept in this client's memory then: the key's
next call here merges it (an absent copy wins; the other's copy for review keeps it
for review)."""

from __future__ import annotations

import asyncio

import pytest

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    RecordStoreError,
    RetryPolicy,
    VioletClient,
)
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .hostile import APP_ID, BAG_ID, ORDER_ID, SECRET, Step, serve
from .test_cancelled_answer import Held
from .test_review27_findings import AMOUNT, RETRY, NoDate

KEY = "rma-key-proof-taken-over"
REASON = "Damaged in transit"
SHORT = RetryPolicy(max_attempts=3, deadline=4.0, jitter=False)


def _client(url: str, clock: FakeClock, store: MemoryStore, retry: RetryPolicy) -> VioletClient:
    return VioletClient(
        APP_ID,
        SECRET,
        username="hostile-user",
        password="hostile-password-0123",
        base_url=url,
        clock=clock,
        retry=retry,
        store=store,
    )


async def test_a_proof_refused_by_a_taken_over_key_is_kept() -> None:
    """The key's next call in the process whose 429's save was refused: never another
    system's refund made after the 429 (parked for review, or a send of its own whose
    refund is returned, are true outcomes)."""
    clock = FakeClock(wall_start=1_800_000_000.0)
    held = Held()
    server = NoDate(
        clock,
        script=[Step(429, commit_after=None, headers={"Retry-After": "1"})],
        on_answer=held,
    )
    store = MemoryStore(lease=5.0)
    async with (
        serve(server) as url,
        _client(url, clock, store, RETRY) as one,
        _client(url, clock, store, SHORT) as two,
    ):
        call = asyncio.ensure_future(
            one.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT, reason=REASON, idempotency_key=KEY
            )
        )
        await asyncio.wait_for(server.post_arrived.wait(), 5.0)
        clock.advance(6.0)  # the first call's lease runs out while its POST is answered
        server.add_refund(AMOUNT, reason="Wrong size")  # almost the ask
        # The other process takes the key over, reads the bag and parks the ask for
        # review: the first call's 429 is unknown to it.
        with pytest.raises(AmbiguousOutcomeError):
            await two.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT, reason=REASON, idempotency_key=KEY
            )
        server.on_answer = None
        held.release.set()  # the first call's answer: 429, proven not applied
        with pytest.raises(RecordStoreError, match="taken over"):
            await call
        assert server.posts == 1
        other = server.add_refund(AMOUNT, reason=REASON)["id"]
        clock.advance(20.0)
        try:
            got: OrderRefund | AmbiguousOutcomeError = await one.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT, reason=REASON, idempotency_key=KEY
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund handed over as the key's own"
    )
    if isinstance(got, OrderRefund):
        assert server.ours == [got.id], "the ask's own refund, made once"
