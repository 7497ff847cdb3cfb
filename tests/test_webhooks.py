"""Webhooks: verified over the signed body only, deduplicated by claim / done / release
on the event id and the body digest, acknowledged only once handled (inline mode), and
every attack of issue B refused, against a real aiohttp.web app on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from violet_async import BagStatus
from violet_async.testing import FakeClock, FakeViolet
from violet_async.testing._webhook_sender import WebhookSender
from violet_async.webhooks import (
    DEFAULT_MAX_AGE,
    ClaimResult,
    InMemoryDedupStore,
    WebhookBusyError,
    WebhookEvent,
    WebhookEventType,
    WebhookHandler,
    WebhookPayloadError,
    WebhookReceiver,
    WebhookSignatureError,
    WebhookTooLargeError,
    sign,
    webhook_handler,
)

from .conftest import make_client, serve

SECRET = "webhook-app-secret"


def order_body(order_id: int = 11, bag_status: str = "REFUNDED", **extra: Any) -> bytes:
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
            **extra,
        }
    )


def signed_headers(body: bytes, event_id: str = "evt-1", **extra: str) -> dict[str, str]:
    try:
        order_id = str(orjson.loads(body)["id"])
    except (orjson.JSONDecodeError, TypeError, KeyError):
        order_id = "11"
    return {
        "X-Violet-Hmac": sign(body, SECRET),
        "X-Violet-Event-Id": event_id,
        "X-Violet-Order-Id": order_id,
        "X-Violet-Bag-Id": "22",
        "X-Violet-Topic": "ORDER_REFUNDED",
        **extra,
    }


# -- receiver ------------------------------------------------------------------------


async def test_receiver_accepts_a_signed_event() -> None:
    """A correctly signed body becomes a typed event whose ids come from the body."""
    body = order_body()
    event = await WebhookReceiver(SECRET).receive(signed_headers(body), body)
    assert event.type is WebhookEventType.ORDER_REFUNDED
    assert (event.event_id, event.order_id, event.bag_id) == ("evt-1", 11, 22)
    assert event.order.bags[0].status is BagStatus.REFUNDED
    assert not event.duplicate
    assert len(event.body_digest) == 64


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h, b + b" "),  # body changed
        lambda h, b: ({**h, "X-Violet-Hmac": sign(b, "other")}, b),  # wrong secret
        lambda h, b: ({k: v for k, v in h.items() if k != "X-Violet-Hmac"}, b),  # none
        lambda h, b: ({**h, "X-Violet-Hmac": "not base64!"}, b),
        lambda h, b: ({**h, "X-Violet-Hmac": "é" * 44}, b),  # non-ASCII junk
    ],
)
async def test_bad_signatures_are_refused(tamper: Any) -> None:
    """Tampered body, wrong secret, missing or junk signature: WebhookSignatureError."""
    body = order_body()
    headers, sent = tamper(signed_headers(body), body)
    with pytest.raises(WebhookSignatureError):
        await WebhookReceiver(SECRET).receive(headers, sent)


async def test_claim_done_release_cycle() -> None:
    """New -> busy while claimed -> new again after release -> duplicate after done."""
    receiver = WebhookReceiver(SECRET)
    body = order_body()
    event = await receiver.receive(signed_headers(body), body)
    with pytest.raises(WebhookBusyError):
        await receiver.receive(signed_headers(body), body)
    await receiver.release(event)
    event = await receiver.receive(signed_headers(body), body)
    await receiver.done(event)
    assert (await receiver.receive(signed_headers(body), body)).duplicate


async def test_replayed_body_under_fresh_event_id_is_duplicate() -> None:
    """A handled body under a new event id is a duplicate, and the new id's claim is not
    kept (the id alone, with another body, is still new)."""
    receiver = WebhookReceiver(SECRET)
    body = order_body()
    await receiver.done(await receiver.receive(signed_headers(body), body))
    assert (await receiver.receive(signed_headers(body, "evt-fresh"), body)).duplicate
    other = order_body(bag_status="PARTIALLY_REFUNDED")
    assert not (await receiver.receive(signed_headers(other, "evt-fresh"), other)).duplicate


async def test_unknown_event_type_is_kept() -> None:
    """An unknown topic is kept and flagged; a missing one is UNKNOWN; a body topic wins
    only when the header agrees or is absent."""
    receiver = WebhookReceiver(SECRET)
    body = order_body()
    event = receiver.parse(signed_headers(body, **{"X-Violet-Topic": "ORDER_TELEPORTED"}), body)
    assert event.type == "ORDER_TELEPORTED"
    assert not event.type.is_known
    headers = signed_headers(body)
    del headers["X-Violet-Topic"]
    assert receiver.parse(headers, body).type == "UNKNOWN"
    with_topic = order_body(topic="ORDER_CANCELLED")
    headers = signed_headers(with_topic)
    del headers["X-Violet-Topic"]
    assert receiver.parse(headers, with_topic).type is WebhookEventType.ORDER_CANCELLED


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"bags": []}', "not an order"),
    ],
)
async def test_bad_payloads_are_refused(body: bytes, match: str) -> None:
    """Signed but unreadable bodies raise WebhookPayloadError."""
    with pytest.raises(WebhookPayloadError, match=match):
        WebhookReceiver(SECRET).parse(signed_headers(body), body)


async def test_oversized_body_is_refused_before_the_signature() -> None:
    """A body over max_body raises WebhookTooLargeError (a WebhookPayloadError)."""
    body = b"x" * 101
    with pytest.raises(WebhookTooLargeError, match="exceeds"):
        WebhookReceiver(SECRET, max_body=100).parse({}, body)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Violet-Order-Id", "²"),
        ("X-Violet-Order-Id", "١٢"),
        ("X-Violet-Order-Id", "1" * 5000),
        ("X-Violet-Order-Id", "eleven"),
        ("X-Violet-Order-Id", "-11"),
        ("X-Violet-Bag-Id", "22.0"),
        ("X-Violet-Event-Id", "e" * 8192),
        ("X-Violet-Event-Id", "evt 1"),
        ("X-Violet-Event-Id", ""),
        ("X-Violet-Topic", "ORDER REFUNDED"),
    ],
)
async def test_malformed_headers_are_payload_errors(name: str, value: str) -> None:
    """Non-ASCII digits, huge or junk ids, spaced topics: WebhookPayloadError, never a
    bare ValueError."""
    body = order_body()
    with pytest.raises(WebhookPayloadError, match=name if value else "Event-Id"):
        WebhookReceiver(SECRET).parse(signed_headers(body, **{name: value}), body)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"X-Violet-Order-Id": "999999"}, order_body(5001)),
        ({"X-Violet-Bag-Id": "23"}, order_body()),
        ({"X-Violet-Topic": "ORDER_REFUNDED"}, order_body(topic="ORDER_UPDATED")),
    ],
)
async def test_headers_that_disagree_with_the_body_are_refused(
    headers: dict[str, str], body: bytes
) -> None:
    """Order id, bag id or topic headers that contradict the signed body are refused."""
    with pytest.raises(WebhookPayloadError, match="signed body"):
        WebhookReceiver(SECRET).parse({**signed_headers(body), **headers}, body)


async def test_headers_are_case_insensitive_and_repeats_refused() -> None:
    """A plain dict of lower-cased headers works; a repeated id header is refused."""
    body = order_body()
    lowered = {k.lower(): v for k, v in signed_headers(body).items()}
    assert WebhookReceiver(SECRET).parse(lowered, body).bag_id == 22
    repeated = CIMultiDict(signed_headers(body))
    repeated.add("X-Violet-Order-Id", "11")
    with pytest.raises(WebhookPayloadError, match="repeated"):
        WebhookReceiver(SECRET).parse(repeated, body)


async def test_bag_id_defaults_to_the_only_bag() -> None:
    """Without X-Violet-Bag-Id the body's only bag is the event's bag."""
    body = order_body()
    headers = signed_headers(body)
    del headers["X-Violet-Bag-Id"]
    assert WebhookReceiver(SECRET).parse(headers, body).bag_id == 22


async def test_old_event_is_refused_by_age_only_when_asked() -> None:
    """By default no real event is refused for its age (Violet does not document that an
    order's date_last_modified moves on a bag refund): a refund event on a month-old
    order is accepted. With max_age set, an order last modified over it ago is refused;
    max_age may not outlast the in-memory store's ttl."""
    modified = "2024-01-01T00:00:00Z"
    then = 1_704_067_200.0
    body = order_body(date_last_modified=modified)
    default = WebhookReceiver(SECRET, clock=lambda: then + 30 * 24 * 3600)
    assert default.max_age is None
    assert default.parse(signed_headers(body), body).order_id == 11
    receiver = WebhookReceiver(SECRET, max_age=DEFAULT_MAX_AGE, clock=lambda: then + 47 * 3600)
    assert receiver.parse(signed_headers(body), body).order_id == 11
    late = WebhookReceiver(SECRET, max_age=DEFAULT_MAX_AGE, clock=lambda: then + 49 * 3600)
    with pytest.raises(WebhookPayloadError, match="max_age"):
        late.parse(signed_headers(body), body)
    with pytest.raises(ValueError, match="max_age"):
        WebhookReceiver(SECRET, max_age=DEFAULT_MAX_AGE, dedup=InMemoryDedupStore(ttl=3600))
    assert WebhookReceiver(SECRET, dedup=InMemoryDedupStore(ttl=3600)).max_age is None
    with pytest.raises(ValueError, match="app_secret"):
        WebhookReceiver("")


# -- dedup store ---------------------------------------------------------------------


async def test_dedup_store_claims_expire_and_done_is_kept_for_ttl() -> None:
    """A claim blocks until it expires; done keys last ttl; release never undoes done."""
    now = [0.0]
    store = InMemoryDedupStore(ttl=100, max_entries=10, clock=lambda: now[0])
    assert await store.claim("k", 5) is ClaimResult.NEW
    assert await store.claim("k", 5) is ClaimResult.RUNNING
    now[0] = 6  # the claimant crashed: its claim expired
    assert await store.claim("k", 5) is ClaimResult.NEW
    await store.done("k")
    await store.release("k")
    assert await store.claim("k", 5) is ClaimResult.DONE
    now[0] = 107
    assert await store.claim("k", 5) is ClaimResult.NEW
    with pytest.raises(ValueError, match="positive"):
        InMemoryDedupStore(ttl=0)


async def test_dedup_store_is_bounded_by_bytes_not_id_length() -> None:
    """8 KB ids are kept as 16-byte digests with a float, and entries are capped."""
    store = InMemoryDedupStore(max_entries=1000)
    for n in range(2000):
        await store.done(f"{n:08d}" + "x" * 8192)
    assert len(store) == 1000
    done = store._done
    assert {type(k) for k in done} == {bytes}
    assert {len(k) for k in done} == {16}
    assert {type(v) for v in done.values()} == {float}
    assert await store.claim("00001999" + "x" * 8192, 1) is ClaimResult.DONE
    assert await store.claim("00000000" + "x" * 8192, 1) is ClaimResult.NEW  # evicted


async def test_dedup_store_full_of_live_claims_says_running() -> None:
    """When every claim slot holds a live claim a new key is RUNNING (retried later)."""
    store = InMemoryDedupStore(max_entries=2)
    assert await store.claim("a", 60) is ClaimResult.NEW
    assert await store.claim("b", 60) is ClaimResult.NEW
    assert await store.claim("c", 60) is ClaimResult.RUNNING


async def test_first_time_is_kept_for_compatibility() -> None:
    """The 0.x first_time is True exactly once per key."""
    store = InMemoryDedupStore()
    assert await store.first_time("a")
    assert not await store.first_time("a")


# -- aiohttp handler -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def hook(handler: WebhookHandler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/violet", handler.handle)
    async with serve(app) as base:
        try:
            yield f"{base}/violet"
        finally:
            await handler.aclose()


class Recorder:
    """A callback that records events and can be told to fail, stall or gate."""

    def __init__(self, fail: int = 0, stall: float = 0.0) -> None:
        self.events: list[WebhookEvent] = []
        self.fail = fail
        self.stall = stall
        self.running = 0
        self.max_running = 0
        self.gate: asyncio.Event | None = None
        self._changed = asyncio.Condition()

    async def wait_done(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.events) >= count)

    async def wait_running(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.running >= count)

    async def __call__(self, event: WebhookEvent) -> None:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        async with self._changed:
            self._changed.notify_all()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.stall:
                stall, self.stall = self.stall, 0.0
                await asyncio.sleep(stall)
            if self.fail:
                self.fail -= 1
                raise RuntimeError("database down")
            self.events.append(event)
        finally:
            self.running -= 1
            async with self._changed:
                self._changed.notify_all()


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
        return r.status, await r.json()


async def test_bad_requests_are_refused_over_http() -> None:
    """401 bad signature, 400 bad JSON / bad header, 413 oversized with Content-Length;
    none reaches the callback."""
    callback = Recorder()
    async with hook(webhook_handler(WebhookReceiver(SECRET, max_body=4096), callback)) as url:
        body = order_body()
        bad = {**signed_headers(body), "X-Violet-Hmac": sign(body, "nope")}
        assert (await post(url, body, bad))[0] == 401
        assert (await post(url, b"{", signed_headers(b"{", "evt-y")))[0] == 400
        superscript = signed_headers(body, **{"X-Violet-Order-Id": "²"})
        assert (await post(url, body, superscript))[0] == 400
        big = b"x" * 5000
        assert (await post(url, big, signed_headers(big, "evt-z")))[0] == 413
    assert callback.events == []


async def test_chunked_3_mib_body_is_413_not_401() -> None:
    """A 3 MiB chunked body (no Content-Length), streamed in 64 KiB chunks over a raw
    socket and never held whole, is refused with 413, not 401."""
    body = order_body()
    async with hook(webhook_handler(WebhookReceiver(SECRET), Recorder())) as url:
        host_port = url.split("//")[1].split("/")[0]
        host, port = host_port.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = "".join(f"{k}: {v}\r\n" for k, v in signed_headers(body).items())
        writer.write(
            f"POST /violet HTTP/1.1\r\nHost: {host_port}\r\nTransfer-Encoding: chunked\r\n"
            f"Connection: close\r\n{head}\r\n".encode()
        )
        piece = b"x" * 65536
        for _ in range(48):
            writer.write(b"10000\r\n" + piece + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        await reader.read()  # to the server's close: it has consumed the whole request
        writer.close()
        await writer.wait_closed()
    assert status == 413


async def raw_post(url: str, headers: dict[str, str], body: bytes, split: int) -> int:
    """POST over a raw socket, the body in two writes with a pause between them."""
    host_port = url.split("//")[1].split("/", maxsplit=1)[0]
    host, port = host_port.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(
        (
            f"POST /violet HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{head}\r\n"
        ).encode()
        + body[:split]
    )
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(body[split:])
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    await reader.read()  # to the server's close
    writer.close()
    await writer.wait_closed()
    return status


@pytest.mark.parametrize(("size", "split"), [(3_000, 1_400), (200_000, 100_000)])
async def test_body_in_two_tcp_pieces_is_verified_whole(size: int, split: int) -> None:
    """A signed body arriving in two TCP writes (3 KB at 1,400 B; 200 KB halves) is
    read to the end before the signature check: 200, not 401."""
    body = order_body(note="n" * size)
    body = order_body(note="n" * (size - (len(body) - size)))
    assert len(body) == size
    callback = Recorder()
    async with hook(webhook_handler(WebhookReceiver(SECRET), callback)) as url:
        assert await raw_post(url, signed_headers(body), body, split) == 200
    assert [e.event_id for e in callback.events] == ["evt-1"]


async def test_replay_with_forged_headers_is_refused_or_duplicate() -> None:
    """A captured body for order 5001 replayed as order 999999 is 400; replayed under a
    fresh event id (headers consistent) it is a 200 duplicate with no callback."""
    callback = Recorder()
    body = order_body(5001)
    async with hook(webhook_handler(WebhookReceiver(SECRET), callback)) as url:
        assert await post(url, body, signed_headers(body)) == (
            200,
            {"received": "evt-1", "duplicate": False},
        )
        forged = signed_headers(body, "evt-new", **{"X-Violet-Order-Id": "999999"})
        assert (await post(url, body, forged))[0] == 400
        status, answer = await post(url, body, signed_headers(body, "evt-new"))
        assert (status, answer["duplicate"]) == (200, True)
    assert len(callback.events) == 1


async def test_concurrent_duplicates_run_one_at_a_time() -> None:
    """2,000 replays of one body (fresh ids) while its callback is slow: one callback,
    every other delivery 503 (retry later), then a 200 duplicate once it is done."""
    callback = Recorder()
    callback.gate = asyncio.Event()
    body = order_body()
    async with hook(webhook_handler(WebhookReceiver(SECRET), callback, budget=5)) as url:
        connector = aiohttp.TCPConnector(limit=50)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def deliver(n: int) -> int:
                async with http.post(url, data=body, headers=signed_headers(body, f"e{n}")) as r:
                    return r.status

            first = asyncio.ensure_future(deliver(0))
            await callback.wait_running(1)
            statuses = await asyncio.gather(*(deliver(n) for n in range(1, 2001)))
            assert set(statuses) == {503}
            callback.gate.set()
            assert await first == 200
            assert await deliver(1) == 200
    assert (len(callback.events), callback.max_running) == (1, 1)


async def test_saturation_answers_503() -> None:
    """With max_concurrent callbacks running, a further distinct event gets 503."""
    callback = Recorder()
    callback.gate = asyncio.Event()
    handler = webhook_handler(WebhookReceiver(SECRET), callback, max_concurrent=2, budget=5)
    async with hook(handler) as url:
        running = [
            asyncio.ensure_future(post(url, b, signed_headers(b, f"e{n}")))
            for n, b in enumerate([order_body(1), order_body(2)])
        ]
        await callback.wait_running(2)
        third = order_body(3)
        status, answer = await post(url, third, signed_headers(third, "e3"))
        assert (status, answer["error"]) == (503, "too many webhooks in progress")
        callback.gate.set()
        assert [s for s, _ in await asyncio.gather(*running)] == [200, 200]
        assert (await post(url, third, signed_headers(third, "e3")))[0] == 200
    assert callback.max_running == 2


async def test_callback_failure_is_500_and_the_sender_retry_succeeds() -> None:
    """A callback that raises once answers 500; FakeViolet's retry runs it again and
    gets 200: the event is not lost."""
    callback = Recorder(fail=1)
    async with (
        hook(webhook_handler(WebhookReceiver(SECRET), callback)) as url,
        FakeViolet(orders=1, app_secret=SECRET, webhook_retry_delay=0.001) as fake,
    ):
        fake.register_webhook(url)
        fake.store.commit_refund(fake.bag(*fake.seeded[0]), {"amount_refunded": 1})
        await fake.drain_webhooks()
    [delivery] = fake.webhook_deliveries
    assert delivery["statuses"] == [500, 200]
    assert len(callback.events) == 1


async def test_callback_over_budget_is_503_then_a_later_success() -> None:
    """A callback slower than the budget answers 503 while it keeps running under its
    claim; the sender's retries get 503 until it finishes, then 200 duplicate."""
    callback = Recorder(stall=0.2)
    handler = webhook_handler(WebhookReceiver(SECRET), callback, budget=0.05)
    async with (
        hook(handler) as url,
        FakeViolet(orders=1, app_secret=SECRET, webhook_retry_delay=0.01) as fake,
    ):
        fake.register_webhook(url)
        fake.store.commit_refund(fake.bag(*fake.seeded[0]), {"amount_refunded": 1})
        await fake.drain_webhooks()
    [delivery] = fake.webhook_deliveries
    assert delivery["statuses"][0] == 503
    assert delivery["statuses"][-1] == 200
    assert set(delivery["statuses"][:-1]) == {503}
    assert len(callback.events) == 1


async def test_callback_cut_at_callback_timeout_is_released() -> None:
    """A callback still running at callback_timeout is cancelled and its claim released,
    so the next delivery runs it again."""
    callback = Recorder(stall=5)
    handler = webhook_handler(
        WebhookReceiver(SECRET, claim_ttl=1), callback, budget=0.02, callback_timeout=0.05
    )
    body = order_body()
    async with hook(handler) as url:
        assert (await post(url, body, signed_headers(body)))[0] == 503
        await handler.drain()
        assert (await post(url, body, signed_headers(body)))[0] == 200
    assert len(callback.events) == 1


async def test_dedup_store_failures_never_acknowledge_unhandled_events() -> None:
    """A dedup store that fails to claim gives 503; one that fails to mark done after a
    successful callback still gives 200 (handled; a redelivery may run it again)."""

    class Broken(InMemoryDedupStore):
        fail_claim = True

        async def claim(self, key: str, ttl: float) -> ClaimResult:
            if self.fail_claim:
                raise ConnectionError("redis down")
            return await super().claim(key, ttl)

        async def done(self, key: str) -> None:
            raise ConnectionError("redis down")

    store = Broken()
    callback = Recorder()
    body = order_body()
    async with hook(webhook_handler(WebhookReceiver(SECRET, dedup=store), callback)) as url:
        assert (await post(url, body, signed_headers(body)))[0] == 503
        store.fail_claim = False
        assert (await post(url, body, signed_headers(body)))[0] == 200
    assert len(callback.events) == 1


async def test_shutdown_cancels_and_releases_running_callbacks() -> None:
    """A callback cancelled on shutdown releases its claim (Violet will deliver again)."""
    receiver = WebhookReceiver(SECRET)
    callback = Recorder()
    callback.gate = asyncio.Event()
    handler = webhook_handler(receiver, callback, budget=0.01)
    body = order_body()
    async with hook(handler) as url:
        assert (await post(url, body, signed_headers(body)))[0] == 503
        for task in handler.tasks:
            task.cancel()
        await handler.drain()
    assert (await receiver.receive(signed_headers(body), body)).duplicate is False


async def test_handler_rejects_bad_settings() -> None:
    """Nonsense budgets, limits and a callback timeout beyond the claim are refused."""
    receiver = WebhookReceiver(SECRET)
    with pytest.raises(ValueError, match="budget"):
        webhook_handler(receiver, Recorder(), budget=0)
    with pytest.raises(ValueError, match="claim_ttl"):
        webhook_handler(receiver, Recorder(), callback_timeout=receiver.claim_ttl)
    assert webhook_handler(receiver, Recorder()).mode == "inline"


# -- FakeViolet's sender -------------------------------------------------------------


async def test_end_to_end_refund_webhook(clock: FakeClock) -> None:
    """Refund and cancel through the SDK; FakeViolet's signed webhooks are verified and
    the callback sees the same order and bag."""
    callback = Recorder()
    async with (
        hook(webhook_handler(WebhookReceiver(SECRET), callback)) as url,
        FakeViolet(orders=2, app_secret=SECRET) as fake,
    ):
        fake.register_webhook(url)
        async with make_client(fake, clock) as client:
            (o1, b1), (o2, b2) = fake.seeded
            refund = await client.refund_bag(o1, b1)
            await client.cancel_bag(o2, b2)
        await fake.drain_webhooks()
    by_bag = {e.bag_id: e for e in callback.events}
    assert by_bag[b1].type is WebhookEventType.ORDER_REFUNDED
    assert by_bag[b1].order_id == refund.order_id
    assert by_bag[b2].type is WebhookEventType.ORDER_CANCELLED
    assert by_bag[b2].order.bag(b2).status is BagStatus.CANCELED  # type: ignore[union-attr]
    assert all(d["statuses"] == [200] for d in fake.webhook_deliveries)


async def test_two_commits_on_one_bag_are_two_events() -> None:
    """Two partial refunds of one bag sign different bodies (date_last_modified), so
    the body digest does not merge them."""
    callback = Recorder()
    async with (
        hook(webhook_handler(WebhookReceiver(SECRET), callback)) as url,
        FakeViolet(orders=1, app_secret=SECRET) as fake,
    ):
        fake.register_webhook(url)
        bag = fake.bag(*fake.seeded[0])
        fake.store.commit_refund(bag, {"amount_refunded": 1})
        fake.store.commit_refund(bag, {"amount_refunded": 1})
        await fake.drain_webhooks()
    assert len({e.body_digest for e in callback.events}) == 2


async def test_fake_retries_webhooks_until_2xx() -> None:
    """FakeViolet retries a failing receiver like Violet: counts attempts, keeps every
    answer, stops at the first 2xx, gives up after 10."""
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
    assert (ok["attempts"], ok["statuses"]) == (3, [500, 500, 200])
    assert dead["attempts"] == 10
    assert dead["status"] == "APIConnectionError"


async def test_sender_sleep_is_injectable() -> None:
    """The sender's backoff goes through the injected sleep: doubling delays, none after
    the last attempt."""
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    sender = WebhookSender(SECRET, retry_delay=1.0, attempts=4, sleep=fake_sleep)
    sender.urls.append("http://127.0.0.1:1/nothing-listens")
    sender.send("ORDER_REFUNDED", 11, 22, order_body())
    await sender.drain()
    await sender.aclose()
    assert slept == [1.0, 2.0, 4.0]
    assert sender.deliveries[0]["attempts"] == 4
