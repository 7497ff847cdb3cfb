"""Review 14: ways the SDK reported a false outcome for a refund (or made a second one),
each against a server scripted here (refunds counted by its own record,
``Scripted.made``), on a virtual clock. Each test names the scenario, what the SDK did,
and the true outcome (one refund per ask; pending or review is a true outcome)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from pathlib import Path

import attrs
import orjson
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    PendingRefund,
    RefundBagRequest,
    RetryPolicy,
    VioletClient,
)
from violet_async._ask import Phase
from violet_async._engine import Outcome, outcome_of
from violet_async._transport import Timeouts
from violet_async.exceptions import IdempotencyKeyReusedError, RecordStoreError
from violet_async.stores import MemoryStore, RecordStore, SQLiteStore
from violet_async.stores._base import Claim, KeyEntry
from violet_async.testing import FakeClock

from .conftest import serve
from .samples import refund_body
from .test_review11_findings import _ended, _stamp

ORDER, BAG = 12, 22
HOUR = 3600.0
REQUEST = RefundBagRequest(amount_refunded=500)


class Scripted:
    """Violet for a few bags. Each POST takes the next step of ``script``:

    - ``lost``: not applied, answered 500;
    - ``applied_lost``: applied, answered 500;
    - ``ok``: applied, answered 200 with the refund;
    - ``idless``: applied, answered 200 with the refund but without its ``id``;
    - ``busy``: not applied, answered 429.

    ``dated``: answers carry a ``Date`` header (Violet's clock: ``clock.time()`` minus
    any step of the client's wall clock, ``stepped``). Refunds are listed dated as made,
    by Violet's clock, ``late`` seconds after it was made; an answer carries the time it
    was made plus ``ahead`` (stamped by another clock of Violet's). ``hide`` hides them
    all."""

    def __init__(
        self, clock: FakeClock, script: list[str], *, dated: bool = True, late: float = 0.0
    ) -> None:
        self.clock = clock
        self.script = script
        self.dated = dated
        self.late = late
        self.ahead = 0.0
        self.retry_after = "1"  # a 429's Retry-After (seconds)
        self.stepped = 0.0  # how far the client's wall clock was stepped off Violet's
        self.hide = False
        self.gate: asyncio.Event | None = None  # when set, every POST waits for it
        self.held = asyncio.Event()  # set once a POST waits at the gate
        self.posts = 0
        self.made: list[dict[str, object]] = []

    def violet_time(self) -> float:
        return self.clock.time() - self.stepped

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    def _headers(self) -> dict[str, str]:
        if not self.dated:
            # aiohttp.web adds its own Date (real time) unless one is set: one that
            # cannot be read is no Date to the SDK (it ignores it, never trusts it).
            return {"Date": "none"}
        return {"Date": formatdate(self.violet_time(), usegmt=True)}

    async def _login(self, request: web.Request) -> web.Response:
        data = {"token": "review14-token-0123456789", "refresh_token": "review14-refresh-01"}
        return web.json_response(data, headers=self._headers())

    async def _list(self, request: web.Request) -> web.Response:
        bag = int(request.match_info["b"])
        shown = [] if self.hide else [r for r in self.made if r["bag_id"] == bag]
        return web.Response(
            body=orjson.dumps(shown), content_type="application/json", headers=self._headers()
        )

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        if self.gate is not None:
            self.held.set()
            await self.gate.wait()
        step = self.script.pop(0) if self.script else "ok"
        if step == "lost":
            return web.json_response(
                {"message": "Internal error"}, status=500, headers=self._headers()
            )
        if step == "busy":
            return web.json_response(
                {"message": "Too many requests"},
                status=429,
                headers={**self._headers(), "Retry-After": self.retry_after},
            )
        now = self.violet_time()
        listed = refund_body(
            id=9_400 + len(self.made),
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
        stamp = _stamp(now + self.ahead)
        answer = dict(listed, date_created=stamp, date_last_modified=stamp)
        if step == "idless":
            del answer["id"]
        return web.json_response(answer, headers=self._headers())

    def on_bag(self, bag: int) -> list[object]:
        return [r["id"] for r in self.made if r["bag_id"] == bag]


@contextlib.asynccontextmanager
async def _serve(server: Scripted) -> AsyncIterator[str]:
    async with serve(server.app()) as base:
        yield base + "/v1"


def _client(
    url: str,
    clock: FakeClock,
    deadline: float = 600.0,
    store: RecordStore | None = None,
    attempts: int = 3,
) -> VioletClient:
    return VioletClient(
        4242,
        "review14-app-secret-0123456789abcdef",
        username="review14-user",
        password="review14-password-0123",
        base_url=url,
        clock=clock,
        store=store,
        retry=RetryPolicy(
            initial_delay=0.5, max_delay=1.0, deadline=deadline, max_attempts=attempts
        ),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


# -- 1. a keyed refund finished while the wall clock was stepped back ------------------


async def test_a_key_finished_while_the_clock_was_stepped_back_is_not_swept_early(
    tmp_path: Path,
) -> None:
    """Scenario: two processes of one machine share a SQLiteStore (each its own client
    and store object, both started with a right clock). The machine's wall clock is
    stepped back 30 h (a bad NTP source, an operator), a keyed refund is made in process
    one (its key finished, ``finished_at`` 30 h back), and a minute later the clock is
    put right (+30 h). A claim of another key in process one sweeps; the web app's
    retry of the first call (same key, same request) then lands in process two.

    Main: the sweep's guard (``SweepClock``) only checks the sweeping process's own
    clock (monotonic reference taken before both steps: no net step), not the time the
    entry was stamped with: ``finished_at`` is 30 h "old" by the put-right clock and
    the finished key is deleted a minute after its refund. Process two finds no key,
    owns it fresh and sends the request again: a second refund.

    True outcome: process two's call returns the one refund (one refund made)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, [])
    path = tmp_path / "keys.db"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic) as one_store,
        SQLiteStore(path, monotonic=clock.monotonic) as two_store,
        _client(url, clock, store=one_store) as one,
        _client(url, clock, store=two_store) as two,
    ):
        # Both processes have worked with keys before (their sweep clocks are set).
        await one.refund_bag(ORDER, 31, REQUEST, idempotency_key="rma-early-1")
        await two.refund_bag(ORDER, 32, REQUEST, idempotency_key="rma-early-2")
        clock.advance(120.0)
        clock.step_wall(-30 * HOUR)
        server.stepped = -30 * HOUR
        made = await one.refund_bag(ORDER, BAG, REQUEST, idempotency_key="rma-4711")
        clock.advance(60.0)
        clock.step_wall(30 * HOUR)  # put right
        server.stepped = 0.0
        clock.advance(61.0)
        await one.refund_bag(ORDER, 33, REQUEST, idempotency_key="rma-other")
        again = await two.refund_bag(ORDER, BAG, REQUEST, idempotency_key="rma-4711")
    assert server.on_bag(BAG) == [made.id], f"bag {BAG} refunded {len(server.on_bag(BAG))} times"
    assert again.id == made.id


# -- 2. an id-less refund whose answer is dated later than its listed record -----------


async def test_an_idless_refund_answered_later_than_listed_is_not_the_next_asks() -> None:
    """Scenario: a server without ``Date`` headers. Call X refunds 5.00 on the bag:
    applied, answered 200 without the refund's ``id``, the answer dated 90 s after the
    time the list gives the refund (the answer stamped by one clock of Violet's, the
    record by another, or the record dated when the request arrived and the answer when
    it was processed). X's caller gets the refund. Ten seconds later call Y asks for
    another 5.00 on the bag (a second item): its POST is answered 500 and did not apply.
    Y reads the bag back: it lists only X's refund.

    Main: ``idless_fits`` binds to an id-less answer only records not more than 60 s
    OLDER than the answer's date (``IDLESS_EARLIER``): X's listed record (90 s older)
    is neither learned as X's nor taken as one of Y's ``unnamed``; its date is within
    ``clock_skew`` of Y's send, so Y claims it: Y returns X's refund ``reconciled`` as
    its own. Two callers told "refunded" for one refund; Y's shopper is never paid.

    True outcome: Y is pending or for review (or fails only if nothing of it applied and
    that is proven without taking X's refund); never X's refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["idless", "lost"], dated=False)
    server.ahead = 90.0
    async with _serve(server) as url, _client(url, clock, deadline=600.0) as client:
        x = await client.refund_bag(ORDER, BAG, REQUEST)
        assert x.id is None
        clock.advance(10.0)
        y = await _ended(client.refund_bag(ORDER, BAG, REQUEST))
    assert len(server.made) == 1  # X's refund only: Y's POST did not apply
    assert not isinstance(y, OrderRefund), f"Y was handed X's refund {y.id} as its own"
    assert isinstance(y, AmbiguousOutcomeError), repr(y)


# -- 3. a resume delivered to two workers sharing a store, the first ended failed -------


async def test_a_resume_told_failed_in_one_worker_is_not_sent_again_by_the_next(
    tmp_path: Path,
) -> None:
    """Scenario: a call's POST is answered 500 (it did not apply) and its deadline ends
    the settle window: pending (record X, put on a job queue). The queue delivers X to
    worker two, then again (at-least-once) to worker three; both workers share one
    SQLiteStore, as docs/retries.md asks ("a resume delivered again ... across processes
    holds only with a shared record store"). Worker two proves X absent and re-sends it:
    429, and it has no attempts left: the ask FAILED, definitely not applied, and the
    job's caller is told so (the app may now refund the shopper another way).

    Main: worker three's claim of X's entry (FAILED, same request) gets the entry as a
    free one (``decide``: "definitely not applied: the key is free again"): it reads the
    bag, proves absence again and sends: the refund applies after the ask was reported
    failed. In one client the same second delivery raises the failure again with no
    request (``KnownRefunds.recall``; docs/simulation.md's "failed-but-applied" class,
    seeds 600011, 606650, 610919): across workers sharing a store it does not.

    True outcome: worker three's resume of X fails as X did (or is pending or for
    review), and sends nothing: no refund made after X was reported failed."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["lost", "busy", "ok"])
    path = tmp_path / "keys.db"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic) as two_store,
        SQLiteStore(path, monotonic=clock.monotonic) as three_store,
        _client(url, clock, deadline=3.0) as one,
        _client(url, clock, store=two_store, attempts=1) as two,
        _client(url, clock, store=three_store, attempts=1) as three,
    ):
        first = await _ended(one.refund_bag(ORDER, BAG, REQUEST))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        record = first.pending.to_json()  # the job's payload
        clock.advance(2_000.0)
        told = await _ended(two.resume(PendingRefund.from_json(record)))
        assert not isinstance(told, OrderRefund)
        assert outcome_of(told) is Outcome.NOT_SENT, repr(told)  # worker two: a 429, not applied
        assert server.made == []
        clock.advance(60.0)
        again = await _ended(three.resume(PendingRefund.from_json(record)))
    assert server.made == [], f"refund {server.on_bag(BAG)} made after X was told it failed"
    assert not isinstance(again, OrderRefund)


async def test_a_keyed_record_whose_ask_the_key_failed_is_not_sent_again_by_its_resume(
    tmp_path: Path,
) -> None:
    """Scenario: a keyed call's POST is answered 500 (it did not apply) and its
    deadline ends the settle window: pending (record X, with its key, on a job queue).
    The web app repeats the key in process two (one SQLiteStore): it takes X over,
    proves it absent and re-sends: 429, no attempts left: the key's ask FAILED, and the
    caller is told so. The job with X then runs in process three (same store).

    Main: the key's entry (FAILED) is free again to ``decide``, and X, the very ask
    that failed, owns it: it reads the bag, proves absence and sends: a refund made
    after the key's call was told it failed.

    True outcome: X's resume fails as the key's ask did (or is pending or for review)
    and sends nothing."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["lost", "busy", "ok"])
    path = tmp_path / "keys.db"
    key = "rma-review14-failed"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic) as one_store,
        SQLiteStore(path, monotonic=clock.monotonic) as two_store,
        SQLiteStore(path, monotonic=clock.monotonic) as three_store,
        _client(url, clock, deadline=3.0, store=one_store) as one,
        _client(url, clock, store=two_store, attempts=1) as two,
        _client(url, clock, store=three_store, attempts=1) as three,
    ):
        first = await _ended(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        record = first.pending.to_json()
        clock.advance(2_000.0)
        told = await _ended(two.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert not isinstance(told, OrderRefund)
        assert outcome_of(told) is Outcome.NOT_SENT, repr(told)  # a 429: not applied
        assert server.made == []
        clock.advance(60.0)
        again = await _ended(three.resume(PendingRefund.from_json(record)))
    assert server.made == [], f"refund {server.on_bag(BAG)} made after the key was told failed"
    assert not isinstance(again, OrderRefund)


# -- 4. a key held by a row written before keys were scoped, after a step -------------


async def test_a_legacy_keys_row_is_not_taken_for_past_retention_after_a_clock_step(
    tmp_path: Path,
) -> None:
    """Scenario: a SQLiteStore carries a finished row under a bare key, written by an
    earlier release (no scope): its refund was made a minute ago. Such a row is refused
    while it is within retention ("neither returned nor resumed, and nothing was sent").
    The machine's wall clock then steps forward 30 h (NTP), and the web app's retry of
    that call (same key, same request) comes in.

    Main: ``KeyedAsks._no_unscoped`` compares the row's ``finished_at`` with the wall
    clock alone (no ``SweepClock`` guard, unlike the stores' sweep): the row "passed
    retention", the key is free, and the call sends: a second refund of the same
    request a minute after the first.

    True outcome: refused (``RecordStoreError``, nothing sent); one refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, [])
    path = tmp_path / "keys.db"
    key = "rma-legacy"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic) as old_store,
        SQLiteStore(path, monotonic=clock.monotonic) as store,
        _client(url, clock) as old,
        _client(url, clock, store=store) as client,
    ):
        made = await old.refund_bag(ORDER, BAG, REQUEST)
        ask = attrs.evolve(
            PendingRefund("refund", ORDER, BAG, REQUEST), phase=Phase.APPLIED, refund_id=made.id
        )
        legacy = KeyEntry(key, ask, refund=made, finished_at=clock.time())
        await old_store.claim(legacy, clock.time())
        clock.advance(60.0)
        clock.step_wall(30 * HOUR)
        server.stepped = 30 * HOUR
        again = await _ended(client.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
    assert server.on_bag(BAG) == [made.id], f"bag {BAG} refunded {len(server.made)} times"
    assert isinstance(again, RecordStoreError), repr(again)


# -- 5. a record the key does not hold, resumed while another process drives the key ---


async def test_a_record_the_key_never_held_is_not_handed_the_keys_record_while_busy(
    tmp_path: Path,
) -> None:
    """Scenario: process zero (its own store, before the app shared one) makes a keyed
    refund F: it applies, its answer is lost (500), a replica hides it, and its
    deadline ends: pending,
    record F with the key, on a job queue. The app, now on a shared SQLiteStore, calls
    the key again in process two: the store has no entry for it, so a new ask Y is sent
    (the documented gap without a shared store). While Y's POST is in flight, the job
    resumes F in process three (same store, a 3 s deadline): the key is busy.

    Main: ``_own_resume``'s busy path hands back ``merged(entry.ask, mine)``, which for
    two asks is the key's record Y: F's caller gets Y's record as F's pending. Resumed
    once Y applied, it returns Y's refund: F's caller is told "refunded" with a refund
    F did not make, and F's own refund is lost track of (the same record resumed when
    the key is not busy ends for review: "not known to be that key's call").

    True outcome: F's resume is pending or for review with F's own record, never Y's;
    and never returns Y's refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["applied_lost", "ok"])
    path = tmp_path / "keys.db"
    key = "rma-review14-busy"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic) as two_store,
        SQLiteStore(path, monotonic=clock.monotonic) as three_store,
        _client(url, clock, deadline=3.0, store=MemoryStore()) as zero,
        _client(url, clock, store=two_store) as two,
        _client(url, clock, deadline=3.0, store=three_store) as three,
    ):
        server.hide = True  # a replica behind: F's refund does not show yet
        first = await _ended(zero.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        record_f = first.pending
        server.hide = False
        clock.advance(2_000.0)
        server.gate = asyncio.Event()
        call_y = asyncio.ensure_future(two.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        await asyncio.wait_for(server.held.wait(), 5.0)
        busy = await _ended(three.resume(record_f))
        server.gate.set()
        made_y = await call_y
        handed = busy.pending if isinstance(busy, AmbiguousOutcomeError) else None
        later = await _ended(three.resume(handed)) if handed is not None else busy
    assert len(server.made) == 2  # F's own refund and Y's
    assert isinstance(busy, AmbiguousOutcomeError), repr(busy)
    assert not (isinstance(later, OrderRefund) and later.id == made_y.id), (
        f"F's resume returned Y's refund {made_y.id}; F made {server.made[0]['id']}"
    )
    assert handed is None or handed.ask_id == record_f.ask_id, "F was handed Y's record"


# -- 6. a keyed record whose key, past retention, now holds another request ------------


async def test_a_keyed_record_whose_key_now_holds_another_request_is_not_told_failed(
    tmp_path: Path,
) -> None:
    """Scenario: a keyed refund X applies, its answer is lost (500), a replica hides it,
    and its deadline ends: pending (record X, on a job queue). The app repeats the key
    in process two (one SQLiteStore): it takes X over and finds X's refund (the key's
    entry: applied). Two days later (past the 24 h retention) the app uses the same key
    string for another request (another amount: allowed, the key expired, as Stripe's
    do), and it applies. The queue then delivers X's job again (late, at least once).

    Main: the key's entry holds another request: the claim answers REUSED and
    ``resume`` raises ``RequestValidationError`` ("names another request... neither
    resumed nor sent"), which every driver reads as ``Outcome.FAILED``: a definite
    failure of X, whose refund was made.

    True outcome: X's resume returns X's refund, or is pending or for review; never a
    definite failure."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["applied_lost", "ok"])
    path = tmp_path / "keys.db"
    key = "rma-review14-expired"

    def store() -> SQLiteStore:
        return SQLiteStore(path, monotonic=clock.monotonic)

    async with (
        _serve(server) as url,
        store() as one_store,
        store() as two_store,
        store() as three_store,
        _client(url, clock, deadline=3.0, store=one_store) as one,
        _client(url, clock, store=two_store) as two,
        _client(url, clock, store=three_store) as three,
    ):
        server.hide = True
        first = await _ended(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        record = first.pending.to_json()
        server.hide = False
        clock.advance(2_000.0)
        found = await two.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key)
        assert found.id == server.made[0]["id"]
        clock.advance(2 * 86_400.0)
        other = RefundBagRequest(amount_refunded=300)
        await three.refund_bag(ORDER, BAG + 1, other, idempotency_key=key)
        again = await _ended(three.resume(PendingRefund.from_json(record)))
    assert len(server.made) == 2
    if isinstance(again, OrderRefund):
        assert again.id == found.id
    else:
        assert outcome_of(again) not in (Outcome.FAILED, None), repr(again)


# -- 7. a wall clock step while a keyed call waits for another process's key -----------


class _StepBeforeFreeClaim:
    """A store that steps the wall clock (``step``) as the claim that finds its key free
    again (its ask FAILED) returns: the step lands while the caller waits for the busy
    key, after the other process's end and before this caller sends anything."""

    def __init__(self, inner: SQLiteStore, step: Callable[[], None]) -> None:
        self.inner = inner
        self.step = step
        self.stepped = False
        self.lease = inner.lease
        self.retention = inner.retention

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        claim, entry = await self.inner.claim(fresh, now)
        if not self.stepped and claim is Claim.OWNED and entry.lineage:
            # The key was free again (its ask FAILED, now in the lineage): the step
            # lands here, after this poll and before anything is sent for the key.
            self.stepped = True
            self.step()
        return claim, entry

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        return await self.inner.save(entry, owner)

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        return await self.inner.renew(key, owner, lease_until)

    async def load(self, key: str) -> KeyEntry | None:
        return await self.inner.load(key)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> _StepBeforeFreeClaim:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None  # the inner store is closed by its own ``async with``


async def test_a_step_while_a_keyed_call_waits_for_the_key_does_not_refund_twice(
    tmp_path: Path,
) -> None:
    """Scenario (no ``Date`` headers): process one calls key K; its POST is in flight.
    Process two calls K too and waits for it (the key is busy: it polls the store).
    Process one's POST is answered 429 and it has no attempts left: K's ask failed
    (nothing applied), the key is free again; process two's next poll owns it, and
    right then (before it sends anything) the machine's wall clock steps forward 15 h
    (NTP). Process two asks anew: its POST applies, but the answer is lost (500). It
    reads the bag back.

    Main: process two's record dates its send by the stepped clock (15 h after Violet's
    date of its own refund); with no ``Date``, nothing moves it back: its refund is
    taken for one "made long before this ask was first sent" and skipped, the ask is
    proven absent after the settle window and sent again: two refunds. The step came
    during the call (a neighbour of the step during the wait for the bag lock), before
    anything of the drive watched the clock.

    True outcome: one refund (process two returns it, or is pending or for review)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["busy", "applied_lost", "ok"], dated=False)
    path = tmp_path / "keys.db"
    key = "rma-review14-step"

    def step() -> None:
        clock.step_wall(15 * HOUR)
        server.stepped = 15 * HOUR

    async with (
        _serve(server) as url,
        # A lease long enough that process two's polls (virtual time) never end it.
        SQLiteStore(path, monotonic=clock.monotonic, lease=3_600.0) as one_store,
        SQLiteStore(path, monotonic=clock.monotonic, lease=3_600.0) as inner,
        _StepBeforeFreeClaim(inner, step) as two_store,
        _client(url, clock, store=one_store, attempts=1) as one,
        _client(url, clock, deadline=600.0, store=two_store) as two,
    ):
        server.gate = asyncio.Event()
        call_one = asyncio.ensure_future(
            _ended(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        )
        await asyncio.wait_for(server.held.wait(), 5.0)
        call_two = asyncio.ensure_future(
            _ended(two.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        )
        await asyncio.sleep(0.02)  # process two polls the busy key
        assert not call_two.done()
        server.gate.set()
        server.gate = None
        told_one = await call_one
        got = await call_two
    assert two_store.stepped, (repr(told_one)[:300], repr(got)[:300])
    assert not isinstance(told_one, OrderRefund)
    assert outcome_of(told_one) is Outcome.NOT_SENT, repr(told_one)  # a 429
    assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"
    if isinstance(got, OrderRefund):
        assert got.id == server.made[0]["id"]


# -- 8. a key reused for another request a minute later, after a forward step ----------


async def test_a_key_reused_for_another_request_after_a_step_is_refused(tmp_path: Path) -> None:
    """Scenario: process one refunds 5.00 under key K (applied). A minute later the
    machine's wall clock steps forward 30 h (NTP), and the app's retry of that call
    lands in process two (one SQLiteStore) with another amount (it recomputed the
    refund: 4.99): same key, another request.

    Main: ``decide`` frees a finished key for another request once ``finished_at +
    retention <= now``, by the wall clock alone (the sweep's ``SweepClock`` guard does
    not apply here): K "expired", the other request owns it and is sent: a second
    refund on the bag, a minute after the first, under one key.

    True outcome: ``IdempotencyKeyReusedError``, nothing sent (one refund)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, [])
    path = tmp_path / "keys.db"
    key = "rma-review14-reused"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic) as one_store,
        SQLiteStore(path, monotonic=clock.monotonic) as two_store,
        _client(url, clock, store=one_store) as one,
        _client(url, clock, store=two_store) as two,
    ):
        made = await one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key)
        clock.advance(60.0)
        clock.step_wall(30 * HOUR)
        server.stepped = 30 * HOUR
        other = RefundBagRequest(amount_refunded=499)
        again = await _ended(two.refund_bag(ORDER, BAG, other, idempotency_key=key))
    assert server.on_bag(BAG) == [made.id], f"bag {BAG} refunded {len(server.made)} times"
    assert isinstance(again, IdempotencyKeyReusedError), repr(again)


# -- 9. a refund another system made while this call waited out a 429 ------------------


async def test_a_refund_made_during_a_429_wait_is_not_taken_for_the_resend() -> None:
    """Scenario: a call's POST is answered 429 with ``Retry-After: 20`` (nothing
    applied). While it waits, another system (the merchant's own admin) refunds the
    same 5.00 on the bag, 10 s after that first POST. The call sends again at +20 s:
    answered 500, and it did not apply. The call reads the bag back: it lists only the
    other system's refund, dated 10 s BEFORE the only send of this call that could have
    applied (``Date`` headers present and in agreement with the client's clock).

    Main: the record keeps ``first_sent_at`` from the 429'd send (``_protocol._send``
    keeps the first send's time): the refund's date is "after the first send", so it is
    claimed: the call returns the other system's refund ``reconciled`` as its own, and
    its shopper's refund is never made. Without the 429 (a send at +20 s) the same
    refund is 10 s before the send: for review.

    True outcome: pending or for review (the refund predates the send that could have
    made it by more than ``date_tolerance``), never that refund. Since the bag is read
    before a re-send after a 429 (simulator seeds 1141662, 1145746), the other
    system's refund is listed before the re-send, never this call's: the re-send's 500
    is proven not applied after its window and the call sends once more, its own
    refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["busy", "lost"])
    server.retry_after = "20"
    start = clock.time()
    other = refund_body(
        id=9_999,
        order_id=ORDER,
        bag_id=BAG,
        amount=500,
        status="COMPLETED",
        skus=[],
        errors=[],
        date_created=_stamp(start + 10.0),
        date_last_modified=_stamp(start + 10.0),
    )
    server.made.append(other)  # listed from the start: dated 10 s after the first POST
    async with _serve(server) as url, _client(url, clock, deadline=600.0, attempts=4) as client:
        got = await _ended(client.refund_bag(ORDER, BAG, REQUEST))
    assert isinstance(got, OrderRefund), repr(got)
    assert got.id != 9_999, "the call took the other system's refund for its own"
    assert server.posts == 3
    assert server.on_bag(BAG) == [9_999, got.id]


# -- 10. a store opened before a step, first used after it ----------------------------


async def test_a_store_first_used_after_a_step_does_not_sweep_a_fresh_key(tmp_path: Path) -> None:
    """Scenario: two processes share a SQLiteStore. Process two has been running (its
    client and store open, calls without a key) since before process one's keyed refund.
    The wall clock steps forward 30 h; process two's first keyed call (another key)
    claims, and a minute after process one's refund the app's retry of it (same key,
    same request) lands in process two.

    Main: ``SweepClock`` takes its reference at the store's first sweep, not when the
    store (or the process) started: process two's first claim, after the step, takes
    the stepped wall clock for steady time and sweeps the finished key; the retry then
    sends again: a second refund. (A neighbour of the process started after the step:
    this one started before it.)

    True outcome: the retry returns the one refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, [])
    path = tmp_path / "keys.db"
    key = "rma-review14-first-use"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic) as one_store,
        SQLiteStore(path, monotonic=clock.monotonic) as two_store,
        _client(url, clock, store=one_store) as one,
        _client(url, clock, store=two_store) as two,
    ):
        await two.refund_bag(ORDER, 31, REQUEST)  # process two at work, no key yet
        made = await one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key)
        clock.advance(60.0)
        clock.step_wall(30 * HOUR)
        server.stepped = 30 * HOUR
        await two.refund_bag(ORDER, 33, REQUEST, idempotency_key="rma-other")
        again = await two.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key)
    assert server.on_bag(BAG) == [made.id], f"bag {BAG} refunded {len(server.on_bag(BAG))} times"
    assert again.id == made.id


# -- 11. a step between two resumes here of another process's record (no Date) ---------


async def test_a_step_between_two_resumes_of_another_process_record_does_not_end_the_window() -> (
    None
):
    """Scenario (no ``Date`` headers): a record R from another process (its ``clock``
    names that process) is resumed here: proven absent, sent again, answered 500 (Violet's
    own 5xx: the platform call behind it may still run for ``settle_running``, 60 s), and
    the call's deadline parks it pending (settle window to +60 s). The wall clock then
    steps forward 1 h; ten seconds later (real time) R is resumed here again.

    Main: the record's times stay on the other process's clock (no ``Date`` ever moved
    them here), so ``_stamped`` writes no ``wall_mono`` and ``run_ask`` compares nothing:
    the step is not seen, the window "ended" an hour ago, one read proves absence and
    the request is sent a third time, 10 s after a 5xx whose platform call may still
    commit (a second refund when it does). This process sent the re-send itself and
    has its own monotonic clock to see the step.

    True outcome: the second resume sends nothing before the window (60 s of real time)
    has passed: pending."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["lost", "lost", "ok"], dated=False)
    async with (
        _serve(server) as url,
        _client(url, clock, deadline=3.0) as zero,
        _client(url, clock, deadline=5.0) as here,
    ):
        first = await _ended(zero.refund_bag(ORDER, BAG, REQUEST))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        # Written by another process: its clock is not this one's.
        record = attrs.evolve(first.pending, clock="0123456789abcdef", wall_mono=None)
        clock.advance(2_000.0)
        again = await _ended(here.resume(record))
        assert isinstance(again, AmbiguousOutcomeError)
        assert again.pending is not None
        assert server.posts == 2  # proven absent, sent again: 500, window to +60 s
        clock.step_wall(HOUR)
        clock.advance(10.0)
        third = await _ended(here.resume(again.pending))
    assert server.posts == 2, "sent again 10 s after a 5xx whose platform call may still run"
    assert isinstance(third, AmbiguousOutcomeError), repr(third)
