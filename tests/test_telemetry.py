"""Observability: the logger tree and VIOLET_LOG, one DEBUG line per attempt, no secret
in any log line of a chaos run, OpenTelemetry spans and metrics (in-memory exporters),
request ids, and raw responses for debugging."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from violet_async import BadRequestError, RetryPolicy, VioletError, telemetry
from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan

from .conftest import ROOMY_POLICY, make_client


@pytest.fixture
def otel() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield spans, reader
    finally:
        telemetry.uninstrument()
        meter_provider.shutdown()
        tracer_provider.shutdown()


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    found: dict[str, list[Any]] = {}
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


async def test_one_debug_line_per_attempt_with_status_duration_and_request_id(
    fake: FakeViolet, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """violet_async.http logs each attempt at DEBUG: method, path, status or error,
    duration, attempt number and Violet's request id."""
    caplog.set_level(logging.DEBUG, logger="violet_async")
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock) as client:
        fake.script("refund", Fault.RATE_LIMIT, bag_id=bag_id)
        await client.refund_bag(order_id, bag_id, amount_refunded=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "violet_async.http"]
    path = f"/orders/{order_id}/bags/{bag_id}/refunds"
    assert any(line.startswith(f"POST {path} -> 429 in ") for line in lines), lines
    assert any("(attempt 1, request id req_fake_" in line for line in lines), lines
    assert any(line.startswith(f"POST {path} -> 200") and "(attempt 2," in line for line in lines)
    retry = [r for r in caplog.records if r.name == "violet_async.retry"]
    assert retry
    assert retry[0].levelno == logging.INFO
    assert retry[0].getMessage().startswith(f"POST {path} attempt 1 failed (RateLimitError)")


async def test_read_backs_and_their_verdict_are_logged(
    fake: FakeViolet, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """violet_async.reconcile says what each read-back after a failure concluded."""
    caplog.set_level(logging.INFO, logger="violet_async")
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        await client.refund_bag(order_id, bag_id, amount_refunded=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "violet_async.reconcile"]
    assert any(line.endswith(": found") for line in lines), lines
    assert all(f"bag {bag_id} (order {order_id})" in line for line in lines)


def test_violet_log_turns_logging_on_without_code(tmp_path: Any) -> None:
    """VIOLET_LOG=debug prints the SDK's lines to stderr (logger name once per line),
    with no secret among them."""
    script = tmp_path / "run.py"
    script.write_text(
        "import asyncio\n"
        "from violet_async.testing import FakeViolet\n"
        "async def main():\n"
        "    async with FakeViolet(orders=1, seed=1) as fake, fake.client() as client:\n"
        "        order_id, bag_id = fake.seeded[0]\n"
        "        await client.refund_bag(order_id, bag_id, amount_refunded=5)\n"
        "        print(fake.app_secret, fake.password, sep='\\n')\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "VIOLET_LOG": "debug", "PYTHONWARNINGS": "error"}
    done = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, str(script)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    secret, password = done.stdout.split()
    err = done.stderr
    assert " DEBUG violet_async.http POST /orders/" in err
    assert " INFO violet_async.auth logged in" in err
    assert "violet_async violet_async" not in err
    assert secret not in err
    assert password not in err


async def test_no_secret_in_any_log_line_of_a_chaos_run(caplog: pytest.LogCaptureFixture) -> None:
    """Every logger at DEBUG (aiohttp's too) through 300 calls on the chaos plan,
    token expiry included: no app secret, password or token appears."""
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    plan = FaultPlan.chaos(seed=5)
    async with FakeViolet(orders=300, seed=5, faults=plan, clock=clock) as fake:
        async with make_client(fake, clock, retry=RetryPolicy(deadline=30)) as client:
            gate = asyncio.Semaphore(16)

            async def one(index: int, order_id: int, bag_id: int) -> None:
                async with gate:
                    if index == 150:
                        fake.expire_tokens()
                    with contextlib.suppress(VioletError):
                        await client.refund_bag(order_id, bag_id, amount_refunded=100)

            await asyncio.gather(*(one(i, o, b) for i, (o, b) in enumerate(fake.seeded)))
            secrets = [fake.app_secret, fake.password, *fake._tokens, *fake._refresh_tokens]
    text = "\n".join(record.getMessage() for record in caplog.records) + caplog.text
    assert len(caplog.records) > 300
    for secret in secrets:
        assert secret not in text


async def test_spans_per_call_attempt_and_read_back(
    fake: FakeViolet,
    clock: FakeClock,
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    """One span per SDK call with ids, outcome and reconciled; child spans per HTTP
    attempt (semantic-convention attributes) and per read-back; the error type on a
    failure."""
    spans, _ = otel
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock, retry=ROOMY_POLICY) as client:
        fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=10)
        with pytest.raises(BadRequestError):
            await client.refund_bag(order_id, bag_id, amount_refunded=10**9)
    finished = spans.get_finished_spans()
    calls = [s for s in finished if s.name == "violet.refund_bag"]
    assert len(calls) == 2
    ok, failed = calls
    assert ok.attributes is not None
    assert ok.attributes["violet.bag_id"] == bag_id
    assert ok.attributes["violet.outcome"] == "reconciled"
    assert ok.attributes["violet.reconciled"] is True
    assert ok.attributes["violet.refund_id"] == refund.id
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "BadRequestError"
    children = [
        s for s in finished if s.parent is not None and s.parent.span_id == ok.context.span_id
    ]
    names = {s.name for s in children}
    assert f"POST /orders/{order_id}/bags/{bag_id}/refunds" in names
    assert "violet.read_back" in names
    attempt = next(s for s in children if s.name.startswith("POST"))
    assert attempt.attributes is not None
    assert attempt.attributes["http.request.method"] == "POST"
    assert attempt.attributes["error.type"] == "APIConnectionError"
    read_back = next(s for s in children if s.name == "violet.read_back")
    gets = [
        s
        for s in finished
        if s.parent is not None and s.parent.span_id == read_back.context.span_id
    ]
    assert gets
    assert gets[0].attributes is not None
    assert gets[0].attributes["http.response.status_code"] == 200


async def test_metrics_count_outcomes_retries_and_read_backs(
    fake: FakeViolet,
    clock: FakeClock,
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    """Counters of calls by outcome, retries by cause, read-backs by verdict and
    ambiguous outcomes, and a histogram of call duration."""
    _, reader = otel
    (o1, b1), (o2, b2) = fake.seeded[0], fake.seeded[1]
    async with make_client(fake, clock, retry=RetryPolicy(deadline=10)) as client:
        fake.script("refund", Fault.RATE_LIMIT, bag_id=b1)
        await client.refund_bag(o1, b1, amount_refunded=10)
        fake.script("refund", Fault.DROP_BEFORE_COMMIT, bag_id=b2)
        with pytest.raises(VioletError):
            await client.refund_bag(o2, b2, amount_refunded=10)
    points = metric_points(reader)
    calls = {p.attributes["violet.outcome"]: p.value for p in points["violet.calls"]}
    assert calls == {"ok": 1, "pending": 1}
    assert [p.attributes["violet.cause"] for p in points["violet.retries"]] == ["RateLimitError"]
    verdicts = {p.attributes["violet.verdict"] for p in points["violet.readbacks"]}
    assert "not yet" in verdicts or "pending" in verdicts
    assert sum(p.value for p in points["violet.ambiguous"]) == 1
    assert sum(p.count for p in points["violet.call.duration"]) == 2


async def test_request_ids_reach_refunds_and_errors(fake: FakeViolet, clock: FakeClock) -> None:
    """Violet's request id (X-Request-Id) is on the refund returned and on API errors
    (and in their message)."""
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock) as client:
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=10)
        with pytest.raises(BadRequestError) as info:
            await client.refund_bag(order_id, bag_id, amount_refunded=10**9)
    assert refund.request_id is not None
    assert refund.request_id.startswith("req_fake_")
    assert info.value.request_id is not None
    assert f"[request id {info.value.request_id}]" in str(info.value)


def test_a_body_cannot_set_the_request_id() -> None:
    """request_id is the SDK's own, never read from the body."""
    from violet_async._converter import converter
    from violet_async.models import OrderRefund

    from .samples import refund_body

    refund = converter.structure(refund_body(request_id="forged"), OrderRefund)
    assert refund.request_id is None


async def test_capture_responses_shows_raw_status_headers_and_body(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """capture_responses() hands over every raw response of the block, for debugging."""
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock) as client:
        await client.list_bag_refunds(order_id, bag_id)  # logs in outside the block
        with telemetry.capture_responses() as seen:
            refund = await client.refund_bag(order_id, bag_id, amount_refunded=10)
        await client.list_bag_refunds(order_id, bag_id)
    assert len(seen) == 1
    assert seen[0].status == 200
    assert seen[0].headers["X-Request-Id"] == refund.request_id
    assert b'"amount":10' in seen[0].body


def test_unknown_violet_log_values_leave_logging_alone() -> None:
    """VIOLET_LOG other than debug / info configures nothing."""
    logger = logging.getLogger("violet_async")
    before = (list(logger.handlers), logger.level)
    telemetry.setup_logging_from_env({"VIOLET_LOG": "loud"})
    assert (list(logger.handlers), logger.level) == before
    telemetry.setup_logging_from_env({"VIOLET_LOG": "info"})
    telemetry.setup_logging_from_env({"VIOLET_LOG": "info"})  # idempotent
    added = [h for h in logger.handlers if getattr(h, "_violet_env", False)]
    try:
        assert len(added) == 1
        assert logger.level == logging.INFO
    finally:
        for handler in added:
            logger.removeHandler(handler)
        logger.setLevel(before[1])


async def test_batch_items_are_counted(
    fake: FakeViolet,
    clock: FakeClock,
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    """The batch runner reports each item's end through the same metrics."""
    from violet_async.batch import BatchItem, run_batch
    from violet_async.models import RefundBagRequest

    _, reader = otel
    items = [
        BatchItem.refund(n, o, b, RefundBagRequest(amount_refunded=10))
        for n, (o, b) in enumerate(fake.seeded[:3], start=1)
    ]
    async with make_client(fake, clock) as client:
        results = [r async for r in run_batch(client, items)]
    assert [r.outcome for r in results] == ["succeeded"] * 3
    points = metric_points(reader)["violet.items"]
    assert [
        (p.attributes["violet.source"], p.attributes["violet.outcome"], p.value) for p in points
    ] == [("batch", "succeeded", 3)]
