"""Review 13: ways the SDK reported a false outcome for a refund, each against a server
scripted here (refunds counted by its own record, ``Scripted.made``), on a virtual
clock. Each test names the scenario, what the SDK did, and the true outcome (one
refund per ask; pending or review is a true outcome)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from email.utils import formatdate

import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    PendingRefund,
    RetryPolicy,
    VioletClient,
    VioletError,
)
from violet_async._engine import Outcome, outcome_of
from violet_async._transport import Timeouts
from violet_async.stores import MemoryStore, RecordStore
from violet_async.stores._base import Claim, KeyEntry
from violet_async.testing import FakeClock

from .conftest import serve
from .samples import refund_body
from .test_review11_findings import _ended, _stamp

ORDER, BAG = 12, 22


class Scripted:
    """Violet for one bag. Each POST takes the next step of ``script``, a pair
    ``(what, late)``:

    - ``lost``: not applied, answered 500;
    - ``applied_lost``: applied, answered 500;
    - ``ok``: applied, answered 200 with the refund;
    - ``idless``: applied, answered 200 with the refund but without its ``id``;
    - ``refused``: not applied, answered 400 (the bag has nothing left to refund);
    - ``replay:N``: not applied, answered 200 with the N-th refund made (as listed).

    An applied refund is listed dated ``late`` seconds after its answer (the platform
    stamps a refund once it has processed it, a time that varies per refund); the
    answer carries the time it was made. ``hide`` hides every refund from the list."""

    def __init__(self, clock: FakeClock, script: list[tuple[str, float]]) -> None:
        self.clock = clock
        self.script = script
        self.hide = False
        self.posts = 0
        self.made: list[dict[str, object]] = []
        self.made_by: dict[int, object] = {}  # POST number -> the id of the refund it made
        self.extra: list[dict[str, object]] = []  # listed too: records that moved no money
        self.post_gate: asyncio.Event | None = None  # when set: POSTs wait for it
        self.post_held = asyncio.Event()  # set once a POST waits at the gate
        # When set: the first read of the list at or after this monotonic time waits for
        # ``list_gate`` (``list_held`` is set once it does).
        self.hold_list_from: float | None = None
        self.list_gate = asyncio.Event()
        self.list_held = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    def _headers(self) -> dict[str, str]:
        return {"Date": formatdate(self.clock.time(), usegmt=True)}

    async def _login(self, request: web.Request) -> web.Response:
        data = {"token": "review13-token-0123456789", "refresh_token": "review13-refresh-01"}
        return web.json_response(data, headers=self._headers())

    async def _list(self, request: web.Request) -> web.Response:
        hold_from = self.hold_list_from
        if hold_from is not None and self.clock.monotonic() >= hold_from:
            self.hold_list_from = None
            self.list_held.set()
            await self.list_gate.wait()
        shown = [] if self.hide else self.made + self.extra
        return web.Response(
            body=orjson.dumps(shown), content_type="application/json", headers=self._headers()
        )

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        step, late = self.script.pop(0) if self.script else ("ok", 0.0)
        if self.post_gate is not None:
            self.post_held.set()
            await self.post_gate.wait()
        if step == "refused":  # Violet's own refusal: nothing left to refund on the bag
            return web.json_response(
                {"message": "Refund amount exceeds the refundable amount of the bag"},
                status=400,
                headers=self._headers(),
            )
        if step == "lost":
            return web.json_response(
                {"message": "Internal error"}, status=500, headers=self._headers()
            )
        if step.startswith("replay:"):  # a cache replays an earlier answer: nothing made
            return web.json_response(self.made[int(step[7:])], headers=self._headers())
        now = self.clock.time()
        listed = refund_body(
            id=9_300 + len(self.made),
            order_id=int(request.match_info["o"]),
            bag_id=int(request.match_info["b"]),
            amount=body["amount_refunded"],
            status="COMPLETED",
            skus=[],
            errors=[],
            date_created=_stamp(now + late),
            date_last_modified=_stamp(now + late),
        )
        self.made.append(listed)
        self.made_by[self.posts] = listed["id"]
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
        "review13-app-secret-0123456789abcdef",
        username="review13-user",
        password="review13-password-0123",
        base_url=url,
        clock=clock,
        store=store,
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=deadline, max_attempts=1),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


# -- 1. an id-less refund's narrowing taken by a record no call here knows ---------------


@pytest.mark.parametrize("beside", ["other_process", "other_bag"])
async def test_an_idless_refund_is_not_narrowed_away_by_another_process_refund(
    beside: str,
) -> None:
    """Scenario: the platform stamps each refund's record 2 s after Violet answers.
    Another process (client ``zero``) refunds 500 on the bag, answered 200 with its id
    (answer dated t, record t+2); or (``other_bag``) the bag's list also shows a refund
    of 500 of another bag of the order, dated t+2 (the driver skips such records when
    it judges a read). Two seconds later this worker (client ``one``) refunds
    500 (call 1): answered 200 *without* the id (answer t+2, record t+4). Right after,
    call 2 refunds 500: Violet answers 500 and applies nothing; a replica behind lists
    nothing, so call 2 ends pending; its record carries call 1's refund as ``unnamed``
    (500, t+2). The record is resumed later in a third process.

    Main: ``_matching._unnamed_taken`` narrows call 1's id-less refund to the listed
    record dated within a second of its answer: the other process's refund (t+2), which
    the resuming process does not know (not in ``others``, ``known`` or a baseline), so
    the review-12 ``owned`` exclusion does not apply. Call 1's own record (t+4) is then
    bound to no call, and the resume claims it as call 2's (same amount, dated after
    call 2's send): a success for a refund call 2 never made.

    True outcome: call 1's record may be call 1's refund (the platform stamps late):
    call 2's resume never claims it (pending or review; a re-send of call 2 proven
    absent is true too). Two refunds were made (the other process's, call 1's).

    Suspected fix: do not narrow by the 1 s rule at all (bind every record that fits
    the 60 s rule), or narrow only when the close record is provably the id-less one;
    any record the resuming process does not own may steal the narrowing (another
    process's refund, a FAILED attempt, another bag's record in a hostile list)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    script = [("idless", 2.0), ("lost", 0.0)]
    if beside == "other_process":
        script.insert(0, ("ok", 2.0))
    applied = len(script) - 1  # every POST but call 2's makes a refund
    server = Scripted(clock, script)
    async with (
        _serve(server) as url,
        _client(url, clock, 3.0) as zero,
        _client(url, clock, 3.0) as one,
    ):
        if beside == "other_process":
            other = await zero.refund_bag(ORDER, BAG, amount_refunded=500)
            assert other.id == 9_300
        else:
            dated = _stamp(clock.time() + 2.0)
            server.extra.append(
                refund_body(
                    id=9_390,
                    order_id=ORDER,
                    bag_id=BAG + 1,
                    amount=500,
                    status="COMPLETED",
                    skus=[],
                    errors=[],
                    date_created=dated,
                    date_last_modified=dated,
                )
            )
        clock.advance(2.0)
        first = await one.refund_bag(ORDER, BAG, amount_refunded=500)
        assert first.id is None
        idless = server.made[-1]["id"]
        clock.advance(0.5)
        server.hide = True  # a replica behind: call 2's own read-backs list nothing
        with pytest.raises(AmbiguousOutcomeError) as info:
            await one.refund_bag(ORDER, BAG, amount_refunded=500)
        pending = info.value.pending
        assert pending is not None
        assert not pending.needs_review
        server.hide = False
        carried = PendingRefund.from_json(pending.to_json())
        assert carried.unnamed, carried
        assert not carried.others
    clock.advance(600.0)
    async with _serve(server) as url2, _client(url2, clock, 600.0) as elsewhere:
        ended = await _ended(elsewhere.resume(carried))
    assert len(server.made) == applied
    assert not (isinstance(ended, OrderRefund) and ended.id == idless), (
        f"call 2 (never applied) was handed call 1's refund: {ended!r}"
    )


# -- 2. a joiner cancelled by its caller leaves an error nobody retrieves -----------------


async def test_a_cancelled_key_joiner_leaves_no_unretrieved_error() -> None:
    """Scenario: a worker (deadline 600 s) refunds 500 with ``idempotency_key``; its POST
    is slow at Violet. A web handler in the same process repeats the keyed call with a
    3 s deadline and joins it; the handler's client disconnects, so its task is
    cancelled while it waits. Violet then refuses the worker's refund (400).

    Main: ``KeyedAsks._join`` waits with ``asyncio.wait({shielded, timer})``; a cancel
    of the caller cancels only the wait and the timer, never ``shielded`` (the shield's
    outer future). When the flight fails, the shield hands its error to that outer
    future, which nobody awaits: asyncio logs "Future exception was never retrieved"
    (an ERROR through the loop's exception handler) carrying the worker's error. Before
    the review-12 change, ``await asyncio.shield(...)`` cancelled the outer future with
    the caller.

    True outcome: the worker gets its failure (nothing applied, one 400); the cancelled
    joiner ends cancelled; no error is left unretrieved.

    Suspected fix: in ``_join``, cancel ``shielded`` in a ``finally`` (or on
    ``CancelledError``) whenever it is not done."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, [("refused", 0.0)])
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        async with _serve(server) as url, _client(url, clock, 3.0) as short:
            long = short.with_options(retry=RetryPolicy(deadline=600.0, max_attempts=1))
            server.post_gate = asyncio.Event()
            owner = asyncio.ensure_future(
                long.refund_bag(ORDER, BAG, amount_refunded=500, idempotency_key="rma-13c")
            )
            await asyncio.wait_for(server.post_held.wait(), 30.0)
            joiner = asyncio.ensure_future(
                short.refund_bag(ORDER, BAG, amount_refunded=500, idempotency_key="rma-13c")
            )
            flights = short._keys._flights  # type: ignore[union-attr]
            for _ in range(1_000):
                if any(f.joined is not None for f in flights.values()) or joiner.done():
                    break
                await asyncio.sleep(0)
            assert any(f.joined is not None for f in flights.values()), "the repeat did not join"
            assert not joiner.done()
            joiner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await joiner
            server.post_gate.set()
            owned = await _ended(owner)
        for _ in range(5):
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert isinstance(owned, VioletError), repr(owned)
    assert outcome_of(owned) is Outcome.FAILED
    assert server.made == []
    assert not unretrieved, [str(c.get("message")) for c in unretrieved]


# -- 3. a joiner's own deadline turned into "not the key's call" -------------------------


class SlowClaim:
    """A record store (a MemoryStore, delegated to) whose next claim waits for
    ``claim_gate`` once ``hold_claim`` is set (a busy Redis); ``claim_held`` is set
    once one does."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.lease = self.inner.lease
        self.retention = self.inner.retention
        self.hold_claim = False
        self.claim_gate = asyncio.Event()
        self.claim_held = asyncio.Event()

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        if self.hold_claim:
            self.hold_claim = False
            self.claim_held.set()
            await self.claim_gate.wait()
        return await self.inner.claim(fresh, now)

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        return await self.inner.save(entry, owner)

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        return await self.inner.renew(key, owner, lease_until)

    async def load(self, key: str) -> KeyEntry | None:
        return await self.inner.load(key)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_key_joiner_whose_deadline_ends_is_pending_not_parked_as_another_keys() -> None:
    """Scenario: a worker's keyed refund (``idempotency_key="rma-13r"``) ends pending
    (Violet answered 500, nothing applied): record P, the key's own ask, kept in the
    client's store. The app repeats the keyed call (deadline 600 s); its claim of the
    key is slow (a busy store). Meanwhile P is delivered to a web handler in the same
    process and resumed with a 3 s deadline: it joins the repeat's flight (one ask per
    key) and its deadline ends before the flight's claim has read the key's entry.

    Main: ``KeyedAsks.resume`` catches the joiner's *own* deadline error (an
    ``AmbiguousOutcomeError``, a ``VioletError``) in ``except VioletError`` and runs
    ``_may_join(..., final=True)`` against ``flight.ask`` (the repeat's NEW ask: its
    claim has not set ``driving``). P's ``ask_id`` is not that ask's and the lineage is
    empty, so ``_not_the_keys`` parks P **for review** with the note "this record is not
    known to be that key's call (a record edited to name the key, or one whose earlier
    entry was swept ...)": false, P is the very ask the key's entry holds (the repeat
    then drives it, and the key's one refund is made).

    True outcome: pending (``Outcome.PENDING``, nothing sent by the joiner: call again),
    as the error's own message says; the key's ask is driven by the flight: one refund.

    Suspected fix: in ``resume``'s joiner, let the joiner's own deadline error
    (raised by ``_join``) pass unchecked; apply ``_may_join(final=True)`` only to the
    flight's outcome (and only once the flight has read the key's entry)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, [("lost", 0.0), ("ok", 0.0)])
    store = SlowClaim()
    async with _serve(server) as url, _client(url, clock, 3.0, store) as short:
        long = short.with_options(
            retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=600.0, max_attempts=2)
        )
        with pytest.raises(AmbiguousOutcomeError) as info:
            await short.refund_bag(ORDER, BAG, amount_refunded=500, idempotency_key="rma-13r")
        record = info.value.pending
        assert record is not None
        assert record.idempotency_key == "rma-13r"
        assert not record.needs_review
        store.hold_claim = True
        repeat = asyncio.ensure_future(
            long.refund_bag(ORDER, BAG, amount_refunded=500, idempotency_key="rma-13r")
        )
        await asyncio.wait_for(store.claim_held.wait(), 30.0)
        joined = await _ended(short.resume(record))
        store.claim_gate.set()
        repeated = await _ended(repeat)
    assert isinstance(repeated, OrderRefund), repr(repeated)
    assert len(server.made) == 1
    assert isinstance(joined, AmbiguousOutcomeError), repr(joined)
    assert outcome_of(joined) is Outcome.PENDING, (
        f"the key's own record was parked for review as another key's: {joined!r}; "
        f"note: {joined.pending.note if joined.pending else None!r}"
    )


# -- 4. an id-less refund of a happy-path call never bound to its record -----------------


@pytest.mark.parametrize("beside", ["known", "other_process", "failed_attempt"])
async def test_a_replayed_answer_naming_an_idless_refund_is_not_taken_for_a_new_call(
    beside: str,
) -> None:
    """Scenario: the platform stamps each refund's record 2 s after Violet answers. Call
    0 refunds 500 (answered 200 with its id: answer t, record t+2): in this client on
    its happy path (``known``: its refund is known with no owner), or in another process
    (``other_process``); or instead (``failed_attempt``) the bag lists a FAILED attempt
    of 500 dated t+2. Two seconds later this client's call 1 refunds 500, answered 200
    *without* the id (answer t+2, record t+4), on its happy path. Call A then refunds
    300: applied, answer lost; its read-back lists the bag and A gets its own. Call 2
    then refunds 500: a cache in front of Violet replays call 1's refund (as listed,
    with its id) as a 200; nothing is made.

    Main: on A's read, ``KnownRefunds.learn`` binds call 1's id-less refund to the
    listed records it may be, narrowed to the one dated within a second of its answer
    (t+2): call 0's record or the FAILED attempt. Its owner-aware exclusion
    (``elsewhere``: known *and owned by another ask*) does not exclude it: call 0's
    refund is known with the owner None, like call 1's (``known``), or not known at all
    (the other two). So call 1's own record stays unknown, and call 2's answer naming it
    passes ``AnswerCheck`` (which refuses a refund "already handed to another call") and
    is returned as call 2's refund: a success for a refund call 2 never made.

    True outcome: call 1's record is known as call 1's after A's read: call 2's answer
    naming it is read back, never returned (call 2 ends pending, or for review); one
    refund per ask.

    Suspected fix: do not narrow in ``learn`` (bind every record that fits the 60 s
    rule; with ``known`` alone, ``elsewhere`` as "known at all" would do)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    script = [("idless", 2.0), ("applied_lost", 0.0)]
    if beside != "failed_attempt":
        script.insert(0, ("ok", 2.0))
    server = Scripted(clock, script)
    async with (
        _serve(server) as url,
        _client(url, clock, 3.0) as one,
        _client(url, clock, 3.0) as zero,
    ):
        if beside == "failed_attempt":
            dead = refund_body(
                id=9_390,
                order_id=ORDER,
                bag_id=BAG,
                amount=500,
                status="FAILED",
                skus=[],
                errors=[],
                date_created=_stamp(clock.time() + 2.0),
                date_last_modified=_stamp(clock.time() + 2.0),
            )
            server.extra.append(dead)
        else:
            made = await (one if beside == "known" else zero).refund_bag(
                ORDER, BAG, amount_refunded=500
            )
            assert made.id == 9_300
        clock.advance(2.0)
        first = await one.refund_bag(ORDER, BAG, amount_refunded=500)
        assert first.id is None
        idless = len(server.made) - 1
        clock.advance(1.0)
        a = await one.refund_bag(ORDER, BAG, amount_refunded=300)
        assert a.reconciled
        clock.advance(1.0)
        server.script.append((f"replay:{idless}", 0.0))
        second = await _ended(one.refund_bag(ORDER, BAG, amount_refunded=500))
    assert len(server.made) == idless + 2  # call 1's and A's (and call 0's); none for call 2
    replayed = server.made[idless]["id"]
    assert not (isinstance(second, OrderRefund) and second.id == replayed), (
        f"call 2 (nothing made) was handed call 1's refund: {second!r}"
    )


# -- 5. a repeat of a keyed call joins another record's resume and takes its review -----


async def test_a_keyed_repeat_joining_a_foreign_records_resume_is_not_handed_that_record() -> None:
    """Scenario: a process refunds 500 with ``idempotency_key="rma-13f"``: applied,
    answered 200 (refund R); the key's entry in the store it shares with a worker is
    finished with R. Another process, sharing no store, also calls with that key (ask
    J): Violet answers 500, nothing applied, J ends pending there. J's record is
    delivered to the worker and resumed; the store is slow to answer the claim.
    Meanwhile the app repeats the keyed call on the worker: it joins J's resume (one
    flight per key).

    Main: J's resume finds the key finished with another ask's refund and parks J for
    review (``_not_the_keys``: right for J). The repeat, which joined that flight with
    no check (``KeyedAsks.run`` only compares the request), is handed the same error:
    ``AmbiguousOutcomeError`` for review whose ``pending`` is **J's** record (another
    ask's ``ask_id``, its note about J). The caller of the key is told to look at a
    record that is not its call's, and its own outcome (R, made once) is lost to it.

    True outcome: the key's repeat gets R with no request (as it does when J's resume
    is not running), or at worst pending for its own key; never another ask's record.
    One refund.

    Suspected fix: a joiner of a flight whose ask is another record (``flight.ask`` not
    the joiner's own ask) takes the flight's refund only as checked, and on an error
    that is about the flight's record (``_not_the_keys``, or any error carrying another
    ``ask_id``) takes the ask over (loop again) instead of raising it."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, [("ok", 0.0), ("lost", 0.0)])
    store = SlowClaim()
    async with (
        _serve(server) as url,
        _client(url, clock, 3.0, store) as zero,
        _client(url, clock, 3.0, store) as one,
        _client(url, clock, 3.0) as two,
    ):
        long = one.with_options(retry=RetryPolicy(deadline=600.0, max_attempts=1))
        refund = await zero.refund_bag(ORDER, BAG, amount_refunded=500, idempotency_key="rma-13f")
        assert refund.id == 9_300
        server.hide = True
        with pytest.raises(AmbiguousOutcomeError) as info:
            await two.refund_bag(ORDER, BAG, amount_refunded=500, idempotency_key="rma-13f")
        server.hide = False
        j_record = info.value.pending
        assert j_record is not None
        clock.advance(600.0)
        store.hold_claim = True
        j_resume = asyncio.ensure_future(one.resume(PendingRefund.from_json(j_record.to_json())))
        await asyncio.wait_for(store.claim_held.wait(), 30.0)
        repeat = asyncio.ensure_future(
            long.refund_bag(ORDER, BAG, amount_refunded=500, idempotency_key="rma-13f")
        )
        flights = one._keys._flights  # type: ignore[union-attr]
        for _ in range(1_000):
            if any(f.joined is not None for f in flights.values()) or repeat.done():
                break
            await asyncio.sleep(0)
        assert any(f.joined is not None for f in flights.values()), "the repeat did not join"
        store.claim_gate.set()
        j_ended = await _ended(j_resume)
        repeated = await _ended(repeat)
    assert len(server.made) == 1
    assert server.posts == 2
    assert isinstance(j_ended, AmbiguousOutcomeError), repr(j_ended)
    assert j_ended.pending is not None
    assert j_ended.pending.needs_review
    handed = repeated.pending if isinstance(repeated, AmbiguousOutcomeError) else None
    assert handed is None or handed.ask_id != j_record.ask_id, (
        f"the key's repeat was handed another ask's record for review: {repeated!r}"
    )
    if isinstance(repeated, OrderRefund):
        assert repeated.id == 9_300
