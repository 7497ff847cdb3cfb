"""FakeViolet is a product: raw HTTP (not through the SDK) sees Violet's rules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def headers(fake: FakeViolet, token: str | None = None) -> dict[str, str]:
    return {
        "X-Violet-App-Id": str(fake.app_id),
        "X-Violet-App-Secret": fake.app_secret,
        "X-Violet-Token": token if token is not None else fake.issue_token(),
    }


async def call(
    http: aiohttp.ClientSession,
    fake: FakeViolet,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
) -> tuple[int, Any]:
    async with http.request(
        method,
        fake.base_url + path,
        headers=headers(fake, token),
        data=None if body is None else orjson.dumps(body),
    ) as response:
        raw = await response.read()
        if response.content_type != "application/json":
            return response.status, raw.decode()
        return response.status, orjson.loads(raw) if raw else None


async def test_login_and_refresh(fake: FakeViolet, http: aiohttp.ClientSession) -> None:
    """Login returns token + refresh_token; refresh returns a new token."""
    async with http.post(
        fake.base_url + "/login",
        headers={"X-Violet-App-Id": str(fake.app_id), "X-Violet-App-Secret": fake.app_secret},
        data=orjson.dumps({"username": fake.username, "password": fake.password}),
    ) as response:
        user = await response.json()
    assert response.status == 200
    status, body = await call(http, fake, "GET", "/auth/token", token=user["refresh_token"])
    assert status == 200
    assert body["token"] != user["token"]
    status, _ = await call(http, fake, "GET", "/auth/token", token="bogus")
    assert status == 401


async def test_auth_failures_are_violet_shaped(
    fake: FakeViolet, http: aiohttp.ClientSession
) -> None:
    """Missing token 401; expired token 401 with error_code 11 and Violet's message."""
    order_id, bag_id = fake.seeded[0]
    path = f"/orders/{order_id}/bags/{bag_id}/refunds"
    status, body = await call(http, fake, "GET", path, token="")
    assert (status, body["error_code"]) == (401, 12)
    status, body = await call(http, fake, "GET", path, token=fake.issue_token(lifetime=-5))
    assert status == 401
    assert body["message"] == "Token has expired"
    assert body["error_code"] == 11
    assert set(body) == {"status", "message", "error_code", "timestamp"}


async def test_refund_rules(fake: FakeViolet, http: aiohttp.ClientSession) -> None:
    """Partial then full refunds move the bag; amounts never go below zero."""
    order = fake.add_order(
        [{"skus": [{"quantity": 2, "price": 1000}], "shipping": 500, "tax": 100}]
    )
    bag_id = next(iter(order.bags))
    sku_id = order.bags[bag_id].skus[0].order_sku_id
    path = f"/orders/{order.id}/bags/{bag_id}/refunds"
    status, body = await call(http, fake, "POST", path, {"amount_refunded": 3000})
    assert (status, body["error_code"]) == (400, 4006)  # more than the 2600 paid
    status, body = await call(http, fake, "POST", path, {"shipping": {"amount": 600}})
    assert (status, body["error_code"]) == (400, 4002)  # more shipping than paid
    status, body = await call(
        http, fake, "POST", path, {"skus": [{"order_sku_id": sku_id, "quantity_refunded": 1}]}
    )
    assert status == 200
    assert body["amount"] == 1000
    assert fake.bag(order.id, bag_id).status == "PARTIALLY_REFUNDED"
    status, body = await call(
        http, fake, "POST", path, {"skus": [{"order_sku_id": sku_id, "quantity_refunded": 2}]}
    )
    assert (status, body["error_code"]) == (400, 4005)  # only 1 unit left
    status, body = await call(http, fake, "POST", path, {})  # omitted amount: the rest
    assert body["amount"] == 1600
    assert fake.bag(order.id, bag_id).status == "REFUNDED"
    status, body = await call(http, fake, "POST", path, {"amount_refunded": 0})
    assert (status, body["error_code"]) == (400, 4001)  # REFUNDED cannot be refunded
    status, refunds = await call(http, fake, "GET", path)
    assert [r["amount"] for r in refunds] == [1000, 1600]
    assert fake.ledger.amount_per_bag[bag_id] == 2600


@pytest.mark.parametrize("status_name", ["IN_PROGRESS", "CANCELED"])
async def test_unrefundable_states(
    fake: FakeViolet, http: aiohttp.ClientSession, status_name: str
) -> None:
    """IN_PROGRESS and CANCELED bags cannot be refunded or cancelled."""
    order = fake.add_order([{"status": status_name}])
    bag_id = next(iter(order.bags))
    base = f"/orders/{order.id}/bags/{bag_id}"
    assert (await call(http, fake, "POST", base + "/refunds", {}))[0] == 400
    assert (await call(http, fake, "POST", base + "/cancel", {}))[0] == 400


async def test_cancel_rules(fake: FakeViolet, http: aiohttp.ClientSession) -> None:
    """Fulfilled bags cannot be cancelled (the platform's refusal: 202 with the bag's
    CANCELLATION_FAILURE); a cancel refunds what is left, answered with Violet's 202
    cancellation body."""
    fulfilled = fake.add_order([{"fulfilled": True}])
    bag_id = next(iter(fulfilled.bags))
    status, body = await call(http, fake, "POST", f"/orders/{fulfilled.id}/bags/{bag_id}/cancel")
    assert (status, body["status"]) == (202, "CANCELLATION_FAILURE")
    assert [(b["bag_id"], b["status"]) for b in body["cancelled_bags"]] == [
        (bag_id, "CANCELLATION_FAILURE")
    ]
    assert fake.ledger.total_refunds == 0
    order_id, bag_id = fake.seeded[0]
    status, body = await call(
        http, fake, "POST", f"/orders/{order_id}/bags/{bag_id}/cancel", {"reason_code": "FRAUD"}
    )
    assert (status, body["status"]) == (202, "CANCELED")
    (entry,) = body["cancelled_bags"]
    assert entry["bag_id"] == bag_id
    assert entry["refund"]["amount"] == fake.bag(order_id, bag_id).total
    status, order = await call(http, fake, "GET", f"/orders/{order_id}")
    assert order["bags"][0]["status"] == "CANCELED"


async def test_cancel_rules_on_the_older_page(http: aiohttp.ClientSession) -> None:
    """With ``cancel_response="refund"`` (the older order-service page) a fulfilled bag is
    a 400 and a cancel answers the bare refund on 200, its reason code kept when the
    records carry every field."""
    async with FakeViolet(orders=1, cancel_response="refund", full_records=True) as fake:
        fulfilled = fake.add_order([{"fulfilled": True}])
        bag_id = next(iter(fulfilled.bags))
        path = f"/orders/{fulfilled.id}/bags/{bag_id}/cancel"
        status, body = await call(http, fake, "POST", path)
        assert (status, body["error_code"]) == (400, 4011)
        order_id, bag_id = fake.seeded[0]
        path = f"/orders/{order_id}/bags/{bag_id}/cancel"
        status, body = await call(http, fake, "POST", path, {"reason_code": "FRAUD"})
        assert (status, body["reason_code"]) == (200, "FRAUD")


async def test_unknown_resources_are_404(fake: FakeViolet, http: aiohttp.ClientSession) -> None:
    """Unknown orders and bags are 404; a non-JSON body is 400."""
    order_id, _ = fake.seeded[0]
    assert (await call(http, fake, "GET", "/orders/1"))[0] == 404
    assert (await call(http, fake, "GET", "/orders/abc"))[0] == 404
    assert (await call(http, fake, "GET", f"/orders/{order_id}/bags/1/refunds"))[0] == 404
    async with http.post(
        fake.base_url + f"/orders/{order_id}/bags/1/refunds",
        headers=headers(fake),
        data=b"{nope",
    ) as response:
        assert response.status == 400


async def test_drop_after_commit_commits_and_closes(
    fake: FakeViolet, http: aiohttp.ClientSession
) -> None:
    """The connection drops without an answer, yet the refund exists."""
    order_id, bag_id = fake.seeded[0]
    fake.script("refund", Fault.DROP_AFTER_COMMIT, bag_id=bag_id)
    with pytest.raises(aiohttp.ClientError):
        await call(
            http, fake, "POST", f"/orders/{order_id}/bags/{bag_id}/refunds", {"amount_refunded": 1}
        )
    assert fake.ledger.refunds_per_bag[bag_id] == 1


async def test_late_commit_lands_only_when_the_clock_passes_the_delay(
    http: aiohttp.ClientSession,
) -> None:
    """LATE_COMMIT: a gateway 504 now; reads see nothing until the fake's clock passes
    late_commit_delay, however many reads happen before."""
    clock = FakeClock()
    plan = FaultPlan(late_commit_delay=2.5)
    async with FakeViolet(orders=1, faults=plan, clock=clock) as fake:
        order_id, bag_id = fake.seeded[0]
        path = f"/orders/{order_id}/bags/{bag_id}/refunds"
        fake.script("refund", Fault.LATE_COMMIT, bag_id=bag_id)
        status, body = await call(http, fake, "POST", path, {"amount_refunded": 1})
        assert (status, body) == (504, "upstream request timeout")
        for _ in range(3):
            assert (await call(http, fake, "GET", path))[1] == []
        clock.advance(2.4)
        assert (await call(http, fake, "GET", path))[1] == []
        assert fake.ledger.refunds_per_bag[bag_id] == 0
        clock.advance(0.1)
        refunds = (await call(http, fake, "GET", path))[1]
        assert len(refunds) == 1
        [post] = fake.ledger.posts_per_bag[bag_id]
        assert (post.fault, post.refund_id) == ("late_commit", refunds[0]["id"])
        [commit] = fake.ledger.commits_per_bag[bag_id]
        assert commit.at == pytest.approx(1_002.5)


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (Fault.HTTP_500, 500),
        (Fault.HTTP_502, 502),
        (Fault.HTTP_503, 503),
        (Fault.HTTP_504, 504),
        (Fault.RATE_LIMIT_NO_HEADER, 429),
        (Fault.HTTP_500_AFTER_COMMIT, 500),
        (Fault.HTTP_502_AFTER_COMMIT, 502),
        (Fault.HTTP_503_AFTER_COMMIT, 503),
        (Fault.HTTP_504_AFTER_COMMIT, 504),
        (Fault.HTTP_524_AFTER_COMMIT, 524),
    ],
)
async def test_status_faults(
    fake: FakeViolet, http: aiohttp.ClientSession, fault: Fault, status: int
) -> None:
    """Scripted status faults answer with that status; only Violet's own (500, 429)
    carry its JSON error body, gateways' are text; *_AFTER_COMMIT ones committed."""
    order_id, bag_id = fake.seeded[0]
    fake.script("refund", fault, bag_id=bag_id)
    got, body = await call(
        http, fake, "POST", f"/orders/{order_id}/bags/{bag_id}/refunds", {"amount_refunded": 1}
    )
    assert got == status
    if status in (500, 429):
        assert set(body) == {"status", "message", "error_code", "timestamp"}
    else:
        assert isinstance(body, str)
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(body)
    committed = 1 if fault.value.endswith("_after_commit") else 0
    assert fake.ledger.refunds_per_bag[bag_id] == committed
    [post] = fake.ledger.posts_per_bag[bag_id]
    assert post.fault == fault.value
    if committed:
        assert post.refund_id == fake.bag(order_id, bag_id).refunds[0]["id"]


async def test_gateway_bodies_look_like_the_real_gateways(
    fake: FakeViolet, http: aiohttp.ClientSession
) -> None:
    """Envoy's 503 and Cloudflare's 524 pages, after the commit."""
    order_id, bag_id = fake.seeded[0]
    path = f"/orders/{order_id}/bags/{bag_id}/refunds"
    fake.script("refund", Fault.HTTP_503_AFTER_COMMIT, Fault.HTTP_524_AFTER_COMMIT)
    status, envoy = await call(http, fake, "POST", path, {"amount_refunded": 1})
    assert envoy.startswith("upstream connect error or disconnect/reset before headers")
    status, cloudflare = await call(http, fake, "POST", path, {"amount_refunded": 1})
    assert status == 524
    assert "<html>" in cloudflare
    assert "524" in cloudflare
    assert "A timeout occurred" in cloudflare
    assert fake.ledger.refunds_per_bag[bag_id] == 2


async def test_malformed_and_rate_limit_faults(
    fake: FakeViolet, http: aiohttp.ClientSession
) -> None:
    """HTML 502, Retry-After on 429, truncated JSON and wrong types are as described."""
    order_id, bag_id = fake.seeded[0]
    url = fake.base_url + f"/orders/{order_id}/bags/{bag_id}/refunds"
    fake.script(
        "refund",
        Fault.HTML_502,
        Fault.RATE_LIMIT,
        Fault.TRUNCATED_JSON,
        Fault.WRONG_TYPES,
        bag_id=bag_id,
    )
    seen = []
    for _ in range(4):
        async with http.post(url, headers=headers(fake), data=b'{"amount_refunded": 1}') as r:
            seen.append(
                (
                    r.status,
                    r.headers.get("Content-Type", ""),
                    r.headers.get("Retry-After"),
                    await r.read(),
                )
            )
    assert seen[0][0] == 502
    assert seen[0][1].startswith("text/html")
    assert (seen[1][0], seen[1][2]) == (429, "1")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(seen[2][3])
    assert isinstance(orjson.loads(seen[3][3])["amount"], str)
    assert fake.ledger.refunds_per_bag[bag_id] == 2


def test_fault_plan_is_seeded_and_validated() -> None:
    """Same seed, same faults; rates must be sane."""
    from violet_async.testing._faults import FaultDrawer

    first = FaultDrawer(FaultPlan.chaos(5))
    second = FaultDrawer(FaultPlan.chaos(5))
    assert [first.draw("refund", mutating=True) for _ in range(200)] == [
        second.draw("refund", mutating=True) for _ in range(200)
    ]
    reads = [first.draw("list_refunds", mutating=False) for _ in range(500)]
    assert Fault.DROP_AFTER_COMMIT not in reads
    assert first.draw("login", mutating=False) is None  # login spared by default
    with pytest.raises(ValueError, match="sum"):
        FaultPlan(rates={Fault.HTTP_500: 0.8, Fault.HTTP_502: 0.5})
    with pytest.raises(ValueError, match="cancel_response"):
        FakeViolet(cancel_response="nope")


async def test_generated_orders_are_deterministic() -> None:
    """The same seed generates the same bags."""
    one, two = FakeViolet(orders=10, seed=9), FakeViolet(orders=10, seed=9)
    totals = [[f.bag(o, b).total for o, b in f.seeded] for f in (one, two)]
    assert totals[0] == totals[1]


async def test_stop_applies_pending_late_commits() -> None:
    """Stopping the server lands late commits, so the ledger is final."""
    async with FakeViolet(orders=1, faults=FaultPlan(late_commit_delay=60)) as fake:
        order_id, bag_id = fake.seeded[0]
        fake.script("refund", Fault.LATE_COMMIT, bag_id=bag_id)
        async with aiohttp.ClientSession() as http:
            await call(
                http,
                fake,
                "POST",
                f"/orders/{order_id}/bags/{bag_id}/refunds",
                {"amount_refunded": 1},
            )
        assert fake.ledger.total_refunds == 0
    assert fake.ledger.total_refunds == 1


def test_named_plans() -> None:
    """The CLI's --faults names map to the plans; an unknown name is refused."""
    assert FaultPlan.named("none") == FaultPlan.none()
    assert FaultPlan.named("moderate", 3) == FaultPlan.moderate(3)
    assert FaultPlan.named("chaos", 3) == FaultPlan.chaos(3)
    assert FaultPlan.named("hostile", 3) == FaultPlan.hostile(3)
    with pytest.raises(ValueError, match="unknown fault plan"):
        FaultPlan.named("mayhem")
