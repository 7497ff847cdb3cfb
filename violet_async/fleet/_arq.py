"""arq integration: the job function, ``WorkerSettings``, and the producer's ``enqueue``.

Run workers with ``arq violet_async.fleet.WorkerSettings`` (or ``violet-async worker``);
they read Violet's credentials like ``VioletClient.from_env`` and the fleet's settings
from ``VIOLET_REDIS_URL``, ``VIOLET_FLEET_KEY`` and ``VIOLET_FLEET_*`` (see
:class:`FleetConfig`). Every item is one job whose id is derived from the item's
content key, so enqueuing the same input twice (or from two producers at once) queues
each item once; its result is the ledger's record (arq keeps none: ``keep_result=0``).

Jobs are JSON (:func:`job_serializer`), never arq's default pickle: a pickled job would
run code inside a worker that holds the app secret, so a worker refuses one unread.
Every pool that enqueues must use the same serializer (:func:`create_fleet_pool`), and
every item is signed with the fleet key (``VIOLET_FLEET_KEY``): a worker refuses an
item no producer signed as it reads now, before any send.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import os
import signal
from collections.abc import Iterable
from typing import Any, ClassVar

import attrs
import orjson
from arq import func
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Retry, Worker
from redis.asyncio.connection import parse_url
from redis.exceptions import NoScriptError, RedisError

from .. import RetryPolicy, Timeouts
from .._client import VioletClient
from .._converter import converter, request_from_dict
from .._engine import engine_of
from .._redact import printable
from .._redis_url import unreadable_redis_url
from ..batch import BatchItem
from ..models import CancelBagRequest, RefundBagRequest
from ._ledger import (
    DEFAULT_PREFIX,
    DurabilityError,
    NonDurableRedisError,
    RedisLedger,
    keyed_items,
    load_fleet_key,
    merchant_field,
)
from ._lock import BagLocks
from ._ratelimit import FleetRateLimit
from ._worker import FleetWorker, RetryLaterError

__all__ = [
    "JOB_NAME",
    "QUEUE_NAME",
    "EnqueueReport",
    "FleetArqWorker",
    "FleetConfig",
    "WorkerSettings",  # noqa: F822 - made on first use (module __getattr__)
    "close_worker",
    "create_fleet_pool",
    "enqueue",
    "job_deserializer",
    "job_id",
    "job_serializer",
    "refund_job",
    "worker_settings",
]

log = logging.getLogger("violet_async.fleet")

QUEUE_NAME = "violet_async:queue"
JOB_NAME = "violet_async.refund"


def job_serializer(data: dict[str, Any]) -> bytes:
    """arq's job and result records as JSON (an exception in a failed job's result is
    kept as its class name)."""
    return orjson.dumps(data, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseException):
        return type(value).__name__
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def job_deserializer(data: bytes) -> dict[str, Any]:
    """Read a JSON job record; anything else (a pickle) raises, and arq fails that job
    without running it."""
    value = orjson.loads(data)
    if not isinstance(value, dict):
        raise TypeError("a job record must be a JSON object")
    return value


async def create_fleet_pool(redis_url: str) -> ArqRedis:
    """An arq pool for ``redis_url`` that enqueues JSON jobs (what :func:`enqueue`
    needs)."""
    return await create_pool(
        redis_settings(redis_url),
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
    )


def redis_settings(redis_url: str) -> RedisSettings:
    """arq's settings for ``redis_url``; a URL that cannot be read raises ValueError
    naming ``VIOLET_REDIS_URL`` and never quoting the URL (its password may be in it)."""
    try:
        settings = RedisSettings.from_dsn(redis_url)
        parsed = parse_url(redis_url)
    except (ValueError, TypeError, IndexError):
        raise ValueError(unreadable_redis_url("VIOLET_REDIS_URL (or --redis)")) from None
    # arq keeps a percent-encoded user and password as written (``pa%3Fss``), where
    # redis-py (the ledger's reads, the CLI's first PING) decodes them: one password,
    # read one way, for every connection of the fleet.
    return dataclasses.replace(
        settings,
        username=parsed.get("username", settings.username),
        password=parsed.get("password", settings.password),
    )


def _env_float(name: str, default: float | None) -> float | None:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


@attrs.frozen
class FleetConfig:
    """A worker's settings; :meth:`from_env` reads ``VIOLET_REDIS_URL`` and
    ``VIOLET_FLEET_{PREFIX,RATE,SETTLE,TIMEOUT,PATIENCE,LOCK_TTL,CONCURRENCY,JOB_TIMEOUT,
    MAX_TRIES,ACCEPT_DOUBLE_REFUNDS_IF_REDIS_LOSES_DATA}``."""

    redis_url: str = "redis://localhost:6379"
    prefix: str = DEFAULT_PREFIX
    rate: float | None = None
    """Sends per second for the whole fleet (per Violet app); None: no limit."""
    settle_running: float = 60.0
    timeout: float = 30.0
    patience: float = 1.0
    lock_ttl: float = 30.0
    concurrency: int = 16
    job_timeout: float = 300.0
    # Each hand-back for later (a settle window, a busy or unsettled bag) uses one of
    # arq's tries: enough for hours of waiting, so an item is never dropped unsent.
    max_tries: int = 100_000
    base_url: str | None = None
    accept_double_refunds_if_redis_loses_data: bool = False
    """Run on a Redis whose configuration does not make every write durable (no AOF
    fsynced on every write). A worker refuses such a Redis unless this is set: a Redis
    that restarts empty forgets which refunds were sent."""
    fleet_key: str | None = attrs.field(default=None, repr=False)
    """The secret items are signed with (``VIOLET_FLEET_KEY``); a worker needs it."""

    @classmethod
    def from_env(cls, **overrides: Any) -> FleetConfig:
        defaults = {f.name: f.default for f in attrs.fields(cls)}
        found: dict[str, Any] = {
            "redis_url": os.environ.get("VIOLET_REDIS_URL") or defaults["redis_url"],
            "prefix": os.environ.get("VIOLET_FLEET_PREFIX") or DEFAULT_PREFIX,
            "rate": _env_float("VIOLET_FLEET_RATE", None),
            "settle_running": _env_float("VIOLET_FLEET_SETTLE", defaults["settle_running"]),
            "fleet_key": os.environ.get("VIOLET_FLEET_KEY") or None,
        }
        for name in ("timeout", "patience", "lock_ttl", "job_timeout"):
            found[name] = _env_float(f"VIOLET_FLEET_{name.upper()}", defaults[name])
        for name in ("concurrency", "max_tries"):
            raw = os.environ.get(f"VIOLET_FLEET_{name.upper()}")
            found[name] = int(raw) if raw else defaults[name]
        risky = os.environ.get("VIOLET_FLEET_ACCEPT_DOUBLE_REFUNDS_IF_REDIS_LOSES_DATA", "")
        found["accept_double_refunds_if_redis_loses_data"] = risky.lower() in ("1", "true", "yes")
        found.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**found)

    def client(self) -> VioletClient:
        """A client from ``VIOLET_*`` credentials, with this fleet's windows."""
        options: dict[str, Any] = {
            "retry": RetryPolicy(
                settle_running=self.settle_running,
                read_before_send=True,
                # One job stays well inside arq's job timeout.
                deadline=max(min(self.job_timeout / 2, 120.0), 1.0),
            ),
            "timeouts": Timeouts(connect=min(5.0, self.timeout), read=self.timeout),
        }
        if self.base_url:
            options["base_url"] = self.base_url
        return VioletClient.from_env(**options)


def job_budget(job_timeout: float) -> float:
    """How long one run of a job may take: a margin inside arq's ``job_timeout`` (a
    fifth, 1 to 30 s) for the run to let go of its bag lock when it is cut off."""
    margin = min(max(job_timeout / 5, 1.0), 30.0)
    return max(job_timeout - margin, job_timeout / 2)


def job_id(key: str) -> str:
    """The arq job id of an item: the same item always gets the same one."""
    return f"violet_async:{key}"


async def without_job(redis: Any, keys: list[str], *, chunk: int = 1000) -> list[str]:
    """Those of ``keys`` (open items) that have no arq job: nothing will finish them
    until they are enqueued again (arq drops a job it gave up on, or one that expired
    unrun). An item is briefly in this state between ``enqueue``'s ledger write and its
    job's."""
    missing: list[str] = []
    for start in range(0, len(keys), chunk):
        part = keys[start : start + chunk]
        pipe = redis.pipeline(transaction=False)
        for key in part:
            pipe.exists(job_key_prefix + job_id(key))
        found = await pipe.execute()
        missing += [key for key, there in zip(part, found, strict=True) if not there]
    return missing


async def refund_job(ctx: dict[str, Any], key: str, item: dict[str, Any] | None = None) -> Any:
    """The arq job: run one item through the fleet (a re-run is safe)."""
    worker: FleetWorker = ctx["violet_fleet"]
    fallback = None
    if item is not None:
        fallback = _item_from(item)
        if fallback.merchant_id is not None:
            # Its merchant only with its own signature (else: an unknown merchant).
            merchant = worker.ledger.merchant_of(
                key, fallback.merchant_id, item.get("merchant_sig")
            )
            fallback = attrs.evolve(fallback, merchant_id=merchant)
    signature = item.get("sig") if item is not None else None
    run = worker.run(key, fallback, signature if isinstance(signature, str) else None)
    budget = ctx.get("violet_job_budget")
    try:
        if budget is None:
            return await run
        # arq ends a job that outlives its job_timeout for good (an error, never run
        # again): the item would stay open in the ledger with no job left to finish it.
        # This budget ends first and asks arq to run the job again; the ledger makes
        # the re-run safe (a sent item is read back, never sent blindly).
        return await asyncio.wait_for(run, budget)
    except asyncio.TimeoutError:
        log.warning("item %s: still running after %.1fs; run again", printable(key), budget)
        raise Retry(defer=1.0) from None
    except RetryLaterError as exc:
        raise Retry(defer=exc.defer) from exc
    except (RedisError, DurabilityError, OSError) as exc:
        # Redis hiccup: the ledger still tells where the item stands; run it again.
        log.warning("item %s: %s; retrying", printable(key), printable(exc))
        raise Retry(defer=1.0) from exc


def _item_dict(item: BatchItem, signature: str, merchant_sig: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "sig": signature,
        "line": item.line,
        "kind": item.kind,
        "order_id": item.order_id,
        "bag_id": item.bag_id,
        "request": converter.unstructure(item.request),
    }
    if merchant_sig is not None and item.merchant_id is not None:
        data["merchant_id"] = item.merchant_id
        data["merchant_sig"] = merchant_sig
    return data


def _item_from(data: dict[str, Any]) -> BatchItem:
    kind = data["kind"]
    request: RefundBagRequest | CancelBagRequest
    if kind == "cancel":
        request = request_from_dict(CancelBagRequest, data["request"])
    else:
        request = request_from_dict(RefundBagRequest, data["request"])
    return BatchItem(
        int(data["line"]),
        kind,
        int(data["order_id"]),
        int(data["bag_id"]),
        request,
        merchant_field(data.get("merchant_id")),
    )


async def startup(ctx: dict[str, Any]) -> None:
    config: FleetConfig = ctx.get("violet_config") or FleetConfig.from_env()
    redis = ctx["redis"]
    ledger = RedisLedger(redis, prefix=config.prefix, fleet_key=load_fleet_key(config.fleet_key))
    problems = await ledger.check_durability()
    if problems and not config.accept_double_refunds_if_redis_loses_data:
        raise NonDurableRedisError(
            f"Redis is not durable enough for refunds ({', '.join(problems)}): a Redis that "
            "restarts empty forgets which refunds were sent, and a re-run could send them "
            "again. Run it with appendonly yes + appendfsync always (or set "
            "VIOLET_FLEET_ACCEPT_DOUBLE_REFUNDS_IF_REDIS_LOSES_DATA=1 / "
            "--accept-double-refunds-if-redis-loses-data to run anyway)"
        )
    if problems:
        log.warning(
            "Redis is not durable enough for refunds (%s), accepted by the operator: a "
            "crash of Redis could lose a 'sent' record",
            ", ".join(problems),
        )
    client = config.client()
    await client.__aenter__()
    ctx["violet_client"] = client
    limiter = (
        FleetRateLimit(redis, engine_of(client).app_id, config.rate, prefix=config.prefix)
        if config.rate
        else None
    )
    ctx["violet_job_budget"] = job_budget(config.job_timeout)
    ctx["violet_fleet"] = FleetWorker(
        client,
        ledger,
        BagLocks(redis, prefix=config.prefix, ttl=config.lock_ttl),
        limiter,
        patience=config.patience,
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    client = ctx.get("violet_client")
    if client is not None:
        await client.aclose()


def worker_settings(config: FleetConfig) -> dict[str, Any]:
    """arq ``Worker`` keyword arguments for ``config``."""

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["violet_config"] = config
        await startup(ctx)

    return {
        "functions": [func(refund_job, name=JOB_NAME, keep_result=0, max_tries=config.max_tries)],
        "queue_name": QUEUE_NAME,
        "on_startup": on_startup,
        "on_shutdown": shutdown,
        "redis_settings": redis_settings(config.redis_url),
        "job_serializer": job_serializer,
        "job_deserializer": job_deserializer,
        "max_jobs": config.concurrency,
        "job_timeout": config.job_timeout,
        "keep_result": 0,
        "poll_delay": 0.1,
    }


async def close_worker(worker: Worker) -> None:
    """Stop an arq ``Worker`` run with ``handle_signals=False``: cancel its jobs (arq
    runs them again; the ledger makes that safe) and close its pool.

    The steps of arq's ``Worker.close`` with redis-py's ``aclose`` (arq still calls the
    deprecated ``close``, a warning this project treats as an error).
    """
    worker.handle_sig(signal.SIGUSR1)  # cancels the jobs still running
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    pool = worker._pool
    if pool is None:
        return
    await pool.delete(worker.health_check_key)
    if worker.on_shutdown:
        await worker.on_shutdown(worker.ctx)
    await pool.aclose(close_connection_pool=True)
    worker._pool = None


# KEYS: the queue, then each job's in-progress key   ARGV: now (ms), in-progress ttl (ms),
# how many jobs to claim, then each job's id, in the order arq read them.
# arq's claim of a job (WATCH its in-progress key; EXISTS it; ZSCORE the job; MULTI,
# PSETEX, EXEC) for each job in turn, as one atomic script, until that many are
# claimed. Returns how many of the jobs it looked at, then each claimed job's id and
# score (a job is passed over when it runs elsewhere, is gone from the queue, or is not
# due yet).
_CLAIM = """
local want = tonumber(ARGV[3])
local found = {0}
local claimed = 0
for i = 2, #KEYS do
  if claimed >= want then
    break
  end
  found[1] = i - 1
  local id = ARGV[i + 2]
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local score = redis.call('ZSCORE', KEYS[1], id)
    if score and tonumber(score) <= tonumber(ARGV[1]) then
      redis.call('PSETEX', KEYS[i], ARGV[2], '1')
      table.insert(found, id)
      table.insert(found, score)
      claimed = claimed + 1
    end
  end
end
return found
"""


def _arq_release() -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in importlib.metadata.version("arq").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ()


#: The claim script stands in for arq's own ``Worker.start_jobs`` on the release whose
#: internals it follows (its semaphore, job counter and task table: arq 0.28); on any
#: other, arq claims as it always does (four round trips a job, the same guarantees).
_CLAIMS_AS_ARQ = _arq_release() == (0, 28)


class FleetArqWorker(Worker):
    """arq's ``Worker``, claiming the jobs it read from the queue in one round trip
    for every slot free at the time.

    arq claims a job with four round trips (WATCH, EXISTS, ZSCORE, then
    MULTI/PSETEX/EXEC, or UNWATCH when another worker has it), and every worker tries
    every job it read: with three workers, about ten round trips an item before it
    runs. The same checks and write, for as many jobs as this worker has free slots
    (passing over the ones another worker has), in one Lua script, are as atomic as
    arq's transaction. ``violet-async worker`` runs this; ``arq
    violet_async.fleet.WorkerSettings`` runs arq's own."""

    _claim: Any = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        if not _CLAIMS_AS_ARQ:
            # Another arq release: its own claim (this one follows 0.28's internals).
            await super().start_jobs(job_ids)
            return
        ids = [job_id.decode() for job_id in job_ids]
        ttl = int(self.in_progress_timeout_s * 1000)
        while ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            # Every slot free now (taken without waiting) claims in the same round trip.
            free = 1
            while (
                free < len(ids)
                and self.job_counter + free < self.max_jobs
                and not self.sem.locked()
            ):
                await self.sem.acquire()
                free += 1
            self.job_counter = self.job_counter + free
            # Most of the jobs just ahead are other workers' by now: look a few past.
            ahead = ids[: 3 * free + 5]
            try:
                looked, *claimed = await self._claim_jobs(
                    [self.queue_name, *(in_progress_key_prefix + i for i in ahead)],
                    [timestamp_ms(), ttl, free, *ahead],
                )
            except BaseException:
                self.job_counter = self.job_counter - free
                for _ in range(free):
                    self.sem.release()
                raise
            ids = ids[max(int(looked), 1) :]
            for raw_id, score in zip(claimed[::2], claimed[1::2], strict=True):
                job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                task = asyncio.get_running_loop().create_task(
                    self.run_job(job_id, int(float(score)))
                )
                task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
                self.tasks[job_id] = task
            for _ in range(free - len(claimed) // 2):
                # A slot no job was claimed for: started elsewhere, finished and gone,
                # or deferred by another worker.
                self.job_counter = self.job_counter - 1
                self.sem.release()

    async def _claim_jobs(self, keys: list[Any], args: list[Any]) -> list[Any]:
        if self._claim is None:
            self._claim = self.pool.register_script(_CLAIM)
        try:
            return list(await self._claim(keys=keys, args=args))
        except NoScriptError:
            # Flushed again between redis-py's load and its second try: sent whole.
            return list(await self.pool.eval(_CLAIM, len(keys), *keys, *args))  # type: ignore[misc]


def _worker_settings_class() -> type:
    """``arq violet_async.fleet.WorkerSettings``: settings from the environment, read
    when arq (or an import) first asks for it, never as the package is imported: every
    ``violet-async`` command imports it, and a ``VIOLET_REDIS_URL`` that cannot be read
    must not stop ``violet-async refund``, nor print the part of it a reader quotes."""
    config = FleetConfig.from_env()
    settings = redis_settings(config.redis_url)

    class WorkerSettings:
        """``arq violet_async.fleet.WorkerSettings``: settings from the environment."""

        _config = config
        functions: ClassVar[list[Any]] = [
            func(refund_job, name=JOB_NAME, keep_result=0, max_tries=config.max_tries)
        ]
        queue_name = QUEUE_NAME
        on_startup = startup
        on_shutdown = shutdown
        redis_settings = settings
        job_serializer = staticmethod(job_serializer)
        job_deserializer = staticmethod(job_deserializer)
        max_jobs = config.concurrency
        job_timeout = config.job_timeout
        keep_result = 0
        poll_delay = 0.1

    WorkerSettings.__module__ = __name__
    WorkerSettings.__qualname__ = "WorkerSettings"
    return WorkerSettings


_made: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "WorkerSettings":
        if name not in _made:
            _made[name] = _worker_settings_class()
        return _made[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@attrs.define
class EnqueueReport:
    """What :func:`enqueue` did: items queued now, already queued (a job with the same
    id exists), already finished in the ledger (applied or failed), and in total."""

    queued: int = 0
    already_queued: int = 0
    already_finished: int = 0
    total: int = 0
    held: int = 0
    """Not queued: an earlier item on the bag applied (or was sent) asking the same
    money (``already_present``, for review; ``allow_repeat`` queues it)."""


async def enqueue(
    redis: ArqRedis,
    items: Iterable[BatchItem],
    *,
    prefix: str = DEFAULT_PREFIX,
    source: str = "",
    fleet_key: str | bytes | None = None,
    allow_repeat: bool = False,
) -> EnqueueReport:
    """Register every item in the ledger (as ``new``, signed with ``fleet_key``, by
    default ``VIOLET_FLEET_KEY``) and queue one JSON job per item whose id is derived
    from its content key (:func:`~violet_async.fleet.item_key`, identical items
    numbered by occurrence). Safe to repeat and to run from several producers at once:
    an item is queued at most once while its job exists, and an item the ledger has
    finished is not queued again.

    ``redis`` must enqueue JSON jobs (:func:`create_fleet_pool`); a pool with arq's
    default pickle serializer, or no fleet key, raises ValueError before anything is
    queued.

    A new item on a bag where the ledger holds an applied (or sent, unsettled) item
    asking the same money of the bag (an edited row: its reason fixed, or a whole-bag
    refund written as its amount) is held, not queued: ``already_present``, for review,
    naming the earlier item. The worker checks again under the bag's lock before any
    send. ``allow_repeat`` sends such items anyway (and releases ones held before)."""
    if getattr(redis, "job_serializer", None) is not job_serializer:
        raise ValueError(
            "the arq pool must enqueue JSON jobs: make it with "
            "violet_async.fleet.create_fleet_pool(url) (or pass job_serializer= and "
            "job_deserializer= from violet_async.fleet); workers refuse pickled jobs"
        )
    ledger = RedisLedger(redis, prefix=prefix, fleet_key=load_fleet_key(fleet_key))
    report = EnqueueReport()
    for key, item in keyed_items(items):
        report.total += 1
        had = await ledger.register(key, item, source=source, allow_repeat=allow_repeat)
        if had in ("applied", "failed"):
            report.already_finished += 1
            continue
        if allow_repeat and had is not None and not await ledger.release(key):
            await ledger.allow_repeat(key)
        elif had is None and not allow_repeat:
            earlier = await ledger.same_money_on_bag(key, item)
            if earlier is not None:
                await ledger.mark_held(key, earlier)
                report.held += 1
                continue
        elif had == "pending" and not allow_repeat:
            record = await ledger.get(key)
            if record is not None and record.held_by:
                report.held += 1
                continue
        job = await redis.enqueue_job(
            JOB_NAME,
            key,
            _item_dict(
                item,
                ledger.sign(key, item),
                None if item.merchant_id is None else ledger.sign_merchant(key, item.merchant_id),
            ),
            _job_id=job_id(key),
            _queue_name=QUEUE_NAME,
        )
        if job is None:
            report.already_queued += 1
        else:
            report.queued += 1
    return report
