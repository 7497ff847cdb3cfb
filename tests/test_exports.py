"""The public surface is exactly DESIGN.md's import list (plus documented growth)."""

from __future__ import annotations

import violet_async

DESIGN_NAMES = [
    "VioletClient",
    "Environment",
    "RetryPolicy",
    "Timeouts",
    "CancelBagRequest",
    "RefundBagRequest",
    "SkuRefund",
    "ShippingRefund",
    "OrderRefund",
    "RefundedSku",
    "RefundError",
    "RefundShipping",
    "RefundStatus",
    "ReasonCode",
    "BagStatus",
    "VioletError",
    "APIError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "RateLimitError",
    "ServerError",
    "APIConnectionError",
    "APITimeoutError",
    "RequestValidationError",
    "ResponseFormatError",
    "AmbiguousOutcomeError",
    "RefundFailedError",
    "CancellationFailedError",
    "PendingRefund",
    "IdempotencyKeyReusedError",
]


def test_all_is_sorted() -> None:
    """__all__ is sorted, so additions are easy to review."""
    assert violet_async.__all__ == sorted(violet_async.__all__)


def test_all_is_complete_and_importable() -> None:
    """Every public name of the module is in __all__ and every entry exists."""
    public = {n for n in dir(violet_async) if not n.startswith("_")} - {
        "batch",
        "exceptions",
        "fleet",
        "models",
        "stores",
        "telemetry",
        "testing",
        "webhooks",
    }
    assert public <= set(violet_async.__all__)
    for name in violet_async.__all__:
        assert hasattr(violet_async, name), name


def test_design_contract_names_are_exported() -> None:
    """Every name DESIGN.md promises can be imported from the package."""
    missing = [n for n in DESIGN_NAMES if n not in violet_async.__all__]
    assert missing == []


def test_version_is_exposed() -> None:
    """__version__ is a dotted version string."""
    assert violet_async.__version__.count(".") == 2


def test_stores_module_exports_the_three_stores() -> None:
    """DESIGN.md's `from violet_async.stores import MemoryStore, SQLiteStore, RedisStore`."""
    from violet_async import stores

    assert {"MemoryStore", "SQLiteStore", "RedisStore"} <= set(stores.__all__)
