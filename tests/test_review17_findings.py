"""Review 17's findings, each against a server scripted here (refunds counted by the
server's own record)."""

from __future__ import annotations

import email.utils
import time
from pathlib import Path

import attrs
import orjson
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
from violet_async._transport import Timeouts
from violet_async.stores import RedisStore, SQLiteStore
from violet_async.testing import FakeClock

from ._fleet_redis import redis_url  # noqa: F401 - the fixture
from .conftest import serve
from .samples import refund_body
from .test_review16_findings import BAG as BAG16
from .test_review16_findings import HOUR, Hostile, _ended, _serve
from .test_review16_findings import ORDER as ORDER16
from .test_review16_findings import REQUEST as REQUEST16
from .test_review16_findings import _client as _client16

ORDER, BAG = 71, 81
WALL0 = 1_790_000_000.0


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class SteppedLogin:
    """Violet for one bag, on a clock of its own (true time: it never steps). Its
    login takes 60 s, during which this machine's wall clock steps by ``step``
    seconds. Each POST applies and is answered by a gateway's 524."""

    def __init__(self, clock: FakeClock, step: float) -> None:
        self.clock = clock
        self.step = step
        self.mono0 = clock.monotonic()
        self.made: list[dict[str, object]] = []
        self.posts = 0

    def violet_time(self) -> float:
        return WALL0 + (self.clock.monotonic() - self.mono0)

    def app(self) -> web.Application:
        app = web.Application()
        app.on_response_prepare.append(self._date)
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    async def _date(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Date"] = email.utils.formatdate(self.violet_time(), usegmt=True)

    async def _login(self, request: web.Request) -> web.Response:
        self.clock.advance(30.0)
        self.clock.step_wall(self.step)
        self.clock.advance(30.0)
        return web.json_response({"token": "step-token-0123456789", "refresh_token": "r-01"})

    async def _list(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.made), content_type="application/json")

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        now = _stamp(self.violet_time())
        self.made.append(
            refund_body(
                id=9_000 + len(self.made),
                order_id=ORDER,
                bag_id=BAG,
                amount=body["amount_refunded"],
                status="COMPLETED",
                skus=[],
                errors=[],
                date_created=now,
                date_last_modified=now,
            )
        )
        return web.Response(status=524, text="<html>Error 524: A timeout occurred</html>")


def _client(url: str, clock: FakeClock) -> VioletClient:
    return VioletClient(
        4242,
        "review17-app-secret-0123456789abcdef",
        username="review17-user",
        password="review17-password-0123",
        base_url=url,
        clock=clock,
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=600.0, max_attempts=4),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


async def _run(step: float) -> tuple[SteppedLogin, OrderRefund | VioletError]:
    clock = FakeClock(wall_start=WALL0)
    violet = SteppedLogin(clock, step)
    async with serve(violet.app()) as url, _client(url + "/v1", clock) as client:
        try:
            outcome: OrderRefund | VioletError = await client.refund_bag(
                ORDER, BAG, amount_refunded=500, idempotency_key="review17-step"
            )
        except VioletError as exc:
            outcome = exc
    return violet, outcome


async def test_a_wall_clock_step_during_a_keyed_sends_login_finds_its_own_refund() -> None:
    """Finding 1 (drive.stamp): a keyed send waits for its login; this machine's wall
    clock steps an hour forward during the login; the POST applies and is answered by
    a gateway's 524. ``stamp`` opened the refund-date window at the time read after
    the step, and the driver's WallWatch, which last looked before the login, then
    moved the record's times by the step once more: the window started an hour after
    the send left, and the call's own refund was left for review ("its date cannot
    place it") instead of handed back (no second refund: the matching rule still saw
    a refund like it). Fixed: ``stamp`` settles a step first."""
    for step in (3600.0, 7200.0):
        violet, outcome = await _run(step)
        assert len(violet.made) == 1, (step, violet.posts)
        assert isinstance(outcome, OrderRefund), (step, outcome)


async def test_a_wall_clock_step_back_during_a_keyed_sends_login_finds_its_own_refund() -> None:
    """As above with a step back of an hour (held before the fix too)."""
    violet, outcome = await _run(-3600.0)
    assert len(violet.made) == 1
    assert isinstance(outcome, OrderRefund), outcome


async def test_no_step_keyed_send_after_login_finds_its_own_refund() -> None:
    """Control: no step, the 524 that applied is read back as the call's own."""
    violet, outcome = await _run(0.0)
    assert len(violet.made) == 1
    assert isinstance(outcome, OrderRefund), outcome


# -- 5. RedisStore's epoch guard -----------------------------------------------------------


async def test_a_keyed_repeat_in_the_same_process_after_redis_lost_its_data(
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """Probe (5): as review 16's Redis-lost test, but the repeat of the key comes in the
    same process that parked the first ask pending (its client still knows the record).
    One refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["applied_lost", "ok", "ok"])
    prefix = "review17-lost-same:"
    key = "rma-review17-redis-same"
    async with (
        _serve(server) as url,
        RedisStore(redis_url, prefix=prefix) as store,
        _client16(url, clock, deadline=3.0, store=store) as one,
    ):
        server.hide = True
        first = await _ended(one.refund_bag(ORDER16, BAG16, REQUEST16, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        server.hide = False
        lost = await store._redis.keys(f"{prefix}*")
        await store._redis.delete(*lost)
        clock.advance(120.0)
        again = await _ended(one.refund_bag(ORDER16, BAG16, REQUEST16, idempotency_key=key))
        clock.advance(3600.0)
        later = await _ended(one.refund_bag(ORDER16, BAG16, REQUEST16, idempotency_key=key))
    assert len(server.made) == 1, (server.posts, again, later)


async def test_a_guarded_key_whose_bag_cannot_be_read_sends_nothing(
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """Probe (5): Redis lost the key's entry; the repeat is guarded, but the bag's list
    answers 503 to every read. The guarded ask must not be sent blind."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Unreadable(clock, ["applied_lost", "ok", "ok"])
    prefix = "review17-lost-unread:"
    key = "rma-review17-redis-unread"
    async with (
        _serve(server) as url,
        RedisStore(redis_url, prefix=prefix) as one_store,
        RedisStore(redis_url, prefix=prefix) as two_store,
        _client16(url, clock, deadline=3.0, store=one_store) as one,
        _client16(url, clock, deadline=60.0, store=two_store) as two,
    ):
        server.hide = True
        first = await _ended(one.refund_bag(ORDER16, BAG16, REQUEST16, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        server.hide = False
        lost = await one_store._redis.keys(f"{prefix}*")
        await one_store._redis.delete(*lost)
        clock.advance(120.0)
        server.broken = True
        again = await _ended(two.refund_bag(ORDER16, BAG16, REQUEST16, idempotency_key=key))
    assert len(server.made) == 1, (server.posts, again)


class Unreadable(Hostile):
    """``Hostile`` whose list answers 503 while ``broken``."""

    broken = False

    async def _list(self, request: web.Request) -> web.Response:
        if self.broken:
            return web.json_response({"message": "unavailable"}, status=503)
        return await super()._list(request)


# -- 3. a resumed record older than the store's retention (``_swept``) ---------------------


async def test_a_keyed_record_told_failed_is_not_sent_again_after_retention_and_a_step_back(
    tmp_path: Path,
) -> None:
    """Finding 3 (``_swept``): review 16's swept-key scenario (SQLiteStore, retention
    600 s: X answered Violet's own 500, parked pending; resumed in worker two, proven
    absent, re-sent, 429, FAILED and its caller told so; the resume job delivered again
    after K's retention), with one change: between the two deliveries NTP steps this
    machine's wall clock back an hour (it ran an hour fast). ``_swept`` compares the
    record's send time with the wall clock as it is now: the record looks an hour
    younger than it is, is not taken for swept, is read back, proven absent and sent
    again after its caller was told it failed.

    Expected: as without the step, nothing sent (review). Fixed: the record's age is
    judged on the wall clock as it was before a step back since the client was made
    (``KeyedAsks._latest``). Open: a process started after the step (or one whose
    clock runs behind the writer's) cannot see it."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["lost", "busy", "ok"])
    path = tmp_path / "keys.db"
    key = "rma-review17-swept-step"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic, retention=600.0) as one_store,
        SQLiteStore(path, monotonic=clock.monotonic, retention=600.0) as two_store,
        SQLiteStore(path, monotonic=clock.monotonic, retention=600.0) as three_store,
        _client16(url, clock, deadline=3.0, store=one_store) as one,
        _client16(url, clock, store=two_store, attempts=1) as two,
        _client16(url, clock, store=three_store) as three,
    ):
        first = await _ended(one.refund_bag(ORDER16, BAG16, REQUEST16, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        record = first.pending.to_json()
        clock.advance(120.0)
        told = await _ended(two.resume(PendingRefund.from_json(record)))
        assert not isinstance(told, (OrderRefund, AmbiguousOutcomeError)), repr(told)
        posts = server.posts
        clock.advance(700.0)
        await one.refund_bag(ORDER16, 99, REQUEST16, idempotency_key="rma-review17-other")
        posts += 1  # that one's own POST, on another bag (its claim swept K's entry)
        clock.step_wall(-HOUR)
        server.stepped = -HOUR  # Violet's clock did not move
        again = await _ended(three.resume(PendingRefund.from_json(record)))
    assert server.posts == posts, f"X was sent again after its caller was told {told!r}"
    assert not isinstance(again, OrderRefund), repr(again)


# -- 2. a resume held back by a record that is held back no more -------------------------


def _foreign(record: PendingRefund) -> PendingRefund:
    """``record`` as another process's (its clock unknown here)."""
    return PendingRefund.from_json(
        attrs.evolve(record, clock="0123456789abcdef", wall_mono=None).to_json()
    )


async def test_a_record_held_back_once_is_not_stuck_after_what_held_it_ended(
    tmp_path: Path,
) -> None:
    """Finding 2 (``PendingAsks._held``): process ``here`` (a SQLiteStore shared with
    process ``two``) makes keyed refund X (5.00): it applies, is answered Violet's own
    500 and the list does not show it yet: X is parked pending here. Another process's
    record R (4.00, nothing applied) is resumed here: proven absent, its re-send is held
    back by X, and R goes back on the bag marked held. Process two resumes X and ends
    it with its refund; X is resumed here too and gets that refund from the store: X
    leaves the bag. Nothing holds R back any more, but it stays marked held. A third
    record C (3.00, another process's, nothing applied) is resumed here: its re-send
    is held back by R, and as R "is held back in turn", C is parked for review
    (a false review: R can simply be resumed now, then C).

    Expected: C is told to resume R first (BagPendingError), nothing parked."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["applied_lost", "lost", "lost"])
    path = tmp_path / "keys.db"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic) as here_store,
        SQLiteStore(path, monotonic=clock.monotonic) as two_store,
        _client16(url, clock, deadline=3.0, store=here_store) as here,
        _client16(url, clock, deadline=60.0, store=two_store) as two,
        _client16(url, clock, deadline=3.0) as zero,
        _client16(url, clock, deadline=3.0) as other,
    ):
        server.hide = True
        x = await _ended(here.refund_bag(ORDER16, BAG16, REQUEST16, idempotency_key="rma-x"))
        r = await _ended(zero.refund_bag(ORDER16, BAG16, RefundBagRequest(amount_refunded=400)))
        c = await _ended(other.refund_bag(ORDER16, BAG16, RefundBagRequest(amount_refunded=300)))
        assert isinstance(x, AmbiguousOutcomeError), repr(x)
        assert x.pending is not None
        assert isinstance(r, AmbiguousOutcomeError), repr(r)
        assert r.pending is not None
        assert isinstance(c, AmbiguousOutcomeError), repr(c)
        assert c.pending is not None
        assert len(server.made) == 1  # X's
        clock.advance(120.0)
        held = await _ended(here.resume(_foreign(r.pending)))
        assert isinstance(held, BagPendingError), repr(held)
        server.hide = False
        clock.advance(120.0)
        theirs = await _ended(two.resume(x.pending))
        assert isinstance(theirs, OrderRefund), repr(theirs)
        mine = await _ended(here.resume(x.pending))
        assert isinstance(mine, OrderRefund), repr(mine)
        clock.advance(120.0)
        third = await _ended(here.resume(_foreign(c.pending)))
    assert len(server.made) == 1
    assert isinstance(third, BagPendingError), f"C parked for review though R can send: {third!r}"


class LaggingSteppedLogin(SteppedLogin):
    """``SteppedLogin`` whose list shows nothing for its first ``lag`` reads."""

    lag = 3

    async def _list(self, request: web.Request) -> web.Response:
        if self.lag > 0:
            self.lag -= 1
            return web.Response(body=b"[]", content_type="application/json")
        return await super()._list(request)


async def test_a_wall_clock_step_during_a_keyed_sends_login_keeps_its_settle_window() -> None:
    """Finding 1's fix, attacked: after a step of an hour during the login, the applied
    send's refund is missing from the first reads (a list that lags): the settle
    window, placed on the stepped clock once, is not cut short; never sent twice."""
    for step in (3600.0, -3600.0):
        clock = FakeClock(wall_start=WALL0)
        violet = LaggingSteppedLogin(clock, step)
        async with serve(violet.app()) as url, _client(url + "/v1", clock) as client:
            try:
                outcome: OrderRefund | VioletError = await client.refund_bag(
                    ORDER, BAG, amount_refunded=500, idempotency_key="review17-lag"
                )
            except VioletError as exc:
                outcome = exc
        assert len(violet.made) == 1, (step, violet.posts, outcome)
        assert violet.posts == 1, (step, outcome)
