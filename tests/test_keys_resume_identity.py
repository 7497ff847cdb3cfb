"""A keyed record is resumed only through its own key: the key's entry must hold the
same ask (``ask_id``). Two legitimate refunds of one amount on one bag under two keys:
a record of the second whose key is edited to name the first must never get the
first's refund (a false success, its own refund lost track of), and a record of
another ask under a key whose own record is pending must never drive or settle it.
Either ends for review, nothing read or sent (not a definite failure: a record whose
key's entry was swept after the store's retention looks the same, and its own request
may have applied).
Two clients on one SQLite file (two processes); refunds counted from the scripted
server's own record (tests/hostile.py)."""

from __future__ import annotations

import attrs
import pytest

from violet_async import (
    AmbiguousOutcomeError,
    PendingRefund,
    RefundBagRequest,
    RequestValidationError,
    RetryPolicy,
)
from violet_async._ask import sent_once
from violet_async._engine import Outcome, outcome_of
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, Hostile, Step
from .test_keys_resume import _two

SHORT = RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=3.0)
INTERNAL = b'{"message": "Internal error"}'


async def _two_refunds(server: Hostile, one: object) -> tuple[int, PendingRefund]:
    """Refund A under ``order-a`` (applied); refund B under ``order-b``: committed,
    answered 500, the list lagging: pending, naming A as another call's."""
    from violet_async import VioletClient

    assert isinstance(one, VioletClient)
    first = await one.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="order-a")
    server.list_lag = 1_000.0
    server.script.append(Step(500, INTERNAL, commit_after=0.0))
    with pytest.raises(AmbiguousOutcomeError) as info:
        await one.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="order-b")
    pending = info.value.pending
    assert pending is not None
    assert first.id in pending.others
    return first.id, pending


def _edited(record: PendingRefund, key: str) -> PendingRefund:
    """The record as JSON, its key edited (a file changed, or written by another)."""
    return PendingRefund.from_json(
        record.to_json().replace(f'"{record.idempotency_key}"', f'"{key}"')
    )


@pytest.mark.parametrize("here", [True, False], ids=["same-client", "other-client"])
async def test_a_record_whose_key_names_another_finished_ask_is_refused(
    tmp_path: object, here: bool
) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    server = Hostile(FakeClock())
    async with _two(server, tmp_path / "keys.db", retry=SHORT) as (one, two):
        first, pending = await _two_refunds(server, one)
        made = list(server.ours)
        server.clock.advance(2_000.0)  # the list has caught up: B can be read back
        resumer = one if here else two
        with pytest.raises(AmbiguousOutcomeError) as info:
            await resumer.resume(_edited(pending, "order-a"))
        # For review: not known to be the key's call (neither its refund nor a failure).
        assert outcome_of(info.value) is Outcome.REVIEW
        assert server.ours == made  # nothing sent
        # The record under its own key settles as refund B, never A.
        refund = await two.resume(pending)
    assert refund.id != first
    assert refund.id in made
    assert len(server.ours) == 2


async def test_a_record_of_another_ask_under_a_pending_key_is_refused(tmp_path: object) -> None:
    """The opposite direction: the key's own record is pending; a record of another ask
    (same request, another ``ask_id``) naming that key neither drives it nor takes its
    refund, and leaves the key free for its own record."""
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    server = Hostile(FakeClock())
    async with _two(server, tmp_path / "keys.db", retry=SHORT) as (one, two):
        _, pending = await _two_refunds(server, one)
        made = list(server.ours)
        server.clock.advance(2_000.0)
        stranger = sent_once(
            "refund",
            ORDER_ID,
            BAG_ID,
            RefundBagRequest(amount_refunded=300),
            pending.first_sent_at,
            idempotency_key="order-b",
        )
        assert stranger.ask_id != pending.ask_id
        for client in (two, one):
            with pytest.raises(AmbiguousOutcomeError) as info:
                await client.resume(stranger)
            assert outcome_of(info.value) is Outcome.REVIEW
        assert server.ours == made
        refund = await two.resume(pending)
    assert refund.id == made[-1]
    assert len(server.ours) == 2


async def test_a_refund_the_record_names_as_another_calls_is_never_returned(
    tmp_path: object,
) -> None:
    """Even under its own ``ask_id`` (a record whose ``others`` was written by someone
    else to hold the key's refund), the refund it lists as another call's is refused."""
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    server = Hostile(FakeClock())
    async with _two(server, tmp_path / "keys.db", retry=SHORT) as (one, two):
        _, pending = await _two_refunds(server, one)
        server.clock.advance(2_000.0)
        refund = await two.resume(pending)
        claims = attrs.evolve(pending, others=pending.others | {refund.id})
        for client in (two, one):
            with pytest.raises(RequestValidationError) as info:
                await client.resume(claims)
            assert info.value.field == "pending"
    assert len(server.ours) == 2
