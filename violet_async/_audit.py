"""``audit``: did every bag get exactly the refund its row asked for, once? Answered
from Violet's own records (every page of each bag's refunds), the journal second.

::

    async for row in audit(client, items, journal="refunds.csv.refund.journal.jsonl"):
        print(row.item.line, row.audit, row.refund_ids, row.detail)

Rows are spooled to a private scratch file and read back one order at a time, so memory
holds at most ``concurrency`` orders' rows and refunds (plus a few waiting for the
caller), however long the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ._audit_judge import (
    AUDITS,
    MONEY_OFF,
    Asked,
    Audit,
    AuditRow,
    JournalView,
    judge_bag,
    unreadable,
)
from ._audit_spool import OrderRows, Spool
from ._retry import RetryEvent
from .exceptions import RateLimitError, VioletError
from .models import OrderBag, OrderRefund

if TYPE_CHECKING:
    from ._client import VioletClient
    from .batch import AdaptiveRate, BatchItem
    from .fleet import RedisLedger

__all__ = ["AUDITS", "MONEY_OFF", "Audit", "AuditRow", "AuditStats", "JournalView", "audit"]


@attrs.define
class AuditStats:
    """Counters of one audit run (pass one in to read them while or after it runs)."""

    rows: int = 0
    """Rows spooled (known before the first read)."""
    orders: int = 0
    bags: int = 0
    reads: int = 0
    """Orders and bag refund lists read (each list every page)."""
    rate_limited: int = 0
    held_rows: int = 0
    """Rows in memory right now (being read, or judged and not yet taken)."""
    max_held_rows: int = 0


_END = object()


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _unusable(refunds: list[OrderRefund], order_id: int, bag_id: int) -> str | None:
    """Why this list of a bag's refunds cannot be judged (None: it can). A refund of
    another bag or order means the answer is not this bag's list; a refund without an id
    or amount cannot be named or counted. Any of them makes the bag unreadable: a list
    we cannot fully read never proves a refund missing, nor one as asked."""
    for refund in refunds:
        held = f"the list of bag {bag_id}'s refunds holds refund {refund.id}"
        if refund.bag_id is not None and refund.bag_id != bag_id:
            return f"{held} of bag {refund.bag_id}"
        if refund.order_id not in (None, order_id):
            return f"{held} of order {refund.order_id}"
        if refund.id is None or refund.amount is None:
            return "a refund record on the bag has no id or no amount"
        if refund.amount < 0:
            return f"{held} of a negative amount ({refund.amount})"
    return None


def _shared(lists: dict[int, list[OrderRefund]]) -> dict[int, str]:
    """Bags of one order whose lists hold the same refund (by id): a refund is on one
    bag, so such a list is not that bag's own, and each of those bags is unreadable
    (a refund counted on two bags would be one refund found twice)."""
    seen: dict[int, list[int]] = {}
    for bag_id, refunds in lists.items():
        for refund in refunds:
            if refund.id is not None:
                seen.setdefault(refund.id, []).append(bag_id)
    problems: dict[int, str] = {}
    for refund_id, bags in seen.items():
        if len(bags) > 1:
            named = " and ".join(str(b) for b in bags)
            for bag_id in bags:
                problems.setdefault(bag_id, f"refund {refund_id} is listed on bags {named}")
    return problems


async def _judge_order(
    client: VioletClient,
    group: OrderRows,
    limiter: AdaptiveRate | None,
    stats: AuditStats,
) -> list[AuditRow]:
    async def paced() -> None:
        if limiter is not None:
            await limiter.wait()
        stats.reads += 1

    try:
        await paced()
        order = await client.get_order(group.order_id)
    except VioletError as exc:
        return [r for _, rows in group.bags for r in unreadable(rows, _why(exc))]
    if order.id != group.order_id:
        why = f"Violet answered order {order.id} for order {group.order_id}"
        return [r for _, rows in group.bags for r in unreadable(rows, why)]
    results: list[AuditRow] = []
    readable: list[tuple[list[Asked], OrderBag, list[OrderRefund]]] = []
    for bag_id, rows in group.bags:
        stats.bags += 1
        bag = order.bag(bag_id)
        if bag is None:
            results += unreadable(rows, f"order {group.order_id} has no bag {bag_id} at Violet")
            continue
        try:
            await paced()
            page = await client._read_refunds(
                client._bag_path(group.order_id, bag_id, "refunds"), client._deadline()
            )
        except VioletError as exc:
            results += unreadable(rows, _why(exc))
            continue
        # Records the page reader skipped: a list we could not read whole proves
        # neither a refund missing nor one as asked.
        if page.unreadable:
            why = f"{page.unreadable} refund record(s) on the bag could not be read"
            results += unreadable(rows, why)
            continue
        refunds = list(page.refunds)
        if limiter is not None:
            limiter.speed_up()
        problem = _unusable(refunds, group.order_id, bag_id)
        if problem is not None:
            results += unreadable(rows, problem)
            continue
        readable.append((rows, bag, refunds))
    shared = _shared({bag.id: refunds for _, bag, refunds in readable})
    for rows, bag, refunds in readable:
        if bag.id in shared:
            results += unreadable(rows, shared[bag.id])
        else:
            results += judge_bag(rows, refunds, bag, bag.currency or order.currency)
    return results


async def _with_ledger(ledger: RedisLedger, group: OrderRows) -> OrderRows:
    """The fleet ledger's records for a group's rows, in place of a journal's."""
    try:
        records = await ledger.get_many(group.ledger_keys)
    except Exception as exc:  # noqa: BLE001 - Redis failing: the verdicts still stand
        failed = JournalView("ledger", "unreadable", error=type(exc).__name__)
        bags = [
            (bag_id, [attrs.evolve(r, journal=failed) for r in rows]) for bag_id, rows in group.bags
        ]
        return attrs.evolve(group, bags=bags)
    found = iter(records)
    bags = []
    for bag_id, rows in group.bags:
        seen = []
        for row in rows:
            record = next(found)
            view = JournalView(
                "ledger",
                record.state if record is not None else None,
                record.refund_id if record is not None else None,
                record.error if record is not None else None,
            )
            seen.append(attrs.evolve(row, journal=view))
        bags.append((bag_id, seen))
    return attrs.evolve(group, bags=bags)


async def audit(
    client: VioletClient,
    items: Iterable[BatchItem] | AsyncIterable[BatchItem],
    *,
    journal: str | os.PathLike[str] | None = None,
    ledger: RedisLedger | None = None,
    concurrency: int = 8,
    rate: float | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
    stats: AuditStats | None = None,
) -> AsyncIterator[AuditRow]:
    """Audit ``items`` (the rows of a refund or cancel batch) against Violet's records,
    yielding one :class:`AuditRow` per item: ``as_asked``, ``missing``, ``extra``,
    ``mismatch`` or ``unreadable`` (see README / docs/audit.md for the rules).

    Every bag named is read (its order once, every page of its refunds), at most
    ``concurrency`` orders at a time and, with ``rate``, at most that many reads per
    second (halved on a 429, like the batch runner); reads use the client's retry
    policy (429 and Retry-After included). ``journal`` (a batch journal's path) or
    ``ledger`` (a fleet's :class:`RedisLedger`) say what our side recorded for each
    row; Violet's records decide the verdict. Items are spooled to a scratch file in
    ``spool_dir`` (default: the system's temporary directory) and grouped there, so
    the input may be any length. Rows come out grouped by order, not in input order.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    from .batch import AdaptiveRate  # noqa: PLC0415 - batch re-exports this module

    limiter = AdaptiveRate(rate) if rate else None
    stats = stats if stats is not None else AuditStats()
    spool = Spool(spool_dir)
    try:
        if isinstance(items, AsyncIterable):
            await spool.add_async_items(items, ledger=ledger is not None)
        else:
            spool.add_items(items, ledger=ledger is not None)
        if journal is not None:
            spool.add_journal(Path(journal))
        stats.rows = spool.count
        previous = client._on_retry

        def on_retry(event: RetryEvent) -> Any:
            if isinstance(event.cause, RateLimitError):
                stats.rate_limited += 1
                if limiter is not None:
                    limiter.slow_down()
            return previous(event) if previous is not None else None

        reader = client.with_options(on_retry=on_retry)
        rows = _run(reader, spool, ledger, concurrency, limiter, stats)
        async with contextlib.aclosing(rows):  # its tasks end before the spool goes
            async for row in rows:
                yield row
    finally:
        spool.close()


async def _run(  # noqa: PLR0917, PLR0915 - one call site; feeder, workers and consumer
    client: VioletClient,
    spool: Spool,
    ledger: RedisLedger | None,
    concurrency: int,
    limiter: AdaptiveRate | None,
    stats: AuditStats,
) -> AsyncGenerator[AuditRow, None]:
    results: asyncio.Queue[Any] = asyncio.Queue(maxsize=concurrency)
    slots = asyncio.Semaphore(concurrency)

    def hold(count: int) -> None:
        stats.held_rows += count
        stats.max_held_rows = max(stats.max_held_rows, stats.held_rows)

    async def one(group: OrderRows) -> None:
        # The slot is held until the result is queued: at most ``concurrency`` orders
        # are being read or wait for the caller, besides the queue's own.
        try:
            if ledger is not None:
                group = await _with_ledger(ledger, group)
            await results.put(await _judge_order(client, group, limiter, stats))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug, or Redis failing: the consumer sees it
            await results.put(exc)
            raise
        finally:
            slots.release()

    async def feed() -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            for group in spool.orders():
                await slots.acquire()
                stats.orders += 1
                hold(group.rows)
                task = asyncio.create_task(one(group))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException as exc:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not isinstance(exc, asyncio.CancelledError):
                await results.put(exc)
            raise
        await results.put(_END)

    feeder = asyncio.create_task(feed())
    try:
        while True:
            got = await results.get()
            if got is _END:
                break
            if isinstance(got, BaseException):
                raise got
            for row in got:
                hold(-1)
                yield row
        await feeder
    finally:
        if not feeder.done():
            feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
