"""Violet's enums. A value the SDK does not know is kept, never a crash.

Each enum is a ``str`` enum. Structuring an unknown value (Violet's APIs have shipped
misspellings such as ``BACKORDERD``) gives a pseudo-member that compares equal to its
string, has ``is_known == False`` and is never identical to a declared member.
"""

from __future__ import annotations

import enum

__all__ = ["BagStatus", "CancelStatus", "ReasonCode", "RefundStatus"]


class _OpenEnum(str, enum.Enum):
    """A str enum that keeps values it does not know."""

    @classmethod
    def _missing_(cls, value: object) -> _OpenEnum | None:
        if not isinstance(value, str):
            return None
        # Not cached on purpose: a misbehaving server must not grow our memory.
        member = str.__new__(cls, value)
        member._name_ = value
        member._value_ = value
        return member

    @property
    def is_known(self) -> bool:
        """True for a value this version of the SDK declares."""
        return type(self)._member_map_.get(self._name_) is self

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        suffix = "" if self.is_known else " (unknown)"
        return f"<{type(self).__name__}.{self._name_}{suffix}>"


class RefundStatus(_OpenEnum):
    """Status of a refund."""

    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"
    PARTIALLY_COMPLETED = "PARTIALLY_COMPLETED"
    FAILED = "FAILED"
    EXTERNAL = "EXTERNAL"

    @property
    def is_terminal(self) -> bool:
        """True when the refund will not change status any more.

        PROCESSING and unknown values are not terminal: wait, or read again.
        """
        return self.is_known and self is not RefundStatus.PROCESSING

    @property
    def is_failure(self) -> bool:
        """True when no money moved: FAILED or CANCELED."""
        return self in (RefundStatus.FAILED, RefundStatus.CANCELED)


class ReasonCode(_OpenEnum):
    """Code that best represents the reason for a cancellation or refund."""

    OTHER = "OTHER"
    CUSTOMER = "CUSTOMER"
    INVENTORY = "INVENTORY"
    FRAUD = "FRAUD"
    DECLINED = "DECLINED"


class BagStatus(_OpenEnum):
    """Status of a bag (one merchant's part of an order)."""

    IN_PROGRESS = "IN_PROGRESS"
    SUBMITTED = "SUBMITTED"
    ACCEPTED = "ACCEPTED"
    COMPLETED = "COMPLETED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
    REFUNDED = "REFUNDED"
    REJECTED = "REJECTED"
    CANCELED = "CANCELED"
    BACKORDERED = "BACKORDERED"

    @property
    def is_refundable(self) -> bool:
        """The refund page's rule: not IN_PROGRESS, REFUNDED or CANCELED."""
        return self.is_known and self not in (
            BagStatus.IN_PROGRESS,
            BagStatus.REFUNDED,
            BagStatus.CANCELED,
        )

    @property
    def is_cancellable(self) -> bool:
        """Bag states Violet can cancel (the bag must also be unfulfilled)."""
        return self in (
            BagStatus.ACCEPTED,
            BagStatus.SUBMITTED,
            BagStatus.COMPLETED,
            BagStatus.PARTIALLY_REFUNDED,
        )


class CancelStatus(_OpenEnum):
    """Outcome of a cancel, in the 202 cancellation body."""

    CANCELED = "CANCELED"
    PARTIALLY_CANCELED = "PARTIALLY_CANCELED"
    CANCELLATION_FAILURE = "CANCELLATION_FAILURE"
