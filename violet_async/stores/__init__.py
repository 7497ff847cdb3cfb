"""Record stores: where ``idempotency_key`` calls keep their asks.

``VioletClient(store=...)`` takes one; the default is a :class:`MemoryStore` (this
process only). ``VioletClient.from_env()`` reads ``VIOLET_STORE``:
``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` or ``redis://...``.

=================  ==========================================  ==================
store              shared by                                   needs
=================  ==========================================  ==================
``MemoryStore``    the calls of one process                    nothing
``SQLiteStore``    the processes of one machine (one file)     nothing (sqlite3)
``RedisStore``     a fleet of machines                         the ``fleet`` extra
=================  ==========================================  ==================

Finished keys are kept :data:`DEFAULT_RETENTION` seconds (24 h; each store takes
``retention=``). A key whose ask has not finished is never dropped.
"""

from __future__ import annotations

from .._redis_url import unreadable_redis_url
from ..exceptions import RequestValidationError
from ._base import DEFAULT_LEASE, DEFAULT_RETENTION, Claim, KeyEntry, RecordStore
from ._memory import MemoryStore
from ._redis import RedisStore
from ._sqlite import SQLiteStore

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_RETENTION",
    "Claim",
    "KeyEntry",
    "MemoryStore",
    "RecordStore",
    "RedisStore",
    "SQLiteStore",
    "store_from_url",
]


def store_from_url(url: str, *, field: str = "VIOLET_STORE") -> RecordStore:
    """The store a ``VIOLET_STORE`` value names: ``sqlite:///path`` (three slashes and a
    relative path, or four and an absolute one), ``redis://...`` / ``rediss://...``,
    or ``memory``."""
    if url == "memory":
        return MemoryStore()
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise RequestValidationError(field, "sqlite:/// needs a file path after it")
        return SQLiteStore(path)
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:
            return RedisStore(url)
        except RequestValidationError as exc:
            if exc.field != "url":
                raise
            raise RequestValidationError(field, unreadable_redis_url(field)) from None
    raise RequestValidationError(
        field, "must be sqlite:///path, redis://host:port/db or memory (the value is not shown)"
    )
