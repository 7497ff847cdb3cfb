"""Verify, parse and deduplicate one webhook, framework-neutral.

What Violet signs is the raw body (the full order); every ``X-Violet-*`` header is
unsigned. So identity and meaning come from the body: the order id is the body's, a
header that disagrees with the body is refused, and deduplication keys on a digest of
the body as well as on the event id (a captured body replayed under a fresh event id is
a duplicate). Assumptions, each kept in one place:

- ``X-Violet-Hmac`` is base64(HMAC-SHA256(app_secret, raw_body)): :func:`sign`.
- The topic comes from ``X-Violet-Topic`` (:data:`TOPIC_HEADER`) unless the body
  carries a ``topic`` / ``event`` field, which then must agree.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import orjson

from .._converter import converter
from ..exceptions import VioletError
from ..models import Order
from ..models.enums import _OpenEnum
from ._dedup import ClaimResult, DedupStore, InMemoryDedupStore

__all__ = [
    "BAG_ID_HEADER",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_BODY",
    "EVENT_ID_HEADER",
    "ORDER_ID_HEADER",
    "SIGNATURE_HEADER",
    "TOPIC_HEADER",
    "WebhookBusyError",
    "WebhookError",
    "WebhookEvent",
    "WebhookEventType",
    "WebhookPayloadError",
    "WebhookReceiver",
    "WebhookSignatureError",
    "WebhookTooLargeError",
    "sign",
]

SIGNATURE_HEADER = "X-Violet-Hmac"
EVENT_ID_HEADER = "X-Violet-Event-Id"
ORDER_ID_HEADER = "X-Violet-Order-Id"
BAG_ID_HEADER = "X-Violet-Bag-Id"
TOPIC_HEADER = "X-Violet-Topic"
#: Violet's payload is one order; anything this large is not one.
DEFAULT_MAX_BODY = 1 << 20
#: An age limit callers may opt into (``max_age=DEFAULT_MAX_AGE``); off by default.
#: Violet retries for 24 h, but it does not document that an order's
#: ``date_last_modified`` moves when one of its bags is refunded or cancelled (order
#: events fire on bag changes), so a real event can carry an old date: refusing it
#: would fail every retry and count against the webhook's failure rate (Violet disables
#: endpoints that keep failing). Replays are kept out by the dedup store's retention.
DEFAULT_MAX_AGE = 48 * 3600.0
#: A claim outlives the longest a handler lets a callback run (60 s by default).
DEFAULT_CLAIM_TTL = 120.0

# Strict ASCII: str.isdigit() accepts '²' and Arabic-Indic digits, int() then fails.
_ID = re.compile(r"[0-9]{1,19}")
_EVENT_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
_TOPIC = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def sign(raw_body: bytes, app_secret: str) -> str:
    """The signature Violet is taken to send: base64 of HMAC-SHA256 over the raw body,
    keyed with the app secret. The single place that assumption lives."""
    digest = hmac.new(app_secret.encode(), raw_body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class WebhookEventType(_OpenEnum):
    """Violet's order webhook topics, from its Webhook Events page (unknown ones are
    kept, ``is_known == False``). Order events fire on changes to a bag, and Violet
    sends ORDER_UPDATED alongside each specific one: act on the order's state."""

    ORDER_ACCEPTED = "ORDER_ACCEPTED"
    ORDER_UPDATED = "ORDER_UPDATED"
    ORDER_COMPLETED = "ORDER_COMPLETED"
    ORDER_SHIPPED = "ORDER_SHIPPED"
    ORDER_DELIVERED = "ORDER_DELIVERED"
    ORDER_REFUNDED = "ORDER_REFUNDED"
    ORDER_RETURNED = "ORDER_RETURNED"
    ORDER_CANCELLED = "ORDER_CANCELLED"  # double L, as the Webhook Events page spells it
    ORDER_CANCELED = "ORDER_CANCELED"
    """One L, as the Webhook Event resource's ``event_type`` enum spells it."""


class WebhookError(VioletError):
    """A webhook was refused."""


class WebhookSignatureError(WebhookError):
    """Missing or wrong ``X-Violet-Hmac``: the body was not signed with our secret
    (HTTP 401)."""


class WebhookPayloadError(WebhookError):
    """A signed body that is not a readable order, a malformed ``X-Violet-*`` header,
    a header that disagrees with the body, or (only with ``max_age`` set) an order older
    than ``max_age`` (HTTP 400)."""


class WebhookTooLargeError(WebhookPayloadError):
    """A body over ``max_body`` (HTTP 413)."""


class WebhookBusyError(WebhookError):
    """Another delivery of this event is being handled right now: answer 503 so the
    sender retries later (never run it twice at once, never drop it)."""


@attrs.frozen
class WebhookEvent:
    """One verified webhook."""

    type: WebhookEventType
    """The topic (unsigned unless the body carries it); unknown topics are kept. Act
    on the order's state, not on the topic."""
    event_id: str
    """``X-Violet-Event-Id`` (unsigned): Violet retries with the same id."""
    order_id: int
    """The signed body's order id (a disagreeing ``X-Violet-Order-Id`` is refused)."""
    bag_id: int | None
    """``X-Violet-Bag-Id``, which must name a bag of the body; else the body's only bag."""
    order: Order
    """The order the payload carries."""
    duplicate: bool = False
    """True when this event (its id or its exact body) was handled before: acknowledge
    it, do not act again."""
    body_digest: str = ""
    """SHA-256 of the signed body, hex: the replay-proof half of the dedup key."""

    @property
    def dedup_keys(self) -> tuple[str, str]:
        """Fixed-size store keys: a digest of the event id and of the body."""
        id_digest = hashlib.sha256(self.event_id.encode()).hexdigest()
        return f"id:{id_digest}", f"body:{self.body_digest}"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    getall = getattr(headers, "getall", None)
    if getall is not None:  # a multidict: a repeated header is ambiguous, refuse it
        values = getall(name, [])
        if len(values) > 1:
            raise WebhookPayloadError(f"{name} is repeated")
        return values[0] if values else None
    value = headers.get(name)
    if value is None:  # a plain dict from a framework may not be case-insensitive
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def _checked(headers: Mapping[str, str], name: str, pattern: re.Pattern[str]) -> str | None:
    value = _header(headers, name)
    if value is None:
        return None
    value = value.strip()
    if not pattern.fullmatch(value):
        raise WebhookPayloadError(f"{name} is malformed")
    return value


def _id_header(headers: Mapping[str, str], name: str) -> int | None:
    value = _checked(headers, name, _ID)
    return None if value is None else int(value)


class WebhookReceiver:
    """Framework-neutral: :meth:`parse` verifies and reads one webhook; :meth:`receive`
    also claims it; after handling call :meth:`done`, or :meth:`release` on failure.

    ``max_age`` (seconds; None, the default, is off): an order whose
    ``date_last_modified`` is older is refused (400). Off by default because Violet does
    not document that the order's date moves when a bag is refunded or cancelled: a
    real event may carry an old date. Replays are kept out by the dedup store, for its
    retention (72 h by default, three times Violet's 24 h of retries). Set ``max_age``
    only if your orders' dates are known to move; it must not exceed the store's
    retention. ``clock`` is wall time.
    """

    def __init__(
        self,
        app_secret: str,
        *,
        dedup: DedupStore | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        max_age: float | None = None,
        claim_ttl: float = DEFAULT_CLAIM_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not app_secret:
            raise ValueError("app_secret is required to verify webhooks")
        self._secret = app_secret
        self._dedup: DedupStore = dedup if dedup is not None else InMemoryDedupStore()
        if (
            isinstance(self._dedup, InMemoryDedupStore)
            and max_age is not None
            and max_age > self._dedup.ttl
        ):
            raise ValueError("max_age must not exceed the dedup store's ttl")
        self.max_body = max_body
        self.max_age = max_age
        self.claim_ttl = claim_ttl
        self._clock = clock

    def __repr__(self) -> str:
        return f"<WebhookReceiver max_body={self.max_body} max_age={self.max_age}>"

    def verify(self, headers: Mapping[str, str], raw_body: bytes) -> None:
        """Raise WebhookSignatureError unless the body carries our signature."""
        given = _header(headers, SIGNATURE_HEADER)
        if not given:
            raise WebhookSignatureError(f"missing {SIGNATURE_HEADER}")
        expected = sign(raw_body, self._secret)
        if not hmac.compare_digest(given.strip().encode(errors="replace"), expected.encode()):
            raise WebhookSignatureError(f"{SIGNATURE_HEADER} does not match the body")

    def parse(self, headers: Mapping[str, str], raw_body: bytes) -> WebhookEvent:
        """Size, signature, then the body; headers are checked against the body and
        the order's age against ``max_age``. No dedup state is touched."""
        if len(raw_body) > self.max_body:
            raise WebhookTooLargeError(f"body of {len(raw_body)} bytes exceeds {self.max_body}")
        self.verify(headers, raw_body)
        event = self.decode(headers, raw_body)
        modified = event.order.date_last_modified
        if self.max_age is not None and modified is not None:
            age = self._clock() - modified.timestamp()
            if age > self.max_age:
                raise WebhookPayloadError(
                    f"order last modified {age:.0f} s ago, over max_age {self.max_age:.0f} s"
                )
        return event

    def decode(self, headers: Mapping[str, str], raw_body: bytes) -> WebhookEvent:
        """Read an already verified body and its headers (the queue's worker replays
        stored events through this). Raises WebhookPayloadError."""
        event_id = _checked(headers, EVENT_ID_HEADER, _EVENT_ID)
        if event_id is None:
            raise WebhookPayloadError(f"missing {EVENT_ID_HEADER}")
        header_topic = _checked(headers, TOPIC_HEADER, _TOPIC)
        header_order = _id_header(headers, ORDER_ID_HEADER)
        header_bag = _id_header(headers, BAG_ID_HEADER)
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
        if header_order is not None and header_order != order.id:
            raise WebhookPayloadError(f"{ORDER_ID_HEADER} disagrees with the signed body")
        bag_ids = [bag.id for bag in order.bags]
        if header_bag is not None and header_bag not in bag_ids:
            raise WebhookPayloadError(f"{BAG_ID_HEADER} names no bag of the signed body")
        body_topic = data.get("topic", data.get("event"))
        if body_topic is not None and header_topic is not None and body_topic != header_topic:
            raise WebhookPayloadError(f"{TOPIC_HEADER} disagrees with the signed body")
        topic = body_topic if isinstance(body_topic, str) else header_topic
        return WebhookEvent(
            type=WebhookEventType(topic or "UNKNOWN"),
            event_id=event_id,
            order_id=order.id,
            bag_id=header_bag if header_bag is not None or len(bag_ids) != 1 else bag_ids[0],
            order=order,
            body_digest=hashlib.sha256(raw_body).hexdigest(),
        )

    async def claim(self, event: WebhookEvent) -> ClaimResult:
        """Claim both keys (event id, body digest): NEW only if both were free; DONE if
        either was handled; else RUNNING. A key claimed here and not kept is released."""
        results: list[tuple[str, ClaimResult]] = []
        for key in event.dedup_keys:
            result = await self._dedup.claim(key, self.claim_ttl)
            results.append((key, result))
            if result is not ClaimResult.NEW:
                break
        outcome = results[-1][1]
        if outcome is not ClaimResult.NEW:
            for key, result in results:
                if result is ClaimResult.NEW:
                    await self._dedup.release(key)
        return outcome

    async def done(self, event: WebhookEvent) -> None:
        """The callback succeeded: later deliveries (same id or same body) are duplicates."""
        for key in event.dedup_keys:
            await self._dedup.done(key)

    async def release(self, event: WebhookEvent) -> None:
        """The callback failed: the next delivery runs it again."""
        for key in event.dedup_keys:
            await self._dedup.release(key)

    async def receive(self, headers: Mapping[str, str], raw_body: bytes) -> WebhookEvent:
        """:meth:`parse`, then :meth:`claim`: a handled event comes back with
        ``duplicate=True``; one being handled right now raises WebhookBusyError. For a
        new event, call :meth:`done` after handling it or :meth:`release` if that
        failed (an unreleased claim expires after ``claim_ttl``)."""
        event = self.parse(headers, raw_body)
        result = await self.claim(event)
        if result is ClaimResult.RUNNING:
            raise WebhookBusyError(f"event {event.event_id} is being handled")
        if result is ClaimResult.DONE:
            return attrs.evolve(event, duplicate=True)
        return event
