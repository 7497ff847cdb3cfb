"""FakeViolet: a real aiohttp.web server speaking Violet's refund and cancel endpoints."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from .._client import VioletClient
from ._faults import COMMIT_FAULTS, Fault, FaultDrawer, FaultPlan, FaultScript
from ._state import FakeBag, FakeOrder, Ledger, RuleViolation, Store
from ._webhook_sender import WebhookSender

__all__ = ["FakeViolet"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Dropped(Exception):
    """The handler closed the connection on purpose."""


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
    """

    def __init__(
        self,
        *,
        orders: int = 0,
        seed: int = 0,
        faults: FaultPlan | None = None,
        token_lifetime: float = 24 * 3600.0,
        cancel_response: str = "refund",
        host: str = "127.0.0.1",
        port: int = 0,
        app_id: int = 10_001,
        app_secret: str | None = None,
        username: str = "ops@fake-violet.test",
        password: str | None = None,
        processing_reads: int = 0,
        webhook_retry_delay: float = 0.05,
        webhook_attempts: int = 10,
    ) -> None:
        if cancel_response not in ("refund", "cancellation"):
            raise ValueError("cancel_response must be 'refund' or 'cancellation'")
        self.app_id = app_id
        self.app_secret = app_secret or f"fake-secret-{secrets.token_hex(12)}"
        self.username = username
        self.password = password or f"fake-password-{secrets.token_hex(8)}"
        self.token_lifetime = token_lifetime
        self.cancel_response = cancel_response
        self.store = Store(app_id)
        self.store.processing_reads = processing_reads
        self.store.on_commit = self._on_commit
        self.webhooks = WebhookSender(
            self.app_secret, retry_delay=webhook_retry_delay, attempts=webhook_attempts
        )
        self.seeded = self.store.generate(orders, seed) if orders else []
        self.faults = FaultDrawer(faults or FaultPlan.none())
        self._script = FaultScript()
        self._host = host
        self._port = port
        self._signing_key = secrets.token_bytes(32)
        self._tokens: dict[str, tuple[float, str]] = {}
        self._refresh_tokens: set[str] = set()
        self._token_serial = 0
        self._late: dict[int, list[Callable[[], None]]] = {}
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # -- lifecycle --------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_post("/v1/login", self._login)
        app.router.add_get("/v1/auth/token", self._refresh)
        app.router.add_post("/v1/orders/{order_id}/bags/{bag_id}/refunds", self._refund)
        app.router.add_get("/v1/orders/{order_id}/bags/{bag_id}/refunds", self._list_refunds)
        app.router.add_post("/v1/orders/{order_id}/bags/{bag_id}/cancel", self._cancel)
        app.router.add_get("/v1/orders/{order_id}", self._get_order)
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
        self.base_url = f"http://{self._host}:{port}/v1"
        return self

    async def stop(self) -> None:
        """Land late commits (so the ledger is final), stop the server, then cancel
        webhook deliveries still retrying (late commits may have started some)."""
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
            order = self.store.order(bag.order_id).to_json()
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
        """Apply every late commit still pending (tests call it before the ledger)."""
        for bag_id in list(self._late):
            self._apply_late(bag_id)

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
        fault = await self._maybe_fault(route, bag_id, mutating=True)
        self._check_token(request)
        body = await self._json(request)
        bag = self.store.bag(order_id, bag_id)
        if route == "refund":
            checked = self.store.check_refund(bag, body)
            if fault is not Fault.LATE_COMMIT:
                record = self.store.commit_refund(bag, body, checked)

            def commit() -> dict[str, Any]:
                return self.store.commit_refund(bag, body)
        else:
            try:
                self.store.check_cancel(bag)
            except RuleViolation as violation:
                if self.cancel_response == "cancellation":
                    return self._cancellation_failure(order_id, violation.message)
                raise

            def commit() -> dict[str, Any]:
                return self.store.commit_cancel(bag, body)

        if fault is Fault.LATE_COMMIT:
            self._schedule_late(bag_id, commit)
            return self._error(504, "Gateway Timeout", 5040)
        if route == "cancel":
            record = commit()
        if fault is not None and fault in COMMIT_FAULTS:
            return await self._after_commit_fault(fault, request, record)
        if route == "cancel" and self.cancel_response == "cancellation":
            return self._ok(_cancellation(order_id, self.app_id, bag, record), status=202)
        return self._ok(record)

    async def _list_refunds(self, request: web.Request) -> web.Response:
        self.ledger.requests["list_refunds"] += 1
        order_id, bag_id = _ids(request)
        await self._maybe_fault("list_refunds", bag_id, mutating=False)
        self._check_token(request)
        bag = self.store.bag(order_id, bag_id)
        response = self._ok(list(bag.refunds))
        # A late commit lands after this read: the next read will see it. Refunds
        # still PROCESSING move one read closer to COMPLETED.
        self._apply_late(bag_id)
        self.store.tick_processing(bag)
        return response

    async def _get_order(self, request: web.Request) -> web.Response:
        self.ledger.requests["get_order"] += 1
        order_id = _int(request.match_info["order_id"])
        await self._maybe_fault("get_order", None, mutating=False)
        self._check_token(request)
        return self._ok(self.store.order(order_id).to_json())

    # -- faults -----------------------------------------------------------------

    async def _maybe_fault(self, route: str, bag_id: int | None, *, mutating: bool) -> Fault | None:
        fault = self._script.take(route, bag_id) or self.faults.draw(route, mutating=mutating)
        delay = self.faults.latency() if route in self.faults.plan.routes else 0.0
        if delay:
            await asyncio.sleep(delay)
        if fault is None:
            return None
        self.ledger.faults[fault.value] += 1
        if fault in COMMIT_FAULTS:
            return fault
        if fault is Fault.DROP_BEFORE_COMMIT:
            raise _Dropped
        if fault is Fault.HTML_502:
            raise web.HTTPBadGateway(
                text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
            )
        if fault is Fault.REDIRECT:
            raise web.HTTPTemporaryRedirect(self.faults.plan.redirect_to)
        if fault is Fault.RATE_LIMIT:
            raise RuleViolation(
                429, "Too Many Requests", 4290, retry_after=self.faults.plan.retry_after
            )
        if fault is Fault.RATE_LIMIT_NO_HEADER:
            raise RuleViolation(429, "Too Many Requests", 4290)
        status = {
            Fault.HTTP_500: 500,
            Fault.HTTP_502: 502,
            Fault.HTTP_503: 503,
            Fault.HTTP_504: 504,
        }[fault]
        raise RuleViolation(status, "Upstream failure", status * 10)

    async def _after_commit_fault(
        self, fault: Fault, request: web.Request, record: dict[str, Any]
    ) -> web.StreamResponse:
        if fault is Fault.DROP_AFTER_COMMIT:
            raise _Dropped
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
        if fault is Fault.TRUNCATED_JSON:
            raw = orjson.dumps(record)
            return web.Response(body=raw[: len(raw) // 2], content_type="application/json")
        # WRONG_TYPES
        return self._ok({**record, "amount": str(record["amount"])})

    def _schedule_late(self, bag_id: int, commit: Callable[[], dict[str, Any]]) -> None:
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
        asyncio.get_running_loop().call_later(self.faults.plan.late_commit_delay, land)

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
        except _Dropped:
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError from None
        except ConnectionResetError:
            # The client went away mid-answer (a cancelled caller): nothing to report.
            raise asyncio.CancelledError from None

    def _ok(self, data: Any, status: int = 200) -> web.Response:
        return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")

    def _error(self, status: int, message: str, error_code: int) -> web.Response:
        body = {
            "status": status,
            "message": message,
            "error_code": error_code,
            "timestamp": int(time.time() * 1000),
        }
        return self._ok(body, status=status)

    def _cancellation_failure(self, order_id: int, message: str) -> web.Response:
        body = {
            "order_id": order_id,
            "app_id": self.app_id,
            "status": "CANCELLATION_FAILURE",
            "cancelled_bags": [],
            "message": message,
        }
        return self._ok(body, status=202)

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


def _cancellation(
    order_id: int, app_id: int, bag: FakeBag, record: dict[str, Any]
) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "app_id": app_id,
        "status": "CANCELED",
        "cancelled_bags": [
            {
                "bag_id": bag.id,
                "external_order_id": f"ext-order-{bag.id}",
                "status": "CANCELED",
                "originated_by": "APP",
                "date_cancelled": record["date_created"],
                "refund": record,
            }
        ],
        "message": None,
    }
