"""Checks for request fields; each raises RequestValidationError naming the field.

Plain functions called from each request model's ``__attrs_post_init__``: one pass per
model is cheaper on the per-call path than one attrs validator call per field, and the
rules still read one line per field.
"""

from __future__ import annotations

from typing import Any

from ..exceptions import RequestValidationError

# JSON's safe integer range: anything larger is a bug, not a refund.
MAX_AMOUNT = 2**53 - 1
MAX_ID = 2**63 - 1
MAX_REASON_LENGTH = 255


def check_id(field: str, value: object) -> int:
    """A path id: a positive int (bool is an int subclass, and never an id)."""
    if type(value) is not int:
        raise RequestValidationError(field, f"must be an int, got {type(value).__name__}")
    if not 0 < value <= MAX_ID:
        raise RequestValidationError(field, f"must be a positive id, got {value!r}")
    return value


def check_amount(field: str, value: object) -> None:
    """Cents: an int >= 0 (never a float, and True is not one cent)."""
    if type(value) is not int:
        raise RequestValidationError(
            field, f"must be an int amount in cents, got {type(value).__name__}"
        )
    if not 0 <= value <= MAX_AMOUNT:
        raise RequestValidationError(
            field, f"must be between 0 and {MAX_AMOUNT} cents, got {value}"
        )


def check_int(field: str, value: object, minimum: int, maximum: int) -> None:
    if type(value) is not int:
        raise RequestValidationError(field, f"must be an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise RequestValidationError(field, f"must be between {minimum} and {maximum}, got {value}")


def check_reason(field: str, value: object) -> None:
    """Text up to 255 characters that JSON can carry."""
    if not isinstance(value, str):
        raise RequestValidationError(field, f"must be a str, got {type(value).__name__}")
    if len(value) > MAX_REASON_LENGTH:
        raise RequestValidationError(
            field, f"must be at most {MAX_REASON_LENGTH} characters, got {len(value)}"
        )
    if not value.isascii():  # the common case needs no encoding attempt
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestValidationError(
                field, "must be valid Unicode text (it contains a lone surrogate)"
            ) from None


def check_flag(field: str, value: object) -> None:
    if type(value) is not bool:
        raise RequestValidationError(field, f"must be a bool, got {type(value).__name__}")


def check_instance(field: str, value: object, cls: type[Any]) -> None:
    if not isinstance(value, cls):
        raise RequestValidationError(field, f"must be a {cls.__name__}, got {type(value).__name__}")


def check_known_member(field: str, value: object, enum_cls: type[Any]) -> None:
    """An enum member the SDK declares (a pseudo-member from a response is refused)."""
    if not (isinstance(value, enum_cls) and value.is_known):
        allowed = ", ".join(m.value for m in enum_cls)
        raise RequestValidationError(field, f"must be one of {allowed}, got {value!r}")
