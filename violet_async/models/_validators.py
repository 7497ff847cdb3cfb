"""attrs validators that raise RequestValidationError naming the field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from ..exceptions import RequestValidationError

# JSON's safe integer range: anything larger is a bug, not a refund.
MAX_AMOUNT = 2**53 - 1
MAX_ID = 2**63 - 1
MAX_REASON_LENGTH = 255

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _is_int(value: object) -> bool:
    # bool is an int subclass: True must never become a one-cent refund.
    return type(value) is int


def check_id(field: str, value: object) -> int:
    """A path id: a positive int."""
    if not _is_int(value):
        raise RequestValidationError(field, f"must be an int, got {type(value).__name__}")
    if not 0 < value <= MAX_ID:  # type: ignore[operator]
        raise RequestValidationError(field, f"must be a positive id, got {value!r}")
    return value  # type: ignore[return-value]


def amount(optional: bool) -> Validator:
    """Cents: an int >= 0 (never a float or bool)."""

    def validate(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None and optional:
            return
        if not _is_int(value):
            raise RequestValidationError(
                attribute.name,
                f"must be an int amount in cents, got {type(value).__name__}",
            )
        if not 0 <= value <= MAX_AMOUNT:  # type: ignore[operator]
            raise RequestValidationError(
                attribute.name, f"must be between 0 and {MAX_AMOUNT} cents, got {value}"
            )

    return validate


def positive_int(minimum: int, maximum: int) -> Validator:
    def validate(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not _is_int(value):
            raise RequestValidationError(
                attribute.name, f"must be an int, got {type(value).__name__}"
            )
        if not minimum <= value <= maximum:  # type: ignore[operator]
            raise RequestValidationError(
                attribute.name, f"must be between {minimum} and {maximum}, got {value}"
            )

    return validate


def reason(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """Optional text up to 255 characters that JSON can carry."""
    if value is None:
        return
    if not isinstance(value, str):
        raise RequestValidationError(attribute.name, f"must be a str, got {type(value).__name__}")
    if len(value) > MAX_REASON_LENGTH:
        raise RequestValidationError(
            attribute.name, f"must be at most {MAX_REASON_LENGTH} characters, got {len(value)}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestValidationError(
            attribute.name, "must be valid Unicode text (it contains a lone surrogate)"
        ) from None


def flag(optional: bool) -> Validator:
    def validate(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None and optional:
            return
        if type(value) is not bool:
            raise RequestValidationError(
                attribute.name, f"must be a bool, got {type(value).__name__}"
            )

    return validate


def instance_of(cls: type[Any], *, optional: bool) -> Validator:
    def validate(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None and optional:
            return
        if not isinstance(value, cls):
            raise RequestValidationError(
                attribute.name, f"must be a {cls.__name__}, got {type(value).__name__}"
            )

    return validate


def known_member(enum_cls: type[Any]) -> Validator:
    """An enum member the SDK declares (a pseudo-member from a response is refused)."""

    def validate(_inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not (isinstance(value, enum_cls) and value.is_known):
            allowed = ", ".join(m.value for m in enum_cls)
            raise RequestValidationError(attribute.name, f"must be one of {allowed}, got {value!r}")

    return validate
