"""``proxy=`` through a real forwarding proxy on 127.0.0.1 (a few lines of aiohttp.web),
and the per-call ``timeout=`` / ``extra_headers=`` and ``app_info=`` options."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from violet_async import (
    APIConnectionError,
    APITimeoutError,
    RequestValidationError,
    RetryPolicy,
    Timeouts,
    VioletClient,
)
from violet_async.testing import FakeViolet

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authorization", "transfer-encoding", "host"}


class ForwardingProxy:
    """An HTTP forward proxy: takes absolute-form requests (``POST http://host/path``),
    records them, and forwards them to their target."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = dict(request.headers)
        self.seen.append((request.method, str(request.url), headers))
        forwarded = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method,
                request.url,
                headers=forwarded,
                data=await request.read(),
                allow_redirects=False,
            ) as upstream,
        ):
            body = await upstream.read()
            answer = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            answer.pop("Content-Length", None)
            return web.Response(status=upstream.status, body=body, headers=answer)


@asynccontextmanager
async def forwarding_proxy() -> AsyncIterator[ForwardingProxy]:
    proxy = ForwardingProxy()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    proxy.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield proxy
    finally:
        await runner.cleanup()


def client_for(fake: FakeViolet, **options: Any) -> VioletClient:
    return VioletClient(
        fake.app_id,
        fake.app_secret,
        username=fake.username,
        password=fake.password,
        base_url=fake.base_url,
        **options,
    )


async def test_every_request_goes_through_the_proxy_with_its_credentials() -> None:
    async with FakeViolet(orders=2, seed=1) as fake, forwarding_proxy() as proxy:
        (o, b), _ = fake.seeded
        with_auth = proxy.url.replace("http://", "http://ops:s3cret-proxy@")
        async with client_for(fake, proxy=with_auth) as client:
            refund = await client.refund_bag(o, b, amount_refunded=300)
            listed = await client.list_bag_refunds(o, b)
        assert [r.id for r in listed] == [refund.id]
        assert fake.ledger.refunds_per_bag[b] == 1
        methods = [(m, url.split("/v1", 1)[1]) for m, url, _ in proxy.seen]
        assert methods == [
            ("POST", "/login"),
            ("POST", f"/orders/{o}/bags/{b}/refunds"),
            ("GET", f"/orders/{o}/bags/{b}/refunds"),
        ]
        expected = "Basic " + base64.b64encode(b"ops:s3cret-proxy").decode()
        assert all(h.get("Proxy-Authorization") == expected for _, _, h in proxy.seen)
        assert all(url.startswith(fake.base_url) for _, url, _ in proxy.seen)


async def test_without_proxy_nothing_goes_through_it() -> None:
    """No proxy unless asked: not even HTTP(S)_PROXY from the environment."""
    async with FakeViolet(orders=1, seed=1) as fake, forwarding_proxy() as proxy:
        (o, b) = fake.seeded[0]
        with pytest.MonkeyPatch.context() as env:
            env.setenv("HTTP_PROXY", proxy.url)
            env.setenv("HTTPS_PROXY", proxy.url)
            async with client_for(fake) as client:
                await client.refund_bag(o, b, amount_refunded=100)
        assert proxy.seen == []
        assert fake.ledger.refunds_per_bag[b] == 1


async def test_an_unreachable_proxy_is_a_connection_error_that_never_left() -> None:
    """A proxy that refuses: nothing reached Violet, the error says it was not sent,
    and the proxy's password is nowhere in it."""
    async with FakeViolet(orders=1, seed=1) as fake:
        (o, b) = fake.seeded[0]
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            dead = f"http://ops:s3cret-proxy@127.0.0.1:{closed.getsockname()[1]}"
            client = client_for(fake, proxy=dead, retry=RetryPolicy.disabled())
            async with client:
                with pytest.raises(APIConnectionError) as caught:
                    await client.refund_bag(o, b, amount_refunded=100)
        assert caught.value.request_sent is False
        assert "s3cret-proxy" not in repr(caught.value) + str(caught.value)
        assert "s3cret-proxy" not in repr(client)
        assert fake.ledger.requests["refund"] == 0


@pytest.mark.parametrize(
    "proxy",
    ["https://proxy.example:3128", "socks5://proxy.example:1080", "not a url", 3128, "http://"],
)
async def test_a_bad_proxy_is_refused_naming_the_field(proxy: Any) -> None:
    async with FakeViolet(orders=1, seed=1) as fake:
        with pytest.raises(RequestValidationError) as caught:
            client_for(fake, proxy=proxy)
        assert caught.value.field == "proxy"
        assert fake.ledger.requests["login"] == 0


async def test_violet_proxy_is_read_by_from_env() -> None:
    async with FakeViolet(orders=1, seed=1) as fake, forwarding_proxy() as proxy:
        (o, _) = fake.seeded[0]
        env = {
            "VIOLET_APP_ID": str(fake.app_id),
            "VIOLET_APP_SECRET": fake.app_secret,
            "VIOLET_USERNAME": fake.username,
            "VIOLET_PASSWORD": fake.password,
            "VIOLET_BASE_URL": fake.base_url,
            "VIOLET_PROXY": proxy.url,
        }
        async with VioletClient.from_env(env) as client:
            await client.get_order(o)
        assert [m for m, _, _ in proxy.seen] == ["POST", "GET"]


async def test_extra_headers_and_app_info_reach_violet_for_that_call_only() -> None:
    async with FakeViolet(orders=2, seed=1) as fake, forwarding_proxy() as proxy:
        (o, b), _ = fake.seeded
        client = client_for(fake, proxy=proxy.url, app_info="refund-desk/2.3")
        async with client:
            await client.refund_bag(
                o, b, amount_refunded=100, extra_headers={"X-Request-Source": "desk-42"}
            )
            await client.list_bag_refunds(o, b, extra_headers={"X-Request-Source": "desk-43"})
            await client.cancel_bag(o, b, extra_headers={"X-Request-Source": "desk-44"})
            await client.list_bag_refunds(o, b)
        calls = {(m, url.split("/v1", 1)[1], h.get("X-Request-Source")) for m, url, h in proxy.seen}
        assert ("POST", f"/orders/{o}/bags/{b}/refunds", "desk-42") in calls
        assert ("GET", f"/orders/{o}/bags/{b}/refunds", "desk-43") in calls
        assert ("POST", f"/orders/{o}/bags/{b}/cancel", "desk-44") in calls
        assert ("GET", f"/orders/{o}/bags/{b}/refunds", None) in calls, "the last call: none"
        assert ("POST", "/login", None) in calls, "not the login"
        agents = {h["User-Agent"] for _, _, h in proxy.seen}
        assert len(agents) == 1
        (agent,) = agents
        assert agent.startswith("violet-async/")
        assert agent.endswith(" refund-desk/2.3")


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"X-Violet-Token": "t"}, "extra_headers['X-Violet-Token']"),
        ({"user-agent": "me"}, "extra_headers['user-agent']"),
        ({"Content-Type": "text/plain"}, "extra_headers['Content-Type']"),
        ({"Bad Name": "x"}, "extra_headers['Bad Name']"),
        ({"X-Ok": "line\r\nX-Evil: 1"}, "extra_headers['X-Ok']"),
        ({"X-Ok": 5}, "extra_headers['X-Ok']"),
        ([("X-Ok", "x")], "extra_headers"),
    ],
)
async def test_bad_extra_headers_are_refused_and_nothing_is_sent(headers: Any, field: str) -> None:
    async with FakeViolet(orders=1, seed=1) as fake:
        (o, b) = fake.seeded[0]
        async with fake.client() as client:
            with pytest.raises(RequestValidationError) as caught:
                await client.refund_bag(o, b, amount_refunded=100, extra_headers=headers)
            assert caught.value.field == field
        assert fake.ledger.requests["login"] == 0
        assert fake.ledger.requests["refund"] == 0


@pytest.mark.parametrize("app_info", ["", "caf\u00e9/1", "x\n", "a" * 201, 12])
async def test_a_bad_app_info_is_refused(app_info: Any) -> None:
    async with FakeViolet(orders=1, seed=1) as fake:
        with pytest.raises(RequestValidationError) as caught:
            client_for(fake, app_info=app_info)
        assert caught.value.field == "app_info"


async def test_a_call_timeout_bounds_that_call_only() -> None:
    """A server that never answers the refunds list: timeout=0.2 ends that call after
    one 0.2 s attempt; the client's own timeouts are untouched."""
    never = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    async with FakeViolet(orders=1, seed=1) as fake:
        (o, b) = fake.seeded[0]
        app = web.Application()
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", hang)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            client = VioletClient(
                fake.app_id,
                fake.app_secret,
                token="a-token",
                base_url=f"http://127.0.0.1:{port}/v1",
                retry=RetryPolicy.disabled(),
                timeouts=Timeouts(connect=5.0, read=30.0),
            )
            async with client:
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(APITimeoutError):
                    await client.list_bag_refunds(o, b, timeout=0.2)
                assert loop.time() - started < 5.0
                assert client._timeouts == Timeouts(connect=5.0, read=30.0)
                with pytest.raises(APITimeoutError):
                    await client.list_bag_refunds(o, b, timeout=Timeouts(connect=1.0, read=0.2))
                with pytest.raises(RequestValidationError) as caught:
                    await client.list_bag_refunds(o, b, timeout=0)
                assert caught.value.field == "timeout"
        finally:
            never.set()
            await runner.cleanup()


async def test_a_short_call_timeout_on_a_committed_refund_is_read_back_not_resent() -> None:
    """Adversarial: timeout=0.3 on a refund whose 200 trickles out for 1 s after Violet
    committed it. The per-call clone must keep the never-twice rule: the refund is
    found by read-back (one refund, reconciled), never sent a second time."""
    from violet_async.testing import FakeClock, Fault, FaultPlan

    async with FakeViolet(orders=1, seed=1, faults=FaultPlan(slow_body_delay=1.0)) as fake:
        (o, b) = fake.seeded[0]
        fake.script("refund", Fault.SLOW_BODY, bag_id=b)
        async with fake.client(clock=FakeClock()) as client:  # settle waits without sleeping
            refund = await client.refund_bag(o, b, amount_refunded=200, timeout=0.3)
        assert refund.reconciled is True
        assert fake.ledger.refunds_per_bag[b] == 1
        assert fake.ledger.requests["refund"] == 1
        assert fake.ledger.double_refunds() == {}
