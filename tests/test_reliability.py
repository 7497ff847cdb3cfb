"""Payments-grade reliability: malformed input both ways, hostile servers, secrets,
and resources left behind."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aioresponses import aioresponses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from violet_async import (
    AmbiguousOutcomeError,
    APIError,
    APITimeoutError,
    BadRequestError,
    CancellationFailedError,
    RefundFailedError,
    ResponseFormatError,
    RetryPolicy,
    Timeouts,
    VioletClient,
)
from violet_async._batch_cli import BatchOptions, run_file
from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan

from .conftest import make_client, serve

BASE = "https://fuzz.test/v1"
TYPED = (
    ResponseFormatError,
    APIError,
    CancellationFailedError,
    RefundFailedError,
    AmbiguousOutcomeError,
)

json_values = st.recursive(
    # orjson writes at most 64-bit integers; larger ones are a literal body below.
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.sampled_from(["PROCESSING", "CANCELED", "CANCELLATION_FAILURE"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "amount",
                    "order_id",
                    "status",
                    "skus",
                    "content",
                    "bags",
                    "cancelled_bags",
                    "bag_id",
                    "refund",
                    "merchant_id",
                    "app_id",
                    "transaction_id",
                    "gateway_transaction_id",
                    "x",
                ]
            ),
            inner,
            max_size=8,
        )
    ),
    max_leaves=20,
)
bodies = st.one_of(
    json_values.map(orjson.dumps),
    st.binary(max_size=64),  # non-UTF-8, garbage
    st.just(b""),
    st.just(b"[" * 3000 + b"]" * 3000),  # deeper than any parser allows
    st.just(b'{"amount": 123456789012345678901234567890123}'),  # beyond 64 bits
    st.just(b'{"amount": 1e400}'),
    st.just('{"reason": "\udcff"}'.encode("utf-8", "surrogatepass")),
)


@settings(
    max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(
    body=bodies,
    status=st.sampled_from([200, 202, 400, 404, 500, 503]),
    endpoint=st.sampled_from(["refund", "cancel", "list", "order"]),
)
async def test_any_body_on_any_endpoint_is_typed(body: bytes, status: int, endpoint: str) -> None:
    """Whatever comes back, every endpoint returns a model or raises a typed error:
    never KeyError, TypeError, an aiohttp or a cattrs exception."""
    refunds = f"{BASE}/orders/1/bags/2/refunds"
    policy = RetryPolicy(max_attempts=1)
    with aioresponses() as wire:
        for method, url in (
            ("POST", refunds),
            ("POST", f"{BASE}/orders/1/bags/2/cancel"),
            ("GET", refunds),
            ("GET", f"{BASE}/orders/1"),
        ):
            wire.add(url, method, status=status, body=body, repeat=True)
        async with VioletClient(
            1, "s", token="t", base_url=BASE, retry=policy, clock=FakeClock()
        ) as client:
            call = {
                "refund": lambda: client.refund_bag(1, 2),
                "cancel": lambda: client.cancel_bag(1, 2),
                "list": lambda: client.list_bag_refunds(1, 2),
                "order": lambda: client.get_order(1),
            }[endpoint]
            with contextlib.suppress(*TYPED):
                await call()


async def test_wrong_content_type_is_still_read() -> None:
    """A JSON body labelled text/plain is read by its bytes, not its label."""
    with aioresponses() as wire:
        wire.get(f"{BASE}/orders/1/bags/2/refunds", body=b"[]", content_type="text/plain")
        async with VioletClient(1, "s", token="t", base_url=BASE) as client:
            assert await client.list_bag_refunds(1, 2) == []


async def test_slow_loris_answer_respects_timeouts_and_reconciles() -> None:
    """The answer stalls after half its body: the attempt's timeout (connect + read)
    fires, the bag is read back, and the committed refund is returned; one refund in
    the ledger."""
    plan = FaultPlan(slow_body_delay=1.2)
    async with FakeViolet(orders=1, faults=plan) as fake:
        order_id, bag_id = fake.seeded[0]
        fake.script("refund", Fault.SLOW_BODY, bag_id=bag_id)
        async with make_client(
            fake,
            None,
            timeouts=Timeouts(connect=0.2, read=0.3),
            retry=RetryPolicy(deadline=3.0, settle_delay=0.05),
        ) as client:
            started = time.perf_counter()
            refund = await client.refund_bag(order_id, bag_id, amount_refunded=7)
            elapsed = time.perf_counter() - started
        assert refund.reconciled
        assert elapsed < 1.0  # the attempt's 0.5 s, not the 1.2 s stall
        assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_a_trickled_body_cannot_outlast_the_attempt() -> None:
    """A body sent a byte every 50 ms never leaves the socket idle for long, yet the
    attempt still ends at connect + read: a per-read timer would wait for the deadline."""
    stop = asyncio.Event()

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for byte in b"[" + b" " * 200 + b"]":
            if stop.is_set():
                break
            await response.write(bytes([byte]))
            await asyncio.sleep(0.05)
        return response

    app = web.Application()
    app.router.add_get("/orders/1/bags/2/refunds", trickle)
    async with serve(app) as base:
        client = VioletClient(
            1,
            "s",
            token="t",
            base_url=base,
            allow_insecure_http=True,
            timeouts=Timeouts(connect=0.1, read=0.3),
            retry=RetryPolicy.disabled(),
        )
        async with client:
            started = time.perf_counter()
            with pytest.raises(APITimeoutError) as info:
                await client.list_bag_refunds(1, 2)
            elapsed = time.perf_counter() - started
        stop.set()
    assert info.value.request_sent
    assert 0.3 <= elapsed < 1.5  # 0.4 s attempt; the trickle alone would take 10 s


async def test_deadline_cuts_a_slow_answer() -> None:
    """With a generous read timeout, the per-call deadline still ends the wait."""
    plan = FaultPlan(slow_body_delay=1.2)
    async with FakeViolet(orders=1, faults=plan) as fake:
        order_id, bag_id = fake.seeded[0]
        fake.script("refund", Fault.SLOW_BODY, bag_id=bag_id)
        fake.script("list_refunds", *[Fault.HTTP_503] * 10, bag_id=bag_id)
        policy = RetryPolicy(deadline=0.5, max_attempts=1)
        async with make_client(fake, None, retry=policy) as client:
            started = time.perf_counter()
            with pytest.raises(AmbiguousOutcomeError) as info:
                await client.refund_bag(order_id, bag_id, amount_refunded=7)
            assert time.perf_counter() - started < 1.0  # the 0.5 s deadline, not the stall
        # Its 200 status line came before the stall: an unreadable 2xx (review 20).
        assert isinstance(info.value.__cause__, (APIError, APITimeoutError, ResponseFormatError))


async def test_reset_mid_body_is_reconciled(client: VioletClient, fake: FakeViolet) -> None:
    """A connection reset halfway through the answer: read back, one refund."""
    order_id, bag_id = fake.seeded[0]
    fake.script("refund", Fault.RESET_MID_BODY, bag_id=bag_id)
    refund = await client.refund_bag(order_id, bag_id, amount_refunded=9)
    assert refund.reconciled
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_redirect_to_another_host_is_not_followed() -> None:
    """A 307 elsewhere is an error; the other host never sees the request (or secret)."""
    seen: list[dict[str, str]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response([])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", elsewhere)
    async with serve(app) as base:
        plan = FaultPlan(redirect_to=f"{base}/steal")
        async with FakeViolet(orders=1, faults=plan) as fake:
            order_id, bag_id = fake.seeded[0]
            fake.script("list_refunds", Fault.REDIRECT, bag_id=bag_id)
            async with make_client(fake, FakeClock()) as client:
                with pytest.raises(APIError) as info:
                    await client.list_bag_refunds(order_id, bag_id)
            assert info.value.status == 307
    assert seen == []


async def test_no_secret_anywhere_through_a_full_cycle(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Login, refresh, refunds, failures, an ambiguous refund and the batch CLI, all
    loggers at DEBUG: no secret in logs, reprs, error texts, journal, results or CLI
    output."""
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    async with FakeViolet(orders=6) as fake:
        async with make_client(fake, FakeClock(), refresh_margin=0.0) as client:
            order_id, bag_id = fake.seeded[0]
            await client.refund_bag(order_id, bag_id, amount_refunded=5)
            fake.expire_tokens()  # forces the 401 -> refresh path
            fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
            texts.append(repr(await client.refund_bag(order_id, bag_id, amount_refunded=6)))
            for bad in (
                lambda: client.refund_bag(order_id, bag_id, amount_refunded=10**9),
                lambda: client.cancel_bag(order_id, 999),
            ):
                with pytest.raises(APIError) as info:
                    await bad()
                texts += [str(info.value), repr(info.value), repr(info.value.headers)]
            texts.append(repr(client))
        for key, value in {
            "VIOLET_APP_ID": str(fake.app_id),
            "VIOLET_APP_SECRET": fake.app_secret,
            "VIOLET_USERNAME": fake.username,
            "VIOLET_PASSWORD": fake.password,
            "VIOLET_BASE_URL": fake.base_url,
        }.items():
            monkeypatch.setenv(key, value)
        rows = tmp_path / "in.csv"
        rows.write_text(
            "order_id,bag_id,amount_refunded\n"
            + "".join(f"{o},{b},full\n" for o, b in fake.seeded[1:])
        )
        out, err = io.StringIO(), io.StringIO()
        code = await run_file(
            "refund", rows, BatchOptions(output=tmp_path / "out.jsonl"), out=out, err=err
        )
        assert code == 0
        secrets = [fake.app_secret, fake.password, *fake._tokens, *fake._refresh_tokens]
    texts += [caplog.text, out.getvalue(), err.getvalue()]
    texts += [p.read_text() for p in sorted(tmp_path.iterdir())]  # noqa: ASYNC240 - test
    assert len(secrets) >= 4
    for secret in secrets:
        for text in texts:
            assert secret not in text


def _client_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Tasks started since ``before`` that are still alive (the test's own excluded)."""
    return {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()}


def _acquired(client: VioletClient) -> int:
    session = client._shared.transport._session
    assert session is not None
    connector = session.connector
    assert connector is not None
    return len(connector._acquired)  # type: ignore[attr-defined]


@pytest.mark.parametrize("keep", [False, True])
async def test_cancelled_caller_leaves_nothing_behind(keep: bool) -> None:
    """Cancelling callers mid-request releases every connection and leaves no task; with
    ``keep_cancelled_sends``, once the answers of the POSTs that had left (awaited apart
    from the cancelled calls, within their own timeouts) have come in."""
    before = asyncio.all_tasks()
    async with FakeViolet(orders=10, faults=FaultPlan(latency=(0.2, 0.2))) as fake:
        async with make_client(fake, FakeClock(), keep_cancelled_sends=keep) as client:
            await client.list_bag_refunds(*fake.seeded[0])  # logs in, warms the pool
            calls = [
                asyncio.create_task(client.refund_bag(o, b, amount_refunded=1))
                for o, b in fake.seeded
            ]
            await asyncio.sleep(0.05)
            for call in calls:
                call.cancel()
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 0.1)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            if keep:
                await asyncio.wait_for(asyncio.gather(*client._shared.late_answers), 5.0)
            else:
                assert not client._shared.late_answers
            assert _acquired(client) == 0
    assert _client_tasks(before) == set()


async def test_failed_retries_and_reconciliation_leave_nothing_behind() -> None:
    """After exhausted retries and a reconciled ambiguous refund: no connection held,
    no task pending, the session closed."""
    before = asyncio.all_tasks()
    async with FakeViolet(orders=3) as fake:
        client = make_client(fake, FakeClock(), retry=RetryPolicy(max_attempts=2))
        async with client:
            (o1, b1), (o2, b2) = fake.seeded[:2]
            fake.script("list_refunds", *[Fault.HTTP_503] * 3, bag_id=b1)
            with pytest.raises(APIError):
                await client.list_bag_refunds(o1, b1)
            fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=b2)
            assert (await client.refund_bag(o2, b2, amount_refunded=3)).reconciled
            with pytest.raises(BadRequestError):
                await client.refund_bag(o2, b2, amount_refunded=10**9)
            assert _acquired(client) == 0
        session = client._shared.transport._session
        assert session is not None
        assert session.closed
    assert _client_tasks(before) == set()


async def test_webhook_sender_and_batch_leave_no_tasks(tmp_path: Path) -> None:
    """A batch with a journal, and FakeViolet's webhook deliveries, finish cleanly."""
    from violet_async.batch import BatchItem, run_batch

    before = asyncio.all_tasks()
    async with FakeViolet(orders=5) as fake:
        fake.register_webhook("http://127.0.0.1:9/nobody")  # deliveries fail, then stop
        async with make_client(fake, FakeClock()) as client:
            items = [BatchItem.refund(n, o, b) for n, (o, b) in enumerate(fake.seeded, 1)]
            results = [r async for r in run_batch(client, items, journal=tmp_path / "j")]
        assert len(results) == 5
    assert _client_tasks(before) == set()


async def test_aiohttp_session_from_caller_survives_cancellations() -> None:
    """A caller's session is usable after cancelled calls and is never closed by us."""
    async with FakeViolet(orders=2, faults=FaultPlan(latency=(0.1, 0.1))) as fake:
        async with aiohttp.ClientSession() as session:
            async with make_client(fake, FakeClock(), session=session) as client:
                task = asyncio.create_task(client.list_bag_refunds(*fake.seeded[0]))
                await asyncio.sleep(0.02)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert await client.list_bag_refunds(*fake.seeded[1]) == []
            assert not session.closed
