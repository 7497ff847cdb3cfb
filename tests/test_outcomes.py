"""Refund outcomes: get_order, wait_for_refund, and webhooks (signed, deduplicated,
typed), end to end on FakeViolet."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from violet_async import (
    BagStatus,
    RefundStatus,
    RefundWaitTimeoutError,
    RequestValidationError,
    VioletClient,
)
from violet_async.testing import FakeClock, FakeViolet
from violet_async.webhooks import (
    InMemoryDedupStore,
    WebhookEvent,
    WebhookEventType,
    WebhookPayloadError,
    WebhookReceiver,
    WebhookSignatureError,
    sign,
    webhook_handler,
)

from .conftest import make_client, serve

SECRET = "webhook-app-secret"


def order_body(order_id: int = 11, bag_status: str = "REFUNDED") -> bytes:
    return orjson.dumps(
        {
            "id": order_id,
            "app_id": 1,
            "status": "COMPLETED",
            "bags": [
                {
                    "id": 22,
                    "status": bag_status,
                    "financial_status": "REFUNDED",
                    "skus": [{"id": 5, "quantity": 1, "price": 100}],
                }
            ],
        }
    )


def signed_headers(body: bytes, event_id: str = "evt-1", **extra: str) -> dict[str, str]:
    return {
        "X-Violet-Hmac": sign(body, SECRET),
        "X-Violet-Event-Id": event_id,
        "X-Violet-Order-Id": "11",
        "X-Violet-Bag-Id": "22",
        "X-Violet-Topic": "ORDER_REFUNDED",
        **extra,
    }


async def test_get_order_is_typed(client: VioletClient, fake: FakeViolet) -> None:
    """get_order returns the bags with typed statuses and amounts."""
    order_id, bag_id = fake.seeded[0]
    order = await client.get_order(order_id)
    bag = order.bag(bag_id)
    assert bag is not None
    assert bag.status in (BagStatus.COMPLETED, BagStatus.ACCEPTED, BagStatus.SUBMITTED)
    assert bag.total == fake.bag(order_id, bag_id).total
    assert bag.skus[0].id == fake.bag(order_id, bag_id).skus[0].order_sku_id
    assert order.bag(1) is None
    with pytest.raises(RequestValidationError):
        await client.get_order(0)


async def test_wait_for_refund_polls_until_terminal(clock: FakeClock) -> None:
    """A PROCESSING refund is polled with backoff until it is COMPLETED."""
    async with FakeViolet(orders=1, processing_reads=3) as fake:
        async with make_client(fake, clock) as client:
            order_id, bag_id = fake.seeded[0]
            refund = await client.refund_bag(order_id, bag_id, amount_refunded=10)
            assert refund.status is RefundStatus.PROCESSING
            assert refund.id is not None
            final = await client.wait_for_refund(order_id, bag_id, refund.id, poll_interval=1)
    assert final.status is RefundStatus.COMPLETED
    assert clock.sleeps == [1, 2, 4]  # PROCESSING on three reads, COMPLETED on the fourth


async def test_wait_for_refund_times_out_with_last_state(clock: FakeClock) -> None:
    """Past the timeout, a typed error carries the last state seen."""
    async with FakeViolet(orders=1, processing_reads=100) as fake:
        async with make_client(fake, clock) as client:
            order_id, bag_id = fake.seeded[0]
            refund = await client.refund_bag(order_id, bag_id, amount_refunded=10)
            assert refund.id is not None
            with pytest.raises(RefundWaitTimeoutError, match="still PROCESSING") as info:
                await client.wait_for_refund(order_id, bag_id, refund.id, timeout=10)
            assert info.value.refund is not None
            assert info.value.refund.id == refund.id
            assert clock.slept == pytest.approx(10)
            with pytest.raises(RefundWaitTimeoutError, match="not found") as missing:
                await client.wait_for_refund(order_id, bag_id, 999, timeout=1)
            assert missing.value.refund is None
            with pytest.raises(RequestValidationError):
                await client.wait_for_refund(order_id, bag_id, 1, timeout=0)


async def test_receiver_accepts_a_signed_event() -> None:
    """A correctly signed body becomes a typed event."""
    receiver = WebhookReceiver(SECRET)
    body = order_body()
    event = await receiver.receive(signed_headers(body), body)
    assert event.type is WebhookEventType.ORDER_REFUNDED
    assert (event.event_id, event.order_id, event.bag_id) == ("evt-1", 11, 22)
    assert event.order.bags[0].status is BagStatus.REFUNDED
    assert not event.duplicate


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b + b" "),  # body changed
        lambda h, b: ({**h, "X-Violet-Hmac": sign(b, "other")}, b),  # wrong secret
        lambda h, b: ({k: v for k, v in h.items() if k != "X-Violet-Hmac"}, b),  # none
        lambda h, b: ({**h, "X-Violet-Hmac": "not base64!"}, b),
    ],
)
async def test_bad_signatures_are_refused(tamper: Any) -> None:
    """Tampered body, wrong secret, missing or junk signature: WebhookSignatureError."""
    body = order_body()
    headers, sent = tamper(signed_headers(body), body)
    with pytest.raises(WebhookSignatureError):
        await WebhookReceiver(SECRET).receive(headers, sent)


async def test_replayed_event_is_flagged_duplicate() -> None:
    """The same X-Violet-Event-Id twice: the second is a duplicate."""
    receiver = WebhookReceiver(SECRET)
    body = order_body()
    assert not (await receiver.receive(signed_headers(body), body)).duplicate
    assert (await receiver.receive(signed_headers(body), body)).duplicate
    assert not (await receiver.receive(signed_headers(body, "evt-2"), body)).duplicate


async def test_dedup_store_forgets_after_ttl_and_bounds_memory() -> None:
    """Seen ids expire after the TTL and the store keeps at most max_entries."""
    now = [0.0]
    store = InMemoryDedupStore(ttl=10, max_entries=2, clock=lambda: now[0])
    assert await store.first_time("a")
    assert not await store.first_time("a")
    now[0] = 11
    assert await store.first_time("a")
    assert await store.first_time("b")
    assert await store.first_time("c")  # evicts the oldest
    assert await store.first_time("a")


async def test_unknown_event_type_is_kept() -> None:
    """An unknown topic is kept and flagged; a missing one is UNKNOWN."""
    receiver = WebhookReceiver(SECRET)
    body = order_body()
    event = await receiver.receive(
        signed_headers(body, X_Violet_Topic="x") | {"X-Violet-Topic": "ORDER_TELEPORTED"}, body
    )
    assert event.type == "ORDER_TELEPORTED"
    assert not event.type.is_known
    headers = signed_headers(body, "evt-9")
    del headers["X-Violet-Topic"]
    assert (await receiver.receive(headers, body)).type == "UNKNOWN"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"bags": []}', "not an order"),
        (b"x" * (1 << 20 + 1), "exceeds"),
    ],
)
async def test_bad_payloads_are_refused(body: bytes, match: str) -> None:
    """Signed but unreadable, or oversized, bodies raise WebhookPayloadError."""
    with pytest.raises(WebhookPayloadError, match=match):
        await WebhookReceiver(SECRET).receive(signed_headers(body), body)


async def test_missing_event_id_and_bad_ids_are_refused() -> None:
    """Event id is required; id headers must be integers."""
    body = order_body()
    headers = signed_headers(body)
    del headers["X-Violet-Event-Id"]
    with pytest.raises(WebhookPayloadError, match="Event-Id"):
        await WebhookReceiver(SECRET).receive(headers, body)
    with pytest.raises(WebhookPayloadError, match="Order-Id"):
        await WebhookReceiver(SECRET).receive(
            signed_headers(body, **{"X-Violet-Order-Id": "eleven"}), body
        )
    with pytest.raises(ValueError, match="app_secret"):
        WebhookReceiver("")


async def test_headers_are_case_insensitive() -> None:
    """A framework's plain dict of lower-cased headers works."""
    body = order_body()
    lowered = {k.lower(): v for k, v in signed_headers(body).items()}
    event = await WebhookReceiver(SECRET).receive(lowered, body)
    assert event.bag_id == 22


@pytest.fixture
async def receiver_app() -> AsyncIterator[tuple[str, list[WebhookEvent], Any]]:
    events: list[WebhookEvent] = []
    gate = asyncio.Event()

    async def slow_callback(event: WebhookEvent) -> None:
        await gate.wait()  # slow on purpose: the answer must not wait for it
        events.append(event)

    handler = webhook_handler(WebhookReceiver(SECRET, max_body=4096), slow_callback)
    app = web.Application()
    app.router.add_post("/violet", handler.handle)
    async with serve(app) as base:
        yield f"{base}/violet", events, (handler, gate)
        gate.set()
        await handler.drain()


async def test_handler_answers_fast_and_refuses_bad_requests(
    receiver_app: tuple[str, list[WebhookEvent], Any],
) -> None:
    """200 at once despite a slow callback; 401 / 400 / 413 for bad requests; a bad
    signature never reaches the callback."""
    import aiohttp

    url, events, (handler, gate) = receiver_app
    body = order_body()
    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        async with http.post(url, data=body, headers=signed_headers(body)) as r:
            assert r.status == 200
        assert time.perf_counter() - started < 1.0
        async with http.post(url, data=body, headers=signed_headers(body)) as r:
            assert (await r.json())["duplicate"] is True
        bad = {**signed_headers(body, "evt-x"), "X-Violet-Hmac": sign(body, "nope")}
        async with http.post(url, data=body, headers=bad) as r:
            assert r.status == 401
        async with http.post(url, data=b"{", headers=signed_headers(b"{", "evt-y")) as r:
            assert r.status == 400
        big = b"x" * 5000
        async with http.post(url, data=big, headers=signed_headers(big, "evt-z")) as r:
            assert r.status == 413

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(5):
                yield b"x" * 1000

        # An async generator body goes out chunked, with no Content-Length.
        async with http.post(url, data=chunks(), headers=signed_headers(big, "evt-c")) as r:
            assert r.status == 413
    gate.set()
    await handler.drain()
    assert [e.event_id for e in events] == ["evt-1"]


async def test_end_to_end_refund_webhook(
    receiver_app: tuple[str, list[WebhookEvent], Any], clock: FakeClock
) -> None:
    """Refund through the SDK; FakeViolet sends a signed ORDER_REFUNDED that the
    aiohttp receiver verifies; the callback sees the same order and bag."""
    url, events, (handler, gate) = receiver_app
    async with FakeViolet(orders=2, app_secret=SECRET) as fake:
        fake.register_webhook(url)
        async with make_client(fake, clock) as client:
            (o1, b1), (o2, b2) = fake.seeded
            refund = await client.refund_bag(o1, b1)
            await client.cancel_bag(o2, b2)
        await fake.drain_webhooks()
        gate.set()
        await handler.drain()
    by_bag = {e.bag_id: e for e in events}
    assert by_bag[b1].type is WebhookEventType.ORDER_REFUNDED
    assert by_bag[b1].order_id == refund.order_id
    assert by_bag[b2].type is WebhookEventType.ORDER_CANCELLED
    assert by_bag[b2].order.bag(b2).status is BagStatus.CANCELED  # type: ignore[union-attr]
    assert all(d["status"] == 200 for d in fake.webhook_deliveries)


async def test_fake_retries_webhooks_until_2xx() -> None:
    """FakeViolet retries a failing receiver like Violet (compressed timing)."""
    calls = 0

    async def flaky(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(status=500 if calls < 3 else 200)

    app = web.Application()
    app.router.add_post("/hook", flaky)
    async with serve(app) as base, FakeViolet(orders=1, webhook_retry_delay=0.001) as fake:
        fake.register_webhook(f"{base}/hook")
        fake.register_webhook("http://127.0.0.1:1/nothing-listens")
        fake.store.commit_refund(fake.bag(*fake.seeded[0]), {"amount_refunded": 1})
        await fake.drain_webhooks()
        ok, dead = fake.webhook_deliveries
    assert (ok["attempts"], ok["status"]) == (3, 200)
    assert dead["attempts"] == 10
    assert dead["status"] == "APIConnectionError"


async def test_stop_with_late_commit_and_webhooks_leaves_no_task() -> None:
    """A late commit still pending at stop lands then, and the delivery it starts is
    ended cleanly: the ledger is final and no task is left."""
    import aiohttp

    from violet_async.testing import Fault, FaultPlan

    before = asyncio.all_tasks()
    async with FakeViolet(orders=1, faults=FaultPlan(late_commit_delay=60)) as fake:
        fake.register_webhook("http://127.0.0.1:9/nobody")
        order_id, bag_id = fake.seeded[0]
        fake.script("refund", Fault.LATE_COMMIT, bag_id=bag_id)
        headers = {
            "X-Violet-App-Id": str(fake.app_id),
            "X-Violet-App-Secret": fake.app_secret,
            "X-Violet-Token": fake.issue_token(),
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{fake.base_url}/orders/{order_id}/bags/{bag_id}/refunds",
                headers=headers,
                data=b'{"amount_refunded": 1}',
            ) as response,
        ):
            assert response.status == 504
        assert fake.ledger.total_refunds == 0  # still pending
    assert fake.ledger.total_refunds == 1
    assert len(fake.webhook_deliveries) == 1
    assert {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()} == set()
