"""Login, expiry, single-flight refresh and secret hygiene, on FakeViolet."""

from __future__ import annotations

import asyncio
import base64
import logging

import orjson
import pytest

from violet_async import AuthenticationError, BadRequestError, ServerError, VioletClient
from violet_async._auth import jwt_expiry
from violet_async.testing import FakeClock, FakeViolet, Fault

from .conftest import make_client


def _jwt(claims: object) -> str:
    payload = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{payload}.sig"


def test_jwt_expiry_reads_exp() -> None:
    """exp is read from the payload; anything unreadable is None."""
    assert jwt_expiry(_jwt({"exp": 1700000000})) == 1700000000.0
    assert jwt_expiry(_jwt({"exp": 1.5})) == 1.5
    for bad in (
        "not-a-jwt",
        "a.!!!.c",
        _jwt({"sub": 1}),
        _jwt({"exp": "soon"}),
        _jwt({"exp": True}),
        _jwt([1]),
    ):
        assert jwt_expiry(bad) is None


async def test_login_is_lazy_and_happens_once(fake: FakeViolet, clock: FakeClock) -> None:
    """No login at construction; one login for many calls."""
    client = make_client(fake, clock)
    assert fake.ledger.logins == 0
    async with client:
        for order_id, bag_id in fake.seeded[:3]:
            await client.list_bag_refunds(order_id, bag_id)
    assert fake.ledger.logins == 1


async def test_wrong_password_is_authentication_error_without_retry(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """Wrong credentials: AuthenticationError, one login attempt, no secret in it."""
    async with make_client(fake, clock, password="wrong-password-123") as client:
        with pytest.raises(AuthenticationError) as info:
            await client.list_bag_refunds(*fake.seeded[0])
    assert fake.ledger.requests["login"] == 1
    assert "wrong-password-123" not in str(info.value)
    assert "wrong-password-123" not in repr(info.value)


async def test_wrong_app_secret_is_authentication_error(fake: FakeViolet) -> None:
    """A wrong app secret is refused with 401."""
    async with VioletClient(
        fake.app_id, "nope", token=fake.issue_token(), base_url=fake.base_url
    ) as client:
        with pytest.raises(AuthenticationError):
            await client.list_bag_refunds(*fake.seeded[0])


async def test_proactive_refresh_before_expiry(clock: FakeClock) -> None:
    """A token inside the refresh margin is refreshed before the call, not after a 401."""
    async with FakeViolet(orders=1, token_lifetime=2.0) as fake:
        async with make_client(fake, clock, refresh_margin=1.0) as client:
            await client.list_bag_refunds(*fake.seeded[0])
            await asyncio.sleep(1.1)
            await client.list_bag_refunds(*fake.seeded[0])
        assert (fake.ledger.logins, fake.ledger.refreshes) == (1, 1)
        assert fake.ledger.requests["list_refunds"] == 2


async def test_expired_token_401_refreshes_once_and_repeats(clock: FakeClock) -> None:
    """A 401 'Token has expired' refreshes once and repeats the request once."""
    async with FakeViolet(orders=1) as fake:
        async with make_client(fake, clock) as client:
            await client.list_bag_refunds(*fake.seeded[0])
            fake.expire_tokens()  # the client still believes its token is fresh
            refund = await client.refund_bag(*fake.seeded[0], amount_refunded=10)
        assert refund.amount == 10
        assert fake.ledger.refreshes == 1
        assert fake.ledger.requests["refund"] == 2  # the 401, then the repeat
        assert fake.ledger.refunds_per_bag[fake.seeded[0][1]] == 1


async def test_rejected_refresh_falls_back_to_login(clock: FakeClock) -> None:
    """When the refresh token is refused, the client logs in again."""
    async with FakeViolet(orders=1, token_lifetime=0.3) as fake:
        async with make_client(fake, clock, refresh_margin=0.0) as client:
            await client.list_bag_refunds(*fake.seeded[0])
            fake._refresh_tokens.clear()
            await asyncio.sleep(0.4)
            await client.list_bag_refunds(*fake.seeded[0])
        assert fake.ledger.logins == 2


async def test_static_token_expiry_raises_with_advice(clock: FakeClock) -> None:
    """A static token with no way to renew: AuthenticationError saying what to pass."""
    async with FakeViolet(orders=1) as fake:
        token = fake.issue_token(lifetime=-1)
        async with VioletClient(
            fake.app_id, fake.app_secret, token=token, base_url=fake.base_url, clock=clock
        ) as client:
            with pytest.raises(AuthenticationError, match="refresh_token"):
                await client.list_bag_refunds(*fake.seeded[0])


async def test_static_token_with_refresh_token_renews(clock: FakeClock) -> None:
    """token= plus refresh_token= renews through GET /auth/token."""
    async with FakeViolet(orders=1) as fake:
        async with VioletClient(
            fake.app_id,
            fake.app_secret,
            token=fake.issue_token(lifetime=-1),
            refresh_token=fake.issue_refresh_token(),
            base_url=fake.base_url,
            clock=clock,
        ) as client:
            await client.list_bag_refunds(*fake.seeded[0])
        assert fake.ledger.refreshes == 1


async def test_second_401_is_not_a_retry_storm(clock: FakeClock) -> None:
    """If the renewed token is also refused, the error surfaces after one renewal."""
    async with FakeViolet(orders=1, token_lifetime=-1) as fake:
        async with make_client(fake, clock) as client:
            with pytest.raises(AuthenticationError, match="expired"):
                await client.list_bag_refunds(*fake.seeded[0])
        assert fake.ledger.logins == 1
        assert fake.ledger.refreshes == 1
        assert fake.ledger.requests["list_refunds"] == 2


async def test_login_survives_a_transient_failure(fake: FakeViolet, clock: FakeClock) -> None:
    """A 503 on login is retried like any safe failure."""
    fake.script("login", Fault.HTTP_503)
    async with make_client(fake, clock) as client:
        await client.list_bag_refunds(*fake.seeded[0])
    assert fake.ledger.requests["login"] == 2


async def test_login_server_error_is_not_authentication(fake: FakeViolet, clock: FakeClock) -> None:
    """A login failure that is not about credentials keeps its own class."""
    fake.script("login", *[Fault.HTTP_500] * 10)
    async with make_client(fake, clock) as client:
        with pytest.raises(ServerError):
            await client.refund_bag(*fake.seeded[0], amount_refunded=5)
    # The login's own retries only: the refund call around it does not multiply them,
    # and nothing was read back since no refund was ever sent.
    assert fake.ledger.requests["login"] == 4
    assert fake.ledger.requests["refund"] == 0
    assert fake.ledger.requests["list_refunds"] == 0


async def test_thousand_concurrent_calls_cause_exactly_one_refresh(clock: FakeClock) -> None:
    """1,000 calls over an expiring token: one login, then exactly one refresh."""
    async with FakeViolet(orders=5, token_lifetime=1.0) as fake:
        async with make_client(fake, clock, refresh_margin=0.5) as client:
            await client.list_bag_refunds(*fake.seeded[0])
            await asyncio.sleep(0.6)  # the token is now inside the refresh margin
            # The renewed token lives long, so however slow this machine is, one
            # renewal is the right count and any more would be a single-flight bug.
            fake.token_lifetime = 3600.0
            pairs = [fake.seeded[i % 5] for i in range(1000)]
            results = await asyncio.gather(*(client.list_bag_refunds(o, b) for o, b in pairs))
        assert len(results) == 1000
        assert (fake.ledger.logins, fake.ledger.refreshes) == (1, 1)


async def test_secrets_never_reach_logs_at_debug(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    """A login-refresh-refund-failure cycle logged at DEBUG (aiohttp included) shows no
    secret: app secret, password, tokens."""
    caplog.set_level(logging.DEBUG)
    async with FakeViolet(orders=2, token_lifetime=0.3) as fake:
        async with make_client(fake, clock, refresh_margin=0.0) as client:
            order_id, bag_id = fake.seeded[0]
            await client.refund_bag(order_id, bag_id, amount_refunded=10)
            await asyncio.sleep(0.4)
            fake.token_lifetime = 3600.0  # the refreshed token outlives a loaded machine
            fake.script("refund", Fault.DROP_AFTER_COMMIT, Fault.RATE_LIMIT)
            await client.refund_bag(order_id, bag_id, amount_refunded=11)
            with pytest.raises(BadRequestError) as info:
                await client.refund_bag(order_id, bag_id, amount_refunded=10**9)
            tokens = list(fake._tokens) + list(fake._refresh_tokens)
        # At least the one refresh after the sleep (a loaded machine may take longer than
        # the first token's 0.3 s before the first refund, and refresh once more).
        assert fake.ledger.refreshes >= 1
    texts = [caplog.text, str(info.value), repr(info.value), repr(client)]
    for secret in [fake.app_secret, fake.password, *tokens]:
        for text in texts:
            assert secret not in text
