"""Simulator seed 1079285: two processes on one machine share a key's record store.
This machine's wall clock steps 18 h forward after the first process's client was
made and before the second's. The second sends the key's ask: a 504, and the refund
applied. With no ``Date`` header (nothing places Violet's clock) its refund is dated
18 h before the send by the second process's clock, "made long before the send", and
every read-back misses it; the second call's deadline ends first (pending). The
first process then takes the ask up (the key's next call, or ``client.resume`` of the
record): it knew the clock stepped since its client was made, but judged the record by
the second process's readings alone, proved the refund absent after the settle window
and sent it again: two refunds. Against a server scripted here; refunds are counted by
its own record."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    PendingRefund,
    RefundBagRequest,
    RetryPolicy,
)
from violet_async._reconcile import ClockOrigin
from violet_async.stores import MemoryStore, SQLiteStore
from violet_async.testing import FakeClock
from violet_async.testing.sim._kinds_review import ProcessClock

from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client

AMOUNT = 500
#: Three steps of the seed's, summed: 3 h, 15 h and 22.5 min.
STEP = 10_800.0 + 54_000.0 + 1_350.0


class _NoDate(Hostile):
    """Hostile Violet with no ``Date`` header on any answer (a proxy that drops it)."""

    def app(self) -> web.Application:
        app = super().app()
        app.on_response_prepare.append(_drop_date)
        return app


async def _drop_date(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.popall("Date", None)


def _store(kind: str, tmp_path: Any) -> MemoryStore | SQLiteStore:
    if kind == "memory":
        return MemoryStore()
    return SQLiteStore(tmp_path / "keys.sqlite3")


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
@pytest.mark.parametrize("how", ["key", "resume"])
async def test_a_record_of_a_process_made_after_a_step_is_not_proven_absent_here(
    store_kind: str, how: str, tmp_path: Any
) -> None:
    clock = FakeClock(wall_start=1_790_000_000.0)
    # The second process's POST: answered 504 by a gateway, applied at Violet.
    server = _NoDate(clock, script=[Step(504, body=GATEWAY_504, commit_after=0.0)])
    store = _store(store_kind, tmp_path)
    # Its deadline ends inside the settle window: pending, never absent.
    short = RetryPolicy(max_attempts=3, deadline=30.0, settle_running=60.0)
    roomy = RetryPolicy(max_attempts=3, deadline=600.0, settle_running=60.0)
    key = {"idempotency_key": "rma-1079285"}
    got: object
    async with hostile_client(server, retry=roomy, store=store) as first:
        clock.step_wall(STEP)  # NTP, an operator: monotonic time does not move
        async with hostile_client(
            server, retry=short, store=store, clock=ProcessClock(clock)
        ) as second:
            with pytest.raises(AmbiguousOutcomeError) as pending:
                await second.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, **key)
        assert server.posts == 1
        assert len(server.ours) == 1
        clock.advance(300.0)  # long past the send's settle window
        try:
            if how == "key":
                # The key's next call, in the first process: it resumes the key's ask.
                got = await first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, **key)
            else:
                record = pending.value.pending
                assert record is not None
                got = await first.resume(record)
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.posts == 1, f"{got!r}: sent again"
    assert len(server.ours) == 1, f"{got!r}: refunded twice"
    if isinstance(got, OrderRefund):
        assert [got.id] == server.ours
    else:
        assert isinstance(got, AmbiguousOutcomeError)
        assert got.pending is not None
        assert got.pending.needs_review, got


def test_a_record_is_recalled_against_the_origin_only_forward_and_never_narrowed() -> None:
    """``ClockOrigin.recall``'s edges: a record stamped after a forward step since the
    origin takes the clock as it was at the origin for its reading before a step; a
    record that knows of as much (or a step back) keeps its own; one stamped before
    the origin, or not stamped, or after a step back, is left as it is."""
    clock = FakeClock(wall_start=1_790_000_000.0)
    origin = ClockOrigin(clock)
    before = (clock.time(), clock.monotonic())
    clock.advance(10.0)
    clock.step_wall(STEP)
    ask = PendingRefund(
        "refund",
        ORDER_ID,
        BAG_ID,
        RefundBagRequest(amount_refunded=AMOUNT),
        wall_mono=(clock.time(), clock.monotonic()),
    )
    assert origin.recall(ask).stepped == STEP
    assert origin.recall(attrs.evolve(ask, stepped=1_350.0)).stepped == STEP
    assert origin.recall(attrs.evolve(ask, stepped=STEP + 5.0)).stepped == STEP + 5.0
    assert origin.recall(attrs.evolve(ask, stepped=-30.0)).stepped == -30.0
    assert origin.recall(attrs.evolve(ask, wall_mono=None)).stepped == 0.0
    early = (before[0] - 5.0, before[1] - 5.0)
    assert origin.recall(attrs.evolve(ask, wall_mono=early)).stepped == 0.0
    clock.step_wall(-2 * STEP)  # now behind the origin's clock: a step back since
    back = attrs.evolve(ask, wall_mono=(clock.time(), clock.monotonic()))
    assert origin.recall(back).stepped == 0.0


@pytest.mark.parametrize("step", [STEP, 15 * 3600.0])
async def test_a_process_made_after_a_step_never_proves_its_own_refund_absent(
    step: float,
) -> None:
    """The second process alone: its client made after the step, no ``Date`` header,
    a deadline longer than the settle window. It holds no reading of the clock as it
    was, and by its clock its refund (behind a 504) was made 15 to 18 h before the
    send: "long before the send" needs a reading of Violet's clock; without one the
    refund is for review, never proof of absence."""
    clock = FakeClock(wall_start=1_790_000_000.0)
    server = _NoDate(clock, script=[Step(504, body=GATEWAY_504, commit_after=0.0)])
    roomy = RetryPolicy(max_attempts=3, deadline=600.0, settle_running=60.0)
    clock.step_wall(step)
    got: object
    async with hostile_client(server, retry=roomy, clock=ProcessClock(clock)) as alone:
        try:
            got = await alone.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.posts == 1, f"{got!r}: sent again"
    assert len(server.ours) == 1
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None
    assert got.pending.needs_review, got
