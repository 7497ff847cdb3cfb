"""RedisStore: keys in Redis, shared by a fleet of processes and machines (the
``fleet`` extra: ``pip install 'violet-async[fleet]'``)."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from ..exceptions import RequestValidationError
from ._base import DEFAULT_LEASE, DEFAULT_RETENTION, Claim, KeyEntry, check_seconds, decide

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["DEFAULT_HOLD", "RedisStore"]

# KEYS: entry, epoch. The entry, the epoch's id and creation, and Redis's clock.
_READ = """
local epoch = redis.call('HMGET', KEYS[2], 'id', 'created')
local now = redis.call('TIME')
return {redis.call('GET', KEYS[1]), epoch[1], epoch[2], now[1], now[2]}
"""

# KEYS: epoch   ARGV: id. An epoch that was never young, created when missing (1).
_NEW_EPOCH = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'created', '0')
return 1
"""

#: Seconds an epoch is young (see :class:`RedisStore`): while it is, a new ask of a key
#: reads the bag before it is sent. Ten minutes: a job queue's or a web app's retry of
#: a call lost with Redis's data usually comes within it.
DEFAULT_HOLD = 600.0


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

    Redis losing its data (a restart with no persistence, a failover to a replica that
    had not received the write) would forget a key whose ask may have applied, and a
    repeat of the call would be sent blind. So the store keeps an **epoch** under its
    prefix (``prefix + "\\x00epoch"``: a hash of ``id`` and ``created``, Redis's own
    clock), created when missing. Each store remembers the epoch it saw; a claim checks
    it in the same WATCH / MULTI transaction as the key. When the epoch is gone or
    replaced (Redis lost data since this store looked), or is younger than ``hold``
    seconds (default 10 min; a process that just started cannot tell a new Redis from
    one that lost its data), a new ask of the key is marked
    :attr:`~violet_async.stores.KeyEntry.guard`: it reads the bag before it is sent and
    is held back (``RefundAlreadyPresentError``, nothing sent) when the bag already
    holds a refund exactly like it that nothing accounts for. A repeat arriving later
    than ``hold`` after the loss was first seen is not guarded: run Redis durably.
    :meth:`new_store` starts a store known to be new (an empty Redis that never held
    its keys) with no young epoch.

    Pass ``url`` (``redis://...``) or a ``redis.asyncio.Redis`` as ``client`` (yours:
    :meth:`aclose` leaves it open). The key and the epoch are written together: on a
    Redis Cluster give ``prefix`` a hash tag (``"{violet}:key:"``).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Redis | None = None,
        prefix: str = "violet:key:",
        retention: float = DEFAULT_RETENTION,
        lease: float = DEFAULT_LEASE,
        hold: float = DEFAULT_HOLD,
    ) -> None:
        check_seconds("retention", retention)
        check_seconds("lease", lease)
        check_seconds("hold", hold)
        if client is None:
            if url is None:
                raise RequestValidationError("url", "pass a redis:// url or client=")
            # The fleet extra's dependency: imported only when a RedisStore is made.
            from redis.asyncio import Redis  # noqa: PLC0415

            from .._redis_url import redis_url_problem, unreadable_redis_url  # noqa: PLC0415

            # Its password may be in it: a URL redis-py cannot read is never quoted.
            if redis_url_problem(url, "url") is not None:
                raise RequestValidationError("url", unreadable_redis_url("the Redis URL"))
            try:
                client = Redis.from_url(url)
            except (ValueError, TypeError, IndexError):
                raise RequestValidationError("url", unreadable_redis_url("the Redis URL")) from None
            self._owns_client = True
        else:
            self._owns_client = False
        self._redis: Any = client
        self.prefix = prefix
        self.retention = retention
        self.lease = lease
        self.hold = hold
        #: Where the epoch is kept (no idempotency key can hold a control character).
        self.epoch_key = prefix + "\x00epoch"
        # The epoch this store saw last, and whether it was seen older than ``hold``.
        self._epoch: str | None = None
        self._settled = False

    def __repr__(self) -> str:
        return f"<RedisStore prefix={self.prefix!r}>"

    async def __aenter__(self) -> RedisStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        found: list[tuple[Claim, KeyEntry]] = []

        def apply(current: KeyEntry | None, unsure: bool) -> KeyEntry | None:
            # A finished key is in Redis only within its retention, counted by Redis
            # (its expiry): never expired by the workers' wall clocks, which can step.
            claim, entry, write = decide(
                current, fresh, now=now, retention=self.retention, expired=False
            )
            if (
                claim is Claim.OWNED
                and write is not None
                and not write.guard
                and (unsure or (current is not None and current.guard))
            ):
                # Redis may have lost this key's entry (or did once): a new ask of it
                # reads the bag first and is not sent over a refund exactly like it.
                write = entry = attrs.evolve(write, guard=True)
            found[:] = [(claim, entry)]
            return write

        await self._update(fresh.key, apply, epoch=True)
        return found[0]

    async def new_store(self) -> bool:
        """Start the store's epoch as one known to be new (this Redis never held its
        keys, so nothing of it can have been lost): its first claims are not guarded.
        Does nothing (False) when the store has an epoch already."""
        made = await self._redis.eval(_NEW_EPOCH, 1, self.epoch_key, secrets.token_hex(8))
        return bool(made)

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        def apply(current: KeyEntry | None, unsure: bool) -> KeyEntry | None:
            if current is None or current.owner != owner:
                return None
            # The key's guard stays (the engine's records do not carry it).
            return attrs.evolve(entry, guard=True) if current.guard else entry

        return await self._update(entry.key, apply)

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        def apply(current: KeyEntry | None, unsure: bool) -> KeyEntry | None:
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

    async def _update(
        self,
        key: str,
        apply: Callable[[KeyEntry | None, bool], KeyEntry | None],
        *,
        epoch: bool = False,
    ) -> bool:
        """Read the entry, let ``apply`` say what to write (None: nothing), write it
        unless someone wrote the key in between (then read again). True when written.
        With ``epoch``: the store's epoch is read (and created when missing) in the
        same transaction, and ``apply`` is told whether Redis may have lost data."""
        from redis.exceptions import WatchError  # noqa: PLC0415 - the fleet extra

        name = self.prefix + key
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    seen: tuple[str, bool, str | None] | None = None
                    if epoch:
                        await _awaited(pipe.watch(name, self.epoch_key))
                        raw, seen = await self._read(pipe, name)
                    else:
                        await _awaited(pipe.watch(name))
                        raw = await pipe.get(name)
                    ident, unsure, made = seen if seen is not None else (None, False, None)
                    write = apply(None if raw is None else KeyEntry.from_json(raw), unsure)
                    if write is None and made is None:
                        await _awaited(pipe.unwatch())
                        self._saw(seen)
                        return False
                    pipe.multi()
                    if made is not None:  # the epoch was missing: created with the write
                        pipe.hset(self.epoch_key, mapping={"id": ident, "created": made})
                    if write is not None and write.finished_at is not None:
                        pipe.set(name, write.to_json(), px=int(self.retention * 1000))
                    elif write is not None:
                        pipe.set(name, write.to_json())
                    await pipe.execute()
                except WatchError:
                    continue
                self._saw(seen)
                return write is not None

    async def _read(self, pipe: Any, name: str) -> tuple[Any, tuple[str, bool, str | None]]:
        """The entry and the epoch as this (watched) read finds them, in one round trip:
        the epoch's id, whether Redis may have lost data (gone, replaced since this
        store looked, or younger than ``hold`` by Redis's own clock, which a worker's
        stepped wall clock cannot move), and the time to create it with when it is
        missing (None: it exists)."""
        raw, ident, created, seconds, micros = await pipe.eval(_READ, 2, name, self.epoch_key)
        now = float(_text(seconds) or 0) + float(_text(micros) or 0) / 1e6
        ident, created = _text(ident), _text(created)
        if ident is None:
            # Gone (Redis lost it) or never made: a new one, as young as can be.
            return raw, (secrets.token_hex(8), True, repr(now))
        if self._epoch is not None and ident != self._epoch:
            return raw, (ident, True, None)  # replaced since this store saw it
        if self._settled and ident == self._epoch:
            return raw, (ident, False, None)
        try:
            born = float(created or "")
        except ValueError:
            born = float("inf")  # unreadable: young
        return raw, (ident, born + self.hold > now, None)

    def _saw(self, seen: tuple[str, bool, str | None] | None) -> None:
        """Remember the epoch a finished claim saw."""
        if seen is None:
            return
        ident, unsure, _ = seen
        self._settled = not unsure
        self._epoch = ident


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


async def _awaited(result: Awaitable[Any] | Any) -> Any:
    # redis-py types some pipeline methods as "awaitable or not".
    if isinstance(result, Awaitable):
        return await result
    return result
