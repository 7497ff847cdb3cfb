"""Request models validate themselves; enums keep unknown values."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from violet_async import (
    BagStatus,
    CancelBagRequest,
    ReasonCode,
    RefundBagRequest,
    RefundStatus,
    RequestValidationError,
    ShippingRefund,
    SkuRefund,
    VioletError,
)
from violet_async._converter import encode_request


def body(request: Any) -> dict[str, Any]:
    decoded: dict[str, Any] = orjson.loads(encode_request(request))
    return decoded


def test_empty_requests_send_an_empty_body() -> None:
    """RefundBagRequest() and CancelBagRequest() send {}: Violet applies its defaults."""
    assert body(RefundBagRequest()) == {}
    assert body(CancelBagRequest()) == {}


def test_refund_notify_unset_lets_the_merchant_default_apply() -> None:
    """notify_customer is omitted unless given; a given False is sent as false."""
    assert "notify_customer" not in body(RefundBagRequest(amount_refunded=1000))
    assert "notify_customer" not in body(RefundBagRequest(notify_customer=None))
    assert body(RefundBagRequest(notify_customer=False)) == {"notify_customer": False}


def test_refund_full_body_matches_the_spec_example() -> None:
    """The spec page's example body is produced field for field."""
    request = RefundBagRequest(
        amount_refunded=1000,
        shipping=ShippingRefund(amount=500),
        skus=[SkuRefund(order_sku_id=10000, quantity_refunded=1, amount_refunded=500)],
        reason="Customer requested refund.",
    )
    assert body(request) == {
        "amount_refunded": 1000,
        "shipping": {"amount": 500},
        "skus": [{"order_sku_id": 10000, "quantity_refunded": 1, "amount_refunded": 500}],
        "reason": "Customer requested refund.",
    }


def test_cancel_sends_given_fields_even_when_they_equal_the_server_default() -> None:
    """A cancel field the caller passes is sent as given, defaults included."""
    request = CancelBagRequest(
        reason_code=ReasonCode.OTHER, restock_items=True, notify_customer=False
    )
    assert body(request) == {
        "reason_code": "OTHER",
        "restock_items": True,
        "notify_customer": False,
    }


def test_cancel_accepts_the_reason_code_string() -> None:
    """A reason code given as its exact string becomes the enum member."""
    assert CancelBagRequest(reason_code="FRAUD").reason_code is ReasonCode.FRAUD  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: RefundBagRequest(amount_refunded=-1), "amount_refunded"),
        (lambda: RefundBagRequest(amount_refunded=10.0), "amount_refunded"),
        (lambda: RefundBagRequest(amount_refunded=True), "amount_refunded"),
        (lambda: RefundBagRequest(amount_refunded="10"), "amount_refunded"),
        (lambda: RefundBagRequest(amount_refunded=2**60), "amount_refunded"),
        (lambda: RefundBagRequest(reason="x" * 256), "reason"),
        (lambda: RefundBagRequest(reason="\ud800"), "reason"),
        (lambda: RefundBagRequest(reason=5), "reason"),
        (lambda: RefundBagRequest(restock_items=1), "restock_items"),
        (lambda: RefundBagRequest(notify_customer="yes"), "notify_customer"),
        (lambda: RefundBagRequest(reason="café \ud800"), "reason"),
        (lambda: RefundBagRequest(shipping={"amount": 1}), "shipping"),
        (lambda: RefundBagRequest(skus=[]), "skus"),
        (lambda: RefundBagRequest(skus="abc"), "skus"),
        (lambda: RefundBagRequest(skus=[{"order_sku_id": 1}]), "skus[0]"),
        (
            lambda: RefundBagRequest(skus=[SkuRefund(order_sku_id=1, quantity_refunded=1)] * 2),
            "skus[1].order_sku_id",
        ),
        (lambda: SkuRefund(order_sku_id=1, quantity_refunded=0), "quantity_refunded"),
        (lambda: SkuRefund(order_sku_id=0, quantity_refunded=1), "order_sku_id"),
        (
            lambda: SkuRefund(order_sku_id=1, quantity_refunded=1, amount_refunded=-5),
            "amount_refunded",
        ),
        (lambda: ShippingRefund(amount=1.5), "amount"),
        (lambda: CancelBagRequest(reason_code="NOPE"), "reason_code"),
        (lambda: CancelBagRequest(reason_code=ReasonCode("WEIRD")), "reason_code"),
        (lambda: CancelBagRequest(notify_customer="no"), "notify_customer"),
        (lambda: CancelBagRequest(restock_items=0), "restock_items"),
        (lambda: CancelBagRequest(reason="x" * 256), "reason"),
    ],
)
def test_invalid_fields_raise_a_typed_error_naming_the_field(build: Any, field: str) -> None:
    """Every invalid value raises RequestValidationError naming the field."""
    with pytest.raises(RequestValidationError) as info:
        build()
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, VioletError)


def test_request_models_are_frozen() -> None:
    """Requests cannot be changed after validation."""
    request = RefundBagRequest(amount_refunded=5)
    with pytest.raises(AttributeError):
        request.amount_refunded = -5  # type: ignore[misc]


def test_skus_list_is_frozen_to_a_tuple() -> None:
    """A list of SKUs is copied into a tuple, so mutating the list changes nothing."""
    skus = [SkuRefund(order_sku_id=1, quantity_refunded=1)]
    request = RefundBagRequest(skus=skus)
    skus.append(SkuRefund(order_sku_id=2, quantity_refunded=1))
    assert len(request.skus or ()) == 1


def test_unknown_enum_values_are_kept_and_flagged() -> None:
    """An unknown status is kept as a pseudo-member, equal to its string, not known."""
    odd = BagStatus("BACKORDERD")
    assert odd == "BACKORDERD"
    assert not odd.is_known
    assert BagStatus.BACKORDERED.is_known
    assert "unknown" in repr(odd)
    assert str(odd) == "BACKORDERD"
    assert not odd.is_refundable
    with pytest.raises(ValueError, match="not a valid"):
        RefundStatus(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "terminal", "failure"),
    [
        (RefundStatus.PROCESSING, False, False),
        (RefundStatus.COMPLETED, True, False),
        (RefundStatus.PARTIALLY_COMPLETED, True, False),
        (RefundStatus.FAILED, True, True),
        (RefundStatus.CANCELED, True, True),
        (RefundStatus.EXTERNAL, True, False),
        (RefundStatus("SOMETHING_NEW"), False, False),
    ],
)
def test_refund_status_helpers(status: RefundStatus, terminal: bool, failure: bool) -> None:
    """is_terminal / is_failure follow the documented table."""
    assert status.is_terminal is terminal
    assert status.is_failure is failure


def test_bag_status_helpers() -> None:
    """Refundable and cancellable follow the spec pages' state lists."""
    assert BagStatus.COMPLETED.is_refundable
    assert not BagStatus.IN_PROGRESS.is_refundable
    assert not BagStatus.REFUNDED.is_refundable
    assert BagStatus.PARTIALLY_REFUNDED.is_cancellable
    assert not BagStatus.CANCELED.is_cancellable


amounts = st.one_of(
    st.none(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=5),
)


@given(
    amount=amounts,
    reason=st.one_of(st.none(), st.text(max_size=300), st.integers()),
    restock=st.one_of(st.none(), st.booleans(), st.integers(0, 1)),
    sku_qty=st.one_of(st.integers(-3, 3), st.floats(), st.none()),
)
def test_any_refund_input_validates_or_raises_request_validation_error(
    amount: Any, reason: Any, restock: Any, sku_qty: Any
) -> None:
    """Arbitrary field values either build a request that serializes, or raise
    RequestValidationError; never another exception."""
    try:
        request = RefundBagRequest(
            amount_refunded=amount,
            reason=reason,
            restock_items=restock,
            skus=[SkuRefund(order_sku_id=7, quantity_refunded=sku_qty)],
        )
    except RequestValidationError:
        return
    decoded = body(request)
    assert decoded["skus"][0]["quantity_refunded"] >= 1
    if amount is not None:
        assert decoded["amount_refunded"] == amount


@given(
    amount=st.one_of(st.none(), st.integers(1, 2**53 - 1)),
    reason=st.one_of(
        st.none(),
        st.text(max_size=255).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
    ),
)
def test_valid_requests_round_trip_through_json(amount: int | None, reason: str | None) -> None:
    """A valid request's JSON carries exactly its set fields."""
    decoded = body(RefundBagRequest(amount_refunded=amount, reason=reason))
    assert decoded.get("amount_refunded") == amount
    assert decoded.get("reason") == reason
    assert None not in decoded.values()


refund_fields = st.fixed_dictionaries(
    {},
    optional={
        "amount_refunded": st.integers(1, 2**53 - 1),
        "shipping": st.builds(ShippingRefund, amount=st.integers(0, 10_000)),
        "skus": st.lists(
            st.builds(SkuRefund, order_sku_id=st.integers(1, 10**6), quantity_refunded=st.just(1)),
            min_size=1,
            max_size=3,
            unique_by=lambda sku: sku.order_sku_id,
        ),
        "reason": st.text(st.characters(codec="utf-8"), max_size=255),
        "restock_items": st.booleans(),
        "notify_customer": st.booleans(),
    },
)
cancel_fields = st.fixed_dictionaries(
    {},
    optional={
        "reason_code": st.sampled_from([*ReasonCode, *(code.value for code in ReasonCode)]),
        "reason": st.text(st.characters(codec="utf-8"), max_size=255),
        "restock_items": st.booleans(),
        "notify_customer": st.booleans(),
    },
)


@given(fields=refund_fields)
def test_refund_body_keys_are_exactly_the_fields_given(fields: dict[str, Any]) -> None:
    """A refund body's keys are exactly the fields passed: no defaults, no nulls."""
    assert set(body(RefundBagRequest(**fields))) == set(fields)


@given(fields=cancel_fields)
def test_cancel_body_keys_are_exactly_the_fields_given(fields: dict[str, Any]) -> None:
    """A cancel body's keys are exactly the fields passed: no defaults, no nulls."""
    decoded = body(CancelBagRequest(**fields))
    assert set(decoded) == set(fields)
    if "reason_code" in fields:
        assert decoded["reason_code"] == ReasonCode(fields["reason_code"]).value


def test_sku_amount_left_unset_is_omitted_not_null() -> None:
    """A SKU line without amount_refunded is sent without the key, never as null."""
    request = RefundBagRequest(skus=[SkuRefund(order_sku_id=5, quantity_refunded=2)])
    assert body(request) == {"skus": [{"order_sku_id": 5, "quantity_refunded": 2}]}
