"""Batch refunds and cancels: bounded concurrency, an optional adaptive rate limit, a
crash-safe journal, and resume without refunding anyone twice.

::

    items = (BatchItem.refund(line, order_id, bag_id, RefundBagRequest(...)) for ...)
    async for result in run_batch(client, items, concurrency=16, journal="run.jsonl"):
        print(result.outcome, result.refund_id, result.error)

Input is consumed lazily: at most ``concurrency`` items are in flight and at most a few
results wait for the consumer, so memory stays flat however long the input is.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any, Literal

import attrs

from ._client import VioletClient
from ._journal import Journal, JournalEntry, JournalMismatchError
from ._retry import RetryEvent
from .exceptions import AmbiguousOutcomeError, RateLimitError, VioletError
from .models import CancelBagRequest, OrderRefund, RefundBagRequest

__all__ = [
    "BatchItem",
    "BatchResult",
    "Journal",
    "JournalMismatchError",
    "run_batch",
]

Kind = Literal["refund", "cancel"]
Outcome = Literal["succeeded", "failed", "unknown", "already_done", "already_failed"]


@attrs.frozen
class BatchItem:
    """One refund or cancel of a batch. ``line`` numbers the item in its input (lines
    must increase through a batch); with the order, bag and amount it makes the ``key``
    the journal resumes by."""

    line: int
    kind: Kind
    order_id: int
    bag_id: int
    request: RefundBagRequest | CancelBagRequest

    @classmethod
    def refund(
        cls, line: int, order_id: int, bag_id: int, request: RefundBagRequest | None = None
    ) -> BatchItem:
        return cls(line, "refund", order_id, bag_id, request or RefundBagRequest())

    @classmethod
    def cancel(
        cls, line: int, order_id: int, bag_id: int, request: CancelBagRequest | None = None
    ) -> BatchItem:
        return cls(line, "cancel", order_id, bag_id, request or CancelBagRequest())

    @property
    def key(self) -> str:
        amount: object = "cancel"
        if isinstance(self.request, RefundBagRequest):
            amount = (
                self.request.amount_refunded if self.request.amount_refunded is not None else "full"
            )
        return f"{self.line}:{self.order_id}:{self.bag_id}:{amount}"


@attrs.frozen
class BatchResult:
    """What happened to one item.

    ``outcome``: succeeded; failed (``error`` says why); unknown (the refund may or may
    not have applied: ``AmbiguousOutcomeError``, read back again on resume);
    already_done / already_failed (skipped, from the journal of an earlier run).
    """

    item: BatchItem
    outcome: Outcome
    refund: OrderRefund | None = None
    refund_id: int | None = None
    error: BaseException | None = None
    error_class: str | None = None
    attempts: int = 0
    retries: int = 0
    reconciled: bool = False
    rate_limited: int = 0


@attrs.define
class _Stats:
    retries: int = 0
    rate_limited: int = 0


_current: contextvars.ContextVar[_Stats | None] = contextvars.ContextVar(
    "violet_async_batch_item", default=None
)


class AdaptiveRate:
    """At most ``rate`` starts per second; halves on a 429, creeps back on success."""

    def __init__(self, rate: float, *, clock: Any = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.ceiling = rate
        self.rate = rate
        self._clock = clock
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = self._clock()
            delay = self._next - now
            self._next = max(now, self._next) + 1.0 / self.rate
            if delay > 0:
                await asyncio.sleep(delay)

    def slow_down(self) -> None:
        self.rate = max(self.ceiling / 64, self.rate / 2)

    def speed_up(self) -> None:
        self.rate = min(self.ceiling, self.rate + self.ceiling / 20)


async def _aiter(items: Iterable[BatchItem] | AsyncIterable[BatchItem]) -> AsyncIterator[BatchItem]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


_END = object()


async def run_batch(
    client: VioletClient,
    items: Iterable[BatchItem] | AsyncIterable[BatchItem],
    *,
    concurrency: int = 16,
    rate: float | None = None,
    journal: Journal | str | os.PathLike[str] | None = None,
    input_id: str | None = None,
    retry_failed: bool = False,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[BatchResult]:
    """Run refunds and cancels, yielding one :class:`BatchResult` per item as it ends.

    One item's failure never stops the batch. With a ``journal`` (a path or an open
    :class:`Journal`), items already done are skipped, items an earlier run left
    "sent" are read back before anything is re-sent, and failed items are skipped
    unless ``retry_failed``. Setting ``stop`` stops feeding new items; those in flight
    finish. ``input_id`` identifies the input (a file hash) in a new journal.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    own_journal = journal is not None and not isinstance(journal, Journal)
    log = (
        await Journal.open(journal, input_id=input_id)
        if journal is not None and not isinstance(journal, Journal)
        else journal
    )
    runner = _Runner(
        client,
        log,
        concurrency,
        AdaptiveRate(rate) if rate else None,
        retry_failed=retry_failed,
        stop=stop,
    )
    feeder = asyncio.create_task(runner.feed(items))
    try:
        while True:
            got = await runner.results.get()
            if got is _END:
                break
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        if not feeder.done():
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
        if own_journal and log is not None:
            await log.aclose()


class _Runner:
    """Feeds items to at most ``concurrency`` tasks; results go to a bounded queue."""

    def __init__(
        self,
        client: VioletClient,
        log: Journal | None,
        concurrency: int,
        limiter: AdaptiveRate | None,
        *,
        retry_failed: bool,
        stop: asyncio.Event | None,
    ) -> None:
        self._caller_hook = client._on_retry
        self.client = client.with_options(on_retry=self._on_retry)
        self.log = log
        self.limiter = limiter
        self.retry_failed = retry_failed
        self.stop = stop
        self.results: asyncio.Queue[Any] = asyncio.Queue(maxsize=concurrency * 2)
        self.slots = asyncio.Semaphore(concurrency)

    def _on_retry(self, event: RetryEvent) -> Any:
        stats = _current.get()
        limited = isinstance(event.cause, RateLimitError)
        if stats is not None:
            stats.retries += 1
            stats.rate_limited += limited
        if limited and self.limiter is not None:
            self.limiter.slow_down()
        # The caller's own hook still runs (its coroutine, if any, is awaited by the
        # retrier).
        return self._caller_hook(event) if self._caller_hook is not None else None

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def _one(self, item: BatchItem, prior: JournalEntry | None) -> None:
        try:
            result = await _process(self.client, item, prior, self.log, self.limiter)
        finally:
            self.slots.release()
        await self.results.put(result)

    async def feed(self, items: Iterable[BatchItem] | AsyncIterable[BatchItem]) -> None:
        tasks: set[asyncio.Task[None]] = set()
        last_line = None
        try:
            async for item in _aiter(items):
                if self._stopping():
                    break
                last_line = _check_increasing(last_line, item.line)
                prior = self.log.entry(item.line, item.key) if self.log is not None else None
                skipped = _skip(item, prior, retry_failed=self.retry_failed)
                if skipped is not None:
                    await self.results.put(skipped)
                    continue
                await self.slots.acquire()
                if self._stopping():
                    self.slots.release()
                    break
                task = asyncio.create_task(self._one(item, prior))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.results.put(exc)
            return
        await self.results.put(_END)


def _check_increasing(last: int | None, line: int) -> int:
    # Lines key the journal: a repeated line could send the same item twice.
    if last is not None and line <= last:
        raise ValueError(f"batch item lines must increase: line {line} after {last}")
    return line


def _skip(item: BatchItem, prior: JournalEntry | None, *, retry_failed: bool) -> BatchResult | None:
    if prior is None:
        return None
    if prior.state == "done":
        return BatchResult(item, "already_done", refund_id=prior.refund_id)
    if prior.state == "failed" and not retry_failed:
        return BatchResult(item, "already_failed", error_class=prior.error)
    return None


async def _process(
    client: VioletClient,
    item: BatchItem,
    prior: JournalEntry | None,
    log: Journal | None,
    limiter: AdaptiveRate | None,
) -> BatchResult:
    stats = _Stats()
    _current.set(stats)
    # An earlier run may have sent it ("sent", or "unknown" after an ambiguous
    # failure): read the bag back first, from the time it was first sent.
    resume_at = (
        prior.first_sent if prior is not None and prior.state in ("sent", "unknown") else None
    )
    if limiter is not None:
        await limiter.wait()
    try:
        if log is not None:
            await log.record(item.line, item.key, "sent")
        if isinstance(item.request, RefundBagRequest):
            refund = await client._refund(
                item.order_id, item.bag_id, item.request, resume_sent_at=resume_at
            )
        else:
            refund = await client._cancel(
                item.order_id, item.bag_id, item.request, resume_sent_at=resume_at
            )
    except VioletError as exc:
        # An ambiguous outcome is "unknown": a resume reads it back, never skips it.
        outcome: Outcome = "unknown" if isinstance(exc, AmbiguousOutcomeError) else "failed"
        if log is not None:
            await log.record(
                item.line, item.key, outcome, error=type(exc).__name__, message=str(exc)
            )
        return _result(item, outcome, stats, error=exc)
    if limiter is not None:
        limiter.speed_up()
    if log is not None:
        await log.record(
            item.line, item.key, "done", refund_id=refund.id, reconciled=refund.reconciled
        )
    return _result(item, "succeeded", stats, refund=refund)


def _result(
    item: BatchItem,
    outcome: Outcome,
    stats: _Stats,
    *,
    refund: OrderRefund | None = None,
    error: BaseException | None = None,
) -> BatchResult:
    return BatchResult(
        item,
        outcome,
        refund=refund,
        refund_id=refund.id if refund is not None else None,
        error=error,
        error_class=type(error).__name__ if error is not None else None,
        attempts=stats.retries + 1,
        retries=stats.retries,
        reconciled=refund.reconciled if refund is not None else False,
        rate_limited=stats.rate_limited,
    )
