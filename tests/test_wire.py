"""Wire-level behaviour, with aioresponses standing in for the network."""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aioresponses import CallbackResult, aioresponses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

import violet_async
from violet_async import (
    APIError,
    AuthenticationError,
    BadRequestError,
    CancelBagRequest,
    CancellationFailedError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ReasonCode,
    RefundBagRequest,
    RefundFailedError,
    RefundStatus,
    RequestValidationError,
    ResponseFormatError,
    RetryPolicy,
    ServerError,
    ShippingRefund,
    SkuRefund,
    UnprocessableEntityError,
    VioletClient,
)
from violet_async.testing import FakeClock

from .samples import refund_body, refund_bytes

BASE = "https://api.test.violet/v1"
REFUNDS = f"{BASE}/orders/11/bags/22/refunds"
CANCEL = f"{BASE}/orders/11/bags/22/cancel"
SECRET = "s3cr3t-app-secret"
TOKEN = "tok-abc"
# The documented refund (tests/samples.py) is dated 2023-11-07T05:31:56Z: the client's
# clock reads that moment, as Violet's answers are dated when the call runs (a 2xx
# naming a refund dated before its call began is read back, never returned).
WHEN = 1_699_335_116.0


@pytest.fixture
def wire() -> Any:
    with aioresponses() as mocked:
        yield mocked


@pytest.fixture
async def client() -> AsyncIterator[VioletClient]:
    async with VioletClient(
        11,
        SECRET,
        token=TOKEN,
        base_url=BASE,
        retry=RetryPolicy.disabled(),
        clock=FakeClock(wall_start=WHEN),
    ) as c:
        yield c


def sent(wire: Any, method: str, url: str) -> list[Any]:
    return list(wire.requests.get((method, URL(url)), []))


async def test_refund_sends_exact_url_headers_and_body(wire: Any, client: VioletClient) -> None:
    """POST to the spec path with the three Violet headers, a User-Agent and the JSON body."""
    wire.post(REFUNDS, status=200, body=refund_bytes())
    refund = await client.refund_bag(
        11,
        22,
        amount_refunded=1000,
        shipping=ShippingRefund(amount=500),
        skus=[SkuRefund(order_sku_id=10000, quantity_refunded=1, amount_refunded=500)],
    )
    assert refund.amount == 1000
    (call,) = sent(wire, "POST", REFUNDS)
    headers = call.kwargs["headers"]
    assert headers["X-Violet-App-Id"] == "11"
    assert headers["X-Violet-App-Secret"] == SECRET
    assert headers["X-Violet-Token"] == TOKEN
    assert headers["User-Agent"] == f"violet-async/{violet_async.__version__}"
    assert headers["Content-Type"] == "application/json"
    assert call.kwargs["allow_redirects"] is False
    assert orjson.loads(call.kwargs["data"]) == {
        "amount_refunded": 1000,
        "shipping": {"amount": 500},
        "skus": [{"order_sku_id": 10000, "quantity_refunded": 1, "amount_refunded": 500}],
    }


async def test_request_object_form_is_the_same_call(wire: Any, client: VioletClient) -> None:
    """refund_bag(o, b, RefundBagRequest(...)) sends the same body as the keyword form."""
    answering(wire, REFUNDS)
    await client.refund_bag(11, 22, RefundBagRequest(amount_refunded=5, reason="r"))
    (call,) = sent(wire, "POST", REFUNDS)
    assert orjson.loads(call.kwargs["data"]) == {
        "amount_refunded": 5,
        "reason": "r",
    }


async def test_both_forms_at_once_are_refused(wire: Any, client: VioletClient) -> None:
    """A request object plus keyword fields is ambiguous: refused before sending."""
    with pytest.raises(RequestValidationError, match="request"):
        await client.refund_bag(11, 22, RefundBagRequest(), amount_refunded=5)
    with pytest.raises(RequestValidationError, match="request"):
        await client.cancel_bag(11, 22, RefundBagRequest())  # type: ignore[arg-type]
    assert wire.requests == {}


@pytest.mark.parametrize("amount", [-1, True, "10", 1.5])
async def test_an_amount_alone_is_validated_as_any_request(
    wire: Any, client: VioletClient, amount: Any
) -> None:
    """The common call (only an amount, or nothing) builds its request by a short route:
    a bad amount is still refused, naming the field, with nothing sent."""
    with pytest.raises(RequestValidationError) as info:
        await client.refund_bag(11, 22, amount_refunded=amount)
    assert info.value.field == "amount_refunded"
    assert wire.requests == {}


@pytest.mark.parametrize(("kwargs", "body"), [({}, {}), ({"amount_refunded": None}, {})])
async def test_no_amount_refunds_the_whole_bag(
    wire: Any, client: VioletClient, kwargs: dict[str, Any], body: dict[str, Any]
) -> None:
    """No amount (left out, or None) sends an empty body: the whole bag."""
    answering(wire, REFUNDS)
    await client.refund_bag(11, 22, **kwargs)
    (call,) = sent(wire, "POST", REFUNDS)
    assert orjson.loads(call.kwargs["data"]) == body


async def test_cancel_sends_only_the_fields_given(wire: Any, client: VioletClient) -> None:
    """cancel_bag sends the fields passed and none of the spec's defaults."""
    wire.post(CANCEL, status=200, body=refund_bytes())
    refund = await client.cancel_bag(11, 22, reason_code=ReasonCode.CUSTOMER, reason="x")
    assert refund.id == 123
    (call,) = sent(wire, "POST", CANCEL)
    assert orjson.loads(call.kwargs["data"]) == {"reason_code": "CUSTOMER", "reason": "x"}


async def test_calls_with_no_fields_send_an_empty_body(wire: Any, client: VioletClient) -> None:
    """refund_bag(o, b) and cancel_bag(o, b) send {}, and so do empty request objects."""
    answering(wire, REFUNDS)
    answering(wire, CANCEL)
    await client.refund_bag(11, 22)
    await client.refund_bag(11, 22, RefundBagRequest())
    await client.cancel_bag(11, 22)
    await client.cancel_bag(11, 22, CancelBagRequest())
    for url in (REFUNDS, CANCEL):
        assert [orjson.loads(c.kwargs["data"]) for c in sent(wire, "POST", url)] == [{}, {}]


async def test_refund_with_only_an_amount_leaves_notification_to_the_merchant(
    wire: Any, client: VioletClient
) -> None:
    """refund_bag(o, b, amount_refunded=1000) sends no restock_items or notify_customer."""
    wire.post(REFUNDS, status=200, body=refund_bytes())
    await client.refund_bag(11, 22, amount_refunded=1000)
    (call,) = sent(wire, "POST", REFUNDS)
    assert orjson.loads(call.kwargs["data"]) == {"amount_refunded": 1000}


async def test_keyword_none_means_not_given(wire: Any, client: VioletClient) -> None:
    """A keyword passed as None is omitted, the same as not passing it."""
    answering(wire, REFUNDS)
    await client.refund_bag(11, 22, amount_refunded=5, notify_customer=None, restock_items=None)
    (call,) = sent(wire, "POST", REFUNDS)
    assert orjson.loads(call.kwargs["data"]) == {"amount_refunded": 5}


#: Refund ids for answers: a new one each time, across every route.
_IDS = itertools.count(1_000)


def answering(mocked: Any, url: str) -> None:
    """Answer every POST to ``url`` with a new refund of the amount and SKU lines asked
    for (a 2xx is checked against its request, and one refund is never the answer to
    two)."""
    ids = _IDS

    def answer(_url: Any, **kwargs: Any) -> CallbackResult:
        asked = orjson.loads(kwargs["data"])
        made: dict[str, Any] = {"amount": asked.get("amount_refunded", 1000)}
        if "skus" in asked:
            made["skus"] = [
                {"order_sku_id": s["order_sku_id"], "quantity_refunded": s["quantity_refunded"]}
                for s in asked["skus"]
            ]
        return CallbackResult(status=200, body=refund_bytes(id=next(ids), **made))

    mocked.post(url, callback=answer, repeat=True)


refund_fields = st.fixed_dictionaries(
    {},
    optional={
        "amount_refunded": st.integers(1, 10**9),
        "shipping": st.builds(ShippingRefund, amount=st.integers(0, 10_000)),
        "skus": st.lists(
            st.builds(
                SkuRefund,
                order_sku_id=st.integers(1, 10**6),
                quantity_refunded=st.integers(1, 5),
                amount_refunded=st.one_of(st.none(), st.integers(0, 10**6)),
            ),
            min_size=1,
            max_size=3,
            unique_by=lambda sku: sku.order_sku_id,
        ),
        "reason": st.text(st.characters(codec="utf-8"), max_size=40),
        "restock_items": st.booleans(),
        "notify_customer": st.booleans(),
    },
)
cancel_fields = st.fixed_dictionaries(
    {},
    optional={
        "reason_code": st.sampled_from([*ReasonCode, *(code.value for code in ReasonCode)]),
        "reason": st.text(st.characters(codec="utf-8"), max_size=40),
        "restock_items": st.booleans(),
        "notify_customer": st.booleans(),
    },
)


def expected_body(fields: dict[str, Any]) -> dict[str, Any]:
    """The JSON a caller should see on the wire for these fields, by hand."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, ShippingRefund):
            out[name] = {"amount": value.amount}
        elif name == "skus":
            out[name] = [
                {
                    "order_sku_id": sku.order_sku_id,
                    "quantity_refunded": sku.quantity_refunded,
                    **(
                        {}
                        if sku.amount_refunded is None
                        else {"amount_refunded": sku.amount_refunded}
                    ),
                }
                for sku in value
            ]
        elif name == "reason_code":
            out[name] = ReasonCode(value).value
        else:
            out[name] = value
    return out


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=40)
@given(refund=refund_fields, cancel=cancel_fields)
async def test_wire_body_holds_exactly_the_fields_passed(
    refund: dict[str, Any], cancel: dict[str, Any]
) -> None:
    """The body sent holds exactly the fields passed, in keyword and request-object form."""
    with aioresponses() as mocked:
        answering(mocked, REFUNDS)
        answering(mocked, CANCEL)
        async with VioletClient(
            11,
            SECRET,
            token=TOKEN,
            base_url=BASE,
            retry=RetryPolicy.disabled(),
            clock=FakeClock(wall_start=WHEN),
        ) as c:
            await c.refund_bag(11, 22, **refund)
            await c.refund_bag(11, 22, RefundBagRequest(**refund))
            await c.cancel_bag(11, 22, **cancel)
            await c.cancel_bag(11, 22, CancelBagRequest(**cancel))
        for url, fields in ((REFUNDS, refund), (CANCEL, cancel)):
            bodies = [orjson.loads(call.kwargs["data"]) for call in sent(mocked, "POST", url)]
            assert bodies == [expected_body(fields)] * 2


async def test_cancel_202_cancellation_body_returns_the_bags_refund(
    wire: Any, client: VioletClient
) -> None:
    """The later-documented 202 body: the matching bag's refund is returned."""
    body = {
        "order_id": 11,
        "app_id": 44,
        "status": "CANCELED",
        "message": None,
        "cancelled_bags": [
            {"bag_id": 21, "status": "CANCELED", "refund": refund_body(id=1, bag_id=21)},
            {
                "bag_id": 22,
                "status": "CANCELED",
                "external_order_id": "x",
                "originated_by": "APP",
                "date_cancelled": "2023-11-07T05:31:56Z",
                "refund": refund_body(id=2),
            },
        ],
    }
    wire.post(CANCEL, status=202, body=orjson.dumps(body))
    refund = await client.cancel_bag(11, 22, CancelBagRequest())
    assert refund.id == 2


async def test_cancel_failure_raises_typed_error(wire: Any, client: VioletClient) -> None:
    """CANCELLATION_FAILURE is a CancellationFailedError carrying the body."""
    body = {
        "order_id": 11,
        "app_id": 44,
        "status": "CANCELLATION_FAILURE",
        "cancelled_bags": [],
        "message": "merchant refused",
    }
    wire.post(CANCEL, status=202, body=orjson.dumps(body))
    with pytest.raises(CancellationFailedError, match="merchant refused") as info:
        await client.cancel_bag(11, 22)
    assert info.value.status == "CANCELLATION_FAILURE"
    assert b"merchant refused" in info.value.body


async def test_cancel_of_another_bag_only_is_read_back(wire: Any, client: VioletClient) -> None:
    """PARTIALLY_CANCELED without our bag is not a definite failure (only Violet's
    CANCELLATION_FAILURE is): the bag is read back, and the cancel is never sent again."""
    body = {
        "status": "PARTIALLY_CANCELED",
        "cancelled_bags": [{"bag_id": 21, "refund": refund_body(bag_id=21)}],
    }
    wire.post(CANCEL, status=202, body=orjson.dumps(body))
    wire.get(
        f"{BASE}/orders/11",
        status=200,
        body=b'{"id": 11, "bags": [{"id": 22, "status": "CANCELED"}]}',
        repeat=True,
    )
    wire.get(REFUNDS, status=200, body=b"[]", repeat=True)
    with pytest.raises(violet_async.AmbiguousOutcomeError):
        await client.cancel_bag(11, 22)
    assert len(sent(wire, "POST", CANCEL)) == 1


async def test_cancel_of_another_bag_with_failure_status_is_a_failure(
    wire: Any, client: VioletClient
) -> None:
    """An overall CANCELLATION_FAILURE that does not list our bag is Violet's definite
    failure: CancellationFailedError, nothing read back."""
    body = {"status": "CANCELLATION_FAILURE", "cancelled_bags": [], "message": "Shopify said no"}
    wire.post(CANCEL, status=202, body=orjson.dumps(body))
    with pytest.raises(CancellationFailedError, match="Shopify said no"):
        await client.cancel_bag(11, 22)


async def test_cancel_without_refund_object_is_a_format_error(
    wire: Any, client: VioletClient
) -> None:
    """A cancelled bag with no refund cannot be returned as an OrderRefund."""
    body = {"status": "CANCELED", "cancelled_bags": [{"bag_id": 22}]}
    wire.post(CANCEL, status=202, body=orjson.dumps(body))
    wire.get(REFUNDS, status=200, body=b"[]")
    wire.get(
        f"{BASE}/orders/11",
        status=200,
        body=b'{"bags": [{"id": 22, "status": "CANCELED"}]}',
        repeat=True,
    )
    wire.get(REFUNDS, status=200, body=b"[]", repeat=True)
    with pytest.raises(violet_async.AmbiguousOutcomeError):
        await client.cancel_bag(11, 22)


async def test_refund_with_errors_is_returned_typed(wire: Any, client: VioletClient) -> None:
    """A 2xx refund carrying errors[] is returned, the errors typed."""
    wire.post(REFUNDS, status=200, body=refund_bytes(status="PARTIALLY_COMPLETED"))
    refund = await client.refund_bag(11, 22)
    assert refund.status is RefundStatus.PARTIALLY_COMPLETED
    assert refund.errors[0].error_code == 77


async def test_failed_refund_raises_with_the_refund(wire: Any, client: VioletClient) -> None:
    """A FAILED refund raises RefundFailedError carrying the OrderRefund."""
    wire.post(REFUNDS, status=200, body=refund_bytes(status="FAILED"))
    with pytest.raises(RefundFailedError, match="merchant platform slow") as info:
        await client.refund_bag(11, 22)
    assert info.value.refund.status is RefundStatus.FAILED


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (504, ServerError),
        (418, APIError),
    ],
)
async def test_every_status_maps_to_its_class(
    wire: Any, client: VioletClient, status: int, cls: type[APIError]
) -> None:
    """Status -> class, with status, error_code, message, raw body and headers."""
    body = {"status": status, "message": "nope", "error_code": 4242, "timestamp": 1}
    wire.get(REFUNDS, status=status, body=orjson.dumps(body), headers={"X-Trace": "t1"})
    with pytest.raises(cls) as info:
        await client.list_bag_refunds(11, 22)
    error = info.value
    assert type(error) is cls
    assert (error.status, error.error_code, error.message) == (status, 4242, "nope")
    assert error.body == orjson.dumps(body)
    assert error.headers["X-Trace"] == "t1"
    assert SECRET not in str(error)
    assert TOKEN not in repr(error)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html><h1>502 Bad Gateway</h1></html>", "<html><h1>502 Bad Gateway</h1></html>"),
        (b"", "HTTP 400 with an empty body"),
        (b'{"code": 7, "error": "swift-shaped"}', "swift-shaped"),
        (b"[1,2]", "[1,2]"),
    ],
)
async def test_error_bodies_are_read_leniently(
    wire: Any, client: VioletClient, body: bytes, message: str
) -> None:
    """HTML, empty, alternative and non-object error bodies still give a message."""
    wire.get(REFUNDS, status=400, body=body)
    with pytest.raises(BadRequestError) as info:
        await client.list_bag_refunds(11, 22)
    assert info.value.message == message
    assert info.value.body == body


async def test_list_accepts_bare_list_and_content_wrapper(wire: Any, client: VioletClient) -> None:
    """GET refunds reads a bare list and a {"content": [...]} page."""
    wire.get(REFUNDS, status=200, body=orjson.dumps([refund_body(id=1)]))
    wire.get(REFUNDS, status=200, body=orjson.dumps({"content": [refund_body(id=2)]}))
    assert [r.id for r in await client.list_bag_refunds(11, 22)] == [1]
    assert [r.id for r in await client.list_bag_refunds(11, 22)] == [2]


@pytest.mark.parametrize(
    "body",
    [
        b"<html>ok</html>",
        b'{"truncated": ',
        b'{"content": 5}',
        b'"just a string"',
        b"\xff\xfe\x00garbage",
    ],
)
async def test_malformed_success_bodies_raise_format_error(
    wire: Any, client: VioletClient, body: bytes
) -> None:
    """A 200 that is not a list of refunds is a ResponseFormatError with the raw body."""
    wire.get(REFUNDS, status=200, body=body, repeat=True)
    with pytest.raises(ResponseFormatError) as info:
        await client.list_bag_refunds(11, 22)
    assert info.value.body == body


async def test_an_unreadable_record_is_skipped_not_fatal(
    wire: Any, client: VioletClient, caplog: pytest.LogCaptureFixture
) -> None:
    """One record that cannot be read (an amount as a string) is skipped and logged; the
    readable records are returned, and the read is made once (a 2xx is not weather)."""
    body = orjson.dumps([{"amount": "x"}, refund_body(id=7)])
    wire.get(REFUNDS, status=200, body=body, repeat=True)
    refunds = await client.list_bag_refunds(11, 22)
    assert [r.id for r in refunds] == [7]
    assert "1 of 2 refund records could not be read" in caplog.text
    assert len(sent(wire, "GET", REFUNDS)) == 1


async def test_a_paged_list_counts_skipped_records_toward_its_total(
    wire: Any, client: VioletClient
) -> None:
    """A Spring page whose total counts a record that cannot be read is still whole:
    the skipped record is counted, not taken for a missing page."""
    page = {"content": [[], refund_body(id=7)], "total_elements": 2, "number": 0, "last": True}
    wire.get(REFUNDS, status=200, body=orjson.dumps(page), repeat=True)
    assert [r.id for r in await client.list_bag_refunds(11, 22)] == [7]


async def test_a_cancelled_bags_refund_of_another_bag_is_read_back(
    wire: Any, client: VioletClient
) -> None:
    """Our bag's entry carrying a refund that names another bag is not returned as our
    cancel's refund: the bag is read back."""
    body = {
        "status": "CANCELED",
        "cancelled_bags": [{"bag_id": 22, "refund": refund_body(bag_id=21)}],
    }
    wire.post(CANCEL, status=202, body=orjson.dumps(body))
    wire.get(
        f"{BASE}/orders/11",
        status=200,
        body=b'{"id": 11, "bags": [{"id": 22, "status": "CANCELED"}]}',
        repeat=True,
    )
    wire.get(REFUNDS, status=200, body=b"[]", repeat=True)
    with pytest.raises(violet_async.AmbiguousOutcomeError):
        await client.cancel_bag(11, 22)
    assert len(sent(wire, "POST", CANCEL)) == 1


async def test_redirect_is_not_followed(wire: Any, client: VioletClient) -> None:
    """A 302 to another host is an error; the secret is never sent there."""
    wire.get(REFUNDS, status=302, headers={"Location": "https://evil.example/steal"})
    wire.get("https://evil.example/steal", status=200, body=b"[]")
    with pytest.raises(APIError) as info:
        await client.list_bag_refunds(11, 22)
    assert info.value.status == 302
    assert sent(wire, "GET", "https://evil.example/steal") == []


bad_ids = st.one_of(
    st.integers(max_value=0),
    st.floats(),
    st.text(max_size=4),
    st.booleans(),
    st.none(),
    st.integers(min_value=2**63),
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(
    order_id=bad_ids,
    field=st.sampled_from(["amount_refunded", "reason", "skus"]),
    value=st.one_of(
        st.floats(), st.text(min_size=256, max_size=300), st.just([]), st.integers(max_value=-1)
    ),
)
async def test_invalid_input_never_reaches_the_wire(order_id: Any, field: str, value: Any) -> None:
    """Bad ids or fields raise RequestValidationError and nothing is sent."""
    with aioresponses() as mocked:
        async with VioletClient(11, SECRET, token=TOKEN, base_url=BASE) as c:
            with pytest.raises(RequestValidationError):
                await c.refund_bag(order_id, 22)
            with pytest.raises(RequestValidationError):
                await c.cancel_bag(11, order_id)
            with pytest.raises(RequestValidationError):
                await c.list_bag_refunds(order_id, order_id)
            with pytest.raises(RequestValidationError) as info:
                await c.refund_bag(11, 22, **{field: value})
            assert info.value.field == field
        assert mocked.requests == {}


def test_all_status_classes_are_api_errors() -> None:
    """Every mapped class is an APIError and a VioletError."""
    for cls in (BadRequestError, UnprocessableEntityError, RateLimitError, ServerError):
        assert issubclass(cls, APIError)
    assert issubclass(UnprocessableEntityError, BadRequestError)
    assert re.match(r"\d+\.\d+\.\d+", violet_async.__version__)
