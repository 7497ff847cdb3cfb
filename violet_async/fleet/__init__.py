"""Refunds on a fleet of asyncio workers, exactly once across hosts (extra: ``fleet``).

``pip install 'violet-async[fleet]'`` adds redis-py and arq. The pieces, each usable
from any asyncio worker:

- :class:`RedisLedger`: each refund item's state (new, sent, applied, pending, failed),
  keyed by its content; the ``sent`` record is written durably before a POST leaves.
- :class:`BagLocks`: one lock per bag across the fleet, renewed while an ask runs.
- :class:`FleetRateLimit`: one adaptive send budget per Violet app, shared in Redis.
- :class:`FleetPace`: each merchant's own adaptive pace, learned from its 429s, shared
  in Redis (a strict merchant slows only its own items).
- :class:`FleetWorker`: runs one item with all three (what a job calls).
- arq: :class:`WorkerSettings` (``arq violet_async.fleet.WorkerSettings``),
  :func:`enqueue`, :func:`refund_job`.
"""

from __future__ import annotations

from typing import Any

try:
    import arq as _arq  # noqa: F401
    import redis as _redis  # noqa: F401
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError(
        "violet_async.fleet needs the 'fleet' extra: pip install 'violet-async[fleet]'"
    ) from exc

from ._arq import (
    JOB_NAME,
    QUEUE_NAME,
    EnqueueReport,
    FleetConfig,
    create_fleet_pool,
    enqueue,
    job_deserializer,
    job_id,
    job_serializer,
    refund_job,
    worker_settings,
)
from ._ledger import (
    DurabilityError,
    Epoch,
    ForgedItemError,
    LedgerHeldError,
    LedgerLostError,
    LedgerRecord,
    LockLostError,
    NonDurableRedisError,
    RedisLedger,
    RefundOwnedError,
    item_key,
    keyed_items,
)
from ._lock import BagLocks, HeldLock, LockBusyError
from ._pace import FleetPace
from ._ratelimit import FleetRateLimit
from ._worker import FleetWorker, RetryLaterError

__all__ = [
    "JOB_NAME",
    "QUEUE_NAME",
    "BagLocks",
    "DurabilityError",
    "EnqueueReport",
    "Epoch",
    "FleetConfig",
    "FleetPace",
    "FleetRateLimit",
    "FleetWorker",
    "ForgedItemError",
    "HeldLock",
    "LedgerHeldError",
    "LedgerLostError",
    "LedgerRecord",
    "LockBusyError",
    "LockLostError",
    "NonDurableRedisError",
    "RedisLedger",
    "RefundOwnedError",
    "RetryLaterError",
    "WorkerSettings",
    "create_fleet_pool",
    "enqueue",
    "item_key",
    "job_deserializer",
    "job_id",
    "job_serializer",
    "keyed_items",
    "refund_job",
    "worker_settings",
]


def __getattr__(name: str) -> Any:
    # ``WorkerSettings`` reads the environment (VIOLET_REDIS_URL, VIOLET_FLEET_*): made
    # when first asked for, so that importing the package (every ``violet-async``
    # command does) never fails on a variable only ``arq`` workers read.
    if name == "WorkerSettings":
        from . import _arq as settings_module  # noqa: PLC0415

        return settings_module.WorkerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
