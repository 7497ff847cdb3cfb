"""Violet webhooks: verified, deduplicated, typed, and never acknowledged before they
are handled or durably kept.

::

    receiver = WebhookReceiver(app_secret)
    handler = webhook_handler(receiver, on_event)                   # inline (default)
    handler = webhook_handler(receiver, on_event, queue="wh.db")    # queued, SQLite
    app.router.add_post("/violet", handler.handle)
    app.cleanup_ctx.append(handler.cleanup_ctx)

Inline: the callback is awaited within ``budget`` (8 s, inside Violet's 10 s) and the
answer is 200 only if it succeeded; a failure or an overrun is a 5xx, so Violet
delivers again. Queued: the verified event is committed to a durable store before the
200 and a worker runs callbacks until they succeed; a crash replays it on restart.
Either way a callback sees **at-least-once** delivery: make it idempotent.

Framework-neutral: ``event = await receiver.receive(headers, raw_body)`` then
``await receiver.done(event)`` after handling it, or ``await receiver.release(event)``
if that failed.

What Violet signs is the raw body (the full order) and nothing else: every
``X-Violet-*`` header is taken as a claim to check against the body, never as a fact.
"""

from ._dedup import ClaimResult, DedupStore, InMemoryDedupStore
from ._handler import WebhookCallback, WebhookHandler, read_body, webhook_handler
from ._queue import EventStore, SQLiteEventStore, StoredEvent, WebhookWorker
from ._receiver import (
    BAG_ID_HEADER,
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_BODY,
    EVENT_ID_HEADER,
    ORDER_ID_HEADER,
    SIGNATURE_HEADER,
    TOPIC_HEADER,
    WebhookBusyError,
    WebhookError,
    WebhookEvent,
    WebhookEventType,
    WebhookPayloadError,
    WebhookReceiver,
    WebhookSignatureError,
    WebhookTooLargeError,
    sign,
)

__all__ = [
    "BAG_ID_HEADER",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_BODY",
    "EVENT_ID_HEADER",
    "ORDER_ID_HEADER",
    "SIGNATURE_HEADER",
    "TOPIC_HEADER",
    "ClaimResult",
    "DedupStore",
    "EventStore",
    "InMemoryDedupStore",
    "SQLiteEventStore",
    "StoredEvent",
    "WebhookBusyError",
    "WebhookCallback",
    "WebhookError",
    "WebhookEvent",
    "WebhookEventType",
    "WebhookHandler",
    "WebhookPayloadError",
    "WebhookReceiver",
    "WebhookSignatureError",
    "WebhookTooLargeError",
    "WebhookWorker",
    "read_body",
    "sign",
    "webhook_handler",
]
