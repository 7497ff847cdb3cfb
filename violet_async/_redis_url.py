"""A Redis URL read without ever quoting it: its password may be in it.

redis-py, arq and ``urllib`` say what they could not read of a URL by quoting that
part, and a password holding ``/``, ``?`` or ``#`` (not percent-encoded) is split
there: the part they quote is the password, or the rest of it
(``Port could not be cast to integer value as 'Pa55word'``). Every place that reads a
Redis URL from the environment or a flag reads it here first.
"""

from __future__ import annotations

from typing import Any

__all__ = ["redis_url_problem", "unreadable_redis_url"]


def unreadable_redis_url(name: str) -> str:
    """What to say of a Redis URL (named by ``name``: the variable or flag it came
    from) that cannot be read, without any of its text."""
    return (
        f"{name} is not a Redis URL that can be read (redis://[:PASSWORD@]HOST[:PORT][/DB]; "
        "the value is not shown): a password holding '/', '?', '#' or '@' must be "
        "percent-encoded (%2F, %3F, %23, %40)"
    )


def redis_url_problem(url: str, name: str, *, arq: bool = False) -> str | None:
    """Why ``url`` cannot be used (None: redis-py, and with ``arq`` arq too, read it):
    a message naming ``name``, never quoting the URL."""
    try:
        from redis.asyncio.connection import parse_url  # noqa: PLC0415 - the fleet extra
    except ImportError:  # pragma: no cover - without redis-py nothing reads it
        return None
    readers: list[Any] = [parse_url]
    if arq:
        from arq.connections import RedisSettings  # noqa: PLC0415 - the fleet extra

        readers.append(RedisSettings.from_dsn)
    for read in readers:
        try:
            read(url)
        except (ValueError, TypeError, IndexError):
            return unreadable_redis_url(name)
    return None
