"""Review 10 findings (failing tests): each asserts the correct behaviour, counted from a
server scripted here (a few lines of aiohttp.web on 127.0.0.1 port 0, one shared
virtual clock)."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import (
    AmbiguousOutcomeError,
    RefundBagRequest,
    RequestValidationError,
    RetryPolicy,
    VioletClient,
    VioletError,
)
from violet_async._engine import Outcome, outcome_of
from violet_async._transport import Timeouts
from violet_async.batch import BatchItem
from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, RetryLaterError
from violet_async.fleet._ledger import item_key
from violet_async.stores import MemoryStore, RecordStore, SQLiteStore
from violet_async.testing import FakeClock

from .samples import refund_body

redis_url = _fleet_redis.redis_url
fleet_key = _fleet_redis.fleet_key

ORDER = 11
HOUR = 3_600.0


class Counting:
    """Violet as far as these tests need: login, and a refund POST that applies and
    answers 200 with a fresh refund id. Counts the POSTs per bag."""

    def __init__(self, clock: FakeClock, statuses: list[str] | None = None) -> None:
        self.clock = clock
        # The status of each POST's refund in turn (then COMPLETED).
        self.statuses = list(statuses or [])
        self.made: list[tuple[int, str]] = []
        # What each POST does in turn ("ok": applies, answers 200; "lost": does not
        # apply, answers 500); then "ok".
        self.script: list[str] = []
        self.posts: Counter[int] = Counter()
        self._ids = itertools.count(9_001)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    async def _list(self, request: web.Request) -> web.Response:
        # A replica far behind: the bag's list shows none of the refunds yet.
        return web.Response(
            body=orjson.dumps([]),
            content_type="application/json",
            headers={"Date": formatdate(self.clock.time(), usegmt=True)},
        )

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response(
            headers={"Date": formatdate(self.clock.time(), usegmt=True)},
            data={
                "token": "r10-access-token-0123456789",
                "refresh_token": "r10-refresh-0123456789",
            },
        )

    async def _refund(self, request: web.Request) -> web.Response:
        bag = int(request.match_info["b"])
        self.posts[bag] += 1
        body = await request.json()
        if (self.script.pop(0) if self.script else "ok") == "lost":
            return web.json_response(
                data={"message": "Internal error"},
                status=500,
                headers={"Date": formatdate(self.clock.time(), usegmt=True)},
            )
        refund_id = next(self._ids)
        status = self.statuses.pop(0) if self.statuses else "COMPLETED"
        self.made.append((refund_id, status))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock.time()))
        return web.json_response(
            headers={"Date": formatdate(self.clock.time(), usegmt=True)},
            data=refund_body(
                id=refund_id,
                order_id=int(request.match_info["o"]),
                bag_id=bag,
                amount=body.get("amount_refunded", 1000),
                status=status,
                skus=[],
                date_created=stamp,
                date_last_modified=stamp,
            ),
        )


@contextlib.asynccontextmanager
async def _serve(server: Counting) -> AsyncIterator[str]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


def _client(url: str, clock: FakeClock, store: RecordStore) -> VioletClient:
    return VioletClient(
        4242,
        "r10-app-secret-0123456789abcdef",
        username="r10-user",
        password="r10-password-0123",
        base_url=url,
        clock=clock,
        store=store,
        retry=RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0),
    )


async def _second_refund_after_a_step(store_a: RecordStore, store_b: RecordStore) -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Counting(clock)
    request = RefundBagRequest(amount_refunded=500)
    async with _serve(server) as url:
        # Two processes sharing one store (two clients: each its own memory of keys).
        async with _client(url, clock, store_a) as first, _client(url, clock, store_b) as second:
            refund = await first.refund_bag(ORDER, 22, request, idempotency_key="order-11-r1")
            assert server.posts[22] == 1
            # The wall clock steps forward past the 24 h retention (two +15 h NTP steps,
            # the simulator's seed 606320): the next claim of ANY other key sweeps the
            # finished key "order-11-r1".
            clock.step_wall(15 * HOUR)
            clock.step_wall(15 * HOUR)
            await first.refund_bag(
                ORDER, 33, RefundBagRequest(amount_refunded=100), idempotency_key="other"
            )
            # The web app's retry of the first call, a minute after its refund (real
            # time): same key, same request, in the other process.
            clock.advance(60.0)
            again = await second.refund_bag(ORDER, 22, request, idempotency_key="order-11-r1")
    # Counted from the server first: one POST on bag 22 for the one key.
    assert server.posts[22] == 1, f"bag 22 refunded {server.posts[22]} times for one key"
    assert again.id == refund.id


async def test_memory_store_a_step_then_another_keys_claim_never_makes_a_second_refund() -> None:
    """The fix of 2a3304d ("a finished key asked again for its own request answers with
    its refund however old; the sweep never drops the key being claimed") holds only
    when the stepped-past key is the NEXT one claimed. Any other key's claim first
    sweeps it (retention measured on the stepped wall clock), and the same request
    under it is then a new ask: a second POST, a second refund to the shopper."""
    store = MemoryStore()
    await _second_refund_after_a_step(store, store)


async def test_sqlite_store_a_step_then_another_keys_claim_never_makes_a_second_refund(
    tmp_path: Path,
) -> None:
    """The same with two processes on one SQLite file: the sweep (``key != ?``) spares
    only the key being claimed."""
    async with (
        SQLiteStore(tmp_path / "keys.db") as store_a,
        SQLiteStore(tmp_path / "keys.db") as store_b,
    ):
        await _second_refund_after_a_step(store_a, store_b)


# -- fleet: an item's first refund moved no money, its second did -----------------------

ITEM = BatchItem.refund(1, ORDER, 22, RefundBagRequest(amount_refunded=300))
KEY = item_key(ITEM)


async def _until_done(worker: FleetWorker, clock: FakeClock) -> dict[str, Any]:
    """Run the item as arq would: again after each hand-back's defer (virtual time)."""
    for _ in range(10):
        try:
            return await worker.run(KEY, ITEM, worker.ledger.sign(KEY, ITEM))
        except RetryLaterError as exc:
            clock.advance(exc.defer)
    raise AssertionError("the item did not end in 10 runs")


async def test_fleet_item_whose_first_refund_failed_is_not_refunded_twice_after_losses(
    redis_url: str,
) -> None:
    """One worker (one client) runs one item. Its first POST is answered with a FAILED
    refund (no money moved: the item ends failed). Redis loses the ledger; the job runs
    again from its copy (the FAILED refund "is not claimed again, the run asks anew":
    51a9e82) and applies, COMPLETED. Redis loses the ledger once more; the job runs
    again on the same worker, the bag's list still behind. The item's refund is the
    COMPLETED one it made: recorded again with no request (3a9be6e's promise). But
    ``KnownRefunds.add`` keeps the FIRST refund an owner was handed (``setdefault``):
    the item's claim is the FAILED one forever, the COMPLETED one is never returned,
    and the run sends a third POST: a second 3.00 that moved money."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Counting(clock, statuses=["FAILED"])
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushall()
        await RedisLedger(redis).new_fleet()
        async with (
            _serve(server) as url,
            VioletClient(
                4242,
                "r10-app-secret-0123456789abcdef",
                username="r10-user",
                password="r10-password-0123",
                base_url=url,
                clock=clock,
                retry=RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0),
                timeouts=Timeouts(connect=1.0, read=2.0),
            ) as client,
        ):
            worker = FleetWorker(client, RedisLedger(redis), BagLocks(redis, ttl=1.0, poll=0.02))
            await worker.ledger.register(KEY, ITEM)
            first = await _until_done(worker, clock)
            assert (first["state"], first["outcome"]) == ("failed", "failed")
            await redis.flushall()  # Redis restarted with nothing
            clock.advance(3_600.0)
            second = await _until_done(worker, clock)
            assert second["state"] == "applied"
            await redis.flushall()  # and once more
            clock.advance(3_600.0)
            third = await _until_done(worker, clock)
    finally:
        await redis.aclose()
    moved = [refund for refund, status in server.made if status == "COMPLETED"]
    assert len(moved) == 1, f"refunds that moved money for one item: {server.made}"
    assert third["refund_id"] == moved[0]


# -- keys: a record of the key's earlier ask, after the key applied under a new one -----


async def test_a_keyed_pending_record_resumed_after_its_key_applied_gets_the_keys_refund() -> None:
    """The standard pattern: a keyed call ends pending (its POST answered 500, nothing
    applied) and the app enqueues ``client.resume(error.pending)``. Meanwhile the user
    clicks again with the same key: that call takes the ask over, proves it absent and
    is out of attempts (the key's ask FAILED); a third click with the key is a new ask
    (the key is free after a failure) and applies refund R. Then the queued resume job
    runs: its record is the key's own earlier ask. It is refused with
    RequestValidationError "is the key of another ask ... this record is not that key's
    call" (73ad0f1's ``_key_ask``), which every driver classifies as a definite failure
    (Outcome.FAILED), while the key's refund R moved money: an app that refunds again on
    "failed" pays twice. Before 73ad0f1 the key's refund was returned. It should return R
    (the key's outcome), sending nothing."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Counting(clock)
    server.script = ["lost", "lost"]
    request = RefundBagRequest(amount_refunded=500)
    store = MemoryStore()  # shared by the app's two processes

    def client(url: str, deadline: float) -> VioletClient:
        return VioletClient(
            4242,
            "r10-app-secret-0123456789abcdef",
            username="r10-user",
            password="r10-password-0123",
            base_url=url,
            clock=clock,
            store=store,
            retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=deadline, max_attempts=1),
            timeouts=Timeouts(connect=1.0, read=2.0),
        )

    async with (
        _serve(server) as url,
        client(url, 3.0) as web_app,
        client(url, 600.0) as other,
    ):
        with pytest.raises(AmbiguousOutcomeError) as info:
            await web_app.refund_bag(ORDER, 22, request, idempotency_key="order-11-r1")
        pending = info.value.pending
        assert pending is not None
        assert pending.idempotency_key == "order-11-r1"
        clock.advance(2_000.0)  # past the settle window
        with pytest.raises(VioletError) as again:
            await other.refund_bag(ORDER, 22, request, idempotency_key="order-11-r1")
        # The key's ask: taken over, proven absent, re-sent (lost), out of attempts.
        assert outcome_of(again.value) is Outcome.FAILED
        assert server.posts[22] == 2
        refund = await other.refund_bag(ORDER, 22, request, idempotency_key="order-11-r1")
        assert server.posts[22] == 3  # the key's one refund that moved money
        for resumer in (web_app, other):
            try:
                resumed = await resumer.resume(pending)
            except RequestValidationError as exc:
                raise AssertionError(
                    f"resume of the key's own record: {outcome_of(exc)} ({exc}) while the "
                    f"key's refund {refund.id} applied"
                ) from exc
            assert resumed.id == refund.id
    assert server.posts[22] == 3  # nothing more sent


# -- redaction: a secret with a quote, echoed four JSON quotings deep -------------------


PASSWORD = 'r10-pa"ss-word-0123'


def _quoted(text: str, times: int) -> str:
    """``text`` as the inside of a JSON string, ``times`` times (a JSON body quoted into
    a string of another, and so on)."""
    for _ in range(times):
        text = orjson.dumps(text).decode()[1:-1]
    return text


async def test_a_password_with_a_quote_echoed_four_quotings_deep_is_redacted() -> None:
    """Violet's error echoes the request it got, itself quoted inside the error of the
    proxies in between: four JSON quotings, each doubling the backslashes before the
    password's ``"`` (15). e30594a bounded a run to 8 ("a longer run still has its last
    eight backslashes and the escape after them matched: the secret is replaced all the
    same"): that holds for a run at a secret's start only; in its middle the first seven
    stand between the characters and the match fails, and the password is in the error.
    Before e30594a (``\\\\+``) it was redacted."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    echoed = _quoted(f'{{"username": "r10-user", "password": "{PASSWORD}"}}', 4)

    async def refused(request: web.Request) -> web.Response:
        return web.json_response(
            data={"message": f"upstream said: {echoed}"},
            status=400,
            headers={"Date": formatdate(clock.time(), usegmt=True)},
        )

    server = Counting(clock)
    app = server.app()
    app.router.add_post("/v1/orders/{o}/bags/{b}/cancel", refused)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with VioletClient(
            4242,
            "r10-app-secret-0123456789abcdef",
            username="r10-user",
            password=PASSWORD,
            base_url=f"http://127.0.0.1:{port}/v1",
            clock=clock,
        ) as client:
            with pytest.raises(VioletError) as info:
                await client.cancel_bag(ORDER, 22)
    finally:
        await runner.cleanup()
    shown = f"{info.value} {info.value!r} {getattr(info.value, 'body', b'')!r}"
    assert _quoted(PASSWORD, 4) not in shown, "the password is in the error"
