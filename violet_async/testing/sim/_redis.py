"""An in-memory Redis for the fleet's ledger and bag locks, in the simulator's time.

The simulator runs the real :class:`~violet_async.fleet.FleetWorker`, with the real
:class:`~violet_async.fleet.RedisLedger` and :class:`~violet_async.fleet.BagLocks`, on
one deterministic virtual-time loop: a redis-server per schedule is not possible there.
What it cannot run is Redis itself, so this module is Redis, for the few commands and
the Lua scripts those two classes use (and nothing else: any other script is refused
when it is registered).

Each Lua script is written again below as a Python function with the same steps, in
the same order, returning what Redis would (Lua integers as ints, strings as bytes,
``false`` as None, a number turned to text by Lua's ``%.14g``). A script runs to its end
with nothing interleaved, as in Redis. ``tests/test_sim_redis.py`` runs one table of
ledger and lock scenarios on this and on a real redis-server and requires identical
results, so the copy cannot drift from the scripts silently.

- :class:`MemoryRedisServer`: the keyspace (hashes, sets, strings with a PX expiry) and
  its clock (``TIME``, expiries); :meth:`~MemoryRedisServer.lose` empties it (a Redis
  restarting with no data).
- :class:`MemoryRedis`: one client connection of one worker process. A connection that
  is ``closed`` (its process died) raises ``ConnectionError`` on every command;
  ``on_write`` is called after each write to an item's record (a death "right after
  the n-th ledger write").
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from ...fleet import _ledger, _lock, _pace, _ratelimit

__all__ = ["MemoryRedis", "MemoryRedisServer"]

_Value = dict[bytes, bytes] | set[bytes] | bytes
_TERMINAL = (b"applied", b"failed")


def _b(value: Any) -> bytes:
    """What redis-py sends for ``value`` (and Redis then keeps): bytes."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        raise TypeError("redis-py refuses a bool")
    if isinstance(value, float):
        return repr(value).encode()
    if isinstance(value, int):
        return str(value).encode()
    raise TypeError(f"redis-py cannot send {type(value).__name__}")


def _number(text: bytes | None) -> float:
    """Lua's ``tonumber`` of a string Redis returned."""
    return float(text) if text is not None else 0.0


def _tonumber(text: bytes) -> float | None:
    """Lua's ``tonumber`` of an argument (None: Lua's nil, not a number)."""
    try:
        return float(text) if b"_" not in text else None
    except ValueError:
        return None


def _lua_tostring(number: float) -> bytes:
    """Lua 5.1's ``tostring`` of a number (``%.14g``)."""
    return (f"{number:.14g}").encode()


class MemoryRedisServer:
    """The keyspace and clock every :class:`MemoryRedis` connection shares."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.data: dict[bytes, _Value] = {}
        self.expires: dict[bytes, float] = {}
        #: Writes to items' records (what a worker dies right after).
        self.writes = 0

    def client(self) -> MemoryRedis:
        """A new connection (one worker process's)."""
        return MemoryRedis(self)

    def lose(self) -> None:
        """Redis restarts with no data: every key is gone."""
        self.data.clear()
        self.expires.clear()

    def exists(self, key: str) -> bool:
        return self._live(_b(key)) is not None

    def time(self) -> tuple[int, int]:
        """Redis's ``TIME``, from the clock: whole seconds and microseconds."""
        now = self.clock()
        seconds = int(now)
        micros = round((now - seconds) * 1e6)
        if micros >= 1_000_000:
            seconds, micros = seconds + 1, micros - 1_000_000
        return seconds, micros

    # -- the keyspace ------------------------------------------------------------

    def _live(self, key: bytes) -> _Value | None:
        until = self.expires.get(key)
        if until is not None and until <= self.clock():
            del self.expires[key]
            self.data.pop(key, None)
        return self.data.get(key)

    def _hash(self, key: bytes, create: bool = False) -> dict[bytes, bytes]:
        found = self._live(key)
        if found is None:
            found = {}
            if create:
                self.data[key] = found
        if not isinstance(found, dict):
            raise TypeError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return found

    def _set(self, key: bytes, create: bool = False) -> set[bytes]:
        found = self._live(key)
        if found is None:
            found = set()
            if create:
                self.data[key] = found
        if not isinstance(found, set):
            raise TypeError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return found

    def get(self, key: bytes) -> bytes | None:
        found = self._live(key)
        if found is not None and not isinstance(found, bytes):
            raise TypeError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return found

    def hget(self, key: bytes, field: bytes) -> bytes | None:
        return self._hash(key).get(field)

    def hset(self, key: bytes, *pairs: bytes) -> None:
        table = self._hash(key, create=True)
        for field, value in zip(pairs[::2], pairs[1::2], strict=True):
            table[field] = value

    def hincrby(self, key: bytes, field: bytes, amount: int) -> int:
        table = self._hash(key, create=True)
        found = table.get(field, b"0")
        if not found.lstrip(b"-").isdigit():
            raise TypeError("ERR hash value is not an integer")
        table[field] = str(int(found) + amount).encode()
        return int(table[field])

    def put(self, key: bytes, value: bytes, px: int | None = None) -> None:
        self.data[key] = value
        self.expires.pop(key, None)
        if px is not None:
            self.expires[key] = self.clock() + px / 1000

    def hmget(self, key: bytes, *fields: bytes) -> list[bytes | None]:
        table = self._hash(key)
        return [table.get(f) for f in fields]

    def sadd(self, key: bytes, *members: bytes) -> int:
        found = self._set(key, create=True)
        added = len(set(members) - found)
        found.update(members)
        return added

    def srem(self, key: bytes, *members: bytes) -> int:
        found = self._set(key)
        removed = len(found & set(members))
        found.difference_update(members)
        if not found:
            self.data.pop(key, None)
            self.expires.pop(key, None)
        return removed

    def delete(self, key: bytes) -> int:
        gone = self._live(key) is not None
        self.data.pop(key, None)
        self.expires.pop(key, None)
        return int(gone)

    def pexpire(self, key: bytes, millis: int) -> int:
        if self._live(key) is None:
            return 0
        self.expires[key] = self.clock() + millis / 1000
        return 1

    def wrote(self) -> None:
        self.writes += 1


# -- the Lua scripts, step for step --------------------------------------------------
# Each takes the server, KEYS and ARGV (as bytes) and returns Redis's reply.

_Keys = list[bytes]


def _write(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> int:  # _ledger._WRITE
    current = r.hget(keys[0], b"state")
    if current is None:
        return -2
    if argv[2] != b"" and r.get(keys[2]) != argv[2]:
        return -1
    if len(keys) > 3:
        r.srem(keys[3], argv[0])
    if current in _TERMINAL:
        return 0
    r.hset(keys[0], b"state", argv[1], *argv[3:])
    r.hset(keys[1], argv[0], argv[1])
    r.wrote()
    return 1


def _register(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> bytes | None:  # _REGISTER
    current = r.hget(keys[0], b"state")
    if current is not None:
        return current
    r.hset(keys[0], b"state", b"new", *argv[1:])
    r.hset(keys[1], argv[0], b"new")
    r.wrote()
    return None


def _send(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> int | list[Any]:  # _SEND
    if argv[3] != b"":
        epoch_id, hold_until = r.hmget(keys[3], b"id", b"hold_until")
        if epoch_id != argv[3]:
            return -2
        if _number(hold_until) > _number(argv[4]):
            return [-3, hold_until]
    if r.get(keys[2]) != argv[2]:
        return -1
    current = r.hget(keys[0], b"state")
    if current in _TERMINAL:
        return 0
    r.hset(keys[0], b"state", argv[1], *argv[5:])
    r.hset(keys[1], argv[0], argv[1])
    r.sadd(keys[4], argv[0])
    r.wrote()
    return 1


def _applied(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> int:  # _APPLIED
    current = r.hget(keys[0], b"state")
    if current is None:
        return -2
    if current in _TERMINAL:
        return 0
    if argv[1] != b"":
        owner = r.hget(keys[3], argv[1])
        if owner is not None and owner != argv[0]:
            return -1
        r.hset(keys[3], argv[1], argv[0])
        r.hset(keys[5], argv[1], argv[2])
        r.sadd(keys[2], argv[1])
        r.hset(keys[0], b"refund_id", argv[1])
    r.hset(keys[0], b"state", b"applied", *argv[4:])
    r.hset(keys[1], argv[0], b"applied")
    r.srem(keys[4], argv[0])
    if argv[3] != b"" and r.get(keys[6]) == argv[3]:
        r.delete(keys[6])
    r.wrote()
    return 1


def _epoch(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> list[bytes | None]:  # _EPOCH
    if r._live(keys[0]) is None:
        r.hset(keys[0], b"id", argv[0], b"created", argv[1], b"hold_until", argv[2])
    return r.hmget(keys[0], b"id", b"hold_until")


def _hold(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> bytes:  # _HOLD
    held = _number(r.hget(keys[0], b"hold_until"))
    if _number(argv[0]) > held:
        r.hset(keys[0], b"hold_until", argv[0])
        return argv[0]
    return _lua_tostring(held)


def _count(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> list[Any] | None:  # _COUNT
    record: list[bytes] | None = None
    if argv[2] == b"1":
        record = [part for pair in r._hash(keys[0]).items() for part in pair]
        if not record:
            return None
    elif r.hget(keys[0], b"state") is None:
        return None

    def add(field: bytes, n: bytes) -> int:
        stored = r.hget(keys[0], field)
        held = 0 if stored is None else _redis_integer(stored)
        if held is None:  # HINCRBY's error, caught by pcall: the run's count instead
            r.hset(keys[0], field, n)
            return int(n)
        r.hset(keys[0], field, str(held + int(n)).encode())
        return held + int(n)

    requests = add(b"requests", argv[0])
    limited = add(b"rate_limited", argv[1])
    if record is not None:
        return [
            *record,
            b"requests",
            str(requests).encode(),
            b"rate_limited",
            str(limited).encode(),
        ]
    return [requests, limited]


def _redis_integer(text: bytes) -> int | None:
    """A hash field as HINCRBY reads it: a plain 64-bit integer, or None (its error)."""
    if re.fullmatch(rb"-?(0|[1-9][0-9]*)", text) is None:
        return None
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None


def _renew(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> int:  # _lock._RENEW
    if r.get(keys[0]) == argv[0]:
        return r.pexpire(keys[0], int(argv[1]))
    return 0


def _release(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> int:  # _lock._RELEASE
    if r.get(keys[0]) == argv[0]:
        return r.delete(keys[0])
    return 0


# -- the fleet's merchant pacing (_pace) and rate limit (_ratelimit) --------------------
# Every one reads Redis's TIME first (the server's clock here), as milliseconds.

_DAY_MS = 86_400_000


def _now_ms(r: MemoryRedisServer) -> float:  # _pace._NOW, _ratelimit._PRELUDE
    seconds, micros = r.time()
    return float(seconds) * 1000 + float(micros) / 1000


def _pace_reserve(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> bytes:  # _pace._RESERVE
    if len(argv) > 1 and argv[1] != b"":
        r.hset(keys[1], argv[1], argv[2])
    now = _now_ms(r)
    rate = _number(r.hget(keys[0], b"rate"))
    if rate <= 0:
        return b"none"
    tat = _number(r.hget(keys[0], b"tat"))
    slot = max(tat, now)
    if slot - now > float(argv[0]):
        return _lua_tostring(-(slot - now))
    r.hset(keys[0], b"tat", _lua_tostring(slot + 1000 / rate))
    r.pexpire(keys[0], _DAY_MS)
    return _lua_tostring(slot - now)


def _pace_gate(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> bytes:  # _pace._GATE
    now = _now_ms(r)
    rate = _number(r.hget(keys[0], b"rate"))
    if rate <= 0:
        return b"none"
    sent = _number(r.hget(keys[0], b"sent_tat"))
    slot = max(sent, now)
    epoch = r.hget(keys[0], b"epoch") or b"0"
    limit = _tonumber(argv[0])
    if limit is not None and slot - now > limit:
        return _lua_tostring(-(slot - now)) + b" " + epoch
    r.hset(keys[0], b"sent_tat", _lua_tostring(slot + 1000 / rate))
    r.pexpire(keys[0], _DAY_MS)
    return _lua_tostring(slot - now) + b" " + epoch


def _pace_limited(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> bytes:  # _pace._LIMITED
    now = _now_ms(r)
    r.put(keys[1], b"1", px=_DAY_MS)
    ceiling = float(argv[3])
    rate = _number(r.hget(keys[0], b"rate"))
    wait = float(argv[0])
    sec = float(math.floor(now / 1000))
    ok_sec = _number(r.hget(keys[0], b"ok_sec"))
    seen, window = 0.0, 1.0
    if ok_sec == sec:
        seen = _number(r.hget(keys[0], b"ok_cur")) + _number(r.hget(keys[0], b"ok_prev"))
        window = 1 + max(now - sec * 1000, 100.0) / 1000
    elif ok_sec == sec - 1:
        seen = _number(r.hget(keys[0], b"ok_cur"))
    if rate <= 0:
        since = _number(r.hget(keys[0], b"ok_since"))
        window = max(min(window, (now - since) / 1000), 0.5)
        estimate = seen / window if seen > 0 else 1.0
        if 0 < wait < 1000:
            estimate = min(estimate, 1000 / wait)
        rate = max(float(argv[1]), estimate)
        if ceiling > 0:
            rate = min(rate, ceiling)
        at = _lua_tostring(now)
        r.hset(
            keys[0],
            *(b"rate", _lua_tostring(rate), b"probing", b"1", b"slowed_at", at),
            *(b"tat", at, b"sent_tat", at),
        )
    else:
        epoch = _number(r.hget(keys[0], b"epoch"))
        if argv[4] != b"":
            slow = _tonumber(argv[4]) == epoch
        else:
            last = _number(r.hget(keys[0], b"slowed_at"))
            slow = now - last >= 1000 / rate
        if slow:
            peak = rate
            floor = min(seen / window, rate * float(argv[5]))
            rate = max(float(argv[1]), rate * float(argv[2]), floor)
            # The new spacing starts after the last slot handed out at the old one.
            tat = max(_number(r.hget(keys[0], b"tat")) - 1000 / peak, now) + 1000 / rate
            sent = max(_number(r.hget(keys[0], b"sent_tat")) - 1000 / peak, now) + 1000 / rate
            r.hset(
                keys[0],
                *(b"rate", _lua_tostring(rate), b"probing", b"0"),
                *(b"slowed_at", _lua_tostring(now), b"tat", _lua_tostring(tat)),
                *(b"peak", _lua_tostring(peak), b"sent_tat", _lua_tostring(sent)),
                *(b"epoch", _lua_tostring(epoch + 1)),
            )
    tat = _number(r.hget(keys[0], b"tat"))
    sent = _number(r.hget(keys[0], b"sent_tat"))
    r.hset(
        keys[0],
        *(b"tat", _lua_tostring(max(tat, now + wait))),
        *(b"sent_tat", _lua_tostring(max(sent, now + wait))),
    )
    r.pexpire(keys[0], _DAY_MS)
    return _lua_tostring(rate)


def _pace_succeeded(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> bytes:  # _SUCCEEDED
    now = _now_ms(r)
    if argv[4] != b"":
        r.hset(keys[1], argv[4], argv[5])
    sec = float(math.floor(now / 1000))
    ok_sec = _number(r.hget(keys[0], b"ok_sec"))
    if ok_sec != sec:
        cur = (r.hget(keys[0], b"ok_cur") or b"0") if ok_sec == sec - 1 else b"0"
        r.hset(keys[0], b"ok_sec", _lua_tostring(sec), b"ok_prev", cur, b"ok_cur", b"0")
    r.hincrby(keys[0], b"ok_cur", 1)
    if r.hget(keys[0], b"ok_since") is None:
        r.hset(keys[0], b"ok_since", _lua_tostring(now))
    rate = _number(r.hget(keys[0], b"rate"))
    if rate <= 0:
        r.pexpire(keys[0], _DAY_MS)
        return b"none"
    peak = _number(r.hget(keys[0], b"peak"))
    if r.hget(keys[0], b"probing") == b"1":
        rate = rate * (1 + float(argv[0]))
    elif rate < 0.95 * peak:
        rate = rate + (peak - rate) * float(argv[3])
    else:
        rate = rate * (1 + float(argv[1]))
    ceiling = float(argv[2])
    if ceiling > 0:
        rate = min(rate, ceiling)
    r.hset(keys[0], b"rate", _lua_tostring(rate))
    return _lua_tostring(rate)


def _limit_rate(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> tuple[float, float, float]:
    """_ratelimit._PRELUDE: now, the ceiling and the rate."""
    now = _now_ms(r)
    ceiling = float(argv[0])
    stored = r.hget(keys[0], b"rate")
    rate = float(stored) if stored is not None else ceiling
    rate = min(rate, ceiling)
    return now, ceiling, rate


def _limit_reserve(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> bytes:  # _RESERVE
    now, _ceiling, rate = _limit_rate(r, keys, argv)
    tat = _number(r.hget(keys[0], b"tat"))
    earliest = now + float(argv[1])
    slot = max(tat, earliest)
    limit = _tonumber(argv[2]) if len(argv) > 2 else None
    if limit is not None and slot - earliest > limit:
        return _lua_tostring(-(slot - earliest))
    r.hset(keys[0], b"tat", _lua_tostring(slot + 1000 / rate))
    r.pexpire(keys[0], _DAY_MS)
    return _lua_tostring(slot - earliest)


def _limit_adjust(r: MemoryRedisServer, keys: _Keys, argv: _Keys) -> bytes:  # _ADJUST
    now, ceiling, rate = _limit_rate(r, keys, argv)
    if argv[1] == b"down":
        last = _number(r.hget(keys[0], b"halved_at"))
        if now - last >= 1000 / rate:
            rate = max(ceiling / 64, rate / 2)
            r.hset(keys[0], b"halved_at", _lua_tostring(now))
            tat = _number(r.hget(keys[0], b"tat"))
            r.hset(keys[0], b"tat", _lua_tostring(max(tat, now) + 1000 / rate))
    else:
        rate = min(ceiling, rate + ceiling / 20)
    r.hset(keys[0], b"rate", _lua_tostring(rate))
    r.pexpire(keys[0], _DAY_MS)
    return _lua_tostring(rate)


_SCRIPTS: dict[str, Callable[[MemoryRedisServer, _Keys, _Keys], Any]] = {
    _ledger._WRITE: _write,
    _ledger._REGISTER: _register,
    _ledger._SEND: _send,
    _ledger._APPLIED: _applied,
    _ledger._EPOCH: _epoch,
    _ledger._HOLD: _hold,
    _ledger._COUNT: _count,
    _lock._RENEW: _renew,
    _lock._RELEASE: _release,
    _pace._RESERVE: _pace_reserve,
    _pace._GATE: _pace_gate,
    _pace._LIMITED: _pace_limited,
    _pace._SUCCEEDED: _pace_succeeded,
    _ratelimit._RESERVE: _limit_reserve,
    _ratelimit._ADJUST: _limit_adjust,
}


def _set(
    server: MemoryRedisServer, name: bytes, value: Any, *, nx: bool, px: int | None
) -> bool | None:
    if nx and server._live(name) is not None:
        return None
    server.data[name] = _b(value)
    server.expires.pop(name, None)
    if px is not None:
        server.expires[name] = server.clock() + px / 1000
    return True


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


#: Each script by its SHA1, as ``EVALSHA`` names it (redis-py's ``Script.sha``).
_BY_SHA = {_sha(text): run for text, run in _SCRIPTS.items()}


class _Script:
    def __init__(self, redis: MemoryRedis, run: Callable[..., Any], sha: str) -> None:
        self.redis = redis
        self.run = run
        self.sha = sha

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        server = await self.redis._command()
        writes = server.writes
        reply = self.run(server, [_b(k) for k in keys], [_b(a) for a in args])
        self.redis._wrote(writes)
        return reply


class _Pipeline:
    """Reads queued and answered in one round trip (the ones the ledger pipelines)."""

    def __init__(self, redis: MemoryRedis) -> None:
        self.redis = redis
        self.queued: list[tuple[str, bytes]] = []
        self.sets: list[tuple[Any, bool, int | None]] = []
        self.scripts: list[tuple[Callable[..., Any], Sequence[Any], Sequence[Any]]] = []

    async def __aenter__(self) -> _Pipeline:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def hgetall(self, key: str) -> None:
        self.queued.append(("hgetall", _b(key)))

    def hvals(self, key: str) -> None:
        self.queued.append(("hvals", _b(key)))

    def smembers(self, key: str) -> None:
        self.queued.append(("smembers", _b(key)))

    def hmget(self, key: str, fields: list[str]) -> None:
        self.queued.append(("hmget", _b(key) + b"\0" + b"\0".join(_b(f) for f in fields)))

    def exists(self, key: str) -> None:
        self.queued.append(("exists", _b(key)))

    def hget(self, key: str, field: str) -> None:
        self.queued.append(("hget", _b(key) + b"\0" + _b(field)))

    def set(self, key: str, value: Any, *, nx: bool = False, px: int | None = None) -> None:
        """A bag lock's ``SET NX`` ahead of the reads made under it."""
        self.queued.append(("set", _b(key)))
        self.sets.append((value, nx, px))

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> None:
        """A script, by the SHA1 ``register_script`` gave it (the ledger's applied
        write with the writes and the read that follow it)."""
        self.queued.append(("evalsha", _b(sha)))
        self.scripts.append((_BY_SHA[sha], keys_and_args[:numkeys], keys_and_args[numkeys:]))

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Every command queued, in order, with nothing of another client's between
        them; a process that dies after one of them (``on_write``) has sent them all,
        so they all run."""
        server = await self.redis._command()
        answers: list[Any] = []
        sets = iter(self.sets)
        scripts = iter(self.scripts)
        for command, key in self.queued:
            if command == "evalsha":
                run, keys, args = next(scripts)
                writes = server.writes
                answers.append(run(server, [_b(k) for k in keys], [_b(a) for a in args]))
                self.redis._wrote(writes)
            elif command == "set":
                value, nx, px = next(sets)
                answers.append(_set(server, key, value, nx=nx, px=px))
            elif command == "exists":
                answers.append(int(server._live(key) is not None))
            elif command == "hgetall":
                answers.append(dict(server._hash(key)))
            elif command == "hvals":
                answers.append(list(server._hash(key).values()))
            elif command == "hget":
                name, field = key.split(b"\0")
                answers.append(server.hget(name, field))
            elif command == "hmget":
                name, *fields = key.split(b"\0")
                answers.append(server.hmget(name, *fields))
            else:
                answers.append(set(server._set(key)))
        return answers


class MemoryRedis:
    """One connection to a :class:`MemoryRedisServer` (the commands ``RedisLedger``,
    ``BagLocks`` and ``FleetWorker`` use, as ``redis.asyncio.Redis`` answers them)."""

    def __init__(self, server: MemoryRedisServer) -> None:
        self.server = server
        #: The process this connection belongs to died: every command fails.
        self.closed = False
        #: Called with the server's count of writes after each write this connection
        #: made to an item's record.
        self.on_write: Callable[[int], object] | None = None

    def _wrote(self, before: int) -> None:
        if self.on_write is not None and self.server.writes != before:
            self.on_write(self.server.writes)

    async def _command(self) -> MemoryRedisServer:
        await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
        if self.closed:
            raise RedisConnectionError("Connection closed by server.")
        return self.server

    def register_script(self, script: str) -> _Script:
        run = _SCRIPTS.get(script)
        if run is None:
            raise NotImplementedError("this script has no in-memory version")
        return _Script(self, run, _sha(script))

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline(self)

    async def time(self) -> tuple[int, int]:
        return (await self._command()).time()

    async def get(self, key: str) -> bytes | None:
        return (await self._command()).get(_b(key))

    async def set(
        self, key: str, value: Any, *, nx: bool = False, px: int | None = None
    ) -> bool | None:
        return _set(await self._command(), _b(key), value, nx=nx, px=px)

    async def hget(self, key: str, field: str) -> bytes | None:
        return (await self._command()).hget(_b(key), _b(field))

    async def hset(self, key: str, field: str, value: Any) -> int:
        """One field (``FleetPace.learn``: the order -> merchant hash; not a write to
        an item's record)."""
        server = await self._command()
        name, at = _b(key), _b(field)
        added = int(at not in server._hash(name))
        server.hset(name, at, _b(value))
        return added

    async def exists(self, *keys: str) -> int:
        server = await self._command()
        return sum(server._live(_b(k)) is not None for k in keys)

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict((await self._command())._hash(_b(key)))

    async def hmget(self, key: str, fields: list[str]) -> list[bytes | None]:
        return (await self._command()).hmget(_b(key), *(_b(f) for f in fields))

    async def hkeys(self, key: str) -> list[bytes]:
        return list((await self._command())._hash(_b(key)))

    async def hvals(self, key: str) -> list[bytes]:
        return list((await self._command())._hash(_b(key)).values())

    async def smembers(self, key: str) -> builtins.set[bytes]:
        return set((await self._command())._set(_b(key)))

    async def sadd(self, key: str, *members: Any) -> int:
        server = await self._command()
        writes = server.writes
        added = server.sadd(_b(key), *(_b(m) for m in members))
        server.wrote()
        self._wrote(writes)
        return added

    async def srem(self, key: str, *members: Any) -> int:
        server = await self._command()
        return server.srem(_b(key), *(_b(m) for m in members))
