"""Review 21: attacks an outsider would try on today's main.

Each test scripts its own server (tests/hostile.py) on a FakeClock shared with the
client; refunds are counted by the server's own record."""

from __future__ import annotations

import asyncio
import contextlib

import attrs
import pytest
from aiohttp import web

from violet_async import AmbiguousOutcomeError, OrderRefund, RetryPolicy
from violet_async._ask import machine_name, same_machine
from violet_async._protocol import Do, Observation, step
from violet_async.stores import Claim, KeyEntry, MemoryStore
from violet_async.testing import FakeClock
from violet_async.testing.sim._kinds_review import ProcessClock

from .hostile import BAG_ID, ORDER_ID, Hostile, Step, hostile_client

AMOUNT = 300

#: ``/proc/self/timens_offsets`` of a process in the machine's first time namespace,
#: and of one in a namespace whose monotonic clock is 500 s ahead (a container made
#: with ``unshare --time --monotonic 500``, or restored by CRIU: its monotonic clock
#: goes on from where it was checkpointed). Both read the machine's ``boot_id``.
ROOT_OFFSETS = "monotonic           0         0\nboottime            0         0\n"
AHEAD_OFFSETS = "monotonic         500         0\nboottime            0         0\n"


class _NamespaceClock:
    """A process's view of the machine's clocks in a time namespace: the same wall
    clock, its monotonic clock ``ahead`` seconds ahead of the machine's; named as the
    process names its machine (its ``boot_id`` and its namespace's offsets)."""

    def __init__(self, clock: FakeClock, offsets: str, ahead: float) -> None:
        self._clock = clock
        self._ahead = ahead
        self.machine = machine_name(clock.machine, offsets)

    def monotonic(self) -> float:
        return self._clock.monotonic() + self._ahead

    def time(self) -> float:
        return self._clock.time()

    async def sleep(self, seconds: float) -> None:
        await self._clock.sleep(seconds)


def test_a_time_namespace_names_another_machine() -> None:
    """Processes in two time namespaces of one boot read one ``boot_id`` but monotonic
    clocks that differ by their namespaces' offsets: their clock names are not of one
    machine. The first namespace names its machine by the boot alone (as records
    written before did)."""
    boot = "e149ceffa5a14446"
    root, ahead = machine_name(boot, ROOT_OFFSETS), machine_name(boot, AHEAD_OFFSETS)
    assert root == boot
    assert machine_name(boot, "") == boot  # no time namespaces (Linux before 5.6)
    assert not same_machine(f"p1@{root}", f"p2@{ahead}")
    assert same_machine(f"p1@{ahead}", f"p2@{machine_name(boot, AHEAD_OFFSETS)}")
    assert machine_name("", AHEAD_OFFSETS) == ""  # no boot: no machine
    # One process's clock is on its own machine, named or not; two unnamed are not.
    assert same_machine("p1", "p1")
    assert not same_machine("p1", "p2")


async def test_a_record_from_another_time_namespace_is_not_moved_by_its_offset() -> None:
    """A worker's POST is answered 504 while it is still running at Violet (it applies
    40 s later); the worker's call ends pending, its record stamped with its wall and
    monotonic time. A worker in a container on the same host (one ``boot_id``, its own
    time namespace, monotonic clock 500 s ahead) resumes the record 5 s later. Taken
    for a process on one machine, the record was moved by the "step" between the two
    monotonic clocks (-500 s): its settle window looked long over, the read-back missed
    the refund still running, and the refund was sent again: two refunds."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, b"gateway", commit_after=40.0), Step(200)])
    policy = RetryPolicy(max_attempts=3, deadline=20.0, settle_running=60.0)
    async with (
        hostile_client(
            server, retry=policy, clock=_NamespaceClock(clock, ROOT_OFFSETS, 0.0)
        ) as first,
        hostile_client(
            server, retry=policy, clock=_NamespaceClock(clock, AHEAD_OFFSETS, 500.0)
        ) as second,
    ):
        try:
            got: object = await first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        except AmbiguousOutcomeError as exc:
            got = exc
        assert isinstance(got, AmbiguousOutcomeError), got
        assert got.pending is not None
        assert server.posts == 1
        clock.advance(5.0)
        try:
            later: object = await second.resume(got.pending)
        except AmbiguousOutcomeError as exc:
            later = exc
        clock.advance(120.0)  # the first POST has applied
    assert len(server.ours) == 1, f"{later!r}: refunded twice"
    assert server.posts == 1
    if isinstance(later, OrderRefund):
        assert [later.id] == server.ours


# -- a key taken over from a process on this machine after its wall clock stepped back --


class _Dies:
    """A process's view of a shared store: as ``base`` until the process dies, then
    nothing it writes arrives (its cancellation's cleanup included)."""

    def __init__(self, base: MemoryStore) -> None:
        self._base = base
        self.lease, self.retention = base.lease, base.retention
        self.dead = False

    def _alive(self) -> None:
        if self.dead:
            raise ConnectionError("the process is gone")

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        self._alive()
        return await self._base.claim(fresh, now)

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        self._alive()
        return await self._base.save(entry, owner)

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        self._alive()
        return await self._base.renew(key, owner, lease_until)

    async def load(self, key: str) -> KeyEntry | None:
        self._alive()
        return await self._base.load(key)

    async def expired(self, key: str, now: float) -> bool:
        self._alive()
        return await self._base.expired(key, now)

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("elsewhere", [False, True])
@pytest.mark.parametrize("step", [-120.0, 0.0])
async def test_a_key_taken_over_after_a_step_back_keeps_its_in_flight_window(
    step: float, elsewhere: bool
) -> None:
    """A keyed call's POST is in flight at Violet (it commits 200 s later) when its
    process dies; the record it saved says SENT, stamped with its wall and monotonic
    time. The machine's wall clock steps back 120 s. Another process on this machine
    takes the key over once the lease has run out and, its owner having stopped
    mid-send, keeps the ask pending until a request still running could commit (the
    time now, plus one attempt's timeout and ``settle_running``). That window was
    added to the record beside the dead owner's stamp; the driver then moved the whole
    record by the step since the stamp (-120 s), the window with it: it looked over at
    once, the read-back missed the POST still running, and the refund was sent again:
    two refunds. The same when the process taking the key over is on another machine
    (its client made before the step): the engine moved the record, window and all, by
    the step of its clock since the client was made."""
    clock = FakeClock()
    server = Hostile(
        clock, script=[Step(200, hang=True, commit_after=200.0), Step(200, commit_after=0.0)]
    )
    base = MemoryStore()
    dying = _Dies(base)
    policy = RetryPolicy(max_attempts=3, deadline=120.0, settle_running=60.0)
    key = {"idempotency_key": "rma-review21"}
    async with (
        hostile_client(server, retry=policy, store=dying) as first,
        hostile_client(
            server,
            retry=policy,
            store=base,
            # Another process on this machine, or one on another machine (its wall
            # clock in step with this one's, stepped alike).
            clock=_NamespaceClock(clock, AHEAD_OFFSETS, 0.0) if elsewhere else ProcessClock(clock),
        ) as second,
    ):
        call = asyncio.ensure_future(
            first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, **key)
        )
        await server.post_arrived.wait()
        dying.dead = True
        call.cancel()
        with contextlib.suppress(BaseException):
            await call
        clock.step_wall(step)
        clock.advance(base.lease + 125.0)  # the lease has run out, on the wall clock too
        try:
            got: object = await second.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, **key)
        except AmbiguousOutcomeError as exc:
            got = exc
        clock.advance(300.0)  # the first POST has applied
    assert len(server.ours) == 1, f"{got!r}: refunded twice"
    assert server.posts == 1
    if isinstance(got, OrderRefund):
        assert [got.id] == server.ours


# -- Date headers that disagree: a claim's bar below the latest reading ------------------


@pytest.mark.parametrize(("before_send", "claimed"), [(10.0, False), (-1.0, True)])
def test_a_refund_before_the_send_by_the_latest_date_is_not_claimed_when_dates_disagree(
    before_send: float, claimed: bool
) -> None:
    """Simulator seed 961780: Violet's clock is 46 s ahead; one answer's ``Date`` was
    120 s behind the others, so the ask's readings of Violet's clock disagree (the
    record is unsure). Its send (a 500: nothing applied) followed another system's
    refund of the same amount by 10 s. The bar a date had to clear was ``clock_skew``
    (60 s) below every reading, and this machine's clock's 5 s: by the local reading
    the refund was 36 s after the send, and a resume after a step claimed it as the
    ask's own. By the latest reading (this process's own, 46 s) it is 10 s before the
    send: for review. A refund 1 s after the send by that reading is still the ask's."""
    from .test_protocol import SETTINGS, T0, refund, sent

    record = sent(server_offset=46.0, offsets=(-74.0, 46.0), clock_unsure=True)
    record = attrs.evolve(record, settle_until=T0 + 60.0)
    theirs = refund(5, age=-(46.0 - before_send))  # Violet's date, 46 s ahead
    read = Observation.read(T0 + 100.0, [theirs], server_time=T0 + 146.0, received_at=T0 + 100.5)
    ask, action = step(record, read, SETTINGS, T0 + 100.5, 100.0)
    assert (action.do is Do.RETURN) is claimed, (action, ask.note)


# -- a login answered 200 and cut off mid-body -----------------------------------------


class _CutLogin(Hostile):
    """The first login is answered 200 with a body cut off mid-way (the connection
    closes short of its ``Content-Length``); every later one as usual."""

    cut = 1

    async def _login(self, request: web.Request) -> web.StreamResponse:
        if not self.cut:
            return await super()._login(request)
        self.cut -= 1
        response = web.StreamResponse(
            status=200, headers={"Content-Length": "500", "Content-Type": "application/json"}
        )
        await response.prepare(request)
        await response.write(b'{"token": "hostile-acc')
        assert request.transport is not None
        request.transport.close()
        return response


async def test_a_login_cut_off_mid_body_is_logged_in_again_not_an_applied_refund() -> None:
    """Review 20 made a POST's 2xx cut off mid-body an unreadable 2xx ("it applied, but
    what it made cannot be read"). The login is a POST too: its cut-off 200 ended the
    refund call with that error, nothing sent, the caller told the refund applied. A
    login is safe to repeat: it is logged in again and the refund made, once."""
    server = _CutLogin(FakeClock())
    async with hostile_client(server, retry=RetryPolicy(max_attempts=3, deadline=60.0)) as client:
        refund = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
    assert server.ours == [refund.id]
    assert server.posts == 1
