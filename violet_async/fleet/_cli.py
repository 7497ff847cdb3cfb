"""``violet-async enqueue FILE | worker | status``, on the Redis of ``VIOLET_REDIS_URL``
(or ``--redis URL``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import IO, Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .. import _batch_cli
from .._redact import printable, printable_json
from .._redis_url import redis_url_problem
from .._signals import on_signals
from ..batch import BatchItem
from ._arq import (
    FleetArqWorker,
    FleetConfig,
    close_worker,
    create_fleet_pool,
    enqueue,
    without_job,
    worker_settings,
)
from ._ledger import (
    DEFAULT_PREFIX,
    STATES,
    LedgerRecord,
    NonDurableRedisError,
    RedisLedger,
    is_blocked,
    load_fleet_key,
)

__all__ = ["add_commands", "run"]

COMMANDS = ("enqueue", "worker", "status")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


_DESCRIPTIONS = {
    "enqueue": "Queue every row of FILE for the fleet's workers, each row at most once: the "
    "same strict rows as `violet-async refund` / `cancel` (every row is checked first; a "
    "bad row queues nothing). Enqueuing a file twice, or from two producers at once, "
    "queues nothing new: each row is keyed by its content.",
    "worker": "Run a fleet worker (arq) until Ctrl-C: it takes queued rows, holds one lock "
    "per bag across the fleet, writes each send to the Redis ledger before it leaves and "
    "reads a bag back before anything is sent again. Run one on each host.",
    "status": "The fleet ledger: counts by state, progress, and the failed rows with their "
    "lines and errors.",
}
_HELP = {
    "enqueue": "queue every row of FILE (refund or cancel) for the fleet's workers, signed "
    "with VIOLET_FLEET_KEY",
    "worker": "run a fleet worker (arq) until Ctrl-C; it sends only items signed with "
    "VIOLET_FLEET_KEY",
    "status": "the fleet ledger: counts by state, progress, failures with their lines",
}
_EXITS = {
    "enqueue": "  0    every row is queued (or was already queued or finished)\n"
    "  1    Redis failed while rows were being queued: run the same command again\n"
    "  2    a bad row (nothing queued), no such file, or Redis unreachable",
    "worker": "  0    stopped (Ctrl-C, or --burst and the queue is empty)\n"
    "  2    bad configuration (VIOLET_* variables, options) or Redis unreachable",
    "status": "  0    no item failed\n  1    some item failed (listed with its line)\n"
    "  2    Redis unreachable",
}
_ENVIRONMENT = """environment:
  VIOLET_APP_ID, VIOLET_APP_SECRET   your app (required by worker)
  VIOLET_USERNAME, VIOLET_PASSWORD   log in (or VIOLET_TOKEN, VIOLET_REFRESH_TOKEN)
  VIOLET_ENV                         sandbox (default) or production
  VIOLET_BASE_URL                    another Violet, e.g. `violet-async fake-server`
  VIOLET_PROXY                       an http:// proxy to reach Violet through
  VIOLET_REDIS_URL                   the fleet's Redis (instead of --redis)
  VIOLET_FLEET_KEY                   the key items are signed with (16+ characters)
"""


def add_commands(subparsers: Any, formatter: type[argparse.HelpFormatter] | None = None) -> None:
    """Add ``enqueue``, ``worker`` and ``status`` to the CLI's subparsers."""
    for name in COMMANDS:
        epilog = _ENVIRONMENT + "\n" + "exit codes:\n" + _EXITS[name]
        cmd = subparsers.add_parser(
            name,
            help=_HELP[name],
            description=_DESCRIPTIONS[name],
            epilog=epilog,
            formatter_class=formatter or argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_argument(
            "--redis",
            default=None,
            metavar="URL",
            help="the fleet's Redis: redis://host:port/db (default: VIOLET_REDIS_URL; prefer "
            "the variable: a password in --redis shows in ps)",
        )
        cmd.add_argument(
            "--prefix",
            default=DEFAULT_PREFIX,
            help="prefix of the ledger's keys (one per fleet sharing a Redis)",
        )
        if name == "enqueue":
            cmd.add_argument("file", type=Path, metavar="FILE", help="the rows to queue")
            cmd.add_argument(
                "--kind", choices=("refund", "cancel"), default="refund", help="what each row is"
            )
            cmd.add_argument(
                "--new-ledger",
                action="store_true",
                help="this Redis has never held this fleet's ledger (no refund of it can "
                "be in flight): the first sends need not wait a settle window",
            )
            cmd.add_argument(
                "--allow-repeat",
                action="store_true",
                help="send rows even where an earlier item on the bag applied (or was "
                "sent) asking the same money (an edited row is held as already_present "
                "otherwise); releases rows held so",
            )
        if name == "worker":
            cmd.add_argument("--concurrency", type=int, default=16, help="jobs at a time")
            cmd.add_argument(
                "--rate",
                type=float,
                default=None,
                help="refund/cancel sends per second for the whole fleet (default: no limit)",
            )
            cmd.add_argument(
                "--settle",
                type=float,
                default=60.0,
                metavar="SECONDS",
                help="how long a refund whose request got no answer may still appear at "
                "Violet before it counts as not applied",
            )
            cmd.add_argument(
                "--timeout",
                type=float,
                default=30.0,
                metavar="SECONDS",
                help="longest wait for one answer from Violet",
            )
            cmd.add_argument(
                "--lock-ttl",
                type=float,
                default=30.0,
                metavar="SECONDS",
                help="a bag's lock expires this long after its holder stops renewing it",
            )
            cmd.add_argument(
                "--job-timeout",
                type=float,
                default=300.0,
                metavar="SECONDS",
                help="longest run of one job",
            )
            cmd.add_argument(
                "--base-url", default=None, help="another Violet (default: VIOLET_BASE_URL)"
            )
            cmd.add_argument(
                "--accept-double-refunds-if-redis-loses-data",
                action="store_true",
                help="run on a Redis without appendonly yes + appendfsync always (refused "
                "otherwise): if it restarts empty, refunds in flight can be sent again",
            )
            cmd.add_argument(
                "--burst",
                action="store_true",
                help="exit when the queue is empty (for scripts and tests)",
            )
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="one JSON object")
            cmd.add_argument(
                "--items",
                action="store_true",
                help="every item with its outcome, requests and 429s (not only problems)",
            )


def run(args: argparse.Namespace) -> int:
    """Run the fleet command ``args.command``; returns the exit code."""
    args.redis = args.redis or os.environ.get("VIOLET_REDIS_URL") or None
    if args.redis is None:
        print("violet-async: set VIOLET_REDIS_URL (or give --redis URL)", file=sys.stderr)
        return EXIT_BAD_INPUT
    problem = redis_url_problem(args.redis, "VIOLET_REDIS_URL (or --redis)", arq=True)
    if problem is not None:
        print(f"violet-async: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command in ("enqueue", "worker"):
        try:
            load_fleet_key()
        except ValueError as exc:
            print(f"violet-async: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.command == "worker" and (
        args.concurrency < 1 or (args.rate is not None and args.rate <= 0)
    ):
        print("violet-async: --concurrency and --rate must be positive", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        asyncio.run(_ping(args.redis))
    except (RedisError, OSError, ValueError) as exc:
        print(
            f"violet-async: cannot reach Redis ({printable(exc)}); check --redis and that the "
            "Redis server is running",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        if args.command == "enqueue":
            return asyncio.run(_enqueue(args, sys.stdout, sys.stderr))
        if args.command == "worker":
            return asyncio.run(_worker(args))
        return asyncio.run(_status(args, sys.stdout))
    except (RedisError, OSError) as exc:
        print(f"violet-async: redis: {printable(exc)}", file=sys.stderr)
        return EXIT_FAILED


async def _ping(url: str) -> None:
    """One PING before anything else: an unreachable Redis is one line and exit 2,
    not arq's reconnect log lines."""
    redis = Redis.from_url(url, socket_connect_timeout=5.0, socket_timeout=5.0)
    try:
        await redis.ping()
    finally:
        await redis.aclose()


async def _enqueue(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    path: Path = args.file
    if not path.is_file():  # noqa: ASYNC240 - one stat before any I/O
        err.write(f"violet-async: {path}: no such file\n")
        return EXIT_BAD_INPUT
    # Every row is validated before anything is queued: the batch CLI's strict rules.
    bad = 0
    for row in _batch_cli.read_items(path, args.kind):
        if not isinstance(row, BatchItem):
            err.write(printable(f"{path}:{row}") + "\n")
            bad += 1
    if bad:
        err.write(f"violet-async: {bad} bad row(s); nothing was queued\n")
        return EXIT_BAD_INPUT
    pool = await create_fleet_pool(args.redis)
    try:
        if getattr(args, "new_ledger", False):
            await RedisLedger(pool, prefix=args.prefix).new_fleet()
        items = (i for i in _batch_cli.read_items(path, args.kind) if isinstance(i, BatchItem))
        report = await enqueue(
            pool,
            items,
            prefix=args.prefix,
            source=str(path),
            allow_repeat=getattr(args, "allow_repeat", False),
        )
    finally:
        await pool.aclose()
    out.write(
        f"{report.total} item(s): {report.queued} queued, {report.already_queued} already "
        f"queued, {report.already_finished} already finished"
        + (
            f", {report.held} held (already_present: an earlier item on the bag asked the "
            "same money; see `violet-async status`, --allow-repeat sends them)"
            if report.held
            else ""
        )
        + "\n"
    )
    return EXIT_OK


async def _worker(args: argparse.Namespace) -> int:
    config = FleetConfig.from_env(
        redis_url=args.redis,
        prefix=args.prefix,
        rate=args.rate,
        settle_running=args.settle,
        timeout=args.timeout,
        lock_ttl=args.lock_ttl,
        concurrency=args.concurrency,
        job_timeout=args.job_timeout,
        base_url=args.base_url,
        accept_double_refunds_if_redis_loses_data=args.accept_double_refunds_if_redis_loses_data
        or None,
    )
    worker = FleetArqWorker(**worker_settings(config), burst=args.burst, handle_signals=False)
    main = asyncio.ensure_future(worker.main())
    restore_signals = on_signals(main.cancel, (signal.SIGINT, signal.SIGTERM))
    try:
        await main
    except asyncio.CancelledError:
        pass
    except NonDurableRedisError as exc:
        print(f"violet-async: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        restore_signals()
        await close_worker(worker)
    return EXIT_OK


async def _status(args: argparse.Namespace, out: IO[str]) -> int:
    redis = Redis.from_url(args.redis)
    try:
        ledger = RedisLedger(redis, prefix=args.prefix)
        counts = await ledger.counts()
        problem_keys = await ledger.keys_in("failed", "pending")
        problems = [r for r in await ledger.get_many(problem_keys) if r is not None]
        # New items left not sent because their bag waits on an item under review.
        problems += await ledger.blocked()
        # Neither is an item without a job to enqueue again: it waits for a person.
        held = {r.key for r in problems if r.held_by or is_blocked(r)}
        open_keys = [k for k in await ledger.keys_in("new", "sent", "pending") if k not in held]
        orphans = await without_job(redis, open_keys)
        spent = await ledger.request_counts()
        every: list[LedgerRecord] = []
        if getattr(args, "items", False):
            found = await ledger.get_many(await ledger.keys_in(*STATES))
            every = sorted(
                (r for r in found if r is not None), key=lambda r: (r.source, r.item.line)
            )
    finally:
        await redis.aclose()
    total = sum(counts.values())
    finished = counts["applied"] + counts["failed"]
    problems.sort(key=lambda r: (r.source, r.item.line))
    if args.json:
        out.write(
            printable_json(
                orjson.dumps(
                    {
                        "total": total,
                        "counts": {s: counts[s] for s in STATES},
                        "finished": finished,
                        "problems": [r.to_dict() for r in problems],
                        "without_job": orphans,
                        **spent,
                        **({"items": [r.to_dict() for r in every]} if every else {}),
                    }
                )
            )
            + "\n"
        )
    else:
        states = ", ".join(f"{s} {counts[s]}" for s in STATES)
        share = f"{100 * finished / total:.1f}%" if total else "-"
        out.write(f"{total} item(s): {states}; finished {finished}/{total} ({share})\n")
        if total:
            # What the items cost at Violet, over all their runs (a run that died before
            # its end is not counted).
            out.write(
                f"requests {spent['requests']} ({spent['requests'] / total:.2f} an item; "
                f"429s {spent['rate_limited']}, {spent['rate_limited'] / total:.2f} an item)\n"
            )
        for record in every:
            out.write(
                printable(
                    f"  {record.source or '?'}:line {record.item.line}: "
                    f"{record.outcome or record.state}: order {record.item.order_id} bag "
                    f"{record.item.bag_id}: {record.requests} request(s), "
                    f"{record.rate_limited} 429(s)"
                )
                + "\n"
            )
        if every and problems:
            out.write("problems:\n")
        for record in problems:
            what = record.outcome or record.state
            review = " (needs review)" if record.needs_review else ""
            if record.held_by:
                review += f" (held for {record.held_by})"
            # Everything in the ledger may have been written by someone else.
            out.write(
                printable(
                    f"  {record.source or '?'}:line {record.item.line}: {what}{review}: "
                    f"order {record.item.order_id} bag {record.item.bag_id}: "
                    f"{_cost(record)}{record.error or ''} {record.message or ''}".rstrip()
                )
                + "\n"
            )
        if orphans:
            out.write(
                f"{len(orphans)} open item(s) have no job queued, so no worker will finish "
                "them: enqueue the file again (items already finished are not queued "
                "again; a sent item is read back, never sent blindly)\n"
            )
            for key in orphans[:20]:
                out.write(printable(f"  {key}") + "\n")
    return EXIT_FAILED if counts["failed"] else EXIT_OK


def _cost(record: LedgerRecord) -> str:
    """An item's requests and 429s as a problem line states them ("" when none)."""
    if not record.requests:
        return ""
    return f"{record.requests} request(s), {record.rate_limited} 429(s): "
