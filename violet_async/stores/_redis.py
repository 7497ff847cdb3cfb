"""RedisStore: keys in Redis, shared by a fleet of processes and machines (the
``fleet`` extra: ``pip install 'violet-async[fleet]'``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from ..exceptions import RequestValidationError
from ._base import DEFAULT_LEASE, DEFAULT_RETENTION, Claim, KeyEntry, check_seconds, decide

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisStore"]


class RedisStore:
    """Idempotency keys in Redis, one string per key (``prefix`` + key), written in
    WATCH / MULTI transactions so that two workers claiming one key run one after the
    other. Finished keys expire after ``retention`` seconds (default 24 h), counted by
    Redis on its own clock (a worker's wall clock stepped forward frees no key early);
    unfinished ones never do.

    A record is as durable as your Redis makes it: run it with ``appendonly yes`` and
    ``appendfsync always`` if a record must survive Redis itself crashing right
    before a POST leaves. Lease times are the workers' wall clocks: keep them in sync
    (NTP) to well within ``lease`` (default 30 s).

    Pass ``url`` (``redis://...``) or a ``redis.asyncio.Redis`` as ``client`` (yours:
    :meth:`aclose` leaves it open).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | None = None,
        prefix: str = "violet:key:",
        retention: float = DEFAULT_RETENTION,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        check_seconds("retention", retention)
        check_seconds("lease", lease)
        if client is None:
            if url is None:
                raise RequestValidationError("url", "pass a redis:// url or client=")
            # The fleet extra's dependency: imported only when a RedisStore is made.
            from redis.asyncio import Redis  # noqa: PLC0415

            client = Redis.from_url(url)
            self._owns_client = True
        else:
            self._owns_client = False
        self._redis: Any = client
        self.prefix = prefix
        self.retention = retention
        self.lease = lease

    def __repr__(self) -> str:
        return f"<RedisStore prefix={self.prefix!r}>"

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        found: list[tuple[Claim, KeyEntry]] = []

        def apply(current: KeyEntry | None) -> KeyEntry | None:
            # A finished key is in Redis only within its retention, counted by Redis
            # (its expiry): never expired by the workers' wall clocks, which can step.
            claim, entry, write = decide(
                current, fresh, now=now, retention=self.retention, expired=False
            )
            found[:] = [(claim, entry)]
            return write

        await self._update(fresh.key, apply)
        return found[0]

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        def apply(current: KeyEntry | None) -> KeyEntry | None:
            return entry if current is not None and current.owner == owner else None

        return await self._update(entry.key, apply)

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        def apply(current: KeyEntry | None) -> KeyEntry | None:
            if current is None or current.owner != owner:
                return None
            return attrs.evolve(current, lease_until=lease_until)

        return await self._update(key, apply)

    async def expired(self, key: str, now: float) -> bool:
        """Always False: a finished key is in Redis only within its retention (Redis
        expires it on its own clock)."""
        return False

    async def load(self, key: str) -> KeyEntry | None:
        raw = await self._redis.get(self.prefix + key)
        return None if raw is None else KeyEntry.from_json(raw)

    async def aclose(self) -> None:
        if self._owns_client:
            self._owns_client = False
            await self._redis.aclose()

    async def _update(self, key: str, apply: Callable[[KeyEntry | None], KeyEntry | None]) -> bool:
        """Read the entry, let ``apply`` say what to write (None: nothing), write it
        unless someone wrote the key in between (then read again). True when written."""
        from redis.exceptions import WatchError  # noqa: PLC0415 - the fleet extra

        name = self.prefix + key
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await _awaited(pipe.watch(name))
                    raw = await pipe.get(name)
                    write = apply(None if raw is None else KeyEntry.from_json(raw))
                    if write is None:
                        await _awaited(pipe.unwatch())
                        return False
                    pipe.multi()
                    if write.finished_at is not None:
                        pipe.set(name, write.to_json(), px=int(self.retention * 1000))
                    else:
                        pipe.set(name, write.to_json())
                    await pipe.execute()
                except WatchError:
                    continue
                return True


async def _awaited(result: Awaitable[Any] | Any) -> Any:
    # redis-py types some pipeline methods as "awaitable or not".
    if isinstance(result, Awaitable):
        return await result
    return result
