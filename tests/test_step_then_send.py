"""A send whose window opens after this machine's wall clock stepped (simulator seed
920240). The first POST is answered 429 (nothing applied); while the client waits
out its Retry-After, its wall clock steps (NTP) and another system refunds the same
amount on the bag; the second POST is answered 500 without applying. Violet's clock
is ahead of this machine's by less than ``clock_skew``.

The window a refund's date must sit in opens at the second send, read after the
step, and Violet's clock is read again by the ``Date`` of that send's answer: the
other system's refund, 10 s before the send by Violet's own clock, is not this
call's. (The step used to leave the record "unsure" for good: its dates were judged
within ``clock_skew`` (60 s) of the send, and that refund was handed to the caller as
theirs: a false success, the refund they asked for never made.) Refunds are counted
by the server's own record (tests/hostile.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from aiohttp import web

from violet_async import AmbiguousOutcomeError, OrderRefund, RetryPolicy
from violet_async._ask import Phase
from violet_async.stores import Claim, KeyEntry, MemoryStore
from violet_async.testing import FakeClock
from violet_async.testing.sim._kinds_review import ProcessClock

from .hostile import BAG_ID, ORDER_ID, Hostile, Step, hostile_client

RETRY = RetryPolicy(max_attempts=3, deadline=120.0)
AMOUNT = 300


def _server(clock: FakeClock, *, violet_ahead: float, retry_after: str = "20") -> Hostile:
    return Hostile(
        clock,
        script=[
            Step(429, commit_after=None, headers={"Retry-After": retry_after}),
            Step(500, b'{"message": "internal error"}', commit_after=None),
        ],
        server_skew=violet_ahead,
    )


async def _outcome(call: object) -> OrderRefund | AmbiguousOutcomeError:
    try:
        return await call  # type: ignore[misc,no-any-return]
    except AmbiguousOutcomeError as exc:
        return exc


@pytest.mark.parametrize("step", [30.0, -30.0, 3600.0])
@pytest.mark.parametrize("violet_ahead", [0.0, 45.0])
async def test_another_systems_refund_made_before_a_send_after_a_step_is_not_ours(
    step: float, violet_ahead: float
) -> None:
    clock = FakeClock()
    server = _server(clock, violet_ahead=violet_ahead)
    clock.call_later(2.0, lambda: clock.step_wall(step))
    other: list[int] = []
    clock.call_later(10.0, lambda: other.append(server.add_refund(AMOUNT)["id"]))
    async with hostile_client(server, retry=RETRY) as client:
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
    assert other, "the other system's refund was made during the wait"
    assert server.posts >= 2
    if isinstance(got, OrderRefund):
        assert got.id not in other, "another system's refund handed over as this call's"
        assert got.id in server.ours
    assert len(server.ours) <= 1


async def test_our_own_refund_after_a_step_is_still_found() -> None:
    """The other side: the second send applies (its answer lost, a 504 after the
    commit) after the step; reading the bag back finds it, and nothing more is sent."""
    clock = FakeClock()
    server = Hostile(
        clock,
        script=[
            Step(429, commit_after=None, headers={"Retry-After": "20"}),
            Step(504, b"gateway timeout", commit_after=0.0),
        ],
        server_skew=45.0,
    )
    clock.call_later(2.0, lambda: clock.step_wall(30.0))
    async with hostile_client(server, retry=RETRY) as client:
        got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
    assert server.ours == [got.id]
    assert server.posts == 2


# -- a caller cancelled while its re-send waits ------------------------------------------
#
# Simulator seed 923128: a keyed call's POST is answered 429 (nothing applied); while it
# waits out the Retry-After, another system refunds the same amount on the bag and the
# caller cancels. Nothing of the call can have applied: the key's record must not say
# "sent at the planned time", or the repeat reads the bag back and takes that other
# refund for the one it planned to send.


@pytest.mark.parametrize("keyed", [True, False])
@pytest.mark.parametrize("violet_ahead", [0.0, 45.0])
async def test_a_call_cancelled_waiting_to_send_again_after_a_429_left_nothing(
    keyed: bool, violet_ahead: float
) -> None:
    clock = FakeClock()
    server = Hostile(
        clock,
        script=[Step(429, commit_after=None, headers={"Retry-After": "30"})],
        server_skew=violet_ahead,
    )
    other: list[int] = []
    clock.call_later(10.0, lambda: other.append(server.add_refund(AMOUNT)["id"]))
    key = {"idempotency_key": "rma-923128"} if keyed else {}
    async with hostile_client(server, retry=RETRY) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, **key)
        )
        clock.call_later(20.0, call.cancel)
        with pytest.raises(asyncio.CancelledError):
            await call
        assert other, "the other system's refund was made during the wait"
        assert server.posts == 1
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, **key))
    assert isinstance(got, OrderRefund), got
    assert got.id not in other, "another system's refund handed over as this call's"
    assert server.ours == [got.id]
    assert server.posts == 2


# -- a step since the client was made, before a call's only send ----------------------
#
# Simulator seed 922284, and review 14's scripted server: this machine's wall clock
# steps (3 h) after the client was made and before a call; another system refunds the
# same amount 10 s before the call's POST, which is answered 504 without applying;
# Violet's clock is 58 s ahead of this machine's. The send's times and every Date read
# after it are on the stepped clock: the other refund is 10 s before the send by
# Violet's own clock, not this call's.


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("step", [3 * 3600.0, -3 * 3600.0, 30.0])
async def test_a_step_since_the_client_was_made_does_not_widen_a_later_sends_window(
    step: float, keyed: bool
) -> None:
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, b"gateway", commit_after=None)], server_skew=58.0)
    key = {"idempotency_key": "rma-922284"} if keyed else {}
    async with hostile_client(server, retry=RETRY) as client:
        clock.advance(5.0)
        clock.step_wall(step)
        clock.advance(5.0)
        other = server.add_refund(AMOUNT)["id"]
        clock.advance(10.0)
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, **key))
    if isinstance(got, OrderRefund):
        assert got.id != other, "another system's refund handed over as this call's"
        assert server.ours == [got.id]
    assert len(server.ours) <= 1


# -- a step during the ask, after its send left ----------------------------------------


@pytest.mark.parametrize("step", [30.0, -30.0, 3600.0])
@pytest.mark.parametrize("violet_ahead", [0.0, 45.0, -45.0])
async def test_a_step_after_the_send_leaves_another_systems_refund_for_review(
    step: float, violet_ahead: float
) -> None:
    """The step comes a second after the POST (answered 504, nothing applied): the
    send's time and what was learned before may be off by it (or not, were it a
    suspend), so the record stays unsure. Another system's refund of the same amount,
    made 10 s before the send, is then never claimed: the call ends for review."""
    clock = FakeClock()
    server = Hostile(
        clock, script=[Step(504, b"gateway", commit_after=None)], server_skew=violet_ahead
    )
    clock.advance(5.0)
    other = server.add_refund(AMOUNT)["id"]
    clock.advance(10.0)
    clock.call_later(1.0, lambda: clock.step_wall(step))
    async with hostile_client(server, retry=RETRY) as client:
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
    assert isinstance(got, AmbiguousOutcomeError), f"{got!r} (another system's is {other})"
    assert got.pending is not None
    assert got.pending.needs_review
    assert server.posts == 1
    assert server.ours == []


@pytest.mark.parametrize("again", ["resume", "keyed"])
@pytest.mark.parametrize("second_step", [-30.0, 30.0])
async def test_a_review_resumed_after_another_step_still_claims_nothing(
    second_step: float, again: str
) -> None:
    """Simulator seed 931646: the first POST is answered 429; in the wait another
    system refunds the same amount and the clock steps 3 h; the re-send is answered
    500 (nothing applied). The clock steps again (30 s) and the caller resumes (or
    repeats its keyed call). The resume once moved the record by the step and read it
    "unsure", which lowered the bar a date must clear to ``clock_skew`` (60 s) below
    the send: the other system's refund, 10 s before the send by Violet's clock, was
    handed over as the caller's.

    Since the bag is read before a re-send after a 429 (seeds 1141662, 1145746), the
    other system's refund is listed before the re-send: never this call's. The re-send's
    500 is proven not applied once its window is over, and the call sends again: its
    own refund, one, and the other system's is never handed over, by the call or by
    what comes after it."""
    clock = FakeClock()
    server = _server(clock, violet_ahead=60.0)
    others: list[int] = []
    clock.call_later(10.0, lambda: others.append(server.add_refund(AMOUNT)["id"]))
    clock.call_later(19.9, lambda: clock.step_wall(3 * 3600.0))
    key = {"idempotency_key": "rma-931646"} if again == "keyed" else {}
    async with hostile_client(server, retry=RETRY) as client:
        got = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, **key))
        assert isinstance(got, OrderRefund), got
        assert got.id not in others, "another system's refund handed over as this call's"
        assert (server.posts, server.ours) == (3, [got.id])
        clock.advance(14.0)
        clock.step_wall(second_step)
        clock.advance(16.0)
        if again == "keyed":
            later = await _outcome(
                client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, **key)
            )
            assert isinstance(later, OrderRefund), later
            assert later.id == got.id
    assert (server.posts, server.ours) == (3, [got.id])


# -- a re-send's save that takes time ----------------------------------------------------


@attrs.define
class SlowSentSave:
    """A MemoryStore whose saves of a re-sent (SENT, second send) record take
    ``takes`` seconds of the shared clock, as a fleet's send slot is waited for while
    the send is recorded; ``during`` runs half-way through."""

    clock: FakeClock
    takes: float
    during: Callable[[], object]
    inner: MemoryStore = attrs.Factory(MemoryStore)
    slow: int = 0

    @property
    def lease(self) -> float:
        return self.inner.lease

    @property
    def retention(self) -> float:
        return self.inner.retention

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        return await self.inner.claim(fresh, now)

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        ask = entry.ask
        if ask.phase is Phase.SENT and ask.sends == 2 and not self.slow:
            self.slow += 1
            await self.clock.sleep(self.takes / 2)
            self.during()
            await self.clock.sleep(self.takes / 2)
        return await self.inner.save(entry, owner)

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        return await self.inner.renew(key, owner, lease_until)

    async def load(self, key: str) -> KeyEntry | None:
        return await self.inner.load(key)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_resend_whose_record_takes_long_to_save_opens_its_window_after() -> None:
    """A keyed call's POST is answered 429; recording its re-send takes 20 s (a fleet's
    send slot), and another system refunds the same amount half-way through; the
    re-send is answered 500 without applying. The window opens when the request
    leaves, after the save: that refund is never this call's."""
    clock = FakeClock()
    server = _server(clock, violet_ahead=0.0, retry_after="5")
    other: list[int] = []
    store = SlowSentSave(clock, 20.0, lambda: other.append(server.add_refund(AMOUNT)["id"]))
    async with hostile_client(server, retry=RETRY, store=store) as client:
        got = await _outcome(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key="slow")
        )
    assert store.slow == 1
    assert other, "the other system's refund was made during the save"
    if isinstance(got, OrderRefund):
        assert got.id not in other, "another system's refund handed over as this call's"
        assert server.ours == [got.id]
    assert len(server.ours) <= 1


# -- a record resumed by another process on this machine after a step --------------------


class _NoDate(Hostile):
    """No readable ``Date`` header (as in the seed): nothing but the machine's clocks
    places the record's times."""

    @web.middleware
    async def _date_header(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["Date"] = "no date here"
        return response


@pytest.mark.parametrize("dated", [False, True])
@pytest.mark.parametrize("step", [15 * 3600.0, -15 * 3600.0])
async def test_a_record_moved_by_a_step_is_not_moved_again_by_another_process(
    step: float, dated: bool
) -> None:
    """Simulator seed 921142: a call's POST is answered 504 (nothing applied) and its
    wall clock steps 15 h while it reads back; the call ends pending, its record's
    times moved with the step. Another process on this machine, made before the step,
    resumes it: it moved the times by the step once more (its own clock stepped since
    it was made), the settle window ended 15 h late, and the resume could only say
    "pending" for hours. Both processes share the machine's monotonic clock: the
    record is moved by the step since it was written (none), its window ends on time,
    absence is proven and the one refund is made."""
    clock = FakeClock()
    server = (Hostile if dated else _NoDate)(
        clock, script=[Step(504, b"gateway", commit_after=None), Step(200)]
    )
    clock.call_later(2.0, lambda: clock.step_wall(step))
    policy = RetryPolicy(max_attempts=3, deadline=20.0, settle_running=60.0)
    async with (
        hostile_client(server, retry=policy) as first,
        # Another process: its own clock object, this machine's clocks.
        hostile_client(server, retry=policy, clock=ProcessClock(clock)) as second,
    ):
        got = await _outcome(first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        assert isinstance(got, AmbiguousOutcomeError), got
        assert got.pending is not None
        assert not got.pending.needs_review
        assert server.posts == 1
        clock.advance(120.0)  # past the settle window, on every clock
        refund = await _outcome(second.resume(got.pending))
    assert isinstance(refund, OrderRefund), f"{refund!r}: the window moved twice"
    assert server.ours == [refund.id]
    assert server.posts == 2
