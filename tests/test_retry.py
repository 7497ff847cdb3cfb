"""Retry classification and backoff: one test per row of the table, on FakeViolet's
scripted faults, with a virtual clock (no real sleeping)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from violet_async import (
    APIConnectionError,
    APITimeoutError,
    BadRequestError,
    RateLimitError,
    RetryEvent,
    RetryPolicy,
    ServerError,
    VioletClient,
    VioletError,
)
from violet_async._protocol import Cause, classify_send_failure
from violet_async._retry import Verdict, classify, parse_retry_after
from violet_async.exceptions import ResponseFormatError, api_error_from_response
from violet_async.testing import FakeClock, FakeViolet, Fault

from .conftest import ROOMY_POLICY, make_client


def _api(status: int, body: bytes = b"{}", headers: dict[str, str] | None = None) -> Exception:
    return api_error_from_response(status, body, headers or {}, method="POST", path="/p")


VIOLET_JSON = b'{"status": 500, "message": "Internal error", "error_code": 5000}'
ENVOY_503 = b"upstream connect error or disconnect/reset before headers"


@pytest.mark.parametrize(
    ("exc", "get", "post"),
    [
        (APIConnectionError("x", request_sent=False), Verdict.RETRY, Cause.NEVER_LEFT),
        (APITimeoutError("x", request_sent=False), Verdict.RETRY, Cause.NEVER_LEFT),
        (_api(429), Verdict.RETRY, Cause.RATE_LIMITED),
        (_api(408), Verdict.RETRY, Cause.REFUSED),
        (_api(400), Verdict.RAISE, Cause.REFUSED),
        (_api(401), Verdict.RAISE, Cause.REFUSED),
        (_api(404), Verdict.RAISE, Cause.REFUSED),
        (_api(409), Verdict.RAISE, Cause.REFUSED),
        (_api(422), Verdict.RAISE, Cause.REFUSED),
        (APITimeoutError("x", request_sent=True), Verdict.RETRY, Cause.NO_ANSWER),
        (APIConnectionError("x", request_sent=True), Verdict.RETRY, Cause.NO_ANSWER),
        (_api(500, VIOLET_JSON), Verdict.RETRY, Cause.ANSWERED),
        (_api(500, b"<html>oops</html>"), Verdict.RETRY, Cause.NO_ANSWER),
        (_api(599, b"<html>network read timeout</html>"), Verdict.RETRY, Cause.NO_ANSWER),
        (_api(502, b"<html>Bad Gateway</html>"), Verdict.RETRY, Cause.NO_ANSWER),
        (_api(503, ENVOY_503), Verdict.RETRY, Cause.NO_ANSWER),
        (_api(503, VIOLET_JSON), Verdict.RETRY, Cause.ANSWERED),
        (_api(504, b""), Verdict.RETRY, Cause.NO_ANSWER),
        (_api(524, b"<html>A timeout occurred</html>"), Verdict.RETRY, Cause.NO_ANSWER),
        (_api(504, VIOLET_JSON), Verdict.RETRY, Cause.ANSWERED),
        # A 2xx read that cannot be parsed is not weather: asking again gets the same.
        # For a refund or cancel POST it proves the request applied: read back, never sent.
        (ResponseFormatError("x", body=b"{", status=200), Verdict.RAISE, Cause.APPLIED),
        (ResponseFormatError("x", body=b"{", status=400), Verdict.RAISE, Cause.NO_ANSWER),
    ],
)
def test_classification_table(exc: VioletError, get: Verdict, post: Cause) -> None:
    """The tables in _retry's and _protocol's docstrings and README, row by row."""
    assert classify(exc) is get
    assert classify_send_failure(exc) is post


def test_only_sdk_errors_are_retried() -> None:
    """Anything that is not an SDK error is raised, never retried."""
    assert classify(ValueError("not ours")) is Verdict.RAISE


def test_retry_after_parses_seconds_and_http_dates() -> None:
    """Retry-After as delta-seconds or HTTP date; junk is ignored."""
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    later = format_datetime(now + timedelta(seconds=7), usegmt=True)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(later, now=now.timestamp()) == pytest.approx(7.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("-5") == 0.0
    for junk in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(junk) is None


def test_backoff_is_capped_full_jitter() -> None:
    """Backoff is uniform in [0, min(max, initial * 2**(n-1))]."""
    policy = RetryPolicy(initial_delay=1.0, max_delay=5.0)
    for n in range(1, 8):
        for _ in range(50):
            assert 0 <= policy.backoff(n) <= min(5.0, 2.0 ** (n - 1))
    fixed = RetryPolicy(initial_delay=1.0, max_delay=5.0, jitter=False)
    assert [fixed.backoff(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]


def test_disabled_policy_sends_once() -> None:
    """RetryPolicy.disabled() allows one send."""
    assert RetryPolicy.disabled().max_attempts == 1


async def test_happy_path_never_builds_a_tenacity_loop(
    client: VioletClient, fake: FakeViolet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first-try success does not construct AsyncRetrying at all."""
    import violet_async._retry as retry_module

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("tenacity entered on the happy path")

    monkeypatch.setattr(retry_module, "AsyncRetrying", forbidden)
    await client.refund_bag(*fake.seeded[0], amount_refunded=100)
    await client.list_bag_refunds(*fake.seeded[0])


@pytest.mark.parametrize(
    "fault",
    [
        Fault.HTTP_503,
        Fault.RATE_LIMIT,
        Fault.RATE_LIMIT_NO_HEADER,
        Fault.DROP_BEFORE_COMMIT,
        Fault.HTML_502,
        Fault.HTTP_500,
        Fault.HTTP_504,
    ],
)
async def test_get_retries_every_transient_failure(
    client: VioletClient, fake: FakeViolet, clock: FakeClock, fault: Fault
) -> None:
    """GET refunds retries 5xx, 429, and dropped connections, then succeeds."""
    order_id, bag_id = fake.seeded[0]
    fake.script("list_refunds", fault, fault, bag_id=bag_id)
    assert await client.list_bag_refunds(order_id, bag_id) == []
    assert fake.ledger.requests["list_refunds"] == 3
    # aiohttp itself re-sends an idempotent GET once when a reused keep-alive
    # connection drops before the answer, so a drop may cost one backoff fewer.
    expected_sleeps = {1, 2} if fault is Fault.DROP_BEFORE_COMMIT else {2}
    assert len(clock.sleeps) in expected_sleeps


@pytest.mark.parametrize("fault", [Fault.RATE_LIMIT, Fault.RATE_LIMIT_NO_HEADER])
async def test_refund_retries_safe_statuses_without_read_back(
    client: VioletClient, fake: FakeViolet, fault: Fault
) -> None:
    """A 429 is answered before processing: re-sent with no read-back of whether it
    applied (one read of what the bag holds, before the re-send), one refund."""
    order_id, bag_id = fake.seeded[0]
    fake.script("refund", fault, bag_id=bag_id)
    refund = await client.refund_bag(order_id, bag_id, amount_refunded=100)
    assert not refund.reconciled
    assert fake.ledger.requests["refund"] == 2
    assert fake.ledger.requests["list_refunds"] == 1
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_connection_refused_is_retried(clock: FakeClock) -> None:
    """Connect refused never reached a server: retried up to max_attempts, then raised."""
    async with FakeViolet() as fake:
        url = fake.base_url
    client = VioletClient(
        1,
        "s",
        token="t",
        base_url=url,
        clock=clock,
        retry=RetryPolicy(max_attempts=3, initial_delay=0.1),
    )
    async with client:
        with pytest.raises(APIConnectionError) as info:
            await client.refund_bag(5, 6, amount_refunded=1)
    assert info.value.request_sent is False
    assert len(clock.sleeps) == 2


async def test_bad_request_is_sent_once(client: VioletClient, fake: FakeViolet) -> None:
    """A 400 (refund beyond what is left) is never retried."""
    order_id, bag_id = fake.seeded[0]
    with pytest.raises(BadRequestError) as info:
        await client.refund_bag(order_id, bag_id, amount_refunded=10**9)
    assert info.value.error_code == 4006
    assert fake.ledger.requests["refund"] == 1


async def test_retry_after_one_second_waits_one_second(
    client: VioletClient, fake: FakeViolet, clock: FakeClock
) -> None:
    """`Retry-After: 1` is honoured exactly, by the virtual clock."""
    order_id, bag_id = fake.seeded[0]
    fake.script("list_refunds", Fault.RATE_LIMIT, bag_id=bag_id)
    await client.list_bag_refunds(order_id, bag_id)
    assert clock.sleeps == [1.0]


async def test_retry_after_is_capped(fake: FakeViolet, clock: FakeClock) -> None:
    """A Retry-After longer than max_retry_after waits the cap."""
    order_id, bag_id = fake.seeded[0]
    policy = RetryPolicy(max_retry_after=0.25)
    async with make_client(fake, clock, retry=policy) as client:
        fake.script("list_refunds", Fault.RATE_LIMIT, bag_id=bag_id)
        await client.list_bag_refunds(order_id, bag_id)
    assert clock.sleeps == [0.25]


async def test_attempts_are_bounded(fake: FakeViolet, clock: FakeClock) -> None:
    """After max_attempts transient failures the last error is raised."""
    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock, retry=RetryPolicy(max_attempts=3)) as client:
        fake.script("list_refunds", *[Fault.HTTP_503] * 5, bag_id=bag_id)
        with pytest.raises(ServerError):
            await client.list_bag_refunds(order_id, bag_id)
    assert fake.ledger.requests["list_refunds"] == 3


async def test_deadline_is_respected(fake: FakeViolet, clock: FakeClock) -> None:
    """No wait is started that would end past the call's deadline."""
    order_id, bag_id = fake.seeded[0]
    policy = RetryPolicy(
        max_attempts=50, initial_delay=1.0, max_delay=1.0, jitter=False, deadline=3.5
    )
    async with make_client(fake, clock, retry=policy) as client:
        fake.script("list_refunds", *[Fault.RATE_LIMIT_NO_HEADER] * 50, bag_id=bag_id)
        with pytest.raises(RateLimitError):
            await client.list_bag_refunds(order_id, bag_id)
    assert clock.slept <= 3.5
    assert clock.sleeps == [1.0, 1.0, 1.0]


async def test_deadline_shrinks_the_attempt_timeout(fake: FakeViolet) -> None:
    """A slow server cannot hold a call past its deadline (real clock, 0.3 s)."""
    from violet_async.testing import FaultPlan

    slow = FakeViolet(orders=1, faults=FaultPlan(latency=(2.0, 2.0)))
    async with (
        slow,
        VioletClient(
            slow.app_id,
            slow.app_secret,
            token=slow.issue_token(),
            base_url=slow.base_url,
            retry=RetryPolicy(deadline=0.3, max_attempts=1),
        ) as client,
    ):
        with pytest.raises(APITimeoutError):
            await client.list_bag_refunds(*slow.seeded[0])


async def test_on_retry_hook_and_log(
    fake: FakeViolet, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """on_retry gets attempt, delay, cause, method, path; an INFO line is logged."""
    events: list[RetryEvent] = []

    async def hook(event: RetryEvent) -> None:
        events.append(event)

    order_id, bag_id = fake.seeded[0]
    caplog.set_level(logging.INFO, logger="violet_async")
    async with make_client(fake, clock, on_retry=hook, retry=ROOMY_POLICY) as client:
        fake.script("refund", Fault.RATE_LIMIT, bag_id=bag_id)
        fake.script("refund", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
        await client.refund_bag(order_id, bag_id, amount_refunded=10)
    (first, second) = events
    assert (first.attempt, first.method, first.read_back) == (1, "POST", False)
    assert isinstance(first.cause, RateLimitError)
    assert first.path == f"/orders/{order_id}/bags/{bag_id}/refunds"
    assert second.attempt == 2
    assert second.read_back is True  # the drop was ambiguous: read back, then re-sent
    assert "retrying" in caplog.text
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_a_failing_on_retry_hook_does_not_change_the_outcome(
    fake: FakeViolet, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises is logged; the refund still completes exactly once."""

    def broken(event: RetryEvent) -> None:
        raise RuntimeError("hook bug")

    order_id, bag_id = fake.seeded[0]
    async with make_client(fake, clock, on_retry=broken, retry=ROOMY_POLICY) as client:
        fake.script("refund", Fault.DROP_BEFORE_COMMIT, bag_id=bag_id)
        refund = await client.refund_bag(order_id, bag_id, amount_refunded=10)
    assert refund.amount == 10
    assert fake.ledger.refunds_per_bag[bag_id] == 1
    assert "on_retry hook raised" in caplog.text
