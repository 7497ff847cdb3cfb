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
import collections
import contextvars
import heapq
import itertools
import math
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, Literal

import attrs

from ._audit import AuditRow, AuditStats, audit
from ._client import VioletClient
from ._config import scope_of
from ._converter import converter
from ._engine import VOCABULARY, Ended, engine_of, resumable
from ._engine import Outcome as AskOutcome
from ._item_key import content_key, numbered, split_key
from ._journal import (
    Journal,
    JournalEntry,
    JournalLockedError,
    JournalMismatchError,
    JournalWriteError,
)
from ._journal_index import JournalIndex, RepeatCounter
from ._pace import MerchantPace
from ._protocol import PendingRefund, Phase
from ._reconcile import KnownRefunds, RateLimitDeferred
from ._retry import RetryEvent
from ._telemetry import CAPTURE, count_item, feed
from .exceptions import (
    AmbiguousOutcomeError,
    BagPendingError,
    RateLimitError,
    RefundAlreadyPresentError,
    RequestValidationError,
    VioletError,
)
from .models import CancelBagRequest, OrderRefund, RefundBagRequest

__all__ = [
    "AuditRow",
    "AuditStats",
    "BatchItem",
    "BatchResult",
    "Journal",
    "JournalLockedError",
    "JournalMismatchError",
    "JournalWriteError",
    "audit",
    "run_batch",
]

Kind = Literal["refund", "cancel"]
Outcome = Literal[
    "succeeded",
    "failed",
    "unknown",
    "not_sent",
    "already_done",
    "already_failed",
    "already_present",
]
#: Outcomes that leave nothing for anyone to do; any other makes the batch not clean.
CLEAN_OUTCOMES = frozenset({"succeeded", "already_done"})


@attrs.frozen
class BatchItem:
    """One refund or cancel of a batch. ``line`` numbers the item in its input, for
    people; the journal knows an item by its content (:attr:`key`), so an edited row is
    a new item and moving rows changes nothing."""

    line: int
    kind: Kind
    order_id: int
    bag_id: int
    request: RefundBagRequest | CancelBagRequest
    merchant_id: int | None = None
    """The bag's merchant, when the input says (optional): its rows are paced by their
    merchant's lane from the start. Not part of what the item asks (:attr:`key`)."""

    @classmethod
    def refund(
        cls,
        line: int,
        order_id: int,
        bag_id: int,
        request: RefundBagRequest | None = None,
        *,
        merchant_id: int | None = None,
    ) -> BatchItem:
        return cls(line, "refund", order_id, bag_id, request or RefundBagRequest(), merchant_id)

    @classmethod
    def cancel(
        cls,
        line: int,
        order_id: int,
        bag_id: int,
        request: CancelBagRequest | None = None,
        *,
        merchant_id: int | None = None,
    ) -> BatchItem:
        return cls(line, "cancel", order_id, bag_id, request or CancelBagRequest(), merchant_id)

    @property
    def key(self) -> str:
        """What the item asks: kind, order, bag and a digest of the canonical request
        (``refund:ORDER:BAG:DIGEST``). Identical rows share it; the batch journal and
        the fleet ledger both number their repeats (``KEY:0``, ``KEY:1``): the item's
        name is :func:`~violet_async.fleet.item_key` (one function for both)."""
        return content_key(self.kind, self.order_id, self.bag_id, self.request)


@attrs.frozen
class BatchResult:
    """What happened to one item.

    ``outcome``: succeeded; failed (definitely not applied: ``error`` says why); unknown
    (the refund may or may not have applied: ``AmbiguousOutcomeError``, read back again
    on resume); not_sent (never reached Violet: refused credentials, or no connection
    could be made, or another item on its bag may have applied and could not be
    resolved; sent anew next run); already_present (not sent: the bag already holds a
    refund exactly like it that no journal entry accounts for, or one an earlier run's
    item on the bag made, whose row this input no longer holds as it was; ``refund_id``
    is that refund); already_done / already_failed (skipped, from the journal of an earlier
    run). ``sent`` is True when a request for it left during this run; ``requests``
    counts the HTTP requests answered for it and ``rate_limited`` the 429s among them.
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
    sent: bool = False
    requests: int = 0
    """HTTP requests answered for this item (baseline and read-backs included)."""
    earlier: bool = False
    """Not an item of this input: one an earlier run left open (sent, pending or
    unknown) whose row this input no longer holds as it was, read back at the end of
    the run (never sent). ``item`` is rebuilt from its journal record (``item.line``
    is its line in that earlier input). ``already_done``: it had applied
    (``refund_id``); ``not_sent``: proven not applied, and not sent, as no row asks for
    it; ``unknown``: still unresolved (the next run reads it back again)."""


@attrs.define
class _Stats:
    retries: int = 0
    rate_limited: int = 0
    """429s answered to this item's requests."""
    sent: bool = False
    requests: int = 0
    deferrals: int = 0
    outer: list[Any] | None = None
    """A caller's ``capture_responses`` list, still fed."""

    def append(self, response: Any) -> None:
        """Counts each answered request (the item's ``capture_responses`` sink)."""
        self.counted(response.status, lambda: response)

    def counted(self, status: int, response: Callable[[], Any]) -> None:
        """:meth:`append` given the status (the response is made only for a caller's
        list this feeds: :func:`~violet_async._telemetry.feed`)."""
        self.requests += 1
        self.rate_limited += status == 429
        if self.outer is not None:
            feed(self.outer, status, response)


_current: contextvars.ContextVar[_Stats | None] = contextvars.ContextVar(
    "violet_async_batch_item", default=None
)


class AdaptiveRate:
    """At most ``rate`` starts per second; halves on a 429, creeps back on success."""

    def __init__(self, rate: float, *, clock: Any = time.monotonic) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a finite number > 0")
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


#: Seconds a batch item may wait in its slot for a settle window; longer, and it is
#: parked and revisited when the window has passed, while other items go through.
DEFAULT_PATIENCE = 1.0
#: Times a parked item is revisited before it is reported unknown (its journal entry
#: stays resumable).
MAX_REVISITS = 8
#: Seconds before the first revisit of an item whose settle window already passed,
#: doubling with each revisit up to MAX_REVISIT_WAIT.
REVISIT_BACKOFF = 1.0
MAX_REVISIT_WAIT = 60.0
#: Items that may wait for their merchant's turn (per slot of concurrency, and at
#: least MIN_WAITING) before the input is held back.
WAITING_PER_SLOT = 64
MIN_WAITING = 4096
#: Times one item is sent back to wait for its merchant's pace after a 429 before it
#: ends not_sent (nothing applied; the next run sends it).
MAX_DEFERRALS = 32


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
    read_before_send: bool = True,
    patience: float = DEFAULT_PATIENCE,
    allow_repeat: bool = False,
) -> AsyncIterator[BatchResult]:
    """Run refunds and cancels, yielding one :class:`BatchResult` per item as it ends.

    One item's failure never stops the batch. Each item follows the refund protocol
    with ``read_before_send`` (the bag's refunds are read before the first send, so a
    failure in flight is matched exactly). An item whose outcome needs a settle window
    longer than ``patience`` seconds is parked and revisited after the window while
    other items go through, so a batch under transient faults ends with every item
    succeeded or failed; only conflicting evidence (or a server that stays down) ends
    one "unknown".

    With a ``journal`` (a path, or an open :class:`Journal`: it serves one run, and a
    second run given it raises :class:`JournalLockedError`), items already done are
    skipped, items an earlier run left sent or pending are read back before anything
    is re-sent, and failed items (definitely not applied) are skipped unless
    ``retry_failed``. Items are known by content (:attr:`BatchItem.key` plus the
    repeat number of identical items), so an edited item is a new one; but before any
    item on a bag is sent, the journal's sent, pending or unknown entries on that bag
    are read back (never re-sent): where one applied, a new item on the bag is not sent
    (already_present; ``allow_repeat`` sends it), and where one stays unresolved, it is
    not_sent. A new item asking a bag for the same money as an earlier run's done item
    on it (differing only in reason, restock_items or notify_customer), whose own row
    this input has not held so far, is not sent either (already_present;
    ``allow_repeat`` sends it). Open entries on bags no item of the input resolved are
    read back after the input (never sent) and yielded as results with
    :attr:`BatchResult.earlier` True. A parked item's revisits share one attempt
    budget. Setting ``stop`` stops feeding new items, and wakes the run from any wait;
    those in flight finish and parked ones are reported unknown (resumable).
    ``input_id`` names the input in a new journal's header (informational).

    The server is the last guard: with ``read_before_send``, an item whose bag already
    holds a refund carrying exactly its request, which neither this run nor the journal
    accounts for, is not sent and ends ``already_present`` (each such refund accounts
    for one item). ``allow_repeat=True`` sends it anyway (a second identical refund).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    limiter = AdaptiveRate(rate) if rate else None  # a bad rate raises before any open
    own_journal = journal is not None and not isinstance(journal, Journal)
    log = (
        await Journal.open(journal, input_id=input_id, scope=journal_scope(client))
        if journal is not None and not isinstance(journal, Journal)
        else journal
    )
    feeder: asyncio.Task[None] | None = None
    try:
        engine = engine_of(client)
        # Refunds this client handed to calls that are no item of this run (an earlier
        # run with another journal, or none; a direct call; another run going on at
        # once): another call's, never an item's to claim, but nothing this run or its
        # journal accounts for, so the guard before a first send holds an item that
        # asks exactly one of them (already_present), as it does in a new process.
        # Left out, the same client ran a file again with a new journal and refunded
        # every row a second time (and did so too with both runs going on at once).
        foreign = _Unaccounted(engine.known_refunds)
        if log is not None:
            log.take_run()  # an open Journal serves one run (it knows what it loaded)
            # Its rows are refunds of one Violet (app and host): not another's.
            await log.bind(journal_scope(client))
            log.redactor = engine.redactor
            for refund_id in log.refund_ids():
                if engine.known_refunds.handed(refund_id):
                    foreign.discard(refund_id)  # handed out before, and the journal's
                engine.known_refunds.add(refund_id)
        runner = _Runner(
            client,
            log,
            concurrency,
            limiter,
            retry_failed=retry_failed,
            stop=stop,
            read_before_send=read_before_send,
            patience=patience,
            allow_repeat=allow_repeat,
            foreign=foreign,
        )
        feeder = asyncio.create_task(runner.feed(items))
        while True:
            got = await runner.results.get()
            if got is _END:
                break
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        try:
            if feeder is not None and not feeder.done():
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
        finally:
            if own_journal and log is not None:
                await log.aclose()


def journal_scope(client: VioletClient) -> str:
    """The Violet a journal's rows are sent to: the client's app id and host (as its
    record store scopes keys)."""
    return scope_of(engine_of(client).app_id, client.base_url)


@attrs.frozen
class _Paced:
    """An item waiting for its merchant's turn (no slot held; its bag stays taken).
    ``resume`` is None (never sent) or an ABSENT record (answered 429: not applied)."""

    item: BatchItem
    key: str
    resume: PendingRefund | None
    stats: _Stats
    due: float
    slot: tuple[float, int] | None
    """The lane's slot it holds (time, lane epoch); None: reserve one when due."""
    error: VioletError | None = None
    merchant: int | None = None
    """Its merchant's lane, where it waits (None: it waits ``due`` out in the heap)."""


@attrs.frozen
class _Parked:
    item: BatchItem
    key: str
    pending: PendingRefund
    revisits: int
    error: AmbiguousOutcomeError
    stats: _Stats
    budget_from: int = 0
    """The item's send count when this run first took it: its revisits share one
    attempt budget (a revisit must not start the budget again)."""


class _Unaccounted:
    """The refunds this client handed to calls that no journal entry and no item of a
    run account for, read as the run goes, not when it began: a refund handed to
    another run of the client going on at once counts too. A refund of this run's
    asks (``own``: each ask, as its record is saved before a send) is accounted for,
    one it got without its id and the client bound to a listed record later included;
    ``discard``: one accounted for by id (the journal's, a claimed one)."""

    __slots__ = ("_accounted", "_known", "_order", "_owners")

    #: Refund ids and asks kept before the oldest are let go (the client itself keeps
    #: fewer refunds than that): memory stays flat.
    LIMIT = 20_000

    def __init__(self, known: KnownRefunds) -> None:
        self._known = known
        self._accounted: set[int] = set()
        self._owners: set[str] = set()
        self._order: collections.deque[str] = collections.deque()

    def __contains__(self, refund_id: object) -> bool:
        known = self._known
        if not isinstance(refund_id, int) or not known.handed(refund_id):
            return False
        if refund_id in self._accounted:
            return False
        owner = known.owner(refund_id)
        return owner is None or owner not in self._owners

    def own(self, ask_id: str) -> None:
        """The ask ``ask_id`` is one of this run's: the refunds it gets are accounted for."""
        if ask_id in self._owners:
            return
        self._owners.add(ask_id)
        self._order.append(ask_id)
        if len(self._order) > self.LIMIT:
            self._owners.discard(self._order.popleft())

    def discard(self, refund_id: int) -> None:
        """``refund_id`` is accounted for by the run (its journal, or one of its items)."""
        accounted = self._accounted
        accounted.add(refund_id)
        if len(accounted) > self.LIMIT:
            # The client forgets refunds (oldest first): a forgotten one is no longer
            # handed out, so it needs no accounting.
            self._accounted = {r for r in accounted if self._known.handed(r)}


class _NoResend(Exception):
    """Raised by the batch's save hook before a send the batch does not allow (an
    earlier run's item resolved by read-back only, or an attempt budget spent): the
    protocol proved the earlier sends did not apply, and nothing more leaves."""

    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


class _Runner:
    """Feeds items to at most ``concurrency`` tasks; results go to a bounded queue;
    parked items wait in a heap ordered by when their settle window ends."""

    def __init__(
        self,
        client: VioletClient,
        log: Journal | None,
        concurrency: int,
        limiter: AdaptiveRate | None,
        *,
        retry_failed: bool,
        stop: asyncio.Event | None,
        read_before_send: bool,
        patience: float,
        allow_repeat: bool = False,
        foreign: _Unaccounted | None = None,
    ) -> None:
        engine = engine_of(client)
        self._caller_hook = engine.on_retry
        # Refunds handed to calls of this client before the run, that its journal does
        # not account for (run_batch): a held item that claims one accounts for it.
        self.foreign = foreign if foreign is not None else _Unaccounted(engine.known_refunds)
        policy = attrs.evolve(engine.policy, read_before_send=read_before_send)
        self.client = client.with_options(on_retry=self._on_retry, retry=policy)
        self.clock = engine.clock
        self.log = log
        self.limiter = limiter
        self.retry_failed = retry_failed
        self.stop = stop
        self.patience = patience
        self.allow_repeat = allow_repeat
        self.hold = read_before_send and not allow_repeat
        self.results: asyncio.Queue[Any] = asyncio.Queue(maxsize=concurrency * 2)
        self.slots = asyncio.Semaphore(concurrency)
        #: (due by the clock's monotonic time, order, item)
        self.parked: list[tuple[float, int, _Parked]] = []
        self.pace = MerchantPace(max_rate=limiter.ceiling if limiter is not None else None)
        self.paced: list[tuple[float, int, _Paced]] = []
        #: Items waiting for their merchant's turn before the input is held back.
        self.max_waiting = max(WAITING_PER_SLOT * concurrency, MIN_WAITING)
        self._order = itertools.count()
        self._parked_changed = asyncio.Event()
        # One item per bag at a time, parked ones included: a later item on the bag
        # could otherwise claim a parked item's refund (or have its own claimed).
        self.busy: set[int] = set()
        self.waiting: dict[int, collections.deque[tuple[BatchItem, str, PendingRefund | None]]] = {}
        self.ready: collections.deque[tuple[BatchItem, str, PendingRefund | None]] = (
            collections.deque()
        )
        # Items an earlier run left open on a bag whose input row is not (or not yet)
        # here: read back, never re-sent, before any other item on the bag goes.
        self.orphans: set[str] = set()
        # Bags where such an item turned out applied: (its refund, its line). A new item
        # on the bag is not sent (it could be that row, edited): already_present.
        self.held: dict[int, tuple[int | None, int | None]] = {}
        # Bags where an item may have applied and could not be resolved: a new item on
        # the bag is not sent (not_sent), and the next run resolves it first.
        self.blocked: dict[int, str] = {}
        # Earlier runs' items that ended "done" and a new item of this input, differing
        # from them only in reason, restock_items or notify_customer, was held for.
        self.claimed: set[str] = set()
        # Their refunds, and those an earlier run's such item was held for (its row in
        # this input, skipped already_present): each done item accounts for one row.
        self.claimed_refunds: set[int] = set()
        # Earlier runs' items left open on bags no item of this input resolved them on:
        # read back after the input, each reported as an ``earlier`` result.
        self.swept: set[str] = set()
        self.repeats: RepeatCounter | None = None
        self.max_attempts = policy.max_attempts

    def _on_retry(self, event: RetryEvent) -> Any:
        stats = _current.get()
        limited = isinstance(event.cause, RateLimitError)
        if stats is not None:
            stats.retries += 1
        if limited and self.limiter is not None:
            self.limiter.slow_down()
        # The caller's own hook still runs (its coroutine, if any, is awaited by the
        # retrier).
        return self._caller_hook(event) if self._caller_hook is not None else None

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    async def _one(  # noqa: PLR0917 - internal
        self,
        item: BatchItem,
        key: str,
        resume: PendingRefund | None,
        revisits: int,
        stats: _Stats | None = None,
        budget_from: int | None = None,
        *,
        slot: tuple[float, int] | None = None,
    ) -> None:
        orphan = key in self.orphans
        if orphan and resume is None and self.log is not None:
            resume = await JournalRecords(self.log, item, key).load()
        if budget_from is None:
            budget_from = resume.sends if resume is not None else 0
        result: BatchResult | _Parked | _Paced
        try:
            if orphan and resume is None:  # journaled before its first send: never left
                note = "an earlier run's item that was never sent; not sent now"
                why = _NotApplied(note)
                result = await _ended(item, key, "not_sent", _Stats(), self.log, why)
            else:
                result = await _process(
                    self.client,
                    item,
                    key,
                    resume,
                    self.log,
                    self.limiter,
                    patience=self.patience,
                    stats=stats or _Stats(),
                    hold=self.hold,
                    resend=not orphan,
                    sends_left=(budget_from, self.max_attempts),
                    pace=self.pace,
                    slot=slot,
                    foreign=self.foreign,
                )
        except Exception as exc:  # noqa: BLE001 - a bug: the consumer must see it
            await self.results.put(exc)
            return
        finally:
            self.slots.release()
        if isinstance(result, _Paced):
            self._wait_for_pace(result)
            return  # its bag stays taken while it waits
        if isinstance(result, _Parked):
            parked = attrs.evolve(result, revisits=revisits, budget_from=budget_from)
            if self._park(parked, revisits):
                return  # its bag stays taken while it is parked
            try:
                result = await _ended(item, key, "unknown", parked.stats, self.log, parked.error)
            except Exception as exc:  # noqa: BLE001 - a journal failure: the consumer sees it
                await self.results.put(exc)
                return
        if result.outcome == "unknown":
            self.blocked.setdefault(
                item.bag_id,
                f"bag {item.bag_id} has a refund or cancel that may have applied (line "
                f"{item.line}, {'an earlier run' if orphan else 'this run'}) and could not "
                "be resolved; not sent: run the same command again to read it back first",
            )
        if orphan:
            await self._orphan_ended(item, key, result)
            return  # not an item of this input: no result of its own
        self._bag_done(item.bag_id)
        await self.results.put(result)

    async def _orphan_ended(self, item: BatchItem, key: str, result: BatchResult) -> None:
        """An earlier run's item on the bag ended: a refund it made holds the bag. One
        on no bag of this input (swept after it) is reported on its own."""
        self.orphans.discard(key)
        if result.outcome == "succeeded":
            self.held[item.bag_id] = (result.refund_id, item.line)
        self._bag_done(item.bag_id)
        if key in self.swept:
            await self.results.put(_earlier(result))

    def _wait_for_pace(self, paced: _Paced) -> None:
        """A row answered 429 (nothing applied) waits for its merchant's turn."""
        if paced.merchant is not None:
            self.pace.wait_in_lane(paced.merchant, paced, first=paced.resume is not None)
        else:
            heapq.heappush(self.paced, (paced.due, next(self._order), paced))
        self._parked_changed.set()

    def _park(self, parked: _Parked, revisits: int) -> bool:
        """Park an item whose outcome is pending until its window ends (False: it has
        been revisited enough, or needs a person: it ends unknown)."""
        if revisits >= MAX_REVISITS or parked.pending.needs_review:
            return False
        # Not before its window ends, and backing off when the window has passed
        # already (a list lagging beyond it): revisits are not spent at once.
        backoff = min(REVISIT_BACKOFF * 2**revisits, MAX_REVISIT_WAIT)
        # Due by monotonic time: a wall clock stepped back hours (NTP) must not hold
        # the run for hours (the record follows the step when it is resumed).
        wait = max((parked.pending.settle_until or 0.0) - self.clock.time(), backoff)
        heapq.heappush(self.parked, (self.clock.monotonic() + wait, next(self._order), parked))
        self._parked_changed.set()
        return True

    def _bag_done(self, bag_id: int) -> None:
        """The item holding ``bag_id`` ended: the next item waiting for the bag is ready."""
        waiting = self.waiting.get(bag_id)
        if waiting:
            self.ready.append(waiting.popleft())
            if not waiting:
                del self.waiting[bag_id]
            self._parked_changed.set()
        else:
            self.busy.discard(bag_id)

    async def _start_ready(self, start: Any) -> None:
        """Start the items whose bag became free (each takes a slot)."""
        while self.ready and not self._stopping():
            item, key, resume = self.ready.popleft()
            if key in self.orphans:
                await self.slots.acquire()
                start(item, key, resume, 0)
            else:
                await self._admit(item, key, start)

    async def _admit(self, item: BatchItem, key: str, start: Any) -> bool:
        """Start ``item``, whose bag it now holds, unless its journal entry says to skip
        it, or an earlier run's item on the bag may have applied: that one is read back
        first (never re-sent), and a new item on a bag where it did is not sent.
        Returns False when the feed must stop."""
        prior = self.log.entry(key) if self.log is not None else None
        skipped = _skip(item, prior, retry_failed=self.retry_failed, allow_repeat=self.allow_repeat)
        resume = None
        if skipped is None and self.log is not None:
            resume = await JournalRecords(self.log, item, key).load()
        if skipped is None and resume is None:
            skipped = await self._not_now(item, key, seen=prior is not None)
        if skipped is not None:
            self._bag_done(item.bag_id)
            await self._skipped(skipped)
            return True
        log = self.log
        entries = (
            [log.entry(k) for k in sorted(log.open_on_bag(item.bag_id))] if log is not None else []
        )
        earlier = [
            job
            for job in map(_orphan, entries)
            if job is not None and job[1] != key and job[1] not in self.orphans
        ]
        if earlier:
            waiting = self.waiting.setdefault(item.bag_id, collections.deque())
            waiting.appendleft((item, key, None))
            waiting.extendleft(reversed(earlier[1:]))
            self.orphans.update(job[1] for job in earlier)
            item, key, resume = earlier[0]
        await self.slots.acquire()
        if self._stopping():
            self.slots.release()
            return False
        start(item, key, resume, 0)
        return True

    async def _skipped(self, result: BatchResult) -> None:
        """An item skipped from its journal entry. One an earlier run held back for an
        earlier item's refund (already_present) accounts for that refund here too."""
        if result.outcome == "already_present" and result.refund_id is not None:
            self.claimed_refunds.add(result.refund_id)
        await self.results.put(result)

    async def _not_now(self, item: BatchItem, key: str, *, seen: bool) -> BatchResult | None:
        """The result of a new item that must not be sent on its bag now (None: send).
        ``seen``: an earlier run journaled this very row (failed, unsent): it is its own
        row, not an edited one."""
        held = self.held.get(item.bag_id)
        if held is not None and not self.allow_repeat:
            refund_id, line = held
            exc = _BagHeld(
                f"bag {item.bag_id} already holds refund {refund_id}, made by an earlier "
                f"run's row (line {line}) that this input no longer has as it was (an "
                "edited row?); not sent. Check the bag; --allow-repeat sends it anyway",
                refund_id,
            )
            return await _present(self.client, item, key, stats=_Stats(), log=self.log, exc=exc)
        paid = self._paid_alike(item) if not (self.allow_repeat or seen) else None
        if paid is not None:
            exc = _BagHeld(held_message(item, paid), paid.refund_id)
            return await _present(self.client, item, key, stats=_Stats(), log=self.log, exc=exc)
        why = self.blocked.get(item.bag_id) or self._unreadable_on_bag(item.bag_id, key)
        if why is not None:
            return await _ended(item, key, "not_sent", _Stats(), self.log, _BagUnresolved(why))
        return None

    def _paid_alike(self, item: BatchItem) -> JournalEntry | None:
        """An earlier run's item done on ``item``'s bag asking the same money, whose own
        row this input has not held so far (nor has another edited row claimed it): the
        new item is likely that row, edited, and sending it would refund the bag twice.
        Claimed for this item (None: no such entry)."""
        if self.log is None or not self.log.any_paid:
            return None
        return claim_paid_alike(
            self.log.paid_alike,
            self.log.entry,
            item,
            self.claimed,
            self.claimed_refunds,
            self.repeats,
        )

    def _unreadable_on_bag(self, bag_id: int, key: str) -> str | None:
        """Why nothing may be sent on ``bag_id`` when an earlier run's open entry on it
        has a record that cannot be read: it may have applied, and it cannot be read
        back (None: no such entry). The bag stays blocked for this run."""
        log = self.log
        if log is None:
            return None
        entries = (log.entry(k) for k in sorted(log.open_on_bag(bag_id) - {key}))
        bad = next((e for e in entries if e is not None and _orphan(e) is None), None)
        if bad is None:
            return None
        return self.blocked.setdefault(
            bag_id,
            f"bag {bag_id} has an earlier run's refund or cancel (line {bad.line}, "
            f"{bad.state}) that may have applied, and its journal record cannot be read; "
            "not sent: check the bag's refunds, then send it with a new --journal if it "
            "is not there",
        )

    async def feed(self, items: Iterable[BatchItem] | AsyncIterable[BatchItem]) -> None:
        tasks: set[asyncio.Task[None]] = set()
        # Repeats of an identical item are distinct items: KEY:0, KEY:1, ...
        repeats = RepeatCounter()  # bounded: on disk beyond 50,000 distinct items
        self.repeats = repeats

        def start(  # noqa: PLR0917 - internal
            item: BatchItem,
            key: str,
            resume: PendingRefund | None,
            revisits: int,
            stats: _Stats | None = None,
            budget_from: int | None = None,
            *,
            slot: tuple[float, int] | None = None,
        ) -> None:
            task = asyncio.create_task(
                self._one(item, key, resume, revisits, stats, budget_from, slot=slot)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        try:
            async for item in _aiter(items):
                if self._stopping():
                    break
                content = item.key
                n = repeats.take(content)
                if self.log is None:
                    key, prior = numbered(content, n), None
                else:
                    key = self.log.key_of(item, content, n)
                    prior = self.log.entry(key)
                skipped = _skip(
                    item, prior, retry_failed=self.retry_failed, allow_repeat=self.allow_repeat
                )
                if skipped is not None:
                    await self._skipped(skipped)
                    continue
                if item.bag_id in self.busy:
                    # Its journal entry is read again when it starts: an earlier item on
                    # the bag may have resolved it meanwhile.
                    self.waiting.setdefault(item.bag_id, collections.deque()).append(
                        (item, key, None)
                    )
                    continue
                self.busy.add(item.bag_id)
                await self._make_room(start)
                if not await self._admit(item, key, start):
                    break
                await self._start_ready(start)
                await self._revisit_due(start)
            await self._drain(tasks, start)
        except asyncio.CancelledError:
            # The consumer went away (closed the iterator): nobody reads results now.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.results.put(exc)
            return
        finally:
            repeats.close()
        await self.results.put(_END)

    async def _make_room(self, start: Any) -> None:
        """Hold the input back while too many items wait for their merchant's turn:
        memory stays bounded however much of a long input one strict merchant has."""
        while self.pace.waiting + len(self.paced) >= self.max_waiting and not self._stopping():
            await self._revisit_due(start)
            lane_due = self.pace.next_due()
            dues = [self.paced[0][0]] if self.paced else []
            first = min([*dues, lane_due] if lane_due is not None else dues)
            await self.clock.sleep(min(max(first - self.clock.monotonic(), 0.0), 1.0))

    async def _revisit_due(self, start: Any) -> None:
        """Start parked items whose settle window has passed (each takes a slot)."""
        while self.parked and self.parked[0][0] <= self.clock.monotonic() and not self._stopping():
            _, _, parked = heapq.heappop(self.parked)
            await self.slots.acquire()
            start(
                parked.item,
                parked.key,
                parked.pending,
                parked.revisits + 1,
                parked.stats,
                parked.budget_from,
            )
        while self.paced and self.paced[0][0] <= self.clock.monotonic() and not self._stopping():
            _, _, paced = heapq.heappop(self.paced)
            await self.slots.acquire()
            start(paced.item, paced.key, paced.resume, 0, paced.stats, slot=paced.slot)
        if self._stopping():
            return
        for paced, slot in self.pace.release(self.clock.monotonic()):
            await self.slots.acquire()
            start(paced.item, paced.key, paced.resume, 0, paced.stats, slot=slot)

    async def _stop_draining(self, tasks: set[asyncio.Task[None]]) -> None:
        """Stopped: finish what runs; parked items end unknown (resumable by read-back),
        rows waiting for their merchant's pace end not_sent (nothing applied)."""
        if tasks:
            await asyncio.gather(*tasks)
        while self.parked:
            _, _, parked = heapq.heappop(self.parked)
            ended = await _ended(
                parked.item, parked.key, "unknown", parked.stats, self.log, parked.error
            )
            if parked.key not in self.orphans:  # an earlier run's: no row here
                await self.results.put(ended)
            elif parked.key in self.swept:
                await self.results.put(_earlier(ended))
        waited = [entry for _, _, entry in self.paced] + self.pace.take_all()
        self.paced.clear()
        for paced in waited:
            # Never sent, or answered 429: nothing applied; the next run sends it.
            error = paced.error or VioletError(
                "not sent: the run stopped while this row waited for its merchant's pace"
            )
            ended = await _ended(
                paced.item,
                paced.key,
                "not_sent",
                paced.stats,
                self.log,
                error,
            )
            if paced.key not in self.orphans:  # an earlier run's: no row here
                await self.results.put(ended)
            elif paced.key in self.swept:
                await self.results.put(_earlier(ended))

    async def _drain(self, tasks: set[asyncio.Task[None]], start: Any) -> None:
        """After the input: finish what runs, then read back what earlier runs left open
        that no item of this input resolved (:meth:`_sweep`), and finish that."""
        while True:
            await self._finish(tasks, start)
            if self._stopping():
                return
            await self._sweep(start)
            if not tasks:
                return

    async def _finish(self, tasks: set[asyncio.Task[None]], start: Any) -> None:
        """Finish what runs, and revisit parked items as they fall due."""
        while tasks or self.parked or self.paced or self.pace.waiting or self.ready or self.waiting:
            if self._stopping():
                await self._stop_draining(tasks)
                return
            await self._start_ready(start)
            await self._revisit_due(start)
            if not (tasks or self.parked or self.paced or self.pace.waiting or self.ready):
                if not self.waiting:
                    continue  # the last items ended meanwhile
                # Items wait for a bag no item holds: never end quietly without them.
                raise RuntimeError(
                    f"batch items wait for bags nobody holds: {sorted(self.waiting)}"
                )
            lane_due = self.pace.next_due()
            if not (self.parked or self.paced or lane_due is not None):
                if tasks:
                    await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
                continue
            # Every due time is monotonic: a wall clock stepped back hours never holds
            # a parked row or a merchant's turn for hours.
            now = self.clock.monotonic()
            waits = [] if lane_due is None else [lane_due - now]
            if self.paced:
                waits.append(self.paced[0][0] - now)
            if self.parked:
                waits.append(self.parked[0][0] - now)
            wait = max(min(waits), 0.0)
            if tasks:
                # Wake for whichever comes first: an item ending (it may park, with an
                # earlier window) or the first parked window passing.
                self._parked_changed.clear()
                await self._nap(min(wait, 1.0), tasks, self._parked_changed)
            elif wait > 0:
                await self._nap(wait)

    async def _sweep(self, start: Any) -> None:
        """After the input, with nothing else left to do: an earlier run's item still
        open that no item of this input resolved (its row edited onto another bag, or
        removed) is read back (never sent) and reported (``BatchResult.earlier``), so a
        refund it made is never lost track of. Each is swept once a run."""
        if self.log is None or self._stopping():
            return
        for entry in self.log.left_open():
            if self._stopping():
                return
            job = _orphan(entry)
            if job is None or entry.key in self.swept or entry.key in self.orphans:
                continue  # an unreadable record cannot be read back
            item, key, resume = job
            self.swept.add(key)
            self.orphans.add(key)
            if item.bag_id in self.busy:
                self.waiting.setdefault(item.bag_id, collections.deque()).append(job)
                continue
            self.busy.add(item.bag_id)
            await self.slots.acquire()
            start(item, key, resume, 0)

    async def _nap(
        self,
        seconds: float,
        tasks: set[asyncio.Task[None]] | None = None,
        wake: asyncio.Event | None = None,
    ) -> None:
        """Sleep ``seconds``, or less: until a task ends, ``wake`` is set, or the run is
        told to stop (Ctrl-C must not wait out a parked item's settle window)."""
        own: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.clock.sleep(seconds))]
        own += [asyncio.ensure_future(e.wait()) for e in (wake, self.stop) if e is not None]
        await asyncio.wait({*own, *(tasks or ())}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in own:
            waiter.cancel()
        await asyncio.gather(*own, return_exceptions=True)


def claim_paid_alike(  # noqa: PLR0917 - internal, two call sites
    paid_alike: Callable[[str, int, int, Any], list[tuple[str, bool]]],
    entry_of_key: Callable[[str], JournalEntry | None],
    item: BatchItem,
    claimed: set[str],
    claimed_refunds: set[int],
    repeats: RepeatCounter | None,
) -> JournalEntry | None:
    """The earlier run's "done" entry on ``item``'s bag that asked the same money
    (``paid_alike``: the journal's lookup), whose own row the input has not held so far
    (``repeats``: the rows met so far) nor another row claimed: claimed for ``item``.
    Failing that, one that moved the whole bag, even if claimed (a whole-bag refund
    split into rows is one refund of the bag). None: none. Shared by a run and a dry
    run (which reads only the journal)."""
    request = converter.unstructure(item.request)  # as the journal records it
    filled: JournalEntry | None = None
    for key, fills in paid_alike(item.kind, item.order_id, item.bag_id, request):
        content, number = split_key(key)
        if repeats is not None and number is not None and repeats.seen(content) > number:
            continue  # its own row is in this input (already_done): it accounts for itself
        entry = entry_of_key(key)
        if entry is None or entry.state != "done":
            continue
        if key in claimed or entry.refund_id in claimed_refunds:
            # Taken by another row. One that moved the whole bag (a whole-bag refund, a
            # cancel) still holds this one: nothing of the bag is left to refund.
            filled = filled or (entry if fills else None)
            continue
        claimed.add(key)
        if entry.refund_id is not None:
            claimed_refunds.add(entry.refund_id)
        return entry
    return filled


class DryRun:
    """What a run would do with each new row of an input (no journal entry of its own),
    read from the journal only: nothing is sent. Rows are given in input order, each
    after ``repeats.take`` counted it, as a run meets them."""

    def __init__(self, index: JournalIndex, *, allow_repeat: bool = False) -> None:
        self.index = index
        self.allow_repeat = allow_repeat
        self.claimed: set[str] = set()
        self.claimed_refunds: set[int] = set()

    def own(self, entry: JournalEntry) -> None:
        """A row whose own entry the journal has: one held before accounts for the
        refund it was held for (as a run's skip of it does)."""
        if entry.state == "present" and entry.refund_id is not None:
            self.claimed_refunds.add(entry.refund_id)

    def verdict(self, item: BatchItem, repeats: RepeatCounter) -> tuple[str, str] | None:
        """(what the run does, why) for a new row the run would not simply send; None:
        it is sent. An earlier run's done row of the same money holds it (as
        :meth:`_Runner._not_now`); an earlier run's open entry on its bag is read back
        before it (it is then held if that one applied)."""
        index = self.index
        if index.any_paid and not self.allow_repeat:
            paid = claim_paid_alike(
                index.paid_like, index.get, item, self.claimed, self.claimed_refunds, repeats
            )
            if paid is not None:
                return "held (already_present)", held_message(item, paid)
        entries = [index.get(k) for k in sorted(index.open_on_bag(item.bag_id))]
        for entry in entries:
            if entry is not None and _orphan(entry) is None:
                return "not_sent", (
                    f"not sent: an earlier run's row on the bag (line {entry.line}, "
                    f"{entry.state}) may have applied and its journal record cannot be read"
                )
        first = next((e for e in entries if e is not None), None)
        if first is not None:
            return "waits for a read-back", (
                f"waits: an earlier run's row on the bag (line {first.line}, {first.state}) "
                "is read back first, never re-sent; this row is not sent if that one applied"
            )
        return None


def held_message(item: BatchItem, paid: JournalEntry) -> str:
    """Why ``item`` is not sent: ``paid``, an earlier run's done row, asked the same
    money of the bag."""
    return (
        f"bag {item.bag_id} already holds refund {paid.refund_id}, made by an earlier "
        f"run's row (line {paid.line}) asking the same money of the bag (this row differs "
        "from it in reason, restock_items or notify_customer, or names as an amount "
        "what that row refunded as the whole bag or its lines, or the other way round, "
        "or cancels where it refunded: an edited row?), and this input no longer has "
        "that row as it was; not sent. Check the bag; --allow-repeat sends it anyway"
    )


def _skip(
    item: BatchItem, prior: JournalEntry | None, *, retry_failed: bool, allow_repeat: bool
) -> BatchResult | None:
    if prior is None:
        return None
    if prior.state == "done":
        return BatchResult(item, "already_done", refund_id=prior.refund_id)
    if prior.state == "failed" and not retry_failed:
        # Sent again (with --retry-failed) only after the bag is read: hold_if_present.
        return BatchResult(
            item, "already_failed", error=_Recorded(prior.message or ""), error_class=prior.error
        )
    if prior.state == "present" and not allow_repeat:
        return BatchResult(
            item,
            "already_present",
            refund_id=prior.refund_id,
            error=_Recorded(prior.message or ""),
            error_class=prior.error,
        )
    return None


def _earlier(result: BatchResult) -> BatchResult:
    """An earlier run's item, resolved (or not) by this run's read-back, as reported."""
    outcome = "already_done" if result.outcome == "succeeded" else result.outcome
    return attrs.evolve(result, outcome=outcome, earlier=True)


class _Recorded(VioletError):
    """The message an earlier run journaled for an item it skipped now."""


class _BagHeld(RefundAlreadyPresentError):
    """Not sent: an earlier run's item on the bag, no longer in the input as it was,
    turned out applied."""

    def __init__(self, message: str, refund_id: int | None) -> None:
        super().__init__(message, refunds=())
        self.refund_id = refund_id


class _BagUnresolved(VioletError):
    """Not sent: a refund or cancel on the bag may have applied and is unresolved."""


class _NotApplied(VioletError):
    """Proven not applied by read-back, and not sent again (see the message)."""


def _orphan(entry: JournalEntry | None) -> tuple[BatchItem, str, PendingRefund | None] | None:
    """An earlier run's open entry as an item to resolve (its record comes from the
    journal entry when it starts); None when its record cannot be read."""
    if entry is None:
        return None
    try:
        ask = PendingRefund.from_dict(entry.ask or {})
    except RequestValidationError:
        return None
    item = BatchItem(entry.line or 0, ask.kind, ask.order_id, ask.bag_id, ask.request)
    return item, entry.key, None


def _resumable(item: BatchItem, prior: JournalEntry | None) -> PendingRefund | None:
    """The record to resume an item an earlier run may have sent (None: send anew).

    The journal's edge only says whether it may have been sent (its sent, pending and
    unknown lines) and reads the line's record; what is resumed from it is the one rule
    of :func:`~violet_async._engine.resumable`, from the first send time it has."""
    if prior is None or prior.state not in ("sent", "pending", "unknown"):
        return None  # never sent, or proven not applied ("failed", "unsent", "present")
    stored: PendingRefund | None = None
    if prior.ask is not None:
        try:
            stored = PendingRefund.from_dict(prior.ask)
        except RequestValidationError:
            stored = None  # a torn record: resumed as sent once
    # An absent record under a "sent" line is the one a run writes when a 429 defers
    # the row, or a re-send waits to leave (every send journaled before it leaves):
    # sent anew. Absent under any other state is a phase the state does not explain:
    # resumed pending and doubted, as the rule says.
    return resumable(
        stored, item_ask(item), sent_at=prior.first_sent, absent_unsent=prior.state == "sent"
    )


#: The journal's line state for each outcome an item's ask ends with
#: (``VOCABULARY["journal"]`` read backwards; "sent" is an open line, never an end).
_JOURNAL_STATES = {
    AskOutcome.APPLIED: "done",
    AskOutcome.PRESENT: "present",
    AskOutcome.FAILED: "failed",
    AskOutcome.NOT_SENT: "unsent",
    AskOutcome.PENDING: "pending",
    AskOutcome.REVIEW: "unknown",
}


@attrs.frozen
class JournalRecords:
    """The batch journal as the record store seam (``AskRecords``) of one item: its
    line key ``key``. ``load``: the record to resume from the key's line (the one
    rule, :func:`_resumable`). ``save``: a "sent" or "pending" line with the record,
    on disk before the send leaves (an ABSENT record, every send so far proven not
    applied, is kept on the "sent" edge). ``end``: the item's last line, its state
    the journal's word for the outcome."""

    journal: Journal
    item: BatchItem
    key: str

    async def load(self) -> PendingRefund | None:
        return _resumable(self.item, self.journal.entry(self.key))

    async def save(self, ask: PendingRefund) -> None:
        phase = ask.phase
        if phase is Phase.SENT or phase is Phase.PENDING:
            await self.journal.record(self.key, self.item.line, phase.value, ask=ask.to_dict())
        elif phase is Phase.ABSENT:
            # Deferred after a 429: every send so far proven not applied. Kept on the
            # "sent" edge (an earlier send left), with the record that says so: a run
            # after a crash sends it anew, its window from that send, and never takes
            # a refund someone else made during the wait for its own.
            await self.journal.record(self.key, self.item.line, "sent", ask=ask.to_dict())

    async def end(self, ended: Ended, **fields: Any) -> None:
        """``fields``: what the batch adds to the line before the error (an already
        present item's refunds)."""
        refund = ended.refund
        if refund is not None:
            # The amount it moved: a later row stating that amount, where this one
            # stated none (the whole bag), is the same money (see
            # _journal_index.same_money).
            fields = {"refund_id": refund.id, "reconciled": refund.reconciled, **fields}
            if type(refund.amount) is int:
                fields["amount"] = refund.amount
        elif ended.error is not None:
            exc = ended.error
            fields = {**fields, "error": type(exc).__name__, "message": str(exc)}
            pending = getattr(exc, "pending", None)
            if isinstance(pending, PendingRefund):
                fields["ask"] = pending.to_dict()
        state = _JOURNAL_STATES[ended.outcome]
        await self.journal.record(self.key, self.item.line, state, **fields)


@attrs.frozen
class _ItemRecords:
    """The batch runner's record store seam for one item's ask: the run's own rules
    before a send (an earlier run's item is only read back; an item's attempts are
    counted across parks), then its journal's (none: a run without a journal)."""

    journal: JournalRecords | None
    stats: _Stats
    resend: bool = True
    sends_left: tuple[int, int] | None = None
    foreign: _Unaccounted | None = None

    async def load(self) -> PendingRefund | None:
        return None if self.journal is None else await self.journal.load()

    async def save(self, ask: PendingRefund) -> None:
        if self.foreign is not None:
            self.foreign.own(ask.ask_id)  # what this ask gets is this run's
        if ask.phase is Phase.SENT:
            if not self.resend:
                raise _NoResend(
                    "an earlier run's send, proven not applied by read-back; not sent "
                    "again, as this run's input does not hold its row (as it was)"
                )
            sends_left = self.sends_left
            if sends_left is not None and ask.sends - sends_left[0] > sends_left[1]:
                raise _NoResend(
                    f"not applied (proven by read-back), and this run's {sends_left[1]} "
                    "attempt(s) for it are spent; not sent again"
                )
            self.stats.sent = True
        if self.journal is not None:
            await self.journal.save(ask)

    async def end(self, ended: Ended) -> None:
        if self.journal is not None:
            await self.journal.end(ended)


def item_ask(item: BatchItem) -> PendingRefund:
    """The ask ``item`` stands for, never sent (what a stored record must match)."""
    return PendingRefund(item.kind, item.order_id, item.bag_id, item.request)


async def _process(  # noqa: PLR0917 - internal, one call site
    client: VioletClient,
    item: BatchItem,
    key: str,
    resume: PendingRefund | None,
    log: Journal | None,
    limiter: AdaptiveRate | None,
    *,
    patience: float,
    stats: _Stats,
    pace: MerchantPace,
    hold: bool = False,
    resend: bool = True,
    sends_left: tuple[int, int] | None = None,
    slot: tuple[float, int] | None = None,
    foreign: _Unaccounted | None = None,
) -> BatchResult | _Parked | _Paced:
    _current.set(stats)
    _count_requests(stats)
    fresh = resume is None or resume.phase is Phase.ABSENT
    waiting = (
        await _merchant_turn(client, item, key, resume, pace, slot, stats, patience)
        if fresh
        else None
    )
    if waiting is not None:
        return waiting
    if limiter is not None:
        await limiter.wait()

    records = _ItemRecords(
        JournalRecords(log, item, key) if log is not None else None,
        stats,
        resend=resend,
        sends_left=sends_left,
        foreign=foreign,
    )

    try:
        # JournalWriteError goes on: the batch stops, since what the journal could not
        # record must not go on.
        ended = await engine_of(client).settle(
            item.kind,
            item.order_id,
            item.bag_id,
            item.request,
            passes=(JournalWriteError,),
            resume=resume,
            records=records,
            patience=patience,
            hold_if_present=hold,
            defer_rate_limited=True,
            foreign=foreign if foreign is not None else (),
        )
    except _NoResend as exc:
        # Proven not applied: an earlier run's item is free to be sent anew by a later
        # input that holds it; an item out of attempts failed.
        outcome: Outcome = "not_sent" if not resend else "failed"
        return await _ended(item, key, outcome, stats, log, _NotApplied(exc.note))
    # The engine's one outcome; the batch's words for it follow (VOCABULARY["batch"]).
    refund, error = ended.refund, ended.error
    if refund is None:
        assert error is not None  # noqa: S101 - Ended holds one or the other
        return await _unapplied(client, item, key, error, ended.outcome, pace, stats, log, foreign)
    if foreign is not None and refund.id is not None:
        foreign.discard(refund.id)  # this run's item's: accounted for
    _paced_success(client, item, refund, pace, limiter)
    await records.end(ended)
    return _result(item, "succeeded", stats, refund=refund)


async def _unapplied(  # noqa: PLR0917 - internal, one call site
    client: VioletClient,
    item: BatchItem,
    key: str,
    exc: VioletError | RateLimitDeferred,
    outcome: AskOutcome,
    pace: MerchantPace,
    stats: _Stats,
    log: Journal | None,
    foreign: _Unaccounted | None = None,
) -> BatchResult | _Parked | _Paced:
    """An item whose ask ended without a refund, in the batch's words."""
    if isinstance(exc, RateLimitDeferred):  # Outcome.DEFERRED
        return await _deferred(client, item, key, exc, pace, stats, log)
    if isinstance(exc, AmbiguousOutcomeError):  # Outcome.PENDING or REVIEW
        if exc.pending is not None:
            return _Parked(item, key, exc.pending, 0, exc, stats)
        return await _ended(item, key, "unknown", stats, log, exc)
    if isinstance(exc, RefundAlreadyPresentError):  # Outcome.PRESENT
        return await _present(client, item, key, stats=stats, log=log, exc=exc, foreign=foreign)
    # Any other error: the request did not apply. Not sent because the caller's own
    # client holds another ask of the bag pending (BagPendingError): failed, so no
    # later run sends it without --retry-failed (that ask may be this very refund).
    if outcome is AskOutcome.NOT_SENT and not isinstance(exc, BagPendingError):
        return await _ended(item, key, "not_sent", stats, log, exc)
    return await _ended(item, key, "failed", stats, log, exc)


def client_time(client: VioletClient) -> float:
    """The client's monotonic time: merchants' lanes and paced rows fall due by it (a
    step of the wall clock must not move a merchant's turn by hours)."""
    return float(engine_of(client).clock.monotonic())


def _count_requests(stats: _Stats) -> None:
    """Count this item's answered requests (and 429s) from here on, in its own task."""
    if stats.outer is None:
        stats.outer = CAPTURE.get()
    CAPTURE.set(stats)  # type: ignore[arg-type] # a list-like sink: append only


def _paced_success(
    client: VioletClient,
    item: BatchItem,
    refund: OrderRefund,
    pace: MerchantPace,
    limiter: AdaptiveRate | None,
) -> None:
    """A refund carries its merchant: learned for free on the happy path."""
    if limiter is not None:
        limiter.speed_up()
    merchant = getattr(refund, "merchant_id", None)
    pace.learn(item.order_id, merchant)
    pace.succeeded(merchant if merchant is not None else item.merchant_id, client_time(client))


async def _look_up_merchant(
    client: VioletClient, item: BatchItem, pace: MerchantPace
) -> int | None:
    """The item's merchant, from the order (one read; None when it cannot be read)."""
    if pace.looked_up(item.order_id):
        return None
    try:
        order = await client.get_order(item.order_id)
    except VioletError:
        return None
    found = None
    for bag in order.bags:
        if bag.id == item.bag_id:
            found = bag.merchant_id
    pace.learn(item.order_id, found, final=True)
    return found


async def _merchant_turn(  # noqa: PLR0917 - internal, one call site
    client: VioletClient,
    item: BatchItem,
    key: str,
    resume: PendingRefund | None,
    pace: MerchantPace,
    slot: tuple[float, int] | None,
    stats: _Stats,
    patience: float,
) -> _Paced | None:
    """Wait for the item's merchant's next send slot when it is near (in this slot), or
    hand the item back to wait without one (None: go now)."""
    merchant = pace.merchant_of(item.order_id, item.merchant_id)
    if merchant is None and pace.learning:
        merchant = await _look_up_merchant(client, item, pace)
    if merchant is None:
        return None
    clock = engine_of(client).clock
    now = clock.monotonic()
    lane = pace.lane(merchant)
    if lane is None:
        return None
    if slot is None or not pace.current(merchant, slot[1]):
        if lane.waiting or lane.next_at - now > patience:
            # Others wait ahead of it, or its turn is far: it waits without a slot.
            return _Paced(item, key, resume, stats, lane.next_at, None, merchant=merchant)
        slot = pace.reserve(merchant, now)
        assert slot is not None  # noqa: S101 - the lane exists
    due = slot[0]
    if due > now:
        await clock.sleep(due - now)
    return None


async def _deferred(  # noqa: PLR0917 - internal, one call site
    client: VioletClient,
    item: BatchItem,
    key: str,
    exc: RateLimitDeferred,
    pace: MerchantPace,
    stats: _Stats,
    log: Journal | None,
) -> BatchResult | _Paced:
    """A send answered 429 (nothing applied): slow its merchant's lane and wait for its
    turn, until the run's limit of such waits for one item; then it ends not_sent."""
    stats.deferrals += 1
    merchant = pace.merchant_of(item.order_id, item.merchant_id)
    if merchant is None:
        merchant = await _look_up_merchant(client, item, pace)
    now = client_time(client)
    if merchant is not None:
        pace.limited(merchant, now, exc.delay)
    else:
        pace.learning = True
    if stats.deferrals > MAX_DEFERRALS:
        return await _ended(item, key, "not_sent", stats, log, exc.cause)
    stats.retries += 1  # it is sent again in its turn
    return _Paced(item, key, exc.pending, stats, now + exc.delay, None, exc.cause, merchant)


async def _present(
    client: VioletClient,
    item: BatchItem,
    key: str,
    *,
    stats: _Stats,
    log: Journal | None,
    exc: RefundAlreadyPresentError,
    foreign: _Unaccounted | None = None,
) -> BatchResult:
    """Not sent: the bag already holds this refund. The lowest such refund becomes
    known, so it accounts for this item only: a repeat of an identical item in the
    same input checks again, and is sent if no other unaccounted refund is there. One
    handed to a call before this run (``foreign``) is unaccounted until it is claimed."""
    if isinstance(exc, _BagHeld):
        # Held back by the batch itself: the refund is an earlier item's, accounted for.
        claimed = exc.refund_id
        ids = [claimed] if claimed is not None else []
    else:
        known = engine_of(client).known_refunds
        ids = sorted(r.id for r in exc.refunds if r.id is not None)
        claimed = next(
            (i for i in ids if i not in known or (foreign is not None and i in foreign)), None
        )
        if claimed is not None:
            known.add(claimed)
            if foreign is not None:
                foreign.discard(claimed)
    if log is not None:
        ended = Ended(AskOutcome.PRESENT, error=exc)
        await JournalRecords(log, item, key).end(ended, refund_id=claimed, refunds=ids)
    result = _result(item, "already_present", stats, error=exc)
    return attrs.evolve(result, refund_id=claimed)


async def _ended(  # noqa: PLR0917 - internal
    item: BatchItem,
    key: str,
    outcome: Outcome,
    stats: _Stats,
    log: Journal | None,
    exc: VioletError,
) -> BatchResult:
    """An item that ended without a refund: its journal line in the batch's words for
    ``outcome`` (``VOCABULARY["batch"]``)."""
    if log is not None:
        ended = Ended(VOCABULARY["batch"][outcome], error=exc)
        await JournalRecords(log, item, key).end(ended)
    return _result(item, outcome, stats, error=exc)


def _result(
    item: BatchItem,
    outcome: Outcome,
    stats: _Stats,
    *,
    refund: OrderRefund | None = None,
    error: BaseException | None = None,
) -> BatchResult:
    count_item("batch", item.kind, outcome)
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
        sent=stats.sent,
        requests=stats.requests,
    )
