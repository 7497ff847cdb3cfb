"""Violet webhooks: verified, deduplicated, typed.

::

    receiver = WebhookReceiver(app_secret)
    event = await receiver.receive(headers, raw_body)   # raises on a bad signature
    if not event.duplicate:
        ...  # event.type, event.order_id, event.bag_id, event.order (typed Order)

or, in an aiohttp.web app, ``app.router.add_post("/violet", webhook_handler(receiver,
callback).handle)``: it answers 2xx at once and runs ``callback(event)`` in the background.

Assumptions, each kept in one place so it is a one-line change if it proves wrong:

- ``X-Violet-Hmac`` is base64(HMAC-SHA256(app_secret, raw_body)): :func:`sign`.
- The event type comes from the ``X-Violet-Topic`` header (or a ``topic`` / ``event``
  field of the body): :data:`TOPIC_HEADER`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import attrs
import orjson
from aiohttp import web

from ._converter import converter
from .exceptions import VioletError
from .models import Order
from .models.enums import _OpenEnum

__all__ = [
    "DedupStore",
    "InMemoryDedupStore",
    "WebhookError",
    "WebhookEvent",
    "WebhookEventType",
    "WebhookHandler",
    "WebhookPayloadError",
    "WebhookReceiver",
    "WebhookSignatureError",
    "sign",
    "webhook_handler",
]

log = logging.getLogger("violet_async.webhooks")

SIGNATURE_HEADER = "X-Violet-Hmac"
EVENT_ID_HEADER = "X-Violet-Event-Id"
ORDER_ID_HEADER = "X-Violet-Order-Id"
BAG_ID_HEADER = "X-Violet-Bag-Id"
TOPIC_HEADER = "X-Violet-Topic"
#: Violet's payload is one order; anything this large is not one.
DEFAULT_MAX_BODY = 1 << 20


def sign(raw_body: bytes, app_secret: str) -> str:
    """The signature Violet is taken to send: base64 of HMAC-SHA256 over the raw body,
    keyed with the app secret. The single place that assumption lives."""
    digest = hmac.new(app_secret.encode(), raw_body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class WebhookEventType(_OpenEnum):
    """Webhook topics (unknown ones are kept, ``is_known == False``)."""

    ORDER_REFUNDED = "ORDER_REFUNDED"
    ORDER_CANCELLED = "ORDER_CANCELLED"  # double L, as Violet spells it
    ORDER_UPDATED = "ORDER_UPDATED"
    ORDER_COMPLETED = "ORDER_COMPLETED"
    ORDER_SHIPPED = "ORDER_SHIPPED"
    ORDER_DELIVERED = "ORDER_DELIVERED"
    ORDER_FAILED = "ORDER_FAILED"


class WebhookError(VioletError):
    """A webhook was refused."""


class WebhookSignatureError(WebhookError):
    """Missing or wrong ``X-Violet-Hmac``: the body was not signed with our secret."""


class WebhookPayloadError(WebhookError):
    """A signed body that is not a readable order (not JSON, too large, wrong shape)."""


@attrs.frozen
class WebhookEvent:
    """One verified webhook."""

    type: WebhookEventType
    """The topic; unknown topics are kept."""
    event_id: str
    """``X-Violet-Event-Id``: Violet retries with the same id."""
    order_id: int | None
    """From ``X-Violet-Order-Id`` (or the order's id)."""
    bag_id: int | None
    """From ``X-Violet-Bag-Id``."""
    order: Order
    """The order the payload carries."""
    duplicate: bool = False
    """True when this event id was seen before: acknowledge it, do not act again."""


class DedupStore(Protocol):
    """Where seen event ids live. ``first_time`` must be atomic: True exactly once per
    id. Implement it on Redis (SET NX EX) or a database unique key to share it across
    processes."""

    async def first_time(self, event_id: str) -> bool: ...


class InMemoryDedupStore:
    """Seen ids in this process, for ``ttl`` seconds (Violet retries for 24 h), at most
    ``max_entries`` (oldest dropped first)."""

    def __init__(
        self,
        *,
        ttl: float = 48 * 3600.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock

    async def first_time(self, event_id: str) -> bool:
        now = self._clock()
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if now - seen_at < self._ttl and len(self._seen) < self._max:
                break
            del self._seen[oldest]
        if event_id in self._seen:
            return False
        self._seen[event_id] = now
        return True


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict from a framework may not be case-insensitive
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = _header(headers, name)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise WebhookPayloadError(f"{name} must be an integer id")
    return int(value)


class WebhookReceiver:
    """Framework-neutral: ``await receive(headers, raw_body)`` verifies, parses and
    deduplicates one webhook."""

    def __init__(
        self,
        app_secret: str,
        *,
        dedup: DedupStore | None = None,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        if not app_secret:
            raise ValueError("app_secret is required to verify webhooks")
        self._secret = app_secret
        self._dedup = dedup if dedup is not None else InMemoryDedupStore()
        self.max_body = max_body

    def __repr__(self) -> str:
        return f"<WebhookReceiver max_body={self.max_body}>"

    def verify(self, headers: Mapping[str, str], raw_body: bytes) -> None:
        """Raise WebhookSignatureError unless the body carries our signature."""
        given = _header(headers, SIGNATURE_HEADER)
        if not given:
            raise WebhookSignatureError(f"missing {SIGNATURE_HEADER}")
        expected = sign(raw_body, self._secret)
        if not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise WebhookSignatureError(f"{SIGNATURE_HEADER} does not match the body")

    async def receive(self, headers: Mapping[str, str], raw_body: bytes) -> WebhookEvent:
        """Verify, parse and deduplicate. The signature is checked before anything in
        the body is read."""
        if len(raw_body) > self.max_body:
            raise WebhookPayloadError(f"body of {len(raw_body)} bytes exceeds {self.max_body}")
        self.verify(headers, raw_body)
        event_id = _header(headers, EVENT_ID_HEADER)
        if not event_id:
            raise WebhookPayloadError(f"missing {EVENT_ID_HEADER}")
        try:
            data: Any = orjson.loads(raw_body)
        except orjson.JSONDecodeError as exc:
            raise WebhookPayloadError(f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise WebhookPayloadError("body must be a JSON object (an order)")
        try:
            order = converter.structure(data, Order)
        except Exception as exc:  # noqa: BLE001 - any shape problem is a payload error
            raise WebhookPayloadError(f"body is not an order: {exc}") from None
        topic = _header(headers, TOPIC_HEADER) or data.get("topic") or data.get("event")
        event_type = WebhookEventType(topic if isinstance(topic, str) else "UNKNOWN")
        order_id = _int_header(headers, ORDER_ID_HEADER)
        return WebhookEvent(
            type=event_type,
            event_id=event_id,
            order_id=order_id if order_id is not None else order.id,
            bag_id=_int_header(headers, BAG_ID_HEADER),
            order=order,
            duplicate=not await self._dedup.first_time(event_id),
        )


WebhookCallback = Callable[[WebhookEvent], Awaitable[Any]]


class WebhookHandler:
    """Register ``handler.handle`` on an aiohttp.web route. It acknowledges at once and
    runs the callback in the background; ``await handler.drain()`` on shutdown."""

    def __init__(self, receiver: WebhookReceiver, callback: WebhookCallback) -> None:
        self.receiver = receiver
        self.callback = callback
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, request: web.Request) -> web.Response:
        """The aiohttp.web request handler."""
        if request.content_length is not None and request.content_length > self.receiver.max_body:
            return web.json_response({"error": "body too large"}, status=413)
        raw = await request.content.read(self.receiver.max_body + 1)
        if len(raw) > self.receiver.max_body:  # chunked, so no Content-Length to check
            return web.json_response({"error": "body too large"}, status=413)
        try:
            event = await self.receiver.receive(request.headers, raw)
        except WebhookSignatureError:
            log.warning("violet webhook refused: bad signature")
            return web.json_response({"error": "bad signature"}, status=401)
        except WebhookPayloadError as exc:
            log.warning("violet webhook refused: %s", exc)
            return web.json_response({"error": "bad payload"}, status=400)
        if not event.duplicate:
            task = asyncio.create_task(self._run(event))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return web.json_response({"received": event.event_id, "duplicate": event.duplicate})

    async def _run(self, event: WebhookEvent) -> None:
        try:
            await self.callback(event)
        except Exception:
            log.exception("violet webhook callback failed for event %s", event.event_id)

    async def drain(self) -> None:
        """Wait for callbacks still running (call on shutdown)."""
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def webhook_handler(receiver: WebhookReceiver, callback: WebhookCallback) -> WebhookHandler:
    """An aiohttp.web handler (``app.router.add_post(path, handler.handle)``): 401 on a
    bad signature, 400 on a bad body, 413 on an oversized one, otherwise 200 at once
    with ``callback(event)`` run in the background (duplicates are acknowledged without
    a callback). Await ``handler.drain()`` on shutdown to let callbacks finish."""
    return WebhookHandler(receiver, callback)
