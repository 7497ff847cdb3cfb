"""Review 11: ways the SDK reported a false outcome for a refund, each against a server
scripted here (refunds counted by its own record, ``Scripted.made``), on a virtual
clock. Each test names the scenario and the true outcome (one refund; pending or
review is a true outcome)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from email.utils import formatdate
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    BagPendingError,
    OrderRefund,
    PendingRefund,
    RefundBagRequest,
    RetryPolicy,
    VioletClient,
    VioletError,
)
from violet_async._ask import sent_once
from violet_async._engine import Outcome, engine_of, outcome_of
from violet_async._transport import Timeouts
from violet_async.stores import RecordStore, SQLiteStore
from violet_async.stores._base import Claim, KeyEntry
from violet_async.testing import FakeClock

from .conftest import serve
from .samples import refund_body

ORDER, BAG = 12, 22
KEY = "rma-review11"
REQUEST = RefundBagRequest(amount_refunded=500)


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class Scripted:
    """Violet for one bag. Each POST takes the next step of ``script``:

    - ``lost``: not applied, answered 500;
    - ``applied_lost``: applied, answered 500;
    - ``ok``: applied, answered 200 with the refund;
    - ``idless``: applied, answered 200 with the refund but without its ``id``.

    The list shows every refund made, dated ``late`` seconds after its answer's date
    (the platform stamps it once processed), unless ``hide`` (a replica behind shows
    none). ``gate``, when set, holds every read of the list until it opens."""

    def __init__(self, clock: FakeClock, script: list[str], late: float = 0.0) -> None:
        self.clock = clock
        self.script = script
        self.late = late
        self.hide = False
        self.gate: asyncio.Event | None = None
        self.held = asyncio.Event()  # set once a read waits at the gate
        self.posts = 0
        self.made: list[dict[str, object]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    def _headers(self) -> dict[str, str]:
        return {"Date": formatdate(self.clock.time(), usegmt=True)}

    async def _login(self, request: web.Request) -> web.Response:
        data = {"token": "review11-token-0123456789", "refresh_token": "review11-refresh-01"}
        return web.json_response(data, headers=self._headers())

    async def _list(self, request: web.Request) -> web.Response:
        if self.gate is not None:
            self.held.set()
            await self.gate.wait()
        shown = [] if self.hide else self.made
        return web.Response(
            body=orjson.dumps(shown), content_type="application/json", headers=self._headers()
        )

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        step = self.script.pop(0) if self.script else "ok"
        if step == "lost":
            return web.json_response(
                {"message": "Internal error"}, status=500, headers=self._headers()
            )
        now = self.clock.time()
        listed = refund_body(
            id=9_100 + len(self.made),
            order_id=int(request.match_info["o"]),
            bag_id=int(request.match_info["b"]),
            amount=body["amount_refunded"],
            status="COMPLETED",
            skus=[],
            errors=[],
            date_created=_stamp(now + self.late),
            date_last_modified=_stamp(now + self.late),
        )
        self.made.append(listed)
        if step == "applied_lost":
            return web.json_response(
                {"message": "Internal error"}, status=500, headers=self._headers()
            )
        answer = dict(listed, date_created=_stamp(now), date_last_modified=_stamp(now))
        if step == "idless":
            del answer["id"]
        return web.json_response(answer, headers=self._headers())


@contextlib.asynccontextmanager
async def _serve(server: Scripted) -> AsyncIterator[str]:
    async with serve(server.app()) as base:
        yield base + "/v1"


def _client(
    url: str, clock: FakeClock, deadline: float, store: RecordStore | None = None
) -> VioletClient:
    return VioletClient(
        4242,
        "review11-app-secret-0123456789abcdef",
        username="review11-user",
        password="review11-password-0123",
        base_url=url,
        clock=clock,
        store=store,
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=deadline, max_attempts=1),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


async def _ended(call: Awaitable[OrderRefund]) -> OrderRefund | BaseException:
    """The refund a call returned, or what it raised."""
    try:
        return await call
    except VioletError as exc:
        return exc


# -- 1. key lineage: the key's later ask resumed while an earlier one's resume runs ------


async def _earlier_and_later(
    one: VioletClient, two: VioletClient, three: VioletClient, clock: FakeClock, server: Scripted
) -> tuple[PendingRefund, PendingRefund]:
    """The key's first ask ends pending (X); a later call takes it over and it fails
    for good; a third call asks anew (Y, X in the key's lineage): it applies, its answer
    is lost and the replica hides it, so Y ends pending too. (``server.script`` must
    start ``lost, lost, applied_lost``.)"""
    with pytest.raises(AmbiguousOutcomeError) as first:
        await one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=KEY)
    earlier = first.value.pending
    assert earlier is not None
    clock.advance(2_000.0)
    with pytest.raises(VioletError) as again:
        await two.refund_bag(ORDER, BAG, REQUEST, idempotency_key=KEY)
    assert outcome_of(again.value) is Outcome.FAILED
    server.hide = True
    with pytest.raises(AmbiguousOutcomeError) as third:
        await three.refund_bag(ORDER, BAG, REQUEST, idempotency_key=KEY)
    later = third.value.pending
    assert later is not None
    assert later.ask_id != earlier.ask_id
    assert len(server.made) == 1
    server.hide = False
    clock.advance(2_000.0)
    return earlier, later


async def test_the_keys_later_record_resumed_while_an_earlier_records_resume_runs_here(
    tmp_path: Path,
) -> None:
    """Scenario: a keyed call ends pending (X); the key is called again, takes X over,
    X fails for good; a third call asks anew (Y, X in the key's lineage): Y applies,
    its answer is lost and a replica hides it, so Y ends pending too. Both records
    are delivered to one worker (a job queue): ``resume(X)`` starts first and drives
    the key's ask Y; ``resume(Y)`` arrives while it runs.

    Main: ``resume(Y)`` raises ``RequestValidationError`` (a definite failure to every
    driver, ``Outcome.FAILED``) for the very ask whose refund was made: the running
    flight is X's record, and the check that lets an earlier record join the key's ask
    (``_earlier_of``) only looks the other way round.

    True outcome: both get the one refund Y made (one refund in the server's record)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["lost", "lost", "applied_lost"])
    path = tmp_path / "keys.db"
    async with (
        _serve(server) as url,
        SQLiteStore(path) as one_store,
        SQLiteStore(path) as two_store,
        SQLiteStore(path) as three_store,
        _client(url, clock, 3.0, one_store) as one,
        _client(url, clock, 600.0, two_store) as two,
        _client(url, clock, 3.0, three_store) as three,
    ):
        earlier, later = await _earlier_and_later(one, two, three, clock, server)
        server.gate = asyncio.Event()
        running = asyncio.ensure_future(two.resume(earlier))
        await asyncio.wait_for(server.held.wait(), 30.0)
        joining = asyncio.ensure_future(two.resume(later))
        for _ in range(20):
            await asyncio.sleep(0)
        server.gate.set()
        driven, joined = await asyncio.gather(running, joining, return_exceptions=True)
        # The earlier record's resume drove the key's ask Y and got its refund...
        assert not isinstance(driven, BaseException), repr(driven)
        assert driven.id == server.made[0]["id"]
        # ...and Y's own record, resumed meanwhile, was told it failed.
        assert not isinstance(joined, BaseException), repr(joined)
        assert joined.id == server.made[0]["id"]
    assert server.posts == 3
    assert len(server.made) == 1


class Blinking:
    """A record store (another's, delegated to) whose next ``fail_loads`` reads fail, as
    a Redis or a disk does for a moment."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.lease = inner.lease
        self.retention = inner.retention
        self.fail_loads = 0
        # When set: the next read waits for it (``stalled`` is set once one does).
        self.hold_load: asyncio.Event | None = None
        self.stalled = asyncio.Event()

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        return await self.inner.claim(fresh, now)

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        return await self.inner.save(entry, owner)

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        return await self.inner.renew(key, owner, lease_until)

    async def load(self, key: str) -> KeyEntry | None:
        if self.fail_loads:
            self.fail_loads -= 1
            raise ConnectionError("store unreachable for a moment")
        hold, self.hold_load = self.hold_load, None
        if hold is not None:
            self.stalled.set()
            await hold.wait()
        return await self.inner.load(key)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_an_earlier_record_joining_the_keys_running_ask_is_not_failed_by_a_store_blip(
    tmp_path: Path,
) -> None:
    """Scenario: as above (X earlier, Y the key's ask, applied, its answer lost); the
    worker resumes Y's record and, while it runs, X's (a record of the key's own call:
    its ask is in the key's lineage). The one store read that tells X is the key's
    (``_earlier_of``) fails for a moment.

    Main: X's resume raises ``RequestValidationError`` ("not that key's call",
    ``Outcome.FAILED``): a store failure becomes a definite failure of a call whose
    key's refund is being made (the caller may refund again).

    True outcome: X joins and gets Y's refund, or at worst a store error (nothing
    sent, not a failure): never FAILED. One refund in the server's record."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["lost", "lost", "applied_lost"])
    path = tmp_path / "keys.db"
    async with (
        _serve(server) as url,
        SQLiteStore(path) as one_store,
        SQLiteStore(path) as two_inner,
        SQLiteStore(path) as three_store,
    ):
        two_store = Blinking(two_inner)
        async with (
            _client(url, clock, 3.0, one_store) as one,
            _client(url, clock, 600.0, two_store) as two,
            _client(url, clock, 3.0, three_store) as three,
        ):
            earlier, later = await _earlier_and_later(one, two, three, clock, server)
            server.gate = asyncio.Event()
            running = asyncio.ensure_future(two.resume(later))
            await asyncio.wait_for(server.held.wait(), 30.0)
            two_store.fail_loads = 1
            joining = asyncio.ensure_future(two.resume(earlier))
            for _ in range(20):
                await asyncio.sleep(0)
            server.gate.set()
            driven, joined = await asyncio.gather(running, joining, return_exceptions=True)
            assert not isinstance(driven, BaseException), repr(driven)
            assert driven.id == server.made[0]["id"]
            if isinstance(joined, BaseException):
                assert outcome_of(joined) is not Outcome.FAILED, repr(joined)
            else:
                assert joined.id == driven.id
    assert server.posts == 3
    assert len(server.made) == 1


async def test_an_earlier_record_joining_a_flight_that_lands_meanwhile_does_not_hang(
    tmp_path: Path,
) -> None:
    """Scenario: as above; the worker resumes Y's record and, while it runs, X's. X's
    resume finds Y's flight and reads the store to tell whether X is the key's
    (``_earlier_of``); that read is slow (a busy Redis), and Y's resume ends meanwhile.

    Main: X's resume then waits on a future of the flight that has already landed,
    which nothing will ever resolve: it hangs past its deadline (the virtual clock is
    moved far past it), with the key's refund made.

    True outcome: X's resume ends within its deadline, with Y's refund (one refund)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["lost", "lost", "applied_lost"])
    path = tmp_path / "keys.db"
    async with (
        _serve(server) as url,
        SQLiteStore(path) as one_store,
        SQLiteStore(path) as two_inner,
        SQLiteStore(path) as three_store,
    ):
        two_store = Blinking(two_inner)
        async with (
            _client(url, clock, 3.0, one_store) as one,
            _client(url, clock, 600.0, two_store) as two,
            _client(url, clock, 3.0, three_store) as three,
        ):
            earlier, later = await _earlier_and_later(one, two, three, clock, server)
            server.gate = asyncio.Event()
            running = asyncio.ensure_future(two.resume(later))
            await asyncio.wait_for(server.held.wait(), 30.0)
            # (The join reads no store any more: the flight knows the key's lineage
            # from its own claim. A slow read is held all the same, in case one comes.)
            release = two_store.hold_load = asyncio.Event()
            joining = asyncio.ensure_future(two.resume(earlier))
            for _ in range(20):
                await asyncio.sleep(0)
            server.gate.set()
            driven = await running
            assert driven.id == server.made[0]["id"]
            release.set()
            clock.advance(10_000.0)  # far past every deadline
            done, _ = await asyncio.wait([joining], timeout=5.0)
            if not done:
                joining.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await joining
            assert done, "X's resume still waits on a flight that has landed"
            assert joining.result().id == driven.id
    assert server.posts == 3
    assert len(server.made) == 1


async def test_a_record_the_key_never_held_does_not_join_the_keys_running_call() -> None:
    """Scenario: a keyed call runs (its POST applied, answer lost, reading the bag
    back); a record naming the same key and request, but of an ask the key never held
    (not its ask, not in its lineage: a record edited to name the key, or written by
    someone else), is resumed in the same process meanwhile.

    Main: the record joins the running call and is handed its refund (the running
    flight's record is the call's NEW one, which ``_key_ask`` lets anything through):
    a success for a refund made for another call, and that record's own ask is lost
    track of. Once the call has finished, the same record is refused
    (``tests/test_keys_lineage.py``).

    True outcome: not the call's refund; for review (it is not known to be the key's
    call, and its own request may have applied), nothing sent for it; one refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["applied_lost"])
    async with _serve(server) as url, _client(url, clock, 600.0) as client:
        server.gate = asyncio.Event()
        call = asyncio.ensure_future(client.refund_bag(ORDER, BAG, REQUEST, idempotency_key=KEY))
        await asyncio.wait_for(server.held.wait(), 30.0)
        stranger = sent_once(
            "refund", ORDER, BAG, REQUEST, clock.time() - 30.0, idempotency_key=KEY
        )
        joining = asyncio.ensure_future(client.resume(stranger))
        for _ in range(20):
            await asyncio.sleep(0)
        server.gate.set()
        made, joined = await asyncio.gather(call, joining, return_exceptions=True)
        assert not isinstance(made, BaseException), repr(made)
        assert made.id == server.made[0]["id"]
        # Review, nothing read or sent for it (the review's first draft asked for a
        # RequestValidationError: a definite failure, which a record whose key's entry
        # was swept would get too, though its request may have applied).
        assert isinstance(joined, AmbiguousOutcomeError), repr(joined)
        assert outcome_of(joined) is Outcome.REVIEW
        assert "idempotency key" in str(joined)
    assert server.posts == 1
    assert len(server.made) == 1


async def test_an_earlier_record_whose_lineage_entry_was_swept_is_not_told_failed(
    tmp_path: Path,
) -> None:
    """Scenario: a keyed call ends pending (X, its record in a job queue); the key is
    called again, takes X over, and X fails for good (the key's entry: FAILED). A day
    later, past the store's retention, a claim of another key sweeps that finished
    entry; the key is then called again and its new ask Y applies. X's record is then
    resumed (a job redelivered late).

    Main: the key's entry holds Y with no lineage (it went with the swept entry), so
    X's record is refused as "not that key's call" (``RequestValidationError``,
    ``Outcome.FAILED``): a definite failure for the key's call, whose money moved once
    (Y). The lineage fix covers this only while the failed entry survives.

    True outcome: one refund; X's resume gets Y's refund, or ends pending or for
    review, never a definite failure."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["lost", "lost", "ok", "ok"])
    path = tmp_path / "keys.db"

    def store() -> SQLiteStore:
        return SQLiteStore(path, monotonic=clock.monotonic)

    async with (
        _serve(server) as url,
        store() as one_store,
        store() as two_store,
        store() as three_store,
        _client(url, clock, 3.0, one_store) as one,
        _client(url, clock, 600.0, two_store) as two,
        _client(url, clock, 600.0, three_store) as three,
    ):
        with pytest.raises(AmbiguousOutcomeError) as first:
            await one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=KEY)
        earlier = first.value.pending
        assert earlier is not None
        clock.advance(2_000.0)
        with pytest.raises(VioletError) as again:
            await two.refund_bag(ORDER, BAG, REQUEST, idempotency_key=KEY)
        assert outcome_of(again.value) is Outcome.FAILED
        clock.advance(2 * 86_400.0)
        # Another call, another key and bag: its claim sweeps finished keys.
        await three.refund_bag(ORDER, BAG + 1, REQUEST, idempotency_key="rma-other")
        assert await three_store.load(f"{three._keys.scope} {KEY}") is None
        made = await three.refund_bag(ORDER, BAG, REQUEST, idempotency_key=KEY)
        got = await asyncio.gather(two.resume(earlier), return_exceptions=True)
        if isinstance(got[0], BaseException):
            assert outcome_of(got[0]) not in (Outcome.FAILED, None), repr(got[0])
        else:
            assert got[0].id == made.id
    assert [r["bag_id"] for r in server.made] == [BAG + 1, BAG]


# -- 2. a refund made on the bag after another ask's record was handed out ------------


@pytest.mark.parametrize("answer", ["ok", "idless"])
async def test_a_record_handed_out_before_another_asks_refund_on_the_bag_never_claims_it(
    answer: str,
) -> None:
    """Scenario: worker P1 left its call A pending on the bag (record RA handed to a
    job queue). P1 is then given another record of the bag, C (sent by P0, lost), to
    resume: C is proven absent and P1 sends it again; it applies (200, with its id or
    without it). RA is resumed in another process P2: the bag lists C's refund, dated
    after A's send, with A's content.

    Main: P2 takes C's refund for A's own (a success for a refund never made; the
    server made one refund, C's). P1 knew A was pending on the bag when it sent C's
    again, the very case ``BagPendingError`` stops for a new ask ("it could claim the
    pending one's refund"); and RA, written before C's refund existed, cannot name it.

    True outcome: one refund; A's resume ends pending or for review, never applied."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["lost", "lost", answer])
    async with (
        _serve(server) as url,
        _client(url, clock, 3.0) as zero,
        _client(url, clock, 600.0) as one,
        _client(url, clock, 600.0) as two,
    ):
        with pytest.raises(AmbiguousOutcomeError) as c_info:
            await zero.refund_bag(ORDER, BAG, REQUEST)
        record_c = c_info.value.pending
        assert record_c is not None
        clock.advance(5.0)
        quick = one.with_options(retry=RetryPolicy(deadline=3.0, max_attempts=1))
        with pytest.raises(AmbiguousOutcomeError) as a_info:
            await quick.refund_bag(ORDER, BAG, REQUEST)
        record_a = a_info.value.pending
        assert record_a is not None
        carried = PendingRefund.from_json(record_a.to_json())
        clock.advance(2_000.0)
        assert engine_of(one).unsettled.on_bag(BAG)  # P1 knows A is pending on the bag
        # C's resume may send C again (main does: it applies) or wait (pending).
        c_end = await _ended(one.resume(PendingRefund.from_json(record_c.to_json())))
        clock.advance(600.0)
        a_end = await _ended(two.resume(carried))
    made = [r["id"] for r in server.made]
    told = [end.id for end in (c_end, a_end) if not isinstance(end, BaseException)]
    # No more successes than refunds made; none names a refund not made, or one that
    # another success names (an id-less answer names none).
    assert len(told) <= len(made), f"A and C both succeeded on {len(made)} refund(s) {made}"
    named = [i for i in told if i is not None]
    assert all(i in made for i in named), (named, made)
    assert len(set(named)) == len(named), (named, made)
    for end in (c_end, a_end):
        if isinstance(end, BaseException):
            # Pending or review; or, for C, not sent again (BagPendingError: A is
            # pending on the bag in P1, as a new ask there would be told).
            assert isinstance(end, (AmbiguousOutcomeError, BagPendingError)), repr(end)
    assert len(made) <= 2  # at most one per ask


# -- 3. an id-less refund whose listed date is not its answer's -------------------------


@pytest.mark.parametrize(
    ("late", "where"),
    # (30 s late and read live: dated after the read itself, it goes to review.)
    [(3.0, "live"), (3.0, "here"), (3.0, "elsewhere"), (30.0, "here"), (30.0, "elsewhere")],
)
async def test_an_idless_refund_listed_with_a_later_date_is_never_claimed_by_another_ask(
    late: float, where: str
) -> None:
    """Scenario: call B gets 200 for its refund without the refund's id, dated D by the
    answer; call A on the bag then fails (500, not applied) and ends pending with B's
    refund described in its record (``unnamed``: 500, D). The bag's list dates B's
    refund ``late`` seconds after D (the platform stamps it once processed). A reads
    the bag back itself (``live``), or a replica hides the refund until A's record is
    resumed in the same process (``here``) or in another one (``elsewhere``).

    Main: an id-less refund is tied to a listed one only within 1 s of D (in another
    process ``unnamed_fit``, in this one ``KnownRefunds.learn`` / ``_may_be``), so B's
    refund, listed at D + 3 s, passes for A's own: a success for a refund never made
    (the server made one, B's).

    True outcome: one refund; A's resume ends pending or for review."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["idless", "lost"], late=late)
    if where == "live":
        async with _serve(server) as url, _client(url, clock, 600.0) as one:
            assert (await one.refund_bag(ORDER, BAG, REQUEST)).id is None
            try:
                refund = await one.refund_bag(ORDER, BAG, REQUEST)
            except AmbiguousOutcomeError:
                pass  # pending or review: true
            else:
                pytest.fail(f"A claimed refund {refund.id}, made for B")
        assert server.posts == 2
        assert len(server.made) == 1
        return
    async with _serve(server) as url, _client(url, clock, 3.0) as one:
        first = await one.refund_bag(ORDER, BAG, REQUEST)
        assert first.id is None
        server.hide = True
        with pytest.raises(AmbiguousOutcomeError) as info:
            await one.refund_bag(ORDER, BAG, REQUEST)
        pending = info.value.pending
        assert pending is not None
        # B's refund is described as its answer dated it (D: the clock's time).
        assert pending.unnamed == ((500, 1_700_000_000.0),)
        server.hide = False
        clock.advance(600.0)
        resumer = (
            one.with_options(retry=RetryPolicy(deadline=600.0, max_attempts=1))
            if where == "here"
            else _client(url, clock, 600.0)
        )
        async with contextlib.AsyncExitStack() as stack:
            if where == "elsewhere":
                await stack.enter_async_context(resumer)
                pending = PendingRefund.from_json(pending.to_json())
            try:
                refund = await resumer.resume(pending)
            except AmbiguousOutcomeError:
                pass  # pending or review: true
            else:
                pytest.fail(f"A's resume claimed refund {refund.id}, made for B")
    assert server.posts == 2
    assert len(server.made) == 1
