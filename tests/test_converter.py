"""The converter: every spec field typed, strict types, tolerant shape."""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
import orjson
import pytest
from cattrs import ClassValidationError
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from violet_async import OrderRefund, ReasonCode, RefundStatus, ResponseFormatError
from violet_async._converter import (
    _fast_structure_fn,
    converter,
    decode,
    parse_datetime,
    structure,
)
from violet_async._responses import parse_refund, parse_refund_page
from violet_async._transport import RawResponse
from violet_async.models import OrderCancellation, RefundedSku

from .samples import refund_body

attrs_fields = [f.name for f in attrs.fields(OrderRefund)]

UTC = timezone.utc


def read(data: Any) -> OrderRefund:
    return structure(data, OrderRefund, body=b"raw", status=200, method="POST", path="/p")


def test_every_spec_field_is_structured() -> None:
    """All fields of both spec pages land typed, platform-currency amounts included."""
    refund = read(refund_body())
    assert refund.id == 123
    assert refund.merchant_transfer_reversal_amount_platform_currency == 880
    assert refund.developer_transfer_reversal_amount_platform_currency == 98
    assert refund.platform_currency == "EUR"
    assert refund.status is RefundStatus.PROCESSING
    assert refund.reason_code is ReasonCode.OTHER
    assert refund.skus[0].order_sku_id == 10000
    assert refund.errors[0].error_message == "merchant platform slow"
    assert refund.errors[0].date_resolved == datetime(2023, 11, 7, 5, 31, 56, tzinfo=UTC)
    assert refund.shipping is not None
    assert refund.shipping.full_refund is True
    assert refund.tax_amount == 80
    assert refund.reconciled is False


@pytest.mark.parametrize(
    "text",
    [
        "2023-11-07T05:31:56Z",
        "2023-11-07T05:31:56+0000",
        "2023-11-07T05:31:56.000Z",
    ],
)
def test_three_date_shapes_become_aware_utc(text: str) -> None:
    """Z, +0000 and .000Z all parse to the same aware datetime."""
    assert parse_datetime(text) == datetime(2023, 11, 7, 5, 31, 56, tzinfo=UTC)


def test_a_date_without_offset_stays_naive() -> None:
    """A date without an offset is server-local time nobody named: never guessed as UTC."""
    assert parse_datetime("2023-11-07T05:31:56").tzinfo is None
    refund = read(refund_body(date_created="2023-11-07T05:31:56"))
    assert refund.date_created == datetime(2023, 11, 7, 5, 31, 56)
    assert refund.date_created is not None
    assert refund.date_created.tzinfo is None


def test_offset_dates_keep_their_offset() -> None:
    """A non-UTC offset is honoured."""
    parsed = parse_datetime("2023-11-07T07:31:56+0200")
    assert parsed.utcoffset() == timedelta(hours=2)


def test_unknown_keys_are_ignored_and_the_body_cannot_claim_reconciled() -> None:
    """Extra keys are dropped; `reconciled` is the SDK's verdict, never the server's."""
    refund = read(refund_body(brand_new_field={"x": 1}, reconciled=True))
    assert refund.reconciled is False


def test_unknown_enum_values_are_kept() -> None:
    """An unknown status or reason code is kept, flagged as not known."""
    refund = read(refund_body(status="REVERSED", reason_code="WHIM"))
    assert refund.status == "REVERSED"
    assert refund.status is not None
    assert not refund.status.is_known
    assert refund.reason_code is not None
    assert not refund.reason_code.is_known


def test_nulls_for_lists_mean_empty() -> None:
    """skus: null and errors: null read as empty tuples."""
    refund = read(refund_body(skus=None, errors=None, shipping=None))
    assert refund.skus == ()
    assert refund.errors == ()


def test_minimal_body_with_only_required_fields() -> None:
    """Every wire field is optional, as in Violet's OpenAPI: an empty object reads,
    with every field None or empty."""
    refund = read({})
    assert refund.id is None
    assert refund.status is None
    assert refund.amount is None
    assert refund.gateway_transaction_id is None
    assert refund.skus == ()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"amount": "1000"}, "$.amount"),
        ({"amount": 10.5}, "$.amount"),
        ({"amount": True}, "$.amount"),
        ({"order_id": "10"}, "$.order_id"),
        ({"status": 5}, "$.status"),
        ({"date_created": "yesterday"}, "$.date_created"),
        ({"date_created": 1699335116}, "$.date_created"),
        ({"skus": [{"quantity_refunded": "1"}]}, "$.skus[0].quantity_refunded"),
        ({"skus": {"a": 1}}, "$.skus"),
        ({"shipping": {"amount": "5"}}, "$.shipping.amount"),
        ({"errors": [{}, {"resolved": "yes"}]}, "$.errors[1].resolved"),
    ],
)
def test_wrong_types_raise_response_format_error_with_the_field_path(
    overrides: dict[str, Any], field: str
) -> None:
    """A wrong type names the field path and carries the raw body."""
    with pytest.raises(ResponseFormatError) as info:
        read(refund_body(**overrides))
    assert info.value.field == field
    assert info.value.body == b"raw"
    assert field in str(info.value)


@pytest.mark.parametrize(
    "missing",
    ["order_id", "merchant_id", "app_id", "transaction_id", "gateway_transaction_id", "amount"],
)
def test_fields_the_spec_page_marks_required_may_be_missing(missing: str) -> None:
    """Violet's examples leave the spec page's "required" fields out (the cancel example
    has no gateway_transaction_id): a missing one reads as None, a null one too."""
    body = refund_body()
    del body[missing]
    assert getattr(read(body), missing) is None
    assert getattr(read(refund_body(**{missing: None})), missing) is None


@pytest.mark.parametrize("data", [[1, 2], "text", 7, None])
def test_non_object_bodies_are_rejected(data: Any) -> None:
    """A JSON value that is not an object cannot be a refund."""
    with pytest.raises(ResponseFormatError) as info:
        read(data)
    assert info.value.field == "$"


def test_cancellation_body_structures() -> None:
    """The 202 cancellation body reads with its bags and refund."""
    data = {
        "order_id": 11,
        "app_id": 44,
        "status": "CANCELED",
        "cancelled_bags": [
            {
                "bag_id": 22,
                "status": "CANCELED",
                "date_cancelled": "2023-11-07T05:31:56Z",
                "refund": refund_body(),
            }
        ],
    }
    result = converter.structure(data, OrderCancellation)
    assert result.cancelled_bags[0].refund is not None
    assert result.cancelled_bags[0].refund.amount == 1000


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    field=st.sampled_from(sorted(refund_body())),
    value=json_values,
)
def test_any_field_value_gives_a_refund_or_a_format_error(field: str, value: Any) -> None:
    """Whatever JSON value lands in any field, the result is an OrderRefund or a
    ResponseFormatError, never a raw TypeError, KeyError or cattrs error."""
    try:
        refund = read(refund_body(**{field: value}))
    except ResponseFormatError as exc:
        body = exc.body
    else:
        body = b"raw"
        assert isinstance(refund, OrderRefund)
    assert body == b"raw"


@given(body=st.dictionaries(st.text(max_size=10), json_values, max_size=8))
def test_arbitrary_objects_never_escape_as_raw_errors(body: dict[str, Any]) -> None:
    """Random JSON objects never raise anything but ResponseFormatError."""
    with contextlib.suppress(ResponseFormatError):
        read(body)


_date_values = st.sampled_from(
    [
        "2023-11-07T05:31:56Z",
        "2023-11-07T05:31:56+0000",
        "2023-11-07T05:31:56.000Z",
        "2023-11-07T05:31:56",
        "2023-11-07T07:31:56+0200",
        "2023-11-07",
        "7 Nov 2023",
    ]
)


@given(
    field=st.sampled_from(sorted(refund_body())),
    value=json_values | _date_values | st.sampled_from(["OTHER", "COMPLETED", "USD", []]),
    drop=st.booleans(),
)
@example(field="skus", value={}, drop=False)
@example(field="errors", value=0, drop=False)
@example(field="skus", value=None, drop=False)
@example(field="status", value=True, drop=False)
@example(field="reason_code", value=[], drop=False)
@example(field="date_created", value=5, drop=False)
@example(field="date_created", value=None, drop=True)
@example(field="shipping", value={"amount": 5}, drop=False)
def test_the_fast_path_builds_what_cattrs_builds(field: str, value: Any, drop: bool) -> None:
    """The generated structuring function (inline checks, slots set directly) gives the
    same refund as cattrs' own detailed function, or fails where cattrs fails."""
    body = refund_body(**{field: value})
    if drop:
        del body[field]
    fast = converter.get_structure_hook(OrderRefund)
    cattrs_fn = fast.__globals__["slow"]  # the generated function's fallback
    try:
        expected = cattrs_fn(body, OrderRefund)
    except Exception:  # noqa: BLE001 - any cattrs failure: the fast path must fail too
        with pytest.raises(Exception):  # noqa: B017, PT011
            fast(body, OrderRefund)
        return
    got = fast(body, OrderRefund)
    assert got == expected
    assert [type(getattr(got, f)) for f in attrs_fields] == [
        type(getattr(expected, f)) for f in attrs_fields
    ]
    assert got.reconciled is False


@attrs.frozen
class _Tally:
    """A model unlike Violet's: plain defaults, a factory, a validator, a kw-only field."""

    name: str
    count: int = 7
    tags: list[str] = attrs.field(factory=list)
    score: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    note: str | None = attrs.field(default=None, kw_only=True)


def test_the_generated_function_handles_defaults_factories_and_validators() -> None:
    """Defaults other than null, factories (a new object each time) and a validator
    (so the model's own __init__ builds it, and a refusal goes to cattrs)."""
    fast = _fast_structure_fn(_Tally, converter)
    first = fast({"name": "a"}, _Tally)
    assert first == _Tally("a")
    assert fast({"name": "a"}, _Tally).tags is not first.tags
    assert fast({"name": "b", "count": 2, "tags": ["x"], "score": 3, "note": "n"}, _Tally) == (
        _Tally("b", 2, ["x"], 3, note="n")
    )
    with pytest.raises(ClassValidationError):
        fast({"name": "c", "score": -1}, _Tally)


@pytest.mark.parametrize(
    ("overrides", "field"), [({"skus": [[]]}, "$.skus[0]"), ({"shipping": []}, "$.shipping")]
)
def test_a_nested_value_that_is_not_an_object_is_never_an_empty_record(
    overrides: dict[str, Any], field: str
) -> None:
    """With every field optional, a list or null where an object belongs must still be
    an error naming it, never a record with nothing in it."""
    with pytest.raises(ResponseFormatError) as info:
        read(refund_body(**overrides))
    assert info.value.field == field


def test_a_refund_list_counts_every_record_it_cannot_read() -> None:
    """Records that are not objects, or carry a wrong type, are skipped and counted;
    the rest are read."""
    items = [None, [], "refund", {"amount": "1"}, refund_body(id=5), {"id": 6}]
    headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
    page = parse_refund_page(RawResponse(200, headers, orjson.dumps(items)), "/x")
    assert [r.id for r in page.refunds] == [5, 6]
    assert page.unreadable == 4


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", None),
        (b"[1, 2]", "$"),
        (orjson.dumps(refund_body(amount="10")), "$.amount"),
        (orjson.dumps(refund_body(skus=[{"id": 1}, {"quantity_refunded": "1"}])), None),
        (orjson.dumps(refund_body(skus="x")), "$.skus"),
        (orjson.dumps(refund_body(errors={"id": 1})), "$.errors"),
        (orjson.dumps(refund_body(skus=[{"id": 1}, {"id": 2}], errors=None)), "ok"),
    ],
)
def test_a_refund_answer_reads_as_the_general_route_reads_it(
    body: bytes, field: str | None
) -> None:
    """``parse_refund``'s happy path (decode and the generated hook in one step, the
    SKU lines structured in place) returns what the general route returns, and every
    body it cannot read goes to the general route, whose error names the field."""
    resp = RawResponse(200, CIMultiDictProxy(CIMultiDict()), body)
    try:
        expected: OrderRefund | None = read(decode(body, status=200, method="POST", path="/p"))
    except ResponseFormatError as exc:
        expected, error = None, exc
    if expected is None:
        with pytest.raises(ResponseFormatError) as info:
            parse_refund(resp, "/p")
        assert info.value.field == error.field
        if field is not None:
            assert info.value.field.startswith(field)
        return
    assert field == "ok"
    got = parse_refund(resp, "/p")
    assert got == expected
    assert [type(s) for s in got.skus] == [RefundedSku, RefundedSku]
    assert got.errors == ()
