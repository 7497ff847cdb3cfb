"""Client lifecycle, options, configuration and secret hygiene, on FakeViolet."""

from __future__ import annotations

import aiohttp
import pytest

from violet_async import (
    BagStatus,
    ClientClosedError,
    Environment,
    NotFoundError,
    RequestValidationError,
    RetryPolicy,
    Timeouts,
    VioletClient,
)
from violet_async.testing import FakeClock, FakeViolet

from .conftest import make_client


async def test_refund_and_cancel_against_fake(client: VioletClient, fake: FakeViolet) -> None:
    """A full refund moves the bag to REFUNDED; a cancel to CANCELED; both typed."""
    (o1, b1), (o2, b2) = fake.seeded[:2]
    refund = await client.refund_bag(o1, b1)
    assert refund.amount == fake.bag(o1, b1).total
    assert fake.bag(o1, b1).status == BagStatus.REFUNDED
    cancel = await client.cancel_bag(o2, b2, reason="Out of stock")
    assert cancel.amount == fake.bag(o2, b2).total
    assert fake.bag(o2, b2).status == BagStatus.CANCELED
    assert [r.id for r in await client.list_bag_refunds(o1, b1)] == [refund.id]


async def test_cancellation_body_variant_end_to_end(clock: FakeClock) -> None:
    """Against a server answering 202 cancellation bodies, cancel returns the refund."""
    async with FakeViolet(orders=1, cancel_response="cancellation") as fake:
        async with make_client(fake, clock) as client:
            (o, b) = fake.seeded[0]
            refund = await client.cancel_bag(o, b)
            assert refund.bag_id == b


async def test_unknown_bag_is_not_found(client: VioletClient, fake: FakeViolet) -> None:
    """An unknown bag gives NotFoundError with Violet's body."""
    order_id, _ = fake.seeded[0]
    with pytest.raises(NotFoundError) as info:
        await client.refund_bag(order_id, 999_999)
    assert info.value.error_code == 4041


async def test_own_session_is_closed_and_client_refuses_reuse(
    fake: FakeViolet, clock: FakeClock
) -> None:
    """The client's own session closes on exit; a closed client raises a clear error."""
    client = make_client(fake, clock)
    async with client:
        await client.list_bag_refunds(*fake.seeded[0])
    assert client.closed
    with pytest.raises(ClientClosedError, match="closed"):
        await client.list_bag_refunds(*fake.seeded[0])
    await client.aclose()  # idempotent


async def test_callers_session_is_never_closed(fake: FakeViolet, clock: FakeClock) -> None:
    """A caller-supplied aiohttp session stays open after the client closes."""
    async with aiohttp.ClientSession() as session:
        async with make_client(fake, clock, session=session) as client:
            await client.list_bag_refunds(*fake.seeded[0])
        assert not session.closed
        async with session.get(fake.base_url + "/orders/1") as response:
            assert response.status == 401


async def test_callers_closed_session_is_a_clear_error(fake: FakeViolet, clock: FakeClock) -> None:
    """A caller session closed under the client raises ClientClosedError."""
    session = aiohttp.ClientSession()
    await session.close()
    client = make_client(fake, clock, session=session, token=fake.issue_token())
    with pytest.raises(ClientClosedError):
        await client.list_bag_refunds(*fake.seeded[0])


async def test_client_works_without_context_manager(fake: FakeViolet, clock: FakeClock) -> None:
    """Without `async with`, the session is made on first use and closed by aclose()."""
    client = make_client(fake, clock)
    try:
        assert await client.list_bag_refunds(*fake.seeded[0]) == []
    finally:
        await client.aclose()


async def test_with_options_shares_pool_and_lifecycle(fake: FakeViolet, clock: FakeClock) -> None:
    """with_options gives other settings over the same session; closing the parent
    closes the child."""
    async with make_client(fake, clock) as client:
        fast = client.with_options(retry=RetryPolicy(max_attempts=2), timeouts=Timeouts(read=5))
        assert fast is not client
        assert fast._retry.max_attempts == 2
        assert fast._timeouts.read == 5
        assert client._retry.max_attempts != 2
        assert fast._shared is client._shared
        await fast.list_bag_refunds(*fake.seeded[0])
    assert fast.closed


def test_constructor_validates_its_arguments() -> None:
    """Bad configuration raises RequestValidationError naming the argument."""
    with pytest.raises(RequestValidationError, match="app_id"):
        VioletClient(0, "s", token="t")
    with pytest.raises(RequestValidationError, match="app_secret"):
        VioletClient(1, "", token="t")
    with pytest.raises(RequestValidationError, match="token"):
        VioletClient(1, "s")
    with pytest.raises(RequestValidationError, match="base_url"):
        VioletClient(1, "s", token="t", base_url="ftp://x")
    for url in ("https://api.violet.io/v1?debug=1", "https://api.violet.io/v1#x"):
        with pytest.raises(RequestValidationError, match=r"base_url.*query or fragment"):
            VioletClient(1, "s", token="t", base_url=url)
    with pytest.raises(RequestValidationError, match="environment"):
        VioletClient(1, "s", token="t", environment="sandbox")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://api.violet.io/v1", False),
        ("http://10.0.0.5:8080/v1", False),
        ("http://127.0.0.1:8080/v1", True),
        ("http://localhost:8080/v1", True),
        ("http://[::1]:8080/v1", True),
        ("https://api.violet.io/v1", True),
    ],
)
def test_plain_http_only_to_loopback(url: str, allowed: bool) -> None:
    """http:// is refused unless loopback or explicitly opted in."""
    if allowed:
        assert VioletClient(1, "s", token="t", base_url=url).base_url == url.rstrip("/")
    else:
        with pytest.raises(RequestValidationError, match="clear text"):
            VioletClient(1, "s", token="t", base_url=url)
        VioletClient(1, "s", token="t", base_url=url, allow_insecure_http=True)


def test_environments_pick_the_documented_hosts() -> None:
    """SANDBOX and PRODUCTION map to Violet's hosts."""
    assert VioletClient(1, "s", token="t").base_url == "https://sandbox-api.violet.io/v1"
    production = VioletClient(1, "s", token="t", environment=Environment.PRODUCTION)
    assert production.base_url == "https://api.violet.io/v1"


def test_from_env_reads_every_variable() -> None:
    """from_env builds the client from VIOLET_* variables."""
    client = VioletClient.from_env(
        {
            "VIOLET_APP_ID": "42",
            "VIOLET_APP_SECRET": "sec",
            "VIOLET_USERNAME": "u",
            "VIOLET_PASSWORD": "p",
            "VIOLET_ENV": "production",
        }
    )
    assert client.base_url == Environment.PRODUCTION.value
    assert client._shared.credentials.app_id == 42
    local = VioletClient.from_env(
        {
            "VIOLET_APP_ID": "42",
            "VIOLET_APP_SECRET": "sec",
            "VIOLET_TOKEN": "t",
            "VIOLET_BASE_URL": "http://127.0.0.1:9/v1",
        }
    )
    assert local.base_url == "http://127.0.0.1:9/v1"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({}, "VIOLET_APP_ID"),
        ({"VIOLET_APP_ID": "x1", "VIOLET_APP_SECRET": "s"}, "VIOLET_APP_ID"),
        ({"VIOLET_APP_ID": "1"}, "VIOLET_APP_SECRET"),
        (
            {
                "VIOLET_APP_ID": "1",
                "VIOLET_APP_SECRET": "s",
                "VIOLET_TOKEN": "t",
                "VIOLET_ENV": "staging",
            },
            "VIOLET_ENV",
        ),
    ],
)
def test_from_env_names_the_bad_variable(env: dict[str, str], name: str) -> None:
    """A missing or malformed variable is named in the error."""
    with pytest.raises(RequestValidationError) as info:
        VioletClient.from_env(env)
    assert info.value.field == name


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (None, False),
        ("", False),
        ("1", True),
        (" TRUE ", True),
        ("on", True),
        ("off", False),
        ("0", False),
    ],
)
def test_from_env_reads_keep_cancelled_sends(value: str | None, kept: bool) -> None:
    """VIOLET_KEEP_CANCELLED_SENDS turns the kept late answer on; unset, it stays off."""
    env = {"VIOLET_APP_ID": "42", "VIOLET_APP_SECRET": "sec", "VIOLET_TOKEN": "t"}
    if value is not None:
        env["VIOLET_KEEP_CANCELLED_SENDS"] = value
    client = VioletClient.from_env(env)
    assert client._shared.keep_cancelled_sends is kept
    # A keyword argument wins over the variable.
    assert VioletClient.from_env(
        env, keep_cancelled_sends=not kept
    )._shared.keep_cancelled_sends is (not kept)


@pytest.mark.parametrize("value", ["maybe", "2", "tru", "yes please", "\u0131"])
def test_from_env_refuses_an_unknown_keep_cancelled_sends(value: str) -> None:
    """A spelling it does not know is refused, naming the variable, never guessed."""
    env = {"VIOLET_APP_ID": "42", "VIOLET_APP_SECRET": "sec", "VIOLET_TOKEN": "t"}
    with pytest.raises(RequestValidationError) as info:
        VioletClient.from_env({**env, "VIOLET_KEEP_CANCELLED_SENDS": value})
    assert info.value.field == "VIOLET_KEEP_CANCELLED_SENDS"


def test_repr_never_shows_secrets() -> None:
    """Client, credentials and auth reprs hold no secret."""
    client = VioletClient(
        7,
        "APP-SECRET-X",
        username="u",
        password="PASSWORD-X",
        token="TOKEN-X",
        refresh_token="REFRESH-X",
    )
    texts = [repr(client), str(client), repr(client._shared.credentials), repr(client._shared.auth)]
    for text in texts:
        for secret in ("APP-SECRET-X", "PASSWORD-X", "TOKEN-X", "REFRESH-X"):
            assert secret not in text
