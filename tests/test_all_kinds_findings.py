"""What the simulator found with every world kind switched on at once (issue 24, the
"Every kind at once" runs of docs/simulation.md): each a double refund or a false
outcome, replayed here against our own hostile server (tests/hostile.py), counting
the refunds the server itself made. Each names the simulator seed it came from."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    PendingRefund,
    RateLimitError,
    RecordStoreError,
    RefundBagRequest,
    RetryPolicy,
)
from violet_async._auth import Auth, Credentials
from violet_async.batch import BatchItem, run_batch
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client

HOUR = 3600.0
RATE_LIMITED = b'{"status": 429, "message": "Too many requests", "error_code": 429}'


async def _pending_of(call: object) -> PendingRefund:
    with pytest.raises(AmbiguousOutcomeError) as info:
        await call  # type: ignore[misc]
    assert info.value.pending is not None
    return info.value.pending


async def _refund_or_pending(call: Awaitable[OrderRefund]) -> OrderRefund | PendingRefund:
    """The refund, or the record of a call that ended pending (a true outcome)."""
    try:
        return await call
    except AmbiguousOutcomeError as exc:
        pending = exc.pending
    assert pending is not None
    return pending


async def test_a_cdn_date_and_a_clock_step_that_agree_never_prove_absence() -> None:
    """Seed 605311. No baseline; a CDN stamps every ``Date`` 15 h ahead of Violet's
    refund dates; the POST gets no answer and commits 13 s later, after the call's
    deadline. Then this machine's wall clock steps 15 h forward (NTP), so the ``Date``
    now agrees with it. The resume must not trust that agreement: by the clock as it
    was before the step, our refund is 13 s after the send. Never absence, one POST."""
    clock = FakeClock()
    server = Hostile(
        clock, script=[Step(504, GATEWAY_504, commit_after=13.0)], header_skew=15 * HOUR
    )
    async with hostile_client(server, retry=RetryPolicy(deadline=8.0)) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        assert server.posts == 1
        clock.step_wall(15 * HOUR)
        clock.advance(120.0)  # past the settle window, the refund long committed
        outcome = await _refund_or_pending(client.resume(pending))
        if isinstance(outcome, PendingRefund):
            assert outcome.needs_review
        else:
            assert outcome.id == server.ours[0]
    assert server.posts == 1
    assert len(server.ours) == 1


@attrs.define
class NoDate(Hostile):
    """The same server behind a proxy that spoils every ``Date`` header (aiohttp adds
    its own when there is none: one that cannot be read is as good as none)."""

    @web.middleware
    async def _date_header(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Date"] = "no date here"
        return response


async def test_without_a_date_a_clock_step_never_proves_absence() -> None:
    """Seed 614937. No ``Date`` headers, no baseline; the POST gets no answer and
    commits 15 s later, after the call was cut off. This machine's wall clock then steps
    15 h forward: by the clock as it is now our refund is 15 h older than the send, by
    the clock it was sent by it is 15 s after. Never absence, one POST."""
    clock = FakeClock()
    server = NoDate(clock, script=[Step(504, GATEWAY_504, commit_after=15.0)])
    async with hostile_client(server, retry=RetryPolicy(deadline=8.0)) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        clock.step_wall(15 * HOUR)
        clock.advance(120.0)
        outcome = await _refund_or_pending(client.resume(pending))
        if isinstance(outcome, PendingRefund):
            assert outcome.needs_review
        else:
            assert outcome.id == server.ours[0]
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_a_second_delivery_of_an_older_record_keeps_what_the_first_saw() -> None:
    """Seeds 606216, 607242 (a resume delivered twice, a replica behind). The first
    delivery of a resume sees our refund (its day-precision date cannot place it: review);
    the second delivery, of the same older record, reads a replica that does not have
    it yet. The client saw that refund for this ask: a list without it is stale, never
    absence. One POST."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=30.0)], day_dates=True)
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        clock.advance(60.0)
        first = await _pending_of(client.resume(pending))
        assert first.needs_review
        assert server.ours[0] in first.seen
        server.replica_behind = 600.0
        second = await _pending_of(client.resume(PendingRefund.from_json(pending.to_json())))
        assert second.needs_review
        assert server.ours[0] in second.seen
    assert server.posts == 1
    assert len(server.ours) == 1


async def test_a_second_delivery_of_an_older_record_waits_for_the_later_send() -> None:
    """Seed 611667. The first delivery proves the send absent and sends again; that
    POST gets no answer (it commits 40 s later) and the call's deadline parks it. The
    second delivery, of the older record, must wait out the later send's window, not
    its own: it finds the refund. One refund."""
    clock = FakeClock()
    server = Hostile(
        clock,
        script=[
            Step(504, GATEWAY_504, commit_after=None),
            Step(504, GATEWAY_504, commit_after=40.0),
        ],
    )
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        clock.advance(120.0)
        first = await _pending_of(client.resume(pending))
        assert server.posts == 2
        assert first.sends == 2
        try:
            refund = await client.resume(PendingRefund.from_json(pending.to_json()))
        except AmbiguousOutcomeError:
            assert server.posts == 2  # pending again: still inside the later window
            clock.advance(120.0)
            refund = await client.resume(PendingRefund.from_json(pending.to_json()))
        assert refund.id == server.ours[0]
    assert server.posts == 2
    assert len(server.ours) == 1


async def test_a_second_delivery_after_a_definite_failure_sends_nothing() -> None:
    """Seeds 600011, 606650, 610919 (a resume delivered twice). The first delivery
    proves the send absent, sends again and is refused with 429 (out of attempts): a
    definite failure, nothing applied. The second delivery, of the same older record,
    gets the same failure without a request: it must not make the refund the first was
    told had failed."""
    clock = FakeClock()
    server = Hostile(
        clock,
        script=[
            Step(504, GATEWAY_504, commit_after=None),
            Step(429, RATE_LIMITED, commit_after=None),
            Step(200),
        ],
    )
    policy = RetryPolicy(deadline=20.0, max_attempts=1)
    async with hostile_client(server, retry=policy) as client:
        pending = await _pending_of(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300))
        clock.advance(120.0)
        with pytest.raises(RateLimitError):
            await client.resume(pending)
        assert server.posts == 2
        with pytest.raises(RateLimitError):
            await client.resume(PendingRefund.from_json(pending.to_json()))
    assert server.posts == 2
    assert server.ours == []


async def test_a_wall_clock_stepped_back_never_stops_token_renewals_for_hours() -> None:
    """Seed 601331 (a livelock: a call without a deadline read back for 20,000 s, every
    read refused 401). A token just issued was refused once; the wall clock then stepped
    back 15 h, and two minutes later Violet refused the next token as expired too. Its
    age by the stepped clock is negative, not "just issued": an ordinary expiry,
    renewed, never "not renewing again for 54060 s"."""
    clock = FakeClock()
    issued: list[str] = []

    async def send(
        method: str, path: str, body: bytes | None, token: str | None
    ) -> tuple[int, bytes]:
        issued.append(f"token-{len(issued)}-0123456789")
        return 200, orjson.dumps({"token": issued[-1], "refresh_token": "refresh-0123456789"})

    creds = Credentials(app_id=11, app_secret="secret-0123456789", username="u", password="p")
    auth = Auth(creds, send, now=clock.time)
    first = await auth.token()
    second = await auth.expired(first)  # a token just issued, refused: renewed
    clock.step_wall(-15 * HOUR)
    clock.advance(120.0)
    third = await auth.expired(second)
    assert len({first, second, third}) == 3


async def test_a_batch_run_with_a_parked_row_survives_a_wall_clock_step_back(
    tmp_path: Path,
) -> None:
    """Seed 600559 and 38 more batch seeds (a livelock: the run slept for hours). A row's
    POST gets a 504 and commits 30 s later; the row parks for its settle window; then
    this machine's wall clock steps back 15 h. The run revisits the row when the window
    has passed by monotonic time (minutes), not 15 h later, and finds the refund."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=30.0)])
    clock.call_later(10.0, lambda: clock.step_wall(-15 * HOUR))
    item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300))
    began = clock.monotonic()
    async with hostile_client(server, retry=RetryPolicy(deadline=300.0)) as client:
        results = [
            r async for r in run_batch(client, [item], journal=tmp_path / "j.jsonl", patience=5.0)
        ]
    assert [r.outcome for r in results] == ["succeeded"]
    assert results[0].refund_id == server.ours[0]
    assert server.posts == 1
    assert clock.monotonic() - began < 600.0


@pytest.mark.parametrize("jump", [15 * HOUR, -15 * HOUR])
async def test_a_keyed_repeat_after_a_wall_clock_step_waits_one_window_not_the_step(
    jump: float,
) -> None:
    """Seeds 602195, 607542 and 613646 (``--kinds all``), 607162 (the first round's
    kinds): a livelock, a call without a deadline still reading back at 20,000 s. A
    keyed call's POST is held (it never commits) and its caller cancels it; a minute
    later this machine's wall clock steps 15 h; the caller repeats the call with the
    key. The repeat takes the ask over and waits out one window from now (a request
    of the cancelled call may still be running at Violet) before proving it absent:
    the step moves the record's times once, never twice (15 h too long forward; back,
    a window ending before the one from now)."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None, hang=True)])
    began = clock.monotonic()
    posted: list[float] = []
    real_sleep = clock.sleep

    async def sleep(seconds: float) -> None:
        # A window stretched by the step would read back for 15 h: stop it at one.
        assert clock.monotonic() - began < HOUR, "still reading back an hour on"
        await real_sleep(seconds)

    async def answered() -> None:
        posted.append(clock.monotonic())

    clock.sleep = sleep  # type: ignore[method-assign]
    server.on_answer = answered
    policy = RetryPolicy(deadline=None, settle_running=60.0)
    async with hostile_client(server, retry=policy) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="rma-7")
        )
        await server.post_arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        clock.advance(60.0)
        clock.step_wall(jump)
        again = clock.monotonic()
        refund = await client.refund_bag(
            ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="rma-7"
        )
    assert server.posts == 2
    assert server.ours == [refund.id]
    # The re-send left once a request of the cancelled call could no longer commit,
    # counted from the repeat (one attempt's timeout, 35 s, plus settle_running)...
    assert posted[-1] >= again + 35.0 + 60.0
    # ...and not hours later.
    assert posted[-1] - again < 300.0


@pytest.mark.parametrize("merchant", [None, 7])
async def test_a_batch_row_answered_429_survives_a_wall_clock_step_back(
    tmp_path: Path, merchant: int | None
) -> None:
    """Seed 600714 (``--kinds all``, batch: a livelock, the run slept past 20,000 s).
    A row's POST is answered 429 (nothing applied); while the row waits for its turn,
    this machine's wall clock steps back 15 h. The row (in its merchant's lane, or
    without one) is sent again after the merchant's wait by monotonic time (seconds),
    not 15 h later."""
    clock = FakeClock()
    limited = Step(429, RATE_LIMITED, commit_after=None, headers={"Retry-After": "30"})
    server = Hostile(clock, script=[limited])
    clock.call_later(10.0, lambda: clock.step_wall(-15 * HOUR))
    item = BatchItem.refund(
        1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300), merchant_id=merchant
    )
    began = clock.monotonic()
    async with hostile_client(server, retry=RetryPolicy(deadline=None)) as client:
        results = [r async for r in run_batch(client, [item], journal=tmp_path / "j.jsonl")]
    assert [r.outcome for r in results] == ["succeeded"]
    assert server.posts == 2
    assert server.ours == [results[0].refund_id]
    assert clock.monotonic() - began < 600.0


class _GatedFirstRead(Hostile):
    """The first refund-list read waits for ``gate``, then every read of that client
    fails (Violet's 503) until it gives up."""

    def __init__(self, clock: FakeClock, gate: asyncio.Event) -> None:
        super().__init__(clock)
        self.gate = gate
        self.failing: set[str] = set()
        self.held = asyncio.Event()

    async def _list(self, request: web.Request) -> web.Response:
        peer = request.host  # each client has its own listener (port)
        if not self.failing and not self.gate.is_set():
            self.failing.add(peer)
            self.held.set()
            await self.gate.wait()
        if peer in self.failing:
            return web.Response(status=503, body=VIOLET_503, content_type="application/json")
        return await super()._list(request)


VIOLET_503 = orjson.dumps({"status": 503, "message": "Unavailable", "error_code": 5000})


async def test_a_keyed_call_whose_key_was_taken_over_never_reports_a_failure() -> None:
    """Seed 609860 (``--kinds all``, direct: told "failed" for a key whose refund was
    made). A keyed call's baseline read hangs past its lease (in the seed, a wall-clock
    step of 15 h made the lease look run out; a step no longer does, see below, so
    here the first process stalls for real), and a second process with the same key
    and store takes the ask over and makes the refund. The first call's baseline read
    then fails: not "failed" (its caller could refund again), but the key was taken
    over: call again with the key, which returns the one refund."""
    clock = FakeClock()
    gate = asyncio.Event()
    server = _GatedFirstRead(clock, gate)
    store = MemoryStore()
    policy = RetryPolicy(deadline=None, read_before_send=True, max_attempts=2)
    async with (
        hostile_client(server, retry=policy, store=store) as first,
        hostile_client(server, retry=policy, store=store) as second,
    ):
        one = asyncio.ensure_future(
            first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="rma-9")
        )
        await server.held.wait()
        clock.advance(store.lease + 1.0)
        refund = await second.refund_bag(
            ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="rma-9"
        )
        gate.set()
        with pytest.raises(RecordStoreError, match="call again with the same key"):
            await one
        again = await first.refund_bag(
            ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="rma-9"
        )
    assert again == refund
    assert server.ours == [refund.id]


class _HeldFirstRead(Hostile):
    """The first refund-list read waits for ``gate``, then answers as every read does."""

    def __init__(self, clock: FakeClock, gate: asyncio.Event) -> None:
        super().__init__(clock)
        self.gate = gate
        self.held = asyncio.Event()

    async def _list(self, request: web.Request) -> web.Response:
        if not self.held.is_set():
            self.held.set()
            await self.gate.wait()
        return await super()._list(request)


@pytest.mark.parametrize("step", [15 * HOUR, 3 * HOUR, 60.0])
async def test_a_wall_clock_step_longer_than_the_lease_hands_no_live_key_over(
    step: float,
) -> None:
    """Seed 931575: while a keyed call runs (its baseline read hangs), this machine's
    wall clock steps forward by more than the lease (30 s). The lease was judged on the
    wall clock alone: it looked run out, a second process with the same key took the
    ask over, and the first call's next write was refused; what it had learned since
    its last write (in the seed, a 429) was lost, and the key's next call took another
    system's refund for the send's. Now the second process finds the key busy and
    waits: the first call sends, and both callers get its one refund."""
    clock = FakeClock()
    gate = asyncio.Event()
    server = _HeldFirstRead(clock, gate)
    store = MemoryStore()
    policy = RetryPolicy(deadline=120.0, read_before_send=True, max_attempts=2)
    async with (
        hostile_client(server, retry=policy, store=store) as first,
        hostile_client(server, retry=policy, store=store) as second,
    ):
        one = asyncio.ensure_future(
            first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="rma-7")
        )
        await server.held.wait()
        clock.step_wall(step)
        two = asyncio.ensure_future(
            second.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key="rma-7")
        )
        await clock.sleep(5.0)
        assert not two.done(), two
        assert server.posts == 0
        gate.set()
        try:
            refund = await one
            assert await two == refund
        finally:
            two.cancel()
    assert server.ours == [refund.id]
    assert server.posts == 1
