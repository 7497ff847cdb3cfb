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
import contextvars
import itertools
import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
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
from ._responses import RefundPage
from ._retry import Clock, RetryEvent
from .exceptions import RateLimitError, VioletError
from .models import OrderBag, OrderRefund

if TYPE_CHECKING:
    from ._client import VioletClient
    from .batch import AdaptiveRate, BatchItem
    from .fleet import RedisLedger

__all__ = [
    "AUDITS",
    "MONEY_OFF",
    "Audit",
    "AuditRow",
    "AuditStats",
    "JournalView",
    "MerchantLanes",
    "audit",
]


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


#: Rounds a bag read that still ends in a 429 (after the client's own retries, each
#: after its Retry-After) waits for its merchant's turn and is made again, before the
#: bag's rows are unreadable.
RATE_LIMITED_ROUNDS = 8
#: Orders that may wait for their merchant's turn without holding one of the
#: ``concurrency`` slots, per slot (more wait holding theirs: memory stays bounded).
WAITING_PER_SLOT = 8

_MERCHANT: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "violet_audit_merchant", default=None
)
"""The merchant whose bag is being read: a 429 the client retries is charged to it."""


@attrs.define
class _Lane:
    rate: float
    next_at: float
    slowed_at: float


class MerchantLanes:
    """Bag reads paced per merchant. Violet passes a merchant platform's 429s through,
    and each platform has its own limit, so only the merchant that said so slows down.
    A merchant has no lane (its reads go at once) until one of its reads gets a 429.
    From then on its reads leave at most ``rate`` a second: the lane starts at half of
    ``start``, halves on a 429 (once per ``1 / rate``: a wave of 429s from reads already
    in flight counts once), never below ``start / 64``, and grows by ``start / 20`` on
    each read that succeeds, up to ``start``. Decisions only: :meth:`turn` says how
    long to wait, on the caller's clock."""

    def __init__(self, start: float, clock: Clock) -> None:
        self.start = start
        self._clock = clock
        self.lanes: dict[int, _Lane] = {}

    def limited(self, merchant: int) -> None:
        now = self._clock.monotonic()
        lane = self.lanes.get(merchant)
        if lane is None:
            self.lanes[merchant] = _Lane(self.start / 2, now, now)
        elif now - lane.slowed_at >= 1.0 / lane.rate:
            lane.rate = max(self.start / 64, lane.rate / 2)
            lane.slowed_at = now

    def succeeded(self, merchant: int | None) -> None:
        lane = self.lanes.get(merchant) if merchant is not None else None
        if lane is not None:
            lane.rate = min(self.start, lane.rate + self.start / 20)

    def turn(self, merchant: int | None) -> float:
        """Seconds this merchant's next read waits (its turn is taken): 0 without a
        lane, so other merchants' reads never wait for a lane not theirs."""
        lane = self.lanes.get(merchant) if merchant is not None else None
        if lane is None:
            return 0.0
        now = self._clock.monotonic()
        due = max(now, lane.next_at)
        lane.next_at = due + 1.0 / lane.rate
        return due - now


@attrs.define
class _Reader:
    """What an order's reads share: the client, the run's rate, the merchants' lanes,
    the counters, and how to wait for a turn without holding a slot."""

    client: VioletClient
    limiter: AdaptiveRate | None
    lanes: MerchantLanes
    stats: AuditStats
    away: Callable[[], contextlib.AbstractAsyncContextManager[None]]

    async def paced(self) -> None:
        if self.limiter is not None:
            await self.limiter.wait()
        self.stats.reads += 1

    async def refunds(self, order_id: int, bag: OrderBag) -> RefundPage:
        """Every page of the bag's refunds. A read that still ends in a 429 waits for
        its merchant's turn and is made again, up to RATE_LIMITED_ROUNDS times."""
        client, merchant = self.client, bag.merchant_id
        for rounds in itertools.count():
            delay = self.lanes.turn(merchant)
            if delay > 0:
                async with self.away():
                    await client._shared.clock.sleep(delay)
            await self.paced()
            token = _MERCHANT.set(merchant)
            try:
                page = await client._read_refunds(
                    client._bag_path(order_id, bag.id, "refunds"), client._deadline()
                )
            except RateLimitError:
                if merchant is None or rounds >= RATE_LIMITED_ROUNDS:
                    raise
                self.lanes.limited(merchant)
                continue
            finally:
                _MERCHANT.reset(token)
            self.lanes.succeeded(merchant)
            return page
        raise AssertionError("unreachable")  # pragma: no cover


async def _judge_order(reader: _Reader, group: OrderRows) -> list[AuditRow]:
    client, stats = reader.client, reader.stats
    try:
        await reader.paced()
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
            page = await reader.refunds(group.order_id, bag)
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
        if reader.limiter is not None:
            reader.limiter.speed_up()
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
    second; reads use the client's retry policy (429 and Retry-After included). Bag
    reads are paced per merchant like the batch runner's sends: a merchant whose
    platform answers 429 gets a lane of its own (see :class:`MerchantLanes`), its
    orders wait their turn without holding a slot, and a read still refused after the
    client's retries waits for its turn and is made again. ``journal`` (a batch
    journal's path) or ``ledger`` (a fleet's :class:`RedisLedger`) say what our side
    recorded for each row; Violet's records decide the verdict. Items are spooled to
    a scratch file in ``spool_dir`` (default: the system's temporary directory) and
    grouped there, so the input may be any length. Rows come out grouped by order, not
    in input order.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    from .batch import AdaptiveRate  # noqa: PLC0415 - batch re-exports this module

    limiter = AdaptiveRate(rate) if rate is not None else None
    lanes = MerchantLanes(rate if rate is not None else float(concurrency), client._shared.clock)
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
                merchant = _MERCHANT.get()
                if merchant is not None:
                    lanes.limited(merchant)  # that merchant's platform: its lane only
                elif limiter is not None:
                    limiter.slow_down()
            return previous(event) if previous is not None else None

        reader = client.with_options(on_retry=on_retry)
        rows = _run(reader, spool, ledger, concurrency, limiter, lanes, stats)
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
    lanes: MerchantLanes,
    stats: AuditStats,
) -> AsyncGenerator[AuditRow, None]:
    results: asyncio.Queue[Any] = asyncio.Queue(maxsize=concurrency)
    slots = asyncio.Semaphore(concurrency)
    waiting = asyncio.Semaphore(concurrency * WAITING_PER_SLOT)
    holding: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("holding")

    @contextlib.asynccontextmanager
    async def away() -> AsyncIterator[None]:
        """This order waits for its merchant's turn without its slot (unless too many
        wait already): other merchants' orders go on meanwhile."""
        if waiting.locked():
            yield
            return
        held = holding.get()
        async with waiting:
            slots.release()
            held[0] = False
            yield  # cancelled while it waits: no slot is taken back, none is given
            await slots.acquire()
            held[0] = True

    reader = _Reader(client, limiter, lanes, stats, away)

    def hold(count: int) -> None:
        stats.held_rows += count
        stats.max_held_rows = max(stats.max_held_rows, stats.held_rows)

    async def one(group: OrderRows) -> None:
        # The slot is held until the result is queued: at most ``concurrency`` orders
        # are being read or wait for the caller, besides the queue's own and those
        # waiting for their merchant's turn (at most ``waiting``'s).
        held = [True]
        holding.set(held)
        try:
            if ledger is not None:
                group = await _with_ledger(ledger, group)
            await results.put(await _judge_order(reader, group))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug, or Redis failing: the consumer sees it
            await results.put(exc)
            raise
        finally:
            if held[0]:
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
