"""Review 9: adversarial findings, each against a Violet scripted in this file (its own
few lines of aiohttp.web: not FakeViolet, not the simulator, not tests/hostile.py).
Refunds are counted from this server's own record (``V9.made``). Each test asserts the
payments-grade behaviour: it fails while the finding is open."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from tests import _fleet_redis
from violet_async import (
    AmbiguousOutcomeError,
    RefundBagRequest,
    RefundFailedError,
    RetryPolicy,
    Timeouts,
    VioletClient,
)
from violet_async.batch import BatchItem
from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, RetryLaterError, item_key
from violet_async.testing import FakeClock

ORDER = 9901
BAG = 9911
APP = 99
SECRET = "review9-app-secret-value"
PASSWORD = "review9-password-value"
WALL = 1_780_000_123.0

redis_url = _fleet_redis.redis_url
fleet_key = _fleet_redis.fleet_key


def _jwt(exp: float) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'sub': 'r9', 'exp': exp})}.c2ln"


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


Answer = Callable[[dict[str, Any], dict[str, Any]], Awaitable[web.StreamResponse]]


class V9:
    """One order, one bag of ``total`` cents whose status lags (stays COMPLETED). A POST
    commits a refund of what it names (no amount: the rest of the bag) with
    ``post_status``; ``answers`` script the answer after the commit."""

    def __init__(self, clock: FakeClock, total: int = 1000) -> None:
        self.clock = clock
        self.total = total
        self.refunds: list[dict[str, Any]] = []
        self.made: list[int] = []
        self.posts = 0
        self.next_id = 90_000
        self.post_status = "COMPLETED"
        self.answers: list[Answer] = []
        self.record_shape: Callable[[dict[str, Any]], dict[str, Any]] = lambda r: r
        #: A list lagging behind: it shows only the first ``shown`` records (None: all).
        self.shown: int | None = None

    def now(self) -> float:
        return self.clock.time()

    def moved(self) -> int:
        return sum(
            r["amount"] or 0 for r in self.refunds if r["status"] not in ("FAILED", "CANCELED")
        )

    def add(self, amount: int | None, status: str = "COMPLETED", **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        record: dict[str, Any] = {
            "id": self.next_id,
            "order_id": ORDER,
            "bag_id": BAG,
            "merchant_id": 3,
            "app_id": APP,
            "transaction_id": 4,
            "gateway_transaction_id": "pi_r9",
            "amount": amount,
            "status": status,
            "date_created": _iso(self.now()),
            **fields,
        }
        self.refunds.append(record)
        return record

    def app(self) -> web.Application:
        @web.middleware
        async def date(request: web.Request, handler: Any) -> web.StreamResponse:
            response: web.StreamResponse = await handler(request)
            response.headers["Date"] = formatdate(self.now(), usegmt=True)
            return response

        app = web.Application(middlewares=[date])
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._post)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        app.router.add_get("/v1/orders/{o}", self._order)
        return app

    async def _login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": _jwt(self.now() + 86_400), "refresh_token": "r9"})

    async def _post(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        body = await request.json()
        if self.total - self.moved() <= 0:
            return web.json_response({"message": "Bag is fully refunded"}, status=400)
        amount = body.get("amount_refunded")
        if amount is None:
            amount = self.total - self.moved()
        record = self.add(amount, status=self.post_status, reason=body.get("reason"))
        if self.post_status not in ("FAILED", "CANCELED"):
            self.made.append(record["id"])
        if self.answers:
            return await self.answers.pop(0)(body, record)
        return web.json_response(record)

    async def _list(self, request: web.Request) -> web.Response:
        listed = [self.record_shape(dict(r)) for r in self.refunds[: self.shown]]
        return web.Response(body=orjson.dumps(listed), content_type="application/json")

    async def _order(self, request: web.Request) -> web.Response:
        bag = {"id": BAG, "status": "COMPLETED", "total": self.total}
        return web.json_response({"id": ORDER, "bags": [bag]})


@contextlib.asynccontextmanager
async def serving(server: V9, **options: Any) -> AsyncIterator[VioletClient]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    retry = options.pop("retry", RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0))
    try:
        async with VioletClient(
            APP,
            SECRET,
            base_url=f"http://127.0.0.1:{port}/v1",
            username="r9-user",
            password=PASSWORD,
            allow_insecure_http=True,
            clock=server.clock,
            retry=retry,
            **options,
        ) as client:
            yield client
    finally:
        await runner.cleanup()


async def outcome(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except (AmbiguousOutcomeError, RefundFailedError) as exc:
        return exc


# -- 1. the redactor is quadratic on an error body of backslashes -------------------------


async def test_an_error_body_of_backslashes_does_not_stall_the_event_loop() -> None:
    """Violet (or a proxy in front of it) answers the refund POST 400 with a JSON error
    whose message is a run of backslashes (a string escaped over and over, 3 KB: far
    under the 4 MiB a body may be). Every error body passes through the redactor; its
    pattern (``\\\\+`` before each escape, for every character of every secret) retries
    the run at each position: the time grows with the square of the run, all of it
    synchronous on the event loop (32 KB: ~50 s measured here; 4 MiB: hours), so every
    other refund, timeout and cancellation of the process stalls. The payments-grade
    behaviour: a 400 is a 400, raised in milliseconds, whatever its body says."""
    import time

    from violet_async import APIError

    server = V9(FakeClock(WALL))

    async def backslashes(body: dict[str, Any], record: dict[str, Any]) -> web.StreamResponse:
        server.refunds.remove(record)  # refused: nothing committed
        server.made.remove(record["id"])
        message = "\\" * 1_500
        return web.json_response({"message": message, "error_code": 4001}, status=400)

    server.answers.append(backslashes)
    async with serving(server) as client:
        started = time.perf_counter()
        with pytest.raises(APIError) as raised:
            await client.refund_bag(ORDER, BAG, amount_refunded=300)
        elapsed = time.perf_counter() - started
    assert raised.value.status == 400
    assert server.made == []
    assert elapsed < 0.5, f"a 3 KB error body took {elapsed:.1f} s of event-loop time"


# -- 2. a keyed record's key altered: resume returns another call's refund ----------------


async def test_a_pending_record_whose_key_names_another_finished_call_is_not_its_refund() -> None:
    """Two keyed refunds of the same 3.00 on one bag (two refunds the merchant owes:
    keys ``order-a`` and ``order-b``). ``order-a`` applies (refund A). ``order-b``
    commits at Violet, answers 500, the list lags: the call ends pending, its record
    saying refund A is another call's (``others``). The record, kept as JSON, comes
    back with its ``idempotency_key`` spelled ``order-a`` (a record file edited, or
    written by someone else: the team's rule says any may be). ``client.resume`` goes
    through the key's entry, finds it FINISHED with the same request, and returns
    refund A as this record's refund: a false success for an ask whose own refund (B,
    committed) is never read back and is lost track of. The payments-grade behaviour: a
    record whose ask is not the key's ask (another ``ask_id``; a refund it names as
    another call's) never gets that refund: a typed refusal naming the record, or the
    record resumed by reading the bag back (never refund A)."""
    from violet_async import PendingRefund, VioletError

    server = V9(FakeClock(WALL))
    retry = RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=3.0)
    async with serving(server, retry=retry) as client:
        first = await client.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="order-a")

        async def committed_500(body: dict[str, Any], record: dict[str, Any]) -> web.Response:
            return web.json_response({"message": "Internal error"}, status=500)

        server.answers.append(committed_500)
        server.shown = 1  # the list lags behind the second refund
        ended = await outcome(
            client.refund_bag(ORDER, BAG, amount_refunded=300, idempotency_key="order-b")
        )
        assert isinstance(ended, AmbiguousOutcomeError)
        assert ended.pending is not None
        assert first.id in ended.pending.others
        text = ended.pending.to_json().replace('"order-b"', '"order-a"')
        altered = PendingRefund.from_json(text)
        server.shown = None  # the list catches up: refund B is there to be read back
        try:
            resumed = await client.resume(altered)
        except VioletError:
            resumed = None
    assert server.made == [first.id, first.id + 1]
    assert resumed is None or resumed.id != first.id, (
        f"resume returned refund {first.id}, the record's own 'others' (another call's)"
    )


# -- 3. the fleet after a Redis loss: the worker that made the refund makes it again ------


ITEM = BatchItem.refund(1, ORDER, BAG, RefundBagRequest(amount_refunded=300))
KEY = item_key(ITEM)


async def _until_done(worker: FleetWorker, clock: FakeClock) -> dict[str, Any]:
    """Run the item as arq would: again after each hand-back's defer (virtual time)."""
    for _ in range(10):
        try:
            return await worker.run(KEY, ITEM, worker.ledger.sign(KEY, ITEM))
        except RetryLaterError as exc:
            clock.advance(exc.defer)
    raise AssertionError("the item did not end in 10 runs")


@pytest.mark.usefixtures("fleet_key")
async def test_after_a_redis_loss_the_worker_that_refunded_the_item_does_not_refund_it_again(
    redis_url: str,
) -> None:
    """A fleet item (a 3.00 refund of a 10.00 bag) applied: 200, ledger ``applied``.
    Redis then restarts empty (the loss fleet.md says is noticed) and the file is
    enqueued again, as fleet.md tells the operator: "the baseline read shows the
    earlier refund, and the item ends already_present rather than sending a second
    one". An hour later (every hold long past; the bag's list shows refund A), the job
    is taken by the same worker process that made refund A. Its client still knows A
    as handed to the item's first ask (KnownRefunds), so the restored run's read takes A
    for another call's refund, nothing accounts the bag's A to the item, and it sends:
    refund B, the same 3.00 twice (counted from this server). A fresh worker holds it
    (already_present). The payments-grade behaviour: one refund, whichever worker
    runs the job again."""
    redis = Redis.from_url(redis_url)
    await redis.flushall()
    await RedisLedger(redis).new_fleet()
    clock = FakeClock(WALL)
    server = V9(clock)
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
    try:
        async with serving(server, retry=retry, timeouts=Timeouts(connect=1.0, read=2.0)) as c:
            worker = FleetWorker(c, RedisLedger(redis), BagLocks(redis, ttl=1.0, poll=0.02))
            await worker.ledger.register(KEY, ITEM)
            first = await _until_done(worker, clock)
            assert (first["state"], first["refund_id"]) == ("applied", server.made[0])
            await redis.flushall()  # Redis restarted with nothing
            clock.advance(3600.0)
            await _until_done(worker, clock)  # the job enqueued again, same worker
    finally:
        await redis.aclose()
    assert server.posts == 1, f"refunds made: {server.made} (3.00 each, one item)"
    assert len(server.made) == 1
