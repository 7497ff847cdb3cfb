"""One lock per bag across the fleet: no two workers refund or cancel a bag at once.

Redis, one key per bag (``P:lock:bag:<bag_id>``) holding a random token::

    acquire   SET key token NX PX ttl            (polled, with jitter, up to ``wait``)
    renew     Lua: if GET key == token then PEXPIRE key ttl   (every ttl/3)
    release   Lua: if GET key == token then DEL key

A holder whose renewal fails (the key expired, another worker took it, Redis is gone)
has lost the lock: :attr:`HeldLock.lost` is set and its ``on_lost`` callback runs (the
fleet worker cancels the ask). The ledger's ``sent`` write checks the token in the same
Lua script, so a worker that lost its lock cannot record a send, and never sends; its
``pending``, ``new`` and ``failed`` writes check it too, so it cannot overwrite the
record of the worker that holds the lock now.

Remaining risk: a process frozen (SIGSTOP, a swap storm) for longer than ``ttl`` between
that check and the POST leaving could send while another worker holds the lock. The
other worker then finds the ``sent`` record only if the frozen one wrote it; keep
``ttl`` well above any pause you expect (the default is 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from ._ledger import DEFAULT_PREFIX

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["BagLocks", "HeldLock", "LockBusyError"]

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LockBusyError(Exception):
    """Another worker held the bag's lock for longer than this one would wait."""


class HeldLock:
    """A lock this worker holds; renewed in the background until released."""

    def __init__(self, key: str, token: str, reads: list[Any] | None = None) -> None:
        self.key = key
        self.token = token
        self.lost = asyncio.Event()
        #: The answers to the reads queued after the lock was taken, in the same round
        #: trip (:meth:`BagLocks.acquire`'s ``reads``; None: none were asked for).
        self.reads = reads
        #: Let go of already, with the holder's last write (the ledger's applied
        #: script): :meth:`BagLocks.hold` has nothing left to release.
        self.released = False


class BagLocks:
    """Per-bag locks in Redis (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = 30.0,
        poll: float = 0.05,
    ) -> None:
        if ttl <= 0 or poll <= 0:
            raise ValueError("ttl and poll must be > 0")
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl
        self.poll = poll
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def key(self, bag_id: int) -> str:
        return f"{self.prefix}:lock:bag:{bag_id}"

    async def acquire(
        self, bag_id: int, *, wait: float = 10.0, reads: Callable[[Any], object] | None = None
    ) -> HeldLock:
        """Take the bag's lock, waiting up to ``wait`` seconds (LockBusyError).

        ``reads`` queues reads on a pipeline that takes the lock first: Redis runs them
        after the ``SET NX``, in the same round trip, so when the lock was taken they
        are read under it (their answers: :attr:`HeldLock.reads`); a try that did not
        take it throws its answers away. Reads only: a write there would be made
        without the lock."""
        key = self.key(bag_id)
        token = secrets.token_hex(16)
        ttl_ms = int(self.ttl * 1000)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + wait
        delay = self.poll
        while True:
            if reads is None:
                taken, answers = await self.redis.set(key, token, nx=True, px=ttl_ms), None
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(key, token, nx=True, px=ttl_ms)
                    reads(pipe)
                    taken, *answers = await pipe.execute()
            if taken:
                return HeldLock(key, token, answers)
            if loop.time() >= give_up:
                raise LockBusyError(f"bag {bag_id} is locked by another worker")
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, 1.0)

    async def renew(self, held: HeldLock) -> bool:
        """Extend ``held`` by ``ttl``; False (and ``held.lost`` set) when it is gone."""
        ok = bool(await self._renew(keys=[held.key], args=[held.token, int(self.ttl * 1000)]))
        if not ok:
            held.lost.set()
        return ok

    async def release(self, held: HeldLock) -> None:
        """Drop ``held`` if it is still this worker's (never another's)."""
        await self._release(keys=[held.key], args=[held.token])

    @contextlib.asynccontextmanager
    async def hold(
        self,
        bag_id: int,
        *,
        wait: float = 10.0,
        on_lost: Callable[[], object] | None = None,
        reads: Callable[[Any], object] | None = None,
    ) -> AsyncIterator[HeldLock]:
        """The bag's lock for the block, renewed every ``ttl / 3`` seconds (``reads``:
        as :meth:`acquire`'s)."""
        held = await self.acquire(bag_id, wait=wait, reads=reads)
        keeper = asyncio.create_task(self._keep(held, on_lost))
        try:
            yield held
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            if not held.released:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.release(held))

    async def _keep(self, held: HeldLock, on_lost: Callable[[], object] | None) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                ok = await asyncio.wait_for(self.renew(held), self.ttl / 3)
            except (asyncio.TimeoutError, OSError, RedisError):
                ok = False
                held.lost.set()
            if not ok:
                if on_lost is not None:
                    on_lost()
                return
