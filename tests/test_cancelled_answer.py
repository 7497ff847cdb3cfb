"""A caller cancels its call while the POST's answer is on its way back (risk (b) of
docs/remaining-risk.md): the answer is awaited apart, and what it proves is kept for
the ask's next resume in this client. A 429 proves nothing applied: the repeat sends
its own refund, never taking another system's identical one made meanwhile. A 2xx names
the ask's refund: the repeat returns it with no second POST. No answer proves nothing:
the ask stays pending, as before.

All of that with ``VioletClient(keep_cancelled_sends=True)``; off (the default), a
cancelled call's POST is cancelled with it and its late answer is never kept.

Each test scripts its own server (tests/hostile.py) on a FakeClock shared with the
client; the POST's answer is held until the caller's cancellation has gone through, and
refunds are counted by the server's own record."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from violet_async import (
    AmbiguousOutcomeError,
    BagPendingError,
    RequestValidationError,
    RetryPolicy,
    Timeouts,
    VioletClient,
)
from violet_async._protocol import Phase
from violet_async._requests import LateAnswer, _kept
from violet_async._transport import REQUEST_LEFT, RawResponse
from violet_async.stores import Claim, KeyEntry, MemoryStore, SQLiteStore
from violet_async.testing import FakeClock

from .hostile import APP_ID, BAG_ID, ORDER_ID, SECRET, Hostile, Step, hostile_client

RETRY = RetryPolicy(max_attempts=3, deadline=120.0, jitter=False)
KEEP = {"keep_cancelled_sends": True}
AMOUNT = 300
KEY = "rma-cancelled-answer"


class Held:
    """``Hostile.on_answer`` that holds the first POST's answer until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self) -> None:
        await self.release.wait()


async def _cut(client: VioletClient, server: Hostile, **kwargs: Any) -> None:
    """Start a refund, cancel it once its POST has reached the server (its answer held),
    and check that the cancellation reached the caller at once."""
    call = asyncio.ensure_future(
        client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, **kwargs)
    )
    await asyncio.wait_for(server.post_arrived.wait(), 5.0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 5.0)
    assert server.posts == 1


async def _landed(client: VioletClient, held: Held, server: Hostile) -> None:
    """Let the held answer go, and wait (real time, bounded) for the client to have it."""
    server.on_answer = None
    held.release.set()
    late = tuple(getattr(client._shared, "late_answers", ()))
    if late:
        await asyncio.wait_for(asyncio.gather(*late), 5.0)


def _held_429(clock: FakeClock) -> tuple[Held, Hostile]:
    """A server whose first POST is answered 429 (Retry-After 1 s), its answer held
    back (``Held``) until the test lets it land."""
    held = Held()
    script = [Step(429, commit_after=None, headers={"Retry-After": "1"})]
    return held, Hostile(clock, script=script, on_answer=held)


async def test_a_keyed_call_cancelled_before_its_429_came_back_sends_its_own_on_repeat() -> None:
    clock = FakeClock()
    held, server = _held_429(clock)
    async with hostile_client(server, **KEEP, retry=RETRY, store=MemoryStore()) as client:
        await _cut(client, server, idempotency_key=KEY)
        clock.advance(2.0)
        other = server.add_refund(AMOUNT)["id"]  # another system's identical refund
        await _landed(client, held, server)
        clock.advance(2.0)
        got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        again = await client.refund_bag(
            ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY
        )
    assert got.id != other, "another system's refund handed over as this call's"
    assert server.ours == [got.id], "the ask's own refund, made once"
    assert again.id == got.id
    assert server.posts == 2


async def test_a_keyed_call_cancelled_before_its_200_came_back_gets_that_refund_on_repeat() -> None:
    clock = FakeClock()
    held = Held()
    server = Hostile(clock, script=[Step(200)], on_answer=held)
    async with hostile_client(server, **KEEP, retry=RETRY, store=MemoryStore()) as client:
        await _cut(client, server, idempotency_key=KEY)
        clock.advance(2.0)
        other = server.add_refund(AMOUNT)["id"]
        await _landed(client, held, server)
        clock.advance(2.0)
        got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
    assert server.ours == [got.id], "the refund the 200 named"
    assert got.id != other
    assert server.posts == 1, "no second POST"


async def test_a_keyed_call_cancelled_with_no_answer_stays_pending() -> None:
    """No answer (the attempt's read timeout runs out apart from the call) proves
    nothing: the repeat reads back and, within the settle window, ends pending."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, hang=True, commit_after=None)])
    short = RetryPolicy(max_attempts=3, deadline=20.0, jitter=False)
    async with hostile_client(
        server,
        **KEEP,
        retry=short,
        store=MemoryStore(),
        timeouts=Timeouts(connect=0.2, read=0.2),
    ) as client:
        await _cut(client, server, idempotency_key=KEY)
        late = tuple(getattr(client._shared, "late_answers", ()))
        if late:
            await asyncio.wait_for(asyncio.gather(*late), 5.0)  # its read timeout
        clock.advance(2.0)
        with pytest.raises(AmbiguousOutcomeError) as caught:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
    assert caught.value.pending is not None
    assert server.posts == 1, "never sent again while it may still apply"
    assert server.ours == []


async def test_an_unkeyed_call_cancelled_before_its_429_came_back_resumes_to_its_own() -> None:
    clock = FakeClock()
    held, server = _held_429(clock)
    async with hostile_client(server, **KEEP, retry=RETRY) as client:
        await _cut(client, server)
        clock.advance(2.0)
        other = server.add_refund(AMOUNT)["id"]
        await _landed(client, held, server)
        clock.advance(2.0)
        with pytest.raises(BagPendingError) as caught:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        assert server.posts == 1, "a new ask on the bag is still held back"
        got = await client.resume(caught.value.pending[0])
    assert got.id != other, "another system's refund handed over as this call's"
    assert server.ours == [got.id]
    assert server.posts == 2


async def test_an_unkeyed_call_cancelled_before_its_200_came_back_resumes_to_that_refund() -> None:
    clock = FakeClock()
    held = Held()
    server = Hostile(clock, script=[Step(200)], on_answer=held)
    async with hostile_client(server, **KEEP, retry=RETRY) as client:
        await _cut(client, server)
        clock.advance(2.0)
        server.add_refund(AMOUNT)
        await _landed(client, held, server)
        with pytest.raises(BagPendingError) as caught:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        got = await client.resume(caught.value.pending[0])
    assert server.ours == [got.id]
    assert server.posts == 1


async def _begun(call: asyncio.Future[Any]) -> None:
    """Give a call begun before the late answer lands time to run as far as it goes
    without that answer (real time, bounded): one that does not wait for it reads the
    bag back (on the shared clock, at no real cost) and ends."""
    await asyncio.wait((call,), timeout=0.5)


async def test_a_keyed_repeat_begun_before_the_429_lands_waits_for_it_and_sends_its_own() -> None:
    """Simulator seed 1197549: the key's repeat begins at once, while the cancelled
    call's 429 is still on its way back, and another system's identical refund, made
    after that send, is on the bag. The repeat waits for the answer (up to its
    deadline): the 429 proves the send not applied, and the repeat sends its own. (It
    read the bag beside the answer before, and took that refund for its own.)"""
    clock = FakeClock()
    held, server = _held_429(clock)
    async with hostile_client(server, **KEEP, retry=RETRY, store=MemoryStore()) as client:
        await _cut(client, server, idempotency_key=KEY)
        clock.advance(2.0)
        other = server.add_refund(AMOUNT)["id"]  # another system's identical refund
        repeat = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        )
        await _begun(repeat)
        await _landed(client, held, server)
        got = await asyncio.wait_for(repeat, 5.0)
    assert got.id != other, "another system's refund handed over as this call's"
    assert server.ours == [got.id], "the ask's own refund, made once"
    assert server.posts == 2


async def test_a_resume_begun_before_the_429_lands_waits_for_it_and_sends_its_own() -> None:
    """Simulator seed 932620, unkeyed: the caller resumes the pending record at once,
    while the cancelled call's 429 is on its way back. The resume waits for it and
    sends its own; the record it would have left pending (resumed elsewhere, it took
    another system's refund) is never left."""
    clock = FakeClock()
    held, server = _held_429(clock)
    async with hostile_client(server, **KEEP, retry=RETRY) as client:
        await _cut(client, server)
        clock.advance(2.0)
        other = server.add_refund(AMOUNT)["id"]
        with pytest.raises(BagPendingError) as caught:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        resume = asyncio.ensure_future(client.resume(caught.value.pending[0]))
        await _begun(resume)
        await _landed(client, held, server)
        got = await asyncio.wait_for(resume, 5.0)
    assert got.id != other, "another system's refund handed over as this call's"
    assert server.ours == [got.id]
    assert server.posts == 2


async def test_a_repeat_whose_deadline_ends_before_the_late_answer_lands_does_not_send() -> None:
    """The answer is still held when the repeat's deadline ends: the repeat reads the
    bag back, as before, and ends pending, never sending over the send that may still
    apply. The answer, landing later, is kept for the next repeat, which sends its own
    and never takes another system's identical refund made meanwhile (the repeat that
    read back and parked the record, with no send of its own, knew nothing newer of
    that send: it used to keep the answer from being kept)."""
    clock = FakeClock()
    held, server = _held_429(clock)
    # A real-time deadline short enough for the test (the wait runs on the loop's clock).
    short = RetryPolicy(max_attempts=3, deadline=0.3, jitter=False)
    async with hostile_client(server, **KEEP, retry=RETRY, store=MemoryStore()) as client:
        await _cut(client, server, idempotency_key=KEY)
        with pytest.raises(AmbiguousOutcomeError):
            await client.with_options(retry=short).refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY
            )
        assert server.posts == 1
        await _landed(client, held, server)
        clock.advance(2.0)
        other = server.add_refund(AMOUNT)["id"]  # another system's identical refund
        got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
    assert got.id != other, "another system's refund handed over as this call's"
    assert server.ours == [got.id]
    assert server.posts == 2


async def test_a_429_landed_late_is_written_through_to_the_keys_store(tmp_path: Path) -> None:
    """Simulator seed 1130819's class, across processes: the cancelled keyed call's 429
    lands in its own process, and the key's repeat comes from another process sharing
    the store (one SQLite file, two stores, two clients). The late answer is written
    through the key's entry: the other process sends its own refund, never taking
    another system's identical one made after the send (it read the send back as "may
    have applied" before, and took it)."""
    clock = FakeClock()
    held, server = _held_429(clock)
    path = tmp_path / "keys.db"
    async with (
        SQLiteStore(path) as one_store,
        hostile_client(server, **KEEP, retry=RETRY, store=one_store) as one,
    ):
        await _cut(one, server, idempotency_key=KEY)
        clock.advance(2.0)
        other = server.add_refund(AMOUNT)["id"]  # another system's identical refund
        await _landed(one, held, server)
        clock.advance(2.0)
        async with (
            SQLiteStore(path) as two_store,
            hostile_client(server, retry=RETRY, store=two_store) as two,
        ):
            got = await two.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY
            )
        again = await one.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
    assert got.id != other, "another system's refund handed over as this call's"
    assert server.ours == [got.id], "the ask's own refund, made once"
    assert again.id == got.id, "the first process's repeat finds it in the store"
    assert server.posts == 2


class _GatedStore(MemoryStore):
    """A MemoryStore whose claim of a record proven not applied (the late answer's
    write-through) waits at a gate the test opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.reached = asyncio.Event()

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        if self.gate is not None and fresh.ask.phase is Phase.ABSENT:
            self.reached.set()
            await self.gate.wait()
        return await super().claim(fresh, now)


async def test_a_repeat_begun_while_the_late_answer_is_written_through_joins_it() -> None:
    """The key's repeat in this process begins while the late 429 is being written
    through the key's entry (its store round trip under way): it waits for that write
    as a flight of the key, then takes the key over and sends its own. (This process's
    calls share one owner in the store: a claim does not keep them apart, and the
    write's give-back took the key from under the repeat, which then could not save
    its send: nothing sent, the caller told so.)"""
    clock = FakeClock()
    held, server = _held_429(clock)
    store = _GatedStore()
    async with hostile_client(server, **KEEP, retry=RETRY, store=store) as client:
        await _cut(client, server, idempotency_key=KEY)
        store.gate = asyncio.Event()
        server.on_answer = None
        held.release.set()
        await asyncio.wait_for(store.reached.wait(), 5.0)  # the write-through's claim
        clock.advance(2.0)
        other = server.add_refund(AMOUNT)["id"]  # another system's identical refund
        repeat = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        )
        await _steps(20)
        store.gate.set()
        got = await asyncio.wait_for(repeat, 5.0)
    assert got.id != other, "another system's refund handed over as this call's"
    assert server.ours == [got.id], "the ask's own refund, made once"
    assert server.posts == 2


async def test_aclose_drops_a_late_answer_still_awaited() -> None:
    """Closing the client while a cancelled call's answer is still on its way drops
    it: the close does not wait for it, and nothing is left running or unretrieved."""
    clock = FakeClock()
    held = Held()
    server = Hostile(clock, script=[Step(200)], on_answer=held)
    async with hostile_client(server, **KEEP, retry=RETRY) as client:
        await _cut(client, server)
        late = tuple(getattr(client._shared, "late_answers", ()))
        assert late, "the answer is awaited apart from the call"
        await asyncio.wait_for(client.aclose(), 5.0)
        assert all(task.done() for task in late)
        held.release.set()  # the server's handler ends (its answer goes nowhere)


async def test_a_post_over_the_callers_own_session_is_cancelled_with_the_call() -> None:
    """A caller's own ``session=`` cannot tell when a request left: its POST is never
    kept past a cancellation (nothing awaited apart, nothing recorded), as before."""
    clock = FakeClock()
    held = Held()
    server = Hostile(clock, script=[Step(200)], on_answer=held)
    async with aiohttp.ClientSession() as session:
        async with hostile_client(server, **KEEP, retry=RETRY, session=session) as client:
            await _cut(client, server)
            assert not client._shared.late_answers
            held.release.set()


# How a POST's exchange is handed over (``_requests._kept``), with an exchange scripted
# here: a future stands for the answer on its way, the mark for the connector's.


async def _exchange(answer: asyncio.Future[RawResponse], *, left: bool) -> RawResponse:
    if left:
        mark = REQUEST_LEFT.get()
        assert mark is not None, "the exchange runs with its mark"
        mark.left = True  # what the connector does as it hands the connection over
    return await answer


async def _steps(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_an_answer_in_as_the_caller_is_cancelled_is_handed_over() -> None:
    """The answer came (the exchange set it) and the caller's cancellation arrived
    before the caller woke up: the answer is handed over, not lost."""
    loop = asyncio.get_running_loop()
    wire: asyncio.Future[RawResponse] = loop.create_future()
    late = LateAnswer()
    call = asyncio.ensure_future(_kept(late, _exchange(wire, left=True)))
    await _steps(3)  # the caller waits for the answer
    answer = RawResponse(429, {}, b"{}")
    wire.set_result(answer)
    await asyncio.sleep(0)  # the exchange's task sets the answer; the caller not yet up
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert late.task is not None
    assert late.task.result() is answer


async def test_an_exchange_whose_request_left_runs_on_past_the_cancel() -> None:
    loop = asyncio.get_running_loop()
    wire: asyncio.Future[RawResponse] = loop.create_future()
    late = LateAnswer()
    call = asyncio.ensure_future(_kept(late, _exchange(wire, left=True)))
    await _steps(3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert late.task is not None
    assert not late.task.done(), "the cancellation reached the caller at once"
    answer = RawResponse(200, {}, b"{}")
    wire.set_result(answer)
    assert await asyncio.wait_for(late.task, 5.0) is answer


async def test_an_exchange_whose_request_had_not_left_is_cancelled_with_the_call() -> None:
    loop = asyncio.get_running_loop()
    wire: asyncio.Future[RawResponse] = loop.create_future()
    late = LateAnswer()
    call = asyncio.ensure_future(_kept(late, _exchange(wire, left=False)))
    await _steps(3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await _steps(3)
    assert late.task is None
    assert wire.cancelled(), "the exchange was cancelled, never left"


async def test_an_exchange_error_reaches_the_waiting_caller() -> None:
    loop = asyncio.get_running_loop()
    wire: asyncio.Future[RawResponse] = loop.create_future()
    late = LateAnswer()
    call = asyncio.ensure_future(_kept(late, _exchange(wire, left=True)))
    await _steps(3)
    wire.set_exception(OSError("reset"))
    with pytest.raises(OSError, match="reset"):
        await asyncio.wait_for(call, 5.0)
    assert late.task is None


# Off (the default): main's send path.


async def test_off_a_keyed_call_cancelled_before_its_429_came_back_keeps_nothing() -> None:
    """Without ``keep_cancelled_sends`` the POST is cancelled with the call: nothing is
    awaited apart, its 429 never reaches the ask, and the repeat (its record "sent, may
    have applied") reads back and ends pending within the window, never sending again."""
    clock = FakeClock()
    held, server = _held_429(clock)
    short = RetryPolicy(max_attempts=3, deadline=20.0, jitter=False)
    async with hostile_client(server, retry=short, store=MemoryStore()) as client:
        await _cut(client, server, idempotency_key=KEY)
        assert not client._shared.late_answers, "nothing awaited apart"
        await _landed(client, held, server)
        clock.advance(2.0)
        with pytest.raises(AmbiguousOutcomeError) as caught:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
    assert caught.value.pending is not None
    assert server.posts == 1, "the 429 was not kept: no second POST"
    assert server.ours == []


@pytest.mark.parametrize(("keep", "marking"), [(False, False), (True, True)])
async def test_only_a_client_that_keeps_cancelled_sends_marks_its_requests(
    keep: bool, marking: bool
) -> None:
    """Off, the client's session has aiohttp's own connector (nothing marks a request
    as left); on, the connector that marks it."""
    client = VioletClient(
        APP_ID, SECRET, token="t", base_url="http://127.0.0.1:9/v1", keep_cancelled_sends=keep
    )
    async with client:
        session = client._shared.transport._session
        assert session is not None
        assert isinstance(session.connector, aiohttp.TCPConnector)
        assert (type(session.connector) is not aiohttp.TCPConnector) is marking
        assert client._shared.keep_cancelled_sends is keep
        assert client.with_options(retry=RETRY)._shared.keep_cancelled_sends is keep


@pytest.mark.parametrize("value", ["yes", 1, 0, None, 1.0])
def test_keep_cancelled_sends_must_be_a_bool(value: object) -> None:
    with pytest.raises(RequestValidationError) as caught:
        VioletClient(APP_ID, SECRET, token="t", keep_cancelled_sends=value)  # type: ignore[arg-type]
    assert caught.value.field == "keep_cancelled_sends"
