"""Review 16: ways today's main refunds twice, reports an outcome it did not prove, or
never ends, each against a server scripted here (``Hostile``; refunds counted by its
own record, ``Hostile.made``), on a virtual clock. Each test names the scenario, what
the SDK did, and the true outcome (one refund per ask; pending or review is a true
outcome)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from email.utils import formatdate
from pathlib import Path

import attrs
import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    PendingRefund,
    RecordStoreError,
    RefundBagRequest,
    RetryPolicy,
    VioletClient,
)
from violet_async._ask import sent_once
from violet_async._transport import Timeouts
from violet_async.exceptions import BagPendingError, VioletError
from violet_async.stores import RecordStore, SQLiteStore
from violet_async.testing import FakeClock

from .conftest import serve
from .samples import refund_body
from .test_keys_resume import Paused

ORDER, BAG = 16, 26
HOUR = 3600.0
REQUEST = RefundBagRequest(amount_refunded=500)


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class Hostile:
    """Violet for a few bags, scripted. Each POST takes the next step of ``script``:

    - ``lost``: not applied, answered Violet's own 500;
    - ``applied_lost``: applied, answered Violet's own 500;
    - ``ok``: applied, answered 200 with the refund;
    - ``busy``: not applied, answered 429;
    - ``applied_held``: applied, answered 200 once ``release`` is set;
    - ``idless``: applied, answered 200 without the refund's ``id``, dated ``ahead``
      seconds after the list's date for it.

    ``dated``: answers carry a ``Date`` header (Violet's clock: ``clock.time()`` minus
    ``stepped``, how far the client's wall clock was stepped off Violet's). ``hide``:
    the refund list shows nothing (a platform call not yet committed, or a lagging
    list). ``gate``: when set, every POST waits for it (``held`` set meanwhile)."""

    def __init__(self, clock: FakeClock, script: list[str], *, dated: bool = True) -> None:
        self.clock = clock
        self.script = script
        self.dated = dated
        self.stepped = 0.0
        self.hide = False
        self.gate: asyncio.Event | None = None
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.posts = 0
        self.made: list[dict[str, object]] = []
        # A record's amount in the merchant platform's currency (``platform_rate``
        # times the amount asked, ``refund_currency`` names it); the bag's currency
        # as the order read gives it (None: left out).
        self.platform_rate = 1.0
        self.refund_currency = "USD"
        self.bag_currency: str | None = "USD"
        self.order_reads = 0
        self.list_reads = 0
        self.ahead = 0.0

    def violet_time(self) -> float:
        return self.clock.time() - self.stepped

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_get("/v1/orders/{o}", self._order)
        return app

    async def _order(self, request: web.Request) -> web.Response:
        self.order_reads += 1
        order = int(request.match_info["o"])
        bags = sorted({int(str(r["bag_id"])) for r in self.made} | {BAG})
        bag_list = []
        for bag in bags:
            one: dict[str, object] = {
                "id": bag,
                "order_id": order,
                "merchant_id": 33,
                "status": "COMPLETED",
                "financial_status": "PAID",
                "total": 10_000,
                "skus": [],
            }
            if self.bag_currency is not None:
                one["currency"] = self.bag_currency
            bag_list.append(one)
        data = {"id": order, "status": "COMPLETED", "currency": "USD", "bags": bag_list}
        return web.json_response(data, headers=self._headers())

    def _headers(self) -> dict[str, str]:
        if not self.dated:
            return {"Date": "none"}  # unreadable: no Date to the SDK
        return {"Date": formatdate(self.violet_time(), usegmt=True)}

    async def _login(self, request: web.Request) -> web.Response:
        data = {"token": "review16-token-0123456789", "refresh_token": "review16-refresh-01"}
        return web.json_response(data, headers=self._headers())

    async def _list(self, request: web.Request) -> web.Response:
        self.list_reads += 1
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
                {"message": "Internal error", "status": 500}, status=500, headers=self._headers()
            )
        if step == "busy":
            return web.json_response(
                {"message": "Too many requests"},
                status=429,
                headers={**self._headers(), "Retry-After": "1"},
            )
        now = self.violet_time()
        listed = refund_body(
            id=16_000 + len(self.made),
            order_id=int(request.match_info["o"]),
            bag_id=int(request.match_info["b"]),
            amount=round(body["amount_refunded"] * self.platform_rate),
            refund_currency=self.refund_currency,
            status="COMPLETED",
            skus=[],
            errors=[],
            date_created=_stamp(now),
            date_last_modified=_stamp(now),
        )
        self.made.append(listed)
        if step == "applied_held":
            # Applied; the answer waits for ``release`` (the caller may be gone by then).
            self.held.set()
            await self.release.wait()
        if step == "applied_lost":
            return web.json_response(
                {"message": "Internal error", "status": 500}, status=500, headers=self._headers()
            )
        answer = listed
        if step == "idless":
            # Without its id, stamped by another clock of Violet's (``ahead`` seconds
            # after the time the list gives the refund).
            stamp = _stamp(now + self.ahead)
            answer = dict(listed, date_created=stamp, date_last_modified=stamp)
            del answer["id"]
        return web.json_response(answer, headers=self._headers())

    def on_bag(self, bag: int) -> list[object]:
        return [r["id"] for r in self.made if r["bag_id"] == bag]


@contextlib.asynccontextmanager
async def _serve(server: Hostile) -> AsyncIterator[str]:
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
        4216,
        "review16-app-secret-0123456789abcdef",
        username="review16-user",
        password="review16-password-0123",
        base_url=url,
        clock=clock,
        store=store,
        retry=RetryPolicy(
            initial_delay=0.5, max_delay=1.0, deadline=deadline, max_attempts=attempts
        ),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


async def _ended(call: Awaitable[OrderRefund]) -> OrderRefund | BaseException:
    """The refund a call returned, or what it raised."""
    try:
        return await call
    except VioletError as exc:
        return exc


# -- 1. another process's record that learned Violet's offset, resumed after a step ----


@pytest.mark.parametrize("dated_here", [False, True])
async def test_a_dated_record_of_another_process_resumed_after_a_step_here_waits(
    dated_here: bool,
) -> None:
    """Scenario: process zero's POST is answered Violet's own 500 (its platform call may
    still run for ``settle_running``, 60 s), with a ``Date`` header: zero's record
    learns Violet's offset (``server_offset``) and its deadline parks it pending: record
    R, on a job queue. This process's client was made before; since then its machine's
    wall clock stepped forward 1 h (NTP), which its ``ClockOrigin`` knows. Ten seconds
    after the 500 the job resumes R here; the answers here carry no readable ``Date``
    (another frontend, or a proxy that drops it).

    Main: ``Engine.drive`` moves another process's times by the origin's step only when
    the record never learned an offset (``server_offset is None``); ``protocol.start``
    likewise adds the skew and takes the record onto this clock only then. R's times
    stay as zero read them (Violet's time, right), compared with this stepped clock:
    the window ended 1 h ago, one read (the platform call not committed yet) proves
    absence, and the request is sent again 10 s after a 5xx: a second refund.

    True outcome: nothing sent inside the window: pending (one refund); the same with a
    ``Date`` here (``dated_here``)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["applied_lost", "ok"])
    server.hide = True  # the platform call has not committed yet (it does within 60 s)
    async with (
        _serve(server) as url,
        _client(url, clock, deadline=3.0) as zero,
        _client(url, clock, deadline=5.0) as here,
    ):
        first = await _ended(zero.refund_bag(ORDER, BAG, REQUEST))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        assert first.pending.server_offset is not None  # zero learned Violet's offset
        record = attrs.evolve(first.pending, clock="0123456789abcdef", wall_mono=None)
        clock.step_wall(HOUR)
        server.stepped = HOUR
        server.dated = dated_here
        clock.advance(10.0)
        again = await _ended(here.resume(PendingRefund.from_json(record.to_json())))
        server.hide = False  # committed, within the settle window
    assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"
    assert isinstance(again, AmbiguousOutcomeError), repr(again)


# -- 2. a refund recorded in another currency, on a bag whose currency is left out ------


async def test_a_refund_in_another_currency_on_a_bag_without_its_currency_is_not_sent_again() -> (
    None
):
    """Scenario: a refund of 25.00 on a USD order; Violet's POST applies it and answers
    its own 500. The merchant platform records it in its own currency: 33.75 CAD
    (``refund_currency`` CAD, amount 3375). The order read gives the bag without its
    ``currency`` (every field of Violet's answers is optional; the order says USD).

    Main: the read-back sees 3375 CAD and no bag, and reads the bag once (audit 27's
    fix) to learn its currency; the bag has none, so ``_other_currency`` says "same
    currency" (it compares only when both are given), 3375 is another amount: a miss.
    After the window the ask is proven absent and sent again: a second refund.

    True outcome: the bag's currency is its cart's, the order's (USD): the CAD record
    may be this ask's and its amount cannot be compared: review, one refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["applied_lost", "ok"])
    server.platform_rate = 1.35
    server.refund_currency = "CAD"
    server.bag_currency = None
    async with _serve(server) as url, _client(url, clock, deadline=600.0) as client:
        got = await _ended(client.refund_bag(ORDER, BAG, amount_refunded=2500))
    assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"
    assert isinstance(got, AmbiguousOutcomeError), repr(got)
    assert got.pending is not None
    assert got.pending.needs_review


# -- 3. another machine's record sent and never answered, resumed here -----------------


async def test_another_machines_sent_record_is_resumed_with_the_skew_allowed_for() -> None:
    """Scenario: a fleet worker on host A (its wall clock 40 s behind, within the
    policy's ``clock_skew`` of 60 s) records its send (``sent``: the record saved
    right before the POST, no settle window yet) and is killed with the POST in
    flight; Violet's platform call behind it commits 50 s later. A worker on host B
    (clock right) resumes the record 35 s after the POST left.

    Main: ``protocol.start`` takes another process's record onto this clock and adds
    ``clock_skew`` to its settle window only when the record has one; a record that
    never got one (sent, then nothing) is given ``last_sent_at + attempt + settle_running``
    on A's clock, 40 s early by B's: the window looks over, the one read (not committed
    yet) proves absence, and B sends again: a second refund.

    True outcome: nothing sent before the window (with the skew) has passed: pending,
    one refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["ok"])
    async with _serve(server) as url, _client(url, clock, deadline=5.0) as here:
        sent_at = clock.time() - 40.0  # host A's clock, 40 s behind
        record = sent_once("refund", ORDER, BAG, REQUEST, sent_at, clock="a0a0a0a0a0a0a0a0")
        # A's POST reached Violet; its platform call has not committed (not listed).
        server.made.append(
            refund_body(
                id=15_999,
                order_id=ORDER,
                bag_id=BAG,
                amount=500,
                status="COMPLETED",
                skus=[],
                errors=[],
                date_created=_stamp(clock.time()),
                date_last_modified=_stamp(clock.time()),
            )
        )
        server.hide = True
        clock.advance(35.0)
        again = await _ended(here.resume(PendingRefund.from_json(record.to_json())))
        server.hide = False  # committed, 50 s after it left
    assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"
    assert isinstance(again, AmbiguousOutcomeError), repr(again)


# -- 4. a keyed call cancelled with its POST applied, repeated across processes ---------


async def test_a_keyed_call_cancelled_after_its_post_applied_refunds_once(
    tmp_path: Path,
) -> None:
    """Scenario: two processes share a SQLiteStore. Process one's keyed refund is
    applied at Violet, and its caller's timeout (``asyncio.wait_for``) cancels the call
    before the answer arrives. The web app retries: without the key in process one,
    then with the key in process two, then with it in process one.

    True outcome: one refund; the unkeyed retry in process one is refused
    (``BagPendingError``), each keyed retry gets the one refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["applied_held"])
    path = tmp_path / "keys.db"
    key = "rma-review16-cancelled"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic) as one_store,
        SQLiteStore(path, monotonic=clock.monotonic) as two_store,
        _client(url, clock, store=one_store) as one,
        _client(url, clock, store=two_store) as two,
    ):
        call = asyncio.ensure_future(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        await server.held.wait()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        server.release.set()
        bare = await _ended(one.refund_bag(ORDER, BAG, REQUEST))
        clock.advance(5.0)
        keyed_two = await _ended(two.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        keyed_one = await _ended(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
    assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"
    assert isinstance(bare, BagPendingError), repr(bare)
    made = server.made[0]["id"]
    assert isinstance(keyed_two, OrderRefund), repr(keyed_two)
    assert keyed_two.id == made
    assert isinstance(keyed_one, OrderRefund), repr(keyed_one)
    assert keyed_one.id == made


# -- 5. another host's record that learned Violet's offset, resumed with no Date here ---


class _Behind:
    """Another host's clock on the same virtual time: its wall clock ``behind`` seconds
    behind ``base``'s (within ``clock_skew``); monotonic time and sleeps are ``base``'s."""

    def __init__(self, base: FakeClock, behind: float) -> None:
        self.base = base
        self.behind = behind

    def monotonic(self) -> float:
        return self.base.monotonic()

    def time(self) -> float:
        return self.base.time() - self.behind

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)


async def test_a_dated_record_of_a_host_behind_resumed_with_no_date_here_waits() -> None:
    """Scenario: worker P's host clock is 40 s behind (within ``clock_skew``, 60 s);
    worker Q's is right. P's POST is answered Violet's own 500 with a ``Date`` (P
    learns Violet's offset, +40 s): its platform call may run for ``settle_running``
    (60 s) and does commit 50 s later. P's deadline parks it: record R. 35 s after the
    500 the job resumes R in Q, whose answers carry no readable ``Date``.

    Main: R learned an offset, so ``protocol.start`` neither takes it onto Q's clock
    nor allows the skew for it; with no ``Date`` in Q nothing moves its times (on P's
    clock, 40 s behind): the window ended 20 s after the 500 by Q's clock, the read (not
    committed yet) proves absence, and Q sends again: a second refund.

    True outcome: nothing sent before the window (with the skew) has passed: pending,
    one refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["applied_lost", "ok"])
    server.hide = True  # the platform call has not committed yet (it does within 60 s)
    async with (
        _serve(server) as url,
        VioletClient(
            4216,
            "review16-app-secret-0123456789abcdef",
            username="review16-user",
            password="review16-password-0123",
            base_url=url,
            clock=_Behind(clock, 40.0),
            retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=3.0, max_attempts=3),
            timeouts=Timeouts(connect=1.0, read=2.0),
        ) as p,
        _client(url, clock, deadline=5.0) as q,
    ):
        first = await _ended(p.refund_bag(ORDER, BAG, REQUEST))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        assert first.pending.server_offset is not None
        server.dated = False
        clock.advance(32.0)
        again = await _ended(q.resume(PendingRefund.from_json(first.pending.to_json())))
        server.hide = False  # committed, 50 s after the 500
    assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"
    assert isinstance(again, AmbiguousOutcomeError), repr(again)


# -- 6. a keyed record told FAILED, resumed again once the key holds an unsent repeat ---


async def test_a_keyed_record_told_failed_is_not_sent_again_through_an_unsent_repeat(
    tmp_path: Path,
) -> None:
    """Scenario: processes one and two share a SQLiteStore. One's keyed refund (key K)
    is answered Violet's own 500 (nothing applied) and its deadline parks it: record X
    (kept pending on the bag in one, and put on a job queue). The job resumes X in
    worker two: proven absent, sent again, 429, no attempts left: FAILED, and the job's caller
    is told so (``Claim.ENDED`` exists so that a later delivery of X says the same
    and sends nothing). The web app then repeats K in process one, and the repeat is
    held back unsent: its store write fails (``RecordStoreError``; when this was found,
    X still pending on the bag there made it ``BagPendingError``, which a key's new ask
    no longer is for its key's earlier asks), and the key's entry is left holding the
    repeat's unsent ask (NEW, X in its lineage). The job is delivered again
    (at-least-once) and resumes X in worker three.

    Main: ``decide`` answers ENDED only while the key's entry holds X FAILED; with the
    repeat's NEW ask there it is OWNED, and ``_own_resume`` resumes X itself through
    the key (``_key_ask``: "a key's record never sent holds no ask yet"): X, told
    FAILED, is read back, proven absent and sent a third time: it applies. A caller
    told "failed" (who may refund the shopper another way) now has a refund made.

    True outcome: the second delivery ends as the first did (failed), nothing sent."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["lost", "busy", "ok"])
    path = tmp_path / "keys.db"
    key = "rma-review16-told-failed"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic) as one_store,
        SQLiteStore(path, monotonic=clock.monotonic) as two_store,
        _client(url, clock, deadline=3.0, store=(failing := Paused(one_store, fail=True))) as one,
        _client(url, clock, store=two_store, attempts=1) as two,
        SQLiteStore(path, monotonic=clock.monotonic) as three_store,
        _client(url, clock, store=three_store) as three,
    ):
        first = await _ended(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        record = first.pending.to_json()
        clock.advance(120.0)
        told = await _ended(two.resume(PendingRefund.from_json(record)))
        assert not isinstance(told, (OrderRefund, AmbiguousOutcomeError)), repr(told)
        posts = server.posts
        failing.where = "sent"  # the repeat's write before its send fails
        repeat = await _ended(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert isinstance(repeat, RecordStoreError), repr(repeat)
        assert server.posts == posts
        clock.advance(120.0)
        again = await _ended(three.resume(PendingRefund.from_json(record)))
    assert server.posts == posts, f"X was sent again after its caller was told {told!r}"
    assert not isinstance(again, OrderRefund), repr(again)


# -- 7. a batch's second row after an id-less answer dated after its record ------------


@pytest.mark.parametrize("ahead", [0.0, 90.0])
async def test_a_batch_row_after_an_idless_answer_is_not_held_as_already_present(
    ahead: float,
) -> None:
    """Scenario: a batch (``read_before_send``, as the CLI runs it) with two rows of
    5.00 on one bag (two items of one bag, each to be refunded). Violet applies the
    first and answers 200 without the refund's ``id``; its answer is dated 90 s after
    the date the bag's list gives the refund (two clocks of Violet's, or one stamping
    on arrival and one on processing). The second row's guard read lists that refund.

    Main: ``KnownRefunds.learn`` binds a listed record to the id-less answer only when it
    is at most 60 s older than the answer (``IDLESS_EARLIER``); this one is 90 s older,
    so it is not known as the first row's, and the guard (``_guard``, which looks at
    ``known`` only, not at the refunds handed out without their id, ``unnamed``) finds
    "a refund exactly like it that nothing accounts for": the second row is
    ``already_present`` and never sent. The first row's refund is reported as the
    second's shopper's too; that shopper is never refunded, and nothing says review.

    True outcome: the second row is sent (two refunds, one per row), or, when that
    cannot be told, left for review (unknown), never "already present". With the answer
    dated as listed (``ahead`` 0), the record is known as the first row's and the
    second row is sent."""
    from violet_async.batch import BatchItem, run_batch

    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["idless", "ok"], dated=False)
    server.ahead = ahead
    items = [BatchItem.refund(1, ORDER, BAG, REQUEST), BatchItem.refund(2, ORDER, BAG, REQUEST)]
    async with _serve(server) as url, _client(url, clock) as client:
        results = [r async for r in run_batch(client, items, concurrency=1)]
    outcomes = {r.item.line: r.outcome for r in results}
    assert outcomes[1] == "succeeded"
    assert outcomes[2] in ("succeeded", "unknown"), outcomes
    if outcomes[2] == "succeeded":
        assert len(server.made) == 2
    if not ahead:
        assert outcomes[2] == "succeeded"


# -- 1. two records pending on one bag in one client hold each other back for good ------


async def test_two_records_pending_on_one_bag_in_one_client_end() -> None:
    """Scenario: this client's refund X of 5.00 is answered Violet's own 500 (nothing
    applied) and its deadline parks it pending. A job hands this client record R of
    another process (the shopper's other 5.00, also answered 500, nothing applied) on
    the same bag. The app resumes both, as the errors say, every two minutes, for an
    hour.

    Main: resuming R finds X pending on the bag (``settings.others_pending``): once R is
    proven absent its re-send is held back (``_held_back``), and R goes back on the
    bag; resuming X then finds R pending and is held back the same way. Neither ever
    ends: no refund, no failure, no review, for as long as the app keeps trying (the
    ``BagPendingError`` says "resume the pending one first", which is the other).

    True outcome: each ask ends (applied, failed, or parked for review by a person):
    one of them at least may send, or the client says a person must look."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["lost", "lost"])
    async with (
        _serve(server) as url,
        _client(url, clock, deadline=3.0) as zero,
        _client(url, clock, deadline=30.0) as here,
    ):
        x = await _ended(here.refund_bag(ORDER, BAG, REQUEST))
        r = await _ended(zero.refund_bag(ORDER, BAG, REQUEST))
        assert isinstance(x, AmbiguousOutcomeError)
        assert x.pending is not None
        assert isinstance(r, AmbiguousOutcomeError)
        assert r.pending is not None
        records = {
            "x": x.pending,
            "r": PendingRefund.from_json(
                attrs.evolve(r.pending, clock="0123456789abcdef", wall_mono=None).to_json()
            ),
        }
        outcomes: list[str] = []
        ends: dict[str, object] = {}
        for _ in range(30):
            clock.advance(120.0)
            for name in ("r", "x"):
                if name in ends:
                    continue
                got = await _ended(here.resume(records[name]))
                outcomes.append(f"{name}: {type(got).__name__}")
                if isinstance(got, AmbiguousOutcomeError) and got.pending is not None:
                    if got.pending.needs_review:
                        ends[name] = got
                    else:
                        records[name] = got.pending
                elif not isinstance(got, BagPendingError):
                    ends[name] = got
            if len(ends) == 2:
                break
    assert len(server.made) <= 2
    made = [e for e in ends.values() if isinstance(e, OrderRefund)]
    assert len(made) == len(server.made)
    assert len(ends) == 2, f"never ended after an hour: {outcomes[-4:]}"


# -- 3. a keyed record told FAILED, resumed after its key's retention --------------------


async def test_a_keyed_record_told_failed_is_not_sent_again_after_retention(
    tmp_path: Path,
) -> None:
    """Scenario: processes share a SQLiteStore (retention 600 s here; 24 h by default).
    Process one's keyed refund (key K) is answered Violet's own 500 (nothing applied);
    its deadline parks it: record X, on a job queue. The job resumes X in worker two:
    proven absent, re-sent, 429, no attempts left: FAILED, and its caller is told so.
    The queue delivers the resume job once more, after K's retention (a queue that
    retries for longer than the store keeps finished keys).

    Main: K's FAILED entry was swept with its retention; the resume finds no entry and
    owns it fresh with X's record: X, told FAILED, is read back, proven absent and
    sent again (it applies). ``Claim.ENDED`` only holds while the entry does.

    True outcome: a record whose ask ended (or may have) and whose key's entry is gone
    is not sent again: failed, or review; nothing sent.

    Why open: a store cannot tell "swept after it finished" from "never held here" (a
    record of another store, or of a process with the default MemoryStore). A fix
    keeps the ``ask_id`` of every ended ask longer than retention (a compact tombstone),
    or refuses a resume of a keyed record older than retention (review)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["lost", "busy", "ok"])
    path = tmp_path / "keys.db"
    key = "rma-review16-swept"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic, retention=600.0) as one_store,
        SQLiteStore(path, monotonic=clock.monotonic, retention=600.0) as two_store,
        SQLiteStore(path, monotonic=clock.monotonic, retention=600.0) as three_store,
        _client(url, clock, deadline=3.0, store=one_store) as one,
        _client(url, clock, store=two_store, attempts=1) as two,
        _client(url, clock, store=three_store) as three,
    ):
        first = await _ended(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        record = first.pending.to_json()
        clock.advance(120.0)
        told = await _ended(two.resume(PendingRefund.from_json(record)))
        assert not isinstance(told, (OrderRefund, AmbiguousOutcomeError)), repr(told)
        posts = server.posts
        clock.advance(700.0)
        await one.refund_bag(ORDER, 99, REQUEST, idempotency_key="rma-review16-other")
        posts += 1  # that one's own POST, on another bag
        again = await _ended(three.resume(PendingRefund.from_json(record)))
    assert server.posts == posts, f"X was sent again after its caller was told {told!r}"
    assert not isinstance(again, OrderRefund), repr(again)
