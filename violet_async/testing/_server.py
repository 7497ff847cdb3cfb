"""FakeViolet: a real aiohttp.web server speaking Violet's refund and cancel endpoints."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
from aiohttp import web

from .._client import VioletClient
from ._clock import RealClock, ServerClock
from ._faults import COMMIT_FAULTS, Fault, FaultDrawer, FaultPlan, FaultScript, ServerQuirks
from ._ratelimit import AppRateLimit, MerchantRateLimits
from ._state import (
    FakeBag,
    FakeOrder,
    Ledger,
    Post,
    RuleViolation,
    Store,
    cancellation_body,
    cancellation_failure_body,
    render_date,
)
from ._webhook_sender import WebhookSender
from ._wire import (
    GATEWAY_FAULTS,
    client_host,
    gateway_response,
    http_date,
    json_response,
    page,
    violet_error,
)

__all__ = ["FakeViolet"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Dropped(Exception):
    """The handler closed the connection on purpose."""


class _Answer(Exception):
    """Answer with this response now (a gateway's page before anything applies)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


class _Now(enum.Enum):
    """``another_actor_refund``'s default date: the commit time (less its age)."""

    NOW = "now"


class FakeViolet:
    """An in-process Violet for tests, demos and benchmarks.

    ::

        async with FakeViolet(orders=10, seed=1) as fake:
            async with VioletClient(fake.app_id, fake.app_secret,
                                    username=fake.username, password=fake.password,
                                    base_url=fake.base_url) as client:
                ...
            assert fake.ledger.double_refunds() == {}

    It listens on 127.0.0.1 (port 0 by default). ``faults`` is a seeded
    :class:`FaultPlan`; :meth:`script` queues exact faults for one route and bag.

    ``clock`` (a :class:`FakeClock`; None: real time) drives everything timed:
    late commits, held requests, list lag, refund dates and the ``Date`` header
    (token expiry stays on real time). Give the client the same clock.

    The server's standing quirks come from ``faults.quirks`` (:class:`ServerQuirks`);
    the keywords ``list_lag``, ``list_lag_rate``, ``naive_dates``,
    ``server_utc_offset_hours``, ``missing_dates``, ``server_clock_skew``,
    ``trim_reasons``, ``page_size``, ``page_keys``, ``bag_status_lag`` and
    ``full_records`` override it one by one (None: the plan's value).

    It answers in Violet's documented shapes by default: a cancel answers **202** with
    the cancellation body (``cancel_response="refund"``: the bare refund on 200 of the
    older order-service page), refund records carry the fields of Violet's own
    examples only, and :meth:`another_actor_refund` makes an ``EXTERNAL`` refund, as
    one made on the merchant's platform shows. docs/testing.md lists what it models
    and what it cannot know.

    Merchant platforms' own limits (Violet passes their 429s through): seeded bags take
    turns among ``merchants`` merchants (ids 20001 up); ``merchant_limits`` maps a
    merchant id to the refund and cancel POSTs per second its platform lets through,
    ``merchant_limit`` is every other merchant's (None: none), each a token bucket of
    ``merchant_burst`` tokens (:class:`MerchantRateLimits`). ``rate_limit`` is the
    app's own limit, over every merchant.

    ``host`` may be an IPv6 literal (``"::1"`` gives ``http://[::1]:PORT/v1``); a
    wildcard bind (``"0.0.0.0"``, ``"::"``) gets a loopback ``base_url``, since the SDK
    refuses plain http to other hosts.
    """

    def __init__(
        self,
        *,
        orders: int = 0,
        seed: int = 0,
        faults: FaultPlan | None = None,
        token_lifetime: float = 24 * 3600.0,
        cancel_response: str = "cancellation",
        host: str = "127.0.0.1",
        port: int = 0,
        app_id: int = 10_001,
        app_secret: str | None = None,
        username: str = "ops@fake-violet.test",
        password: str | None = None,
        processing_reads: int = 0,
        webhook_retry_delay: float = 0.05,
        webhook_attempts: int = 10,
        clock: ServerClock | None = None,
        list_lag: float | None = None,
        list_lag_rate: float | None = None,
        naive_dates: bool | None = None,
        server_utc_offset_hours: float | None = None,
        missing_dates: bool | None = None,
        server_clock_skew: float | None = None,
        trim_reasons: bool | None = None,
        page_size: int | None = None,
        page_keys: str | None = None,
        rate_limit: float | None = None,
        bag_status_lag: float | None = None,
        full_records: bool | None = None,
        merchants: int = 1,
        merchant_limits: dict[int, float] | None = None,
        merchant_limit: float | None = None,
        merchant_burst: float = 1.0,
    ) -> None:
        if cancel_response not in ("refund", "cancellation"):
            raise ValueError("cancel_response must be 'refund' or 'cancellation'")
        self.app_id = app_id
        self.app_secret = app_secret or f"fake-secret-{secrets.token_hex(12)}"
        self.username = username
        self.password = password or f"fake-password-{secrets.token_hex(8)}"
        self.token_lifetime = token_lifetime
        self.cancel_response = cancel_response
        plan = faults or FaultPlan.none()
        overrides: dict[str, Any] = {
            name: value
            for name, value in {
                "list_lag": list_lag,
                "list_lag_rate": list_lag_rate,
                "naive_dates": naive_dates,
                "server_utc_offset_hours": server_utc_offset_hours,
                "missing_dates": missing_dates,
                "server_clock_skew": server_clock_skew,
                "trim_reasons": trim_reasons,
                "page_size": page_size,
                "page_keys": page_keys,
                "bag_status_lag": bag_status_lag,
                "full_records": full_records,
            }.items()
            if value is not None
        }
        self.quirks: ServerQuirks = attrs.evolve(plan.quirks, **overrides)
        self.clock: ServerClock = clock if clock is not None else RealClock()
        self.store = Store(app_id, clock=self.clock, quirks=self.quirks)
        self.store.lag_for = self._lag_for
        self.store.processing_reads = processing_reads
        self.store.on_commit = self._on_commit
        self.webhooks = WebhookSender(
            self.app_secret, retry_delay=webhook_retry_delay, attempts=webhook_attempts
        )
        self.seeded = self.store.generate(orders, seed, merchants=merchants) if orders else []
        self.faults = FaultDrawer(attrs.evolve(plan, quirks=self.quirks))
        self._script = FaultScript()
        self._request_serial = 0
        self._reads = 0
        self._host = host
        self._port = port
        self._signing_key = secrets.token_bytes(32)
        self._tokens: dict[str, tuple[float, str]] = {}
        self._refresh_tokens: set[str] = set()
        self._token_serial = 0
        self._late: dict[int, list[Callable[[], None]]] = {}
        self._bag_lag: dict[int, float] = {}
        self._holds: set[asyncio.Event] = set()
        self._held_changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.rate_limit = AppRateLimit(rate_limit) if rate_limit else None
        self.merchant_limits = (
            MerchantRateLimits(
                merchant_limits or {},
                self._merchant_of,
                default=merchant_limit,
                burst=merchant_burst,
                clock=self.clock.monotonic,
            )
            if merchant_limits or merchant_limit
            else None
        )

    def _merchant_of(self, order_id: int, bag_id: int) -> int | None:
        order = self.store.orders.get(order_id)
        bag = order.bags.get(bag_id) if order is not None else None
        return bag.merchant_id if bag is not None else None

    # -- lifecycle --------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        if self.rate_limit is not None:  # refund / cancel POSTs over the app's rate: 429
            app.middlewares.append(self.rate_limit.middleware)
        if self.merchant_limits is not None:  # over a merchant platform's rate: 429
            app.middlewares.append(self.merchant_limits.middleware)
        app.on_response_prepare.append(self._stamp_date)
        app.router.add_post("/v1/login", self._login)
        app.router.add_get("/v1/auth/token", self._refresh)
        app.router.add_post("/v1/orders/{order_id}/bags/{bag_id}/refunds", self._refund)
        app.router.add_get("/v1/orders/{order_id}/bags/{bag_id}/refunds", self._list_refunds)
        app.router.add_post("/v1/orders/{order_id}/bags/{bag_id}/cancel", self._cancel)
        app.router.add_get("/v1/orders/{order_id}", self._get_order)
        app.router.add_get("/v1/orders/{order_id}/refunds/{refund_id}", self._get_refund)
        return app

    async def start(self) -> FakeViolet:
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        port: int = server.sockets[0].getsockname()[1]
        self._port = port
        self.base_url = f"http://{client_host(self._host)}:{port}/v1"
        return self

    async def stop(self) -> None:
        """Land late commits (so the ledger is final), stop the server, then cancel
        webhook deliveries still retrying (late commits may have started some). Held
        requests are let go first, or the server's shutdown would wait for them."""
        for hold in self._holds:
            hold.set()
        self.settle()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.webhooks.aclose()

    async def __aenter__(self) -> FakeViolet:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def client(self, **options: Any) -> VioletClient:
        """A VioletClient pointed at this server with its app id, secret and user
        credentials; ``options`` are VioletClient's other keyword arguments."""
        settings: dict[str, Any] = {
            "username": self.username,
            "password": self.password,
            "base_url": self.base_url,
            **options,
        }
        return VioletClient(self.app_id, self.app_secret, **settings)

    # -- seeding and scripting ---------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        return self.store.ledger

    def add_order(self, bags: list[dict[str, Any]]) -> FakeOrder:
        """Seed an order; see :meth:`Store.add_order` for the bag fields."""
        return self.store.add_order(bags)

    def bag(self, order_id: int, bag_id: int) -> FakeBag:
        return self.store.bag(order_id, bag_id)

    def stop_faults(self) -> None:
        """No more drawn faults from now on (scripted ones and quirks stay): for tests
        that check every pending outcome resolves once the weather clears."""
        self.faults = FaultDrawer(attrs.evolve(FaultPlan.none(), quirks=self.quirks))

    def script(self, route: str, *faults: Fault, bag_id: int | None = None) -> None:
        """Queue faults for the next requests on ``route`` ("refund", "cancel",
        "list_refunds", "get_order", "login", "refresh"), optionally one bag only."""
        self._script.add(route, list(faults), bag_id)

    def issue_token(self, lifetime: float | None = None) -> str:
        """A valid access token, for clients built with ``token=``."""
        return self._mint(lifetime if lifetime is not None else self.token_lifetime)

    # -- webhooks ---------------------------------------------------------------

    def register_webhook(self, url: str) -> None:
        """POST a signed ORDER_REFUNDED / ORDER_CANCELLED to ``url`` on every commit,
        retrying non-2xx answers like Violet does (10 attempts, compressed timing)."""
        self.webhooks.urls.append(url)

    async def drain_webhooks(self) -> None:
        """Wait until every webhook delivery has succeeded or given up."""
        await self.webhooks.drain()

    @property
    def webhook_deliveries(self) -> list[dict[str, Any]]:
        """One record per event: event_id, topic, order_id, bag_id, attempts, status."""
        return self.webhooks.deliveries

    def _on_commit(self, bag: FakeBag, record: dict[str, Any]) -> None:
        if self.webhooks.urls:
            topic = "ORDER_CANCELLED" if bag.status == "CANCELED" else "ORDER_REFUNDED"
            order = self.store.order(bag.order_id).to_json(self.clock.monotonic())
            self.webhooks.send(topic, bag.order_id, bag.id, orjson.dumps(order))

    def expire_tokens(self) -> None:
        """Make every access token issued so far expired, server side (the next call
        with one gets Violet's 401 "Token has expired")."""
        past = time.time() - 1
        self._tokens = {token: (past, user) for token, (_, user) in self._tokens.items()}

    def issue_refresh_token(self) -> str:
        token = f"rt-{secrets.token_hex(16)}"
        self._refresh_tokens.add(token)
        return token

    def settle(self) -> None:
        """Apply every late commit still pending and end list lag for everything
        committed (tests call it before the ledger)."""
        for bag_id in list(self._late):
            self._apply_late(bag_id)
        self.store.reveal_all()

    def lag_list(self, seconds: float, *, bag_id: int) -> None:
        """From now on, refunds committed on ``bag_id`` show in its list ``seconds``
        after their commit (overrides ``list_lag`` and ``list_lag_rate``)."""
        self._bag_lag[bag_id] = seconds

    def _lag_for(self, bag_id: int) -> float:
        if bag_id in self._bag_lag:
            return self._bag_lag[bag_id]
        if self.quirks.list_lag and self.faults.lags():
            return self.quirks.list_lag
        return 0.0

    def another_actor_refund(
        self,
        order_id: int,
        bag_id: int,
        amount: int,
        *,
        reason: str | None = None,
        age_seconds: float = 0.0,
        date: str | _Now | None = _Now.NOW,
        status: str = "EXTERNAL",
        listed_in: float = 0.0,
    ) -> dict[str, Any]:
        """Commit a refund as another system would, ``age_seconds`` ago. By default it
        is one made on the merchant's platform (its dashboard): status ``EXTERNAL``, no
        transaction ids. ``status="COMPLETED"`` makes it another Violet client's.
        ``date`` overrides ``date_created`` (None makes it null). ``listed_in``: the
        bag's list shows it only that many seconds from now (a replica behind: a
        baseline read before then misses it, though it is older than the send that
        follows). Counted in ``ledger.external_refunds_per_bag``, not
        ``refunds_per_bag``. Returns the record."""
        body: dict[str, Any] = {"amount_refunded": amount, "reason": reason}
        record = self.store.commit_refund(
            self.bag(order_id, bag_id),
            body,
            status=status,
            route="external",
            age_seconds=age_seconds,
        )
        if date is not _Now.NOW:
            record["date_created"] = date
        if listed_in > 0:
            self.store.list_late(record["id"], bag_id, listed_in)
        return record

    def failed_attempt(
        self,
        order_id: int,
        bag_id: int,
        amount: int,
        *,
        status: str = "FAILED",
        age_seconds: float = 0.0,
    ) -> dict[str, Any]:
        """List a refund attempt on the bag that moved no money (``FAILED``, or
        ``CANCELED``), as another system's refused attempt leaves it, ``age_seconds``
        ago. Nothing is refunded or counted. Returns the record."""
        if status not in ("FAILED", "CANCELED"):
            raise ValueError("status must be 'FAILED' or 'CANCELED'")
        return self.store.dead_refund(
            self.bag(order_id, bag_id), amount, status=status, age_seconds=age_seconds
        )

    @property
    def held(self) -> int:
        """Requests held open by TIMEOUT_THEN_COMMIT right now."""
        return len(self._holds)

    async def wait_held(self, count: int = 1) -> None:
        """Wait until exactly ``count`` requests are held (no real-time polling in
        the caller: it wakes on each change)."""
        while len(self._holds) != count:
            self._held_changed.clear()
            await self._held_changed.wait()

    # -- auth -------------------------------------------------------------------

    def _mint(self, lifetime: float) -> str:
        self._token_serial += 1
        header = _b64(b'{"alg":"HS256","typ":"JWT"}')
        exp = time.time() + lifetime
        payload = _b64(orjson.dumps({"sub": self.username, "exp": exp, "jti": self._token_serial}))
        signature = _b64(
            hmac.new(self._signing_key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        )
        token = f"{header}.{payload}.{signature}"
        self._tokens[token] = (exp, self.username)
        return token

    def _check_app(self, request: web.Request) -> None:
        if request.headers.get("X-Violet-App-Id") != str(self.app_id) or not hmac.compare_digest(
            request.headers.get("X-Violet-App-Secret", ""), self.app_secret
        ):
            raise RuleViolation(401, "Invalid app id or app secret", 10)

    def _check_token(self, request: web.Request) -> None:
        self._check_app(request)
        token = request.headers.get("X-Violet-Token", "")
        entry = self._tokens.get(token)
        if entry is None:
            raise RuleViolation(401, "Invalid token", 12)
        if entry[0] <= time.time():
            raise RuleViolation(401, "Token has expired", 11)

    async def _login(self, request: web.Request) -> web.Response:
        self.ledger.requests["login"] += 1
        await self._maybe_fault("login", None, mutating=False)
        self._check_app(request)
        body = await self._json(request)
        if not (
            body.get("username") == self.username
            and hmac.compare_digest(str(body.get("password", "")), self.password)
        ):
            raise RuleViolation(401, "Invalid username or password", 13)
        self.ledger.logins += 1
        return self._ok(
            {
                "id": 1,
                "email": self.username,
                "token": self._mint(self.token_lifetime),
                "refresh_token": self.issue_refresh_token(),
                "type": "DEVELOPER",
            }
        )

    async def _refresh(self, request: web.Request) -> web.Response:
        self.ledger.requests["refresh"] += 1
        await self._maybe_fault("refresh", None, mutating=False)
        self._check_app(request)
        if request.headers.get("X-Violet-Token", "") not in self._refresh_tokens:
            raise RuleViolation(401, "Invalid refresh token", 14)
        self.ledger.refreshes += 1
        return self._ok({"token": self._mint(self.token_lifetime)})

    # -- endpoints --------------------------------------------------------------

    async def _refund(self, request: web.Request) -> web.StreamResponse:
        return await self._mutate(request, "refund")

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        return await self._mutate(request, "cancel")

    async def _mutate(self, request: web.Request, route: str) -> web.StreamResponse:
        self.ledger.requests[route] += 1
        order_id, bag_id = _ids(request)
        post = Post(route, self.clock.monotonic(), None)
        self.ledger.posts_per_bag.setdefault(bag_id, []).append(post)
        fault = await self._draw(route, bag_id)
        post.fault = fault.value if fault is not None else None
        self._answer_early(fault)
        self._check_token(request)
        body = await self._json(request)
        bag = self.store.bag(order_id, bag_id)
        late = fault in (Fault.LATE_COMMIT, Fault.TIMEOUT_THEN_COMMIT)
        if route == "refund":
            checked = self.store.check_refund(bag, body)

            def commit(recheck: bool) -> dict[str, Any]:
                record = self.store.commit_refund(bag, body, None if recheck else checked)
                post.refund_id = record["id"]
                return record
        else:
            try:
                self.store.check_cancel(bag)
            except RuleViolation as violation:
                # A state Violet checks itself is its 400; a fulfilled order is the
                # platform's refusal, which the cancellation body reports per bag.
                if self.cancel_response == "cancellation" and violation.error_code == 4011:
                    return self._cancellation_failure(order_id, bag, violation.message)
                raise

            def commit(recheck: bool) -> dict[str, Any]:
                record = self.store.commit_cancel(bag, body)
                post.refund_id = record["id"]
                return record

        if late:
            assert fault is not None
            self._schedule_late(bag_id, lambda: commit(recheck=True))
            if fault is Fault.TIMEOUT_THEN_COMMIT:
                await self._hold(request)
            return gateway_response(fault)
        before = bag.status
        record = commit(recheck=False)
        if fault is Fault.REFUND_CANCELED or fault is Fault.REFUND_FAILED:
            # The platform refused it after Violet recorded it: no money moved, and
            # the 2xx answer below carries the refund in that status.
            status = "CANCELED" if fault is Fault.REFUND_CANCELED else "FAILED"
            self.store.void_refund(bag, record, status, before if route == "refund" else None)
        elif fault is not None and fault in COMMIT_FAULTS:
            return await self._after_commit_fault(fault, request, record)
        if route == "cancel" and self.cancel_response == "cancellation":
            return self._ok(cancellation_body(self.app_id, bag, record), status=202)
        return self._ok(record)

    async def _list_refunds(self, request: web.Request) -> web.Response:
        self.ledger.requests["list_refunds"] += 1
        order_id, bag_id = _ids(request)
        await self._maybe_fault("list_refunds", bag_id, mutating=False)
        self._check_token(request)
        bag = self.store.bag(order_id, bag_id)
        behind = self._replica_lag()
        records = list(bag.refunds)
        if self.quirks.list_other_bags:
            for other in self.store.order(order_id).bags.values():
                if other.id != bag_id:
                    records += other.refunds
        shown = [
            self._shaped(record) for record in records if self.store.visible(record, behind=behind)
        ]
        if self.quirks.page_size is None:
            response = self._ok(shown)
        else:
            response = self._ok(page(shown, request, self.quirks))
        # Refunds still PROCESSING move one read closer to COMPLETED.
        self.store.tick_processing(bag)
        return response

    async def _get_refund(self, request: web.Request) -> web.Response:
        self.ledger.requests["get_refund"] += 1
        order_id = _int(request.match_info["order_id"])
        refund_id = _int(request.match_info["refund_id"])
        await self._maybe_fault("get_refund", None, mutating=False)
        self._check_token(request)
        for bag in self.store.order(order_id).bags.values():
            behind = self._replica_lag()
            for record in bag.refunds:
                if record["id"] == refund_id and self.store.visible(record, behind=behind):
                    response = self._ok(self._shaped(record))
                    # A read of the refund moves it toward COMPLETED, as a list read does.
                    self.store.tick_processing(bag)
                    return response
        raise RuleViolation(404, f"Refund {refund_id} not found on order {order_id}", 4042)

    def _shaped(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record as a read shows it (``listed_without_skus``: no ``skus``;
        ``listed_without_sku_ids``: lines without their ``order_sku_id``;
        ``listed_zero_ids``: ``id`` and ``bag_id`` 0)."""
        quirks = self.quirks
        if quirks.listed_without_skus:
            record = {k: v for k, v in record.items() if k != "skus"}
        elif quirks.listed_without_sku_ids and record.get("skus"):
            lines = [
                {k: v for k, v in line.items() if k != "order_sku_id"} for line in record["skus"]
            ]
            record = {**record, "skus": lines}
        if quirks.listed_zero_ids:
            record = {**record, "id": 0, "bag_id": 0}
        return record

    def _replica_lag(self) -> float:
        """How far behind the primary this read's replica is (``replica_behind``; with
        ``replica_flap``, every other read is the primary's)."""
        self._reads += 1
        if self.quirks.replica_flap and self._reads % 2:
            return 0.0
        return self.quirks.replica_behind

    async def _get_order(self, request: web.Request) -> web.Response:
        self.ledger.requests["get_order"] += 1
        order_id = _int(request.match_info["order_id"])
        await self._maybe_fault("get_order", None, mutating=False)
        self._check_token(request)
        return self._ok(self.store.order(order_id).to_json(self.clock.monotonic()))

    # -- faults -----------------------------------------------------------------

    async def _draw(self, route: str, bag_id: int | None) -> Fault | None:
        """The fault for this request (script first, then the plan), after the
        plan's latency; counted in the ledger."""
        fault = self._script.take(route, bag_id) or self.faults.draw(
            route, mutating=route in ("refund", "cancel")
        )
        delay = self.faults.latency() if route in self.faults.plan.routes else 0.0
        if delay:
            await asyncio.sleep(delay)
        if fault is not None:
            self.ledger.faults[fault.value] += 1
        return fault

    def _answer_early(self, fault: Fault | None) -> None:
        """Raise the answer of a fault that strikes before anything is applied."""
        if fault is None or fault in COMMIT_FAULTS:
            return
        if fault is Fault.DROP_BEFORE_COMMIT:
            raise _Dropped
        if fault in GATEWAY_FAULTS:
            raise _Answer(gateway_response(fault))
        if fault is Fault.REDIRECT:
            raise web.HTTPTemporaryRedirect(self.faults.plan.redirect_to)
        if fault is Fault.RATE_LIMIT:
            raise RuleViolation(
                429, "Too Many Requests", 4290, retry_after=self.faults.plan.retry_after
            )
        if fault is Fault.RATE_LIMIT_NO_HEADER:
            raise RuleViolation(429, "Too Many Requests", 4290)
        # HTTP_500: Violet's app itself fails.
        raise RuleViolation(500, "Internal Server Error", 5000)

    async def _maybe_fault(self, route: str, bag_id: int | None, *, mutating: bool) -> Fault | None:
        fault = self._script.take(route, bag_id) or self.faults.draw(route, mutating=mutating)
        if fault is not None and fault in COMMIT_FAULTS and not mutating:
            fault = Fault.HTTP_502  # a scripted commit fault on a read: nothing to commit
        delay = self.faults.latency() if route in self.faults.plan.routes else 0.0
        if delay:
            await asyncio.sleep(delay)
        if fault is not None:
            self.ledger.faults[fault.value] += 1
        self._answer_early(fault)
        return fault

    async def _hold(self, request: web.Request) -> None:
        """Hold the request open until the fake's clock passes ``hang_seconds``, the
        server stops, or the client hangs up (checked every 20 ms of real time: aiohttp
        tells a handler nothing when its connection closes)."""
        released = asyncio.Event()
        timer = self.clock.call_later(self.faults.plan.hang_seconds, released.set)
        self._holds.add(released)
        self._held_changed.set()
        try:
            while not released.is_set():
                if request.transport is None or request.transport.is_closing():
                    raise _Dropped
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(released.wait(), 0.02)
        finally:
            timer.cancel()
            self._holds.discard(released)
            self._held_changed.set()

    async def _after_commit_fault(
        self, fault: Fault, request: web.Request, record: dict[str, Any]
    ) -> web.StreamResponse:
        if fault is Fault.DROP_AFTER_COMMIT:
            raise _Dropped
        if fault in GATEWAY_FAULTS:
            return gateway_response(fault)
        if fault in (Fault.SLOW_BODY, Fault.RESET_MID_BODY):
            raw = orjson.dumps(record)
            response = web.StreamResponse(
                status=200,
                headers={"Content-Type": "application/json", "Content-Length": str(len(raw))},
            )
            await response.prepare(request)
            await response.write(raw[: len(raw) // 2])
            if fault is Fault.RESET_MID_BODY:
                raise _Dropped
            await asyncio.sleep(self.faults.plan.slow_body_delay)
            await response.write(raw[len(raw) // 2 :])
            await response.write_eof()
            return response
        if fault is Fault.HTTP_500_AFTER_COMMIT:
            return self._error(500, "Internal Server Error", 5000)
        if fault is Fault.SEE_OTHER:
            location = f"/v1/orders/{record['order_id']}/refunds/{record['id']}"
            return web.Response(status=303, headers={"Location": location})
        if fault is Fault.NO_ID_ANSWER:
            return self._ok({k: v for k, v in record.items() if k != "id"})
        if fault is Fault.FOREIGN_CANCELLATION:
            other = {"order_id": record["order_id"] + 1_000_000, "bag_id": record["bag_id"] + 1}
            foreign = {
                "order_id": other["order_id"],
                "app_id": self.app_id,
                "status": "CANCELLATION_FAILURE",
                "cancelled_bags": [{**other, "status": "CANCELLATION_FAILURE"}],
                "message": f"order {other['order_id']} could not be cancelled",
            }
            return self._ok(foreign, status=202)
        if fault is Fault.TRUNCATED_JSON:
            raw = orjson.dumps(record)
            return web.Response(body=raw[: len(raw) // 2], content_type="application/json")
        if fault is Fault.WRONG_BAG_ANSWER:
            return self._ok({**record, "bag_id": record["bag_id"] + 1_000_000})
        if fault is Fault.STALE_ANSWER:
            when = self.store.server_time() - 3600.0
            stale = render_date(when, 0, self.quirks)
            return self._ok({**record, "date_created": stale})
        # WRONG_TYPES
        return self._ok({**record, "amount": str(record["amount"])})

    def _schedule_late(self, bag_id: int, commit: Callable[[], object]) -> None:
        done = False

        def land() -> None:
            nonlocal done
            if done:
                return
            done = True
            # The bag may have moved on meanwhile; Violet would fail the late refund too.
            with contextlib.suppress(RuleViolation):
                commit()

        self._late.setdefault(bag_id, []).append(land)
        self.clock.call_later(self.faults.plan.late_commit_delay, land)

    def _apply_late(self, bag_id: int) -> None:
        for land in self._late.pop(bag_id, ()):
            land()

    # -- responses --------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RuleViolation as violation:
            response = self._error(violation.status, violation.message, violation.error_code)
            if violation.retry_after is not None:
                response.headers["Retry-After"] = violation.retry_after
            return response
        except _Answer as answer:
            return answer.response
        except _Dropped:
            # The client may have hung up first (its own timeout): nothing to close.
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError from None
        except ConnectionResetError:
            # The client went away mid-answer (a cancelled caller): nothing to report.
            raise asyncio.CancelledError from None

    async def _stamp_date(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer carries the server's own time (skew included) in ``Date``, and a
        request id in ``X-Request-Id``, as real APIs do."""
        skew = self.quirks.date_header_skew
        if self.quirks.date_header_flap and self._request_serial % 2:
            skew = 0.0
        response.headers["Date"] = http_date(self.store.server_time() + skew)
        self._request_serial += 1
        response.headers["X-Request-Id"] = f"req_fake_{self._request_serial}"

    def _ok(self, data: Any, status: int = 200) -> web.Response:
        return json_response(data, status=status)

    def _error(self, status: int, message: str, error_code: int) -> web.Response:
        return violet_error(status, message, error_code, self.store.server_time())

    def _cancellation_failure(self, order_id: int, bag: FakeBag, message: str) -> web.Response:
        return self._ok(cancellation_failure_body(self.app_id, bag, message), status=202)

    async def _json(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            data = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            raise RuleViolation(400, "Request body is not valid JSON", 4000) from None
        if not isinstance(data, dict):
            raise RuleViolation(400, "Request body must be a JSON object", 4000)
        return data


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise RuleViolation(404, f"Not found: {text}", 4040) from None


def _ids(request: web.Request) -> tuple[int, int]:
    return _int(request.match_info["order_id"]), _int(request.match_info["bag_id"])


#: ``export VIOLET_...=`` names that ``violet-async fake-server`` prints, and the keys
#: :func:`read_banner` gives them.
BANNER_NAMES = {
    "VIOLET_BASE_URL": "base_url",
    "VIOLET_APP_ID": "app_id",
    "VIOLET_APP_SECRET": "app_secret",
    "VIOLET_USERNAME": "username",
    "VIOLET_PASSWORD": "password",
}


def read_banner(lines: Any) -> dict[str, str]:
    """The connection settings from ``violet-async fake-server``'s output (an iterable of
    lines, e.g. a subprocess's stdout), read up to the last one it prints."""
    found: dict[str, str] = {}
    for line in lines:
        name, _, value = line.strip().removeprefix("export ").partition("=")
        if name in BANNER_NAMES:
            found[BANNER_NAMES[name]] = value
        if len(found) == len(BANNER_NAMES):
            return found
    raise RuntimeError(f"fake-server stopped before printing its settings (got {sorted(found)})")
