"""Run one refund item exactly once across a fleet: ledger, bag lock, shared rate limit.

Framework-neutral: :meth:`FleetWorker.run` is a coroutine any asyncio worker can call
with an item's key (arq's job function is three lines around it). At-least-once
delivery is fine: a second run of an item that applied returns the ledger's answer, and
a run that finds the item ``sent`` or ``pending`` reads the bag back
(``client.resume``'s rule), never re-sending blind.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from redis.exceptions import RedisError

from .._client import VioletClient
from .._engine import Ended, Outcome, engine_of, of_the_moment
from .._protocol import PendingRefund, Phase
from .._reconcile import RateLimitDeferred
from .._redact import printable
from .._retry import RetryEvent
from .._telemetry import CAPTURE, RequestCount, count_item, counting_requests
from ..batch import BatchItem
from ..exceptions import (
    AmbiguousOutcomeError,
    BagPendingError,
    RateLimitError,
    VioletError,
)
from ..models import OrderRefund
from ._ledger import (
    BAG_VIEW_READS,
    BagView,
    ForgedItemError,
    LedgerHeldError,
    LedgerLostError,
    LedgerRecord,
    LedgerRecords,
    LockLostError,
    RedisLedger,
    RefundOwnedError,
    UnderReview,
    check_applied,
    is_blocked,
    item_key,
    load_fleet_key,
    merchant_field,
    resolve,
)
from ._lock import BagLocks, HeldLock, LockBusyError
from ._pace import FleetPace
from ._ratelimit import FleetRateLimit

__all__ = ["FleetWorker", "RetryLaterError"]

log = logging.getLogger("violet_async.fleet")

#: Items whose refund this worker got but could not record yet (Redis was away).
_WON_CAPACITY = 10_000

#: A value not read (as opposed to one read and found missing, None).
_UNREAD: Any = object()


class RetryLaterError(Exception):
    """Run this item again after ``defer`` seconds (a settle window, a busy bag, a lost
    lock). Nothing was sent that the ledger does not know about."""

    def __init__(self, message: str, defer: float) -> None:
        super().__init__(message)
        self.defer = defer


class FleetWorker:
    """What every worker of a fleet needs to run refund items exactly once.

    ``client`` is used with ``read_before_send`` on (the bag's refunds are read before
    the first send, so a failure in flight is matched exactly and a refund the ledger
    lost is held back); ``patience`` is how long one run waits for a settle window
    before it hands the item back (:class:`RetryLaterError`) for a later run.
    ``fresh_hold`` is how long a ledger that is new, or that Redis lost, holds every
    send back (default: the client's ``settle_running`` plus one attempt's timeouts,
    so a POST in flight from before has landed and shows in the read-back).

    With ``merchant_pace`` (default: on, unless the environment says
    ``VIOLET_FLEET_MERCHANT_PACE=0``) sends are paced per merchant across the fleet
    (:class:`FleetPace`, in the ledger's Redis): a 429 hands the item back (nothing
    applied) and slows only its merchant's lane; an item whose merchant's next slot is
    further than ``patience`` is handed back until then. Off, a 429 is retried in place
    and halves the fleet's :class:`FleetRateLimit`.
    """

    def __init__(
        self,
        client: VioletClient,
        ledger: RedisLedger,
        locks: BagLocks,
        limiter: FleetRateLimit | None = None,
        *,
        patience: float = 1.0,
        lock_wait: float = 5.0,
        fresh_hold: float | None = None,
        merchant_pace: bool | None = None,
    ) -> None:
        if ledger.fleet_key is None:
            load_fleet_key()  # raises ValueError naming VIOLET_FLEET_KEY: nothing is checked
        given = engine_of(client)
        self._caller_hook = given.on_retry
        policy = given.policy
        if not policy.read_before_send:
            policy = attrs.evolve(policy, read_before_send=True)
        self.client = client.with_options(retry=policy, on_retry=self._on_retry)
        self._deadline = policy.deadline
        # Jobs go job -> worker -> engine -> protocol: the client is only read from
        # (get_order), never driven through.
        self.engine = engine = engine_of(self.client)
        self.ledger = ledger
        self.locks = locks
        self.limiter = limiter
        self.patience = patience
        self.lock_wait = lock_wait
        timeouts = engine.timeouts
        self.fresh_hold = (
            fresh_hold
            if fresh_hold is not None
            else policy.settle_running + timeouts.connect + timeouts.read
        )
        self.clock = engine.clock
        # The ledger's epoch as this worker knows it (None: not read yet).
        self._epoch: str | None = None
        # Redis's clock less this worker's monotonic one (None: not read yet): the
        # fleet's hold is judged by one clock, Redis's, whatever each worker's says.
        self._offset: float | None = None
        # Refunds this worker got for an item (a 2xx, or claimed by read-back) whose
        # ledger write has not succeeded yet: a re-run here records them, never asks
        # again (this client knows the refund, and would take it for another's).
        self._won: OrderedDict[str, OrderRefund] = OrderedDict()
        # The merchant lane's epoch each running item's send passed the gate in.
        self._gate_epochs: dict[str, int] = {}
        self.pace = (
            FleetPace(
                ledger.redis,
                engine.app_id,
                prefix=ledger.prefix,
                ceiling=limiter.ceiling if limiter is not None else None,
            )
            if (
                merchant_pace
                if merchant_pace is not None
                else os.environ.get("VIOLET_FLEET_MERCHANT_PACE", "").strip().lower()
                not in ("0", "false", "no", "off")
            )
            else None
        )

    def _on_retry(self, event: RetryEvent) -> Any:
        if isinstance(event.cause, RateLimitError) and self.limiter is not None:
            # Told once per 429 by whichever worker saw it; the Lua script halves the
            # fleet's rate at most once per burst.
            task = asyncio.ensure_future(self.limiter.slow_down())
            task.add_done_callback(_quiet)
        return self._caller_hook(event) if self._caller_hook is not None else None

    async def run(
        self, key: str, item: BatchItem | None = None, signature: str | None = None
    ) -> dict[str, Any]:
        """Run the item ``key`` (the ledger's record, or ``item`` with its producer's
        ``signature`` when the ledger has lost it) to an end state; returns the ledger's
        summary of it. Raises :class:`RetryLaterError` when it must run again later. An
        item whose bag is kept open only by items under review (no wait settles them) is
        returned *new*, outcome ``not_sent``, nothing sent: it runs when enqueued again.

        An item whose signature under the fleet key does not match what it would send
        is refused before anything is sent: the ledger marks it failed, outcome
        ``refused`` (what ``status`` shows).

        The requests this run had answered, and the 429s among them, are added to the
        item's ``requests`` and ``rate_limited`` in the ledger (and the fleet's totals,
        :meth:`RedisLedger.request_counts`) as it ends, however it ends; the summary
        returned carries the item's totals."""
        with counting_requests() as count:
            try:
                summary = await self._start(key, item, signature)
            except LedgerLostError as exc:
                # The item's record vanished under this run: Redis lost the ledger. The
                # job runs again (re-registered from its own copy of the item) after the
                # hold.
                await self._add_requests(key, count)
                raise RetryLaterError(str(exc), defer=await self._after_loss()) from exc
            except Exception:
                await self._add_requests(key, count)
                raise
        totals = await self._add_requests(key, count)
        if totals is not None:
            summary["requests"], summary["rate_limited"] = totals
        return summary

    async def _add_requests(self, key: str, count: RequestCount) -> tuple[int, int] | None:
        """Add a run's counts to the item's (None: nothing to add, or not written). A
        count is never worth an item's outcome: a failed write is logged and passed."""
        if not count.requests:
            return None
        try:
            return await self.ledger.add_requests(key, count.requests, count.rate_limited)
        except (RedisError, OSError) as exc:
            log.warning(
                "item %s: its run's request counts (%d, %d 429s) were not recorded: %s",
                printable(key),
                count.requests,
                count.rate_limited,
                printable(exc),
            )
            return None

    async def _start(
        self, key: str, item: BatchItem | None, signature: str | None
    ) -> dict[str, Any]:
        record = await self.ledger.get(key)
        if record is None:
            if item is None:
                raise LookupError(f"item {key} is not in the ledger")
            if not self.ledger.verify(key, item, signature):
                return await self._refuse(key, item, "a queued job")
            if not _is_item(key, item):
                # A signed copy that is another item (a producer's bug): never sent.
                raise LookupError(
                    f"item {key} is not in the ledger, and the job's copy of it is not "
                    "this item (its kind, order, bag or request differ): not run"
                )
            # The ledger lost it (or it was never registered): start it as new.
            # read_before_send + hold_if_present keep a refund it already made; a run
            # that ends in a definite error proves nothing about what applied before.
            await self.ledger.register(key, item, restored=True)
            record = await self._record(key)
        if record.state in ("applied", "failed"):
            self._won.pop(key, None)
            return record.to_dict()
        return await self._run(key, record)

    async def _run(self, key: str, record: LedgerRecord) -> dict[str, Any]:
        won = self._won.get(key)
        if won is not None:
            # This worker got the item's refund; only the ledger write failed.
            return await self._applied(key, record.item, won, self._records(record))
        if record.state == "pending" and record.needs_review:
            return record.to_dict()
        if not self._signed(record):
            return await self._refuse(key, record.item, "the ledger")
        if self._epoch is None:
            now = await self._now(fresh=True)
            epoch = await self.ledger.epoch(hold=self.fresh_hold, now=now)
            self._epoch = epoch.id
            if epoch.hold_until > now:
                log.warning(
                    "the fleet ledger is new, or its Redis lost it: no send for %.0f s, so "
                    "that a request in flight from before lands first (a new fleet: "
                    "`enqueue --new-ledger` starts it without the wait)",
                    epoch.hold_until - now,
                )
        bag_id = record.item.bag_id
        pace = self.pace
        order_id = record.item.order_id if record.item.merchant_id is None else None

        def reads(pipe: Any) -> None:
            # Read under the lock in the round trip that takes it: whether any merchant
            # has a lane yet and the merchant the fleet knows for the item's order (when
            # the item does not say), then the item's record with its bag's sets.
            if pace is not None:
                pace.queue_learning(pipe)
                if order_id is not None:
                    pace.queue_merchant_of(pipe, order_id)
            self.ledger.queue_bag_view(pipe, key, bag_id)

        try:
            async with self.locks.hold(bag_id, wait=self.lock_wait, reads=reads) as held:
                return await self._under_lock(key, held, bag_id)
        except LockBusyError as exc:
            raise RetryLaterError(str(exc), defer=self.lock_wait) from exc
        finally:
            self._gate_epochs.pop(key, None)

    async def _under_lock(self, key: str, held: Any, bag_id: int) -> dict[str, Any]:
        # Read again under the lock: another worker may have moved it on meanwhile.
        answers = getattr(held, "reads", None)
        record, view = await self._view(key, bag_id, answers)
        if record.state in ("applied", "failed") or record.needs_review:
            return record.to_dict()
        if not self._signed(record):
            return await self._refuse(key, record.item, "the ledger")
        if record.state in ("sent", "pending") and not self.ledger.verify_ask(record):
            # Its protocol record (sends, settle window, baseline) decides what a resume
            # concludes: one nobody with the fleet key wrote is no evidence. Nothing more
            # is sent; a person checks the bag.
            await self.ledger.mark_review(
                key,
                "the item's sent record is not signed with this fleet's key "
                "(VIOLET_FLEET_KEY) or was altered; nothing more was sent: check the bag",
            )
            return (await self._record(key)).to_dict()
        ledger_records = self._records(record, held)
        resume = await ledger_records.load()
        item = record.item
        if resume is None and await self._held(key, record, held, view):
            return (await self._record(key)).to_dict()
        known = self.engine.known_refunds
        recorded = view.refunds if view is not None else await self.ledger.bag_refunds(item.bag_id)
        owners = await self.ledger.bag_owners(item.bag_id) if recorded else {}
        for refund_id in recorded:
            owner = owners.get(refund_id)
            if owner == key:
                continue  # the item's own refund is never another's
            if owner is None:
                # No owner signed with the fleet key (a ledger from before owners were
                # kept, or a Redis writer's): it may be this item's own. Never taken
                # for another's: a resume's baseline tells an older one apart, and a
                # refund like it that nothing accounts for holds a first send back
                # (hold_if_present), for review.
                continue
            known.add(refund_id, item.bag_id)

        # A resumed item may send again (its bag read back shows nothing): it takes its
        # merchant's turn and passes the send gate as a first send does.
        learning = bool(answers[0]) if answers is not None and self.pace is not None else None
        merchant = await self._merchant_turn(item, learning, _known_merchant(answers))
        # The call's deadline as the engine sets it as it starts (this one a moment
        # sooner: never later than the engine's).
        deadline = None if self._deadline is None else self.clock.monotonic() + self._deadline

        async def take_slot(ask: PendingRefund) -> None:
            await self._send_slot(ask, merchant, key, deadline)

        records = _ItemRecords(ledger_records, take_slot)
        ask_task = asyncio.ensure_future(
            self.engine.settle(
                item.kind,
                item.order_id,
                item.bag_id,
                item.request,
                resume=resume,
                records=records,
                patience=self.patience,
                hold_if_present=True,
                defer_rate_limited=self.pace is not None,
                # Every run of the item (of this ledger) is one owner of its refunds in
                # this client: a run again from the job's copy (the ledger lost) gets
                # its refund back.
                item=self.ledger.record_key(key),
                # Refunds this client handed to calls that are no item of this ledger
                # (a program's own refund_bag on the same client): nothing the ledger
                # accounts for, so the guard holds an item asking exactly one of them,
                # as another worker's does (this one sent it again).
                foreign=_OutsideLedger(known, self.ledger.record_key("")),
            )
        )
        lost = asyncio.ensure_future(held.lost.wait())
        try:
            await asyncio.wait({ask_task, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not ask_task.done():
                # The lock is gone (or this run is cancelled): stop now. If a send was in
                # flight, the ledger says sent and the next run reads the bag back.
                ask_task.cancel()
            await asyncio.gather(ask_task, lost, return_exceptions=True)
        if ask_task.cancelled():
            raise RetryLaterError(f"lost the lock of bag {item.bag_id}", defer=0.5)
        try:
            return await self._settle(key, record, ask_task, held, merchant, records)
        except LockLostError as exc:
            # A record of the send was refused: another worker holds the bag (and the
            # item) now; this one's view of it is stale.
            raise RetryLaterError(str(exc), defer=await self._defer(exc)) from exc

    async def _view(
        self, key: str, bag_id: int, answers: list[Any] | None = None
    ) -> tuple[LedgerRecord, BagView | None]:
        """The item's record under the bag's lock, with the bag's sets read in the same
        round trip (reads only; None: the record names another bag, never so for a
        signed key, and its own bag's sets are read when needed). ``answers``: the
        reads made as the lock was taken (None: read now)."""
        if answers is None:
            view = await self.ledger.bag_view(key, bag_id)
        else:
            view = self.ledger.parse_bag_view(key, answers)
        if view.record is None:
            raise LedgerLostError(
                f"item {key} vanished from the ledger under this run: Redis lost its data"
            )
        return view.record, view if view.record.item.bag_id == bag_id else None

    async def _held(
        self, key: str, record: LedgerRecord, held: Any, view: BagView | None = None
    ) -> bool:
        """Under the bag's lock, the authoritative check before a first send: an
        earlier item on the bag (applied, or sent and unsettled) asked the same money,
        as an edited row of it would. Held as already_present, not sent (enqueuers race;
        the ledger may have been edited), unless enqueued with ``--allow-repeat``. Raises
        RetryLaterError while another item of the bag is sent and not settled; when every
        such item is under review (no wait settles it), the item is left new, outcome
        ``not_sent``, naming it (True: not sent)."""
        item = record.item
        # The bag's sets as read with the record under the bag's lock (read now when
        # not given), for both checks below.
        if view is None:
            view = await self.ledger.bag_view(key, item.bag_id)
        if not self.ledger.allows_repeat(record):
            earlier = await self.ledger.same_money_on_bag(key, item, view=view)
            if earlier is not None:
                await self._write_holding(
                    self.ledger.mark_held(key, earlier, lock_key=held.key, token=held.token)
                )
                count_item("fleet", item.kind, "already_present")
                return True
        # Another item on this bag sent and not settled (pending, or a worker died
        # mid-send): a send now could claim its refund, or have its own claimed.
        unsettled = await self.ledger.open_on_bag(item.bag_id, members=view.opened) - {key}
        if unsettled:
            review = await self.ledger.all_under_review(unsettled)
            if review is None:
                raise RetryLaterError(
                    f"bag {item.bag_id} has an unsettled item ({sorted(unsettled)[0]})",
                    defer=max(self.patience, 1.0),
                )
            # Every one is under review: no wait settles it, a person does. Not sent,
            # not retried: left new (nothing sent), for the file enqueued again.
            await self._blocked(key, record, review, held)
            return True
        if is_blocked(record):
            # Left not sent by an earlier run; the bag is free now: it runs as new.
            await self._write_holding(self.ledger.unblock(key, lock_key=held.key, token=held.token))
        return False

    async def _blocked(
        self, key: str, record: LedgerRecord, review: list[UnderReview], held: Any
    ) -> None:
        """Leave ``key`` not sent (new, outcome ``not_sent``) with a message naming the
        item under review that keeps its bag; ``status`` lists it. Raises RetryLaterError
        when the bag changed meanwhile (an item settled): the item runs again soon."""
        item = record.item
        first = review[0]
        where = (
            f"line {_short(first.line)} of {_short(first.source)}"
            if first.source
            else f"line {_short(first.line) or '?'}"
        )
        what = (
            f"an item under review ({_short(first.key)}, {where})"
            if first.readable
            else f"an item whose ledger record cannot be read ({_short(first.key)}, {where})"
        )
        more = f" and {len(review) - 1} more" if len(review) > 1 else ""
        message = (
            f"not sent: bag {item.bag_id} is kept open by {what}{more}; waiting will not "
            "settle it, a person must. Check the bag, settle the item under review, then "
            "enqueue this file again: this item runs then (nothing was sent for it here)"
        )
        await self._write_holding(
            self.ledger.mark_blocked(key, message, lock_key=held.key, token=held.token)
        )
        # Settled (or re-run) while this was written: run again rather than wait for a
        # person to enqueue it (the next run sends, or waits as any other item would).
        again = await self.ledger.open_on_bag(item.bag_id) - {key}
        if not again or await self.ledger.all_under_review(again) is None:
            raise RetryLaterError(
                f"bag {item.bag_id}: the item under review changed; run again",
                defer=max(self.patience, 1.0),
            )
        log.warning("item %s: %s", printable(key), printable(message))
        count_item("fleet", item.kind, "not_sent")

    async def _send_slot(
        self, ask: PendingRefund, merchant: int | None, key: str, deadline: float | None
    ) -> None:
        """Wait for the fleet's budget and the merchant's spacing, as the request is
        about to leave (the record is stamped again if this waits). ``deadline``: the
        call's (monotonic, None: none).

        The merchant's gate takes no slot further away than the worker's patience, nor
        one that would leave the send less than a connect timeout before the call's
        deadline (after the driver's own wait for it): then nothing is taken and nothing
        sent, and the item is handed back (:class:`_PacedBack`) until its slot is near.
        A slot taken and given up would push the lane's sends ahead of the slots
        reserved for later items."""
        # The driver's own wait before this send (a backoff), after this returns.
        planned = (ask.last_sent_at or 0.0) - self.clock.time()
        connect = self.engine.timeouts.connect
        if self.limiter is not None:
            # The fleet's budget: no slot the send could not leave at a connect timeout
            # before the call's deadline (a backlog, or a 429 halving the rate, could
            # push it past; the send would leave after the call gave up on it).
            reach = None
            if deadline is not None:
                reach = deadline - self.clock.monotonic() - max(planned, 0.0) - connect
            waited = await self.limiter.wait(planned, limit=reach)
            if waited < 0:
                raise _PacedBack(None, -waited, max(reach or 0.0, 0.0))
        if merchant is not None and self.pace is not None:
            limit = self.patience
            if deadline is not None:
                room = deadline - self.clock.monotonic() - max(planned, 0.0)
                limit = min(limit, room - connect)
            slot = await self.pace.gate_slot(merchant, max(limit, 0.0))
            if slot is not None:
                wait, epoch = slot
                if wait < 0:
                    raise _PacedBack(merchant, -wait, max(limit, 0.0))
                # The lane's epoch this send left in: its 429 slows the lane only if
                # no other has since (FleetPace.limited).
                self._gate_epochs[key] = epoch
                if wait > 0:
                    await asyncio.sleep(wait)

    async def _merchant_of(self, item: BatchItem, *, look_up: bool) -> int | None:
        """The item's merchant: its own, the fleet's memory, or (``look_up``) its order."""
        pace = self.pace
        if pace is None:
            return None
        merchant = item.merchant_id or await pace.merchant_of(item.order_id)
        if merchant is not None or not look_up:
            return merchant
        merchant = await self._looked_up(item)
        await pace.learn(item.order_id, merchant)
        return merchant

    async def _looked_up(self, item: BatchItem) -> int | None:
        """The merchant of the item's bag, as its order says (None: not known)."""
        try:
            order = await self.client.get_order(item.order_id)
        except VioletError:
            return None
        return next((b.merchant_id for b in order.bags if b.id == item.bag_id), None)

    async def _merchant_turn(
        self, item: BatchItem, learning: bool | None = None, known: Any = _UNREAD
    ) -> int | None:
        """Wait for the merchant's next send slot when it is near; hand the item back
        when it is not (:class:`RetryLaterError`). Returns the merchant (None: unpaced).
        ``learning``: :meth:`FleetPace.learning` as read with the bag's lock (None: read
        it now); ``known``: the merchant the fleet knew for the item's order, read with
        it (``_UNREAD``: not read)."""
        pace = self.pace
        if pace is None:
            return None
        if learning is None:
            learning = await pace.learning()
        if not learning:
            # No 429 seen (a lane starts only at one, and sets this flag with it): no
            # merchant has a lane, nothing to pace by. One round trip on the happy path.
            return None
        # The item's own merchant (its input's column, signed with it) needs no look-up;
        # a merchant looked up is noted for the fleet in the reservation's own script.
        merchant = item.merchant_id
        learned = None
        if merchant is None:
            merchant = await pace.merchant_of(item.order_id) if known is _UNREAD else known
        if merchant is None:
            merchant = await self._looked_up(item)
            learned = item.order_id
        if merchant is None:
            return None
        wait = await pace.reserve(merchant, self.patience, order_id=learned)
        if wait is not None and wait < 0:
            # Back half a patience early: a job runs some time after it is due (the
            # queue's poll, a free job slot, the ledger reads before this point), and a
            # slot nobody is there to take is lost to the lane.
            raise RetryLaterError(
                f"merchant {merchant}'s pace: its next send slot is in {-wait:.1f}s",
                defer=max(-wait - self.patience / 2, 0.05),
            )
        if wait:
            await asyncio.sleep(wait)
        return merchant

    async def _settle(  # noqa: PLR0917 - internal, one call site
        self,
        key: str,
        record: LedgerRecord,
        ask_task: asyncio.Future[Ended],
        held: Any,
        merchant: int | None,
        records: _ItemRecords,
    ) -> dict[str, Any]:
        item = record.item
        try:
            ended = ask_task.result()
        except LockLostError as exc:
            # Nothing was sent: the lock, or the ledger itself, is not what it was.
            raise RetryLaterError(str(exc), defer=await self._defer(exc)) from exc
        except _PacedBack as exc:
            # Nothing was sent, nor recorded as sent, by this send: the ledger keeps
            # what it had (new, or an earlier send of this run, which the next run
            # reads back). The item comes back when its slot is half the reach it
            # missed away (half a patience early, as a reservation does).
            raise RetryLaterError(str(exc), defer=max(exc.wait - exc.limit / 2, 0.05)) from exc
        # The engine's one outcome; the ledger's words for it follow
        # (VOCABULARY["ledger"]).
        if ended.refund is not None:
            return await self._applied(key, item, ended.refund, records.ledger, merchant, held)
        assert ended.error is not None  # noqa: S101 - Ended holds one or the other
        await self._ended(key, record, ended, merchant, records)
        summary = (await self._record(key)).to_dict()
        count_item("fleet", item.kind, str(summary.get("outcome") or summary.get("state")))
        return summary

    async def _ended(
        self,
        key: str,
        record: LedgerRecord,
        ended: Ended,
        merchant: int | None,
        records: _ItemRecords,
    ) -> None:
        """Record an ask that ended without a refund (``records.end``, in the ledger's
        words), or raise RetryLaterError when the item runs again later."""
        exc = ended.error
        item = record.item
        if isinstance(exc, RateLimitDeferred):  # Outcome.DEFERRED
            await self._deferred(key, item, exc, merchant, records, ended)
        elif isinstance(exc, BagPendingError):  # Outcome.NOT_SENT
            # This worker's client holds another item of the bag pending: later.
            raise RetryLaterError(str(exc), defer=max(self.patience, 1.0)) from exc
        elif ended.outcome is Outcome.PRESENT:
            await records.end(ended)
        elif isinstance(exc, AmbiguousOutcomeError):  # Outcome.PENDING or REVIEW
            # The ledger, not this worker's client, keeps the fleet's pending asks (the
            # item may be resumed by any worker; its bag is guarded by open_on_bag).
            self.engine.unsettled.forget(item.bag_id)
            await records.end(ended)
            pending = exc.pending
            if pending is not None and not pending.needs_review:
                now = self.clock.time()
                wait = (pending.settle_until or now) - now
                raise RetryLaterError(str(exc), defer=max(wait, 0.2)) from exc
        else:
            assert exc is not None  # noqa: S101 - Ended holds one or the other
            # Any other error (Outcome.FAILED or NOT_SENT): the request did not apply.
            # When that was weather (a connection, a 5xx, a 429 out of budget, a failed
            # baseline read), the item starts over later (new again); a refusal (4xx)
            # is final (failed; for review when the ledger lost the item's record).
            if of_the_moment(exc):
                await records.end(Ended(Outcome.NOT_SENT, error=exc))
                raise RetryLaterError(str(exc), defer=1.0) from exc
            await records.end(Ended(Outcome.FAILED, error=exc))

    def _records(self, record: LedgerRecord, held: HeldLock | None = None) -> LedgerRecords:
        """The ledger's records of ``record``'s item, under ``held`` (None: no lock, an
        applied end only)."""
        return LedgerRecords(
            self.ledger,
            record,
            None if held is None else held.key,
            "" if held is None else held.token,
            clock=self.clock.time,
            epoch=lambda: self._epoch,
            stamp=self._now,
            redact=self._message,
        )

    async def _applied(  # noqa: PLR0917 - internal
        self,
        key: str,
        item: BatchItem,
        refund: OrderRefund,
        records: LedgerRecords,
        merchant: int | None = None,
        held: HeldLock | None = None,
    ) -> dict[str, Any]:
        """Record the item's refund (``records.end``). Kept here until the ledger has
        it: Redis away now (the job runs again) must not turn the item's own refund into
        another's. ``held``: the bag's lock, let go of by the applied write itself."""
        self._won[key] = refund
        self._won.move_to_end(key)
        while len(self._won) > _WON_CAPACITY:
            self._won.popitem(last=False)
        # The applied write (letting go of the bag's lock as it writes), the merchant
        # lane's success and the record read back with this run's request counts: one
        # round trip, the applied write first.
        count = CAPTURE.get()
        if not isinstance(count, RequestCount) or not count.requests:
            count = None
        await records.end(
            Ended(Outcome.APPLIED, refund=refund),
            then=self._success_calls(item, refund, merchant),
            counts=None if count is None else (count.requests, count.rate_limited),
        )
        assert records.applied is not None  # noqa: S101 - an applied end sets it
        done, record = records.applied
        if held is not None and done == 1:
            held.released = True
        if count is not None and record is not None:
            count.requests = count.rate_limited = 0  # added to the item's in that read
        try:
            check_applied(done, key, item.bag_id, refund.id)
        except RefundOwnedError as exc:
            # Two items cannot have one refund: a person looks (nothing more is sent).
            await self.ledger.mark_review(key, str(exc))
            record = await self.ledger.get(key)
        if self.limiter is not None:
            await self.limiter.speed_up()
        # Kept until the record is read back: a ledger lost in between runs the job
        # again, and the re-run records this refund again rather than asking anew.
        if record is None:
            raise LedgerLostError(
                f"item {key} vanished from the ledger under this run: Redis lost its data"
            )
        summary = record.to_dict()
        self._won.pop(key, None)
        count_item("fleet", item.kind, str(summary.get("outcome") or summary.get("state")))
        return summary

    async def _write_holding(self, write: Awaitable[None]) -> None:
        """A ledger write made only while this worker holds the bag's lock: when it does
        not any more (another worker has the bag), nothing was sent, and the item runs
        again later (RetryLaterError)."""
        try:
            await write
        except LockLostError as exc:
            raise RetryLaterError(str(exc), defer=await self._defer(exc)) from exc

    async def _defer(self, exc: LockLostError) -> float:
        if isinstance(exc, LedgerLostError):
            return await self._after_loss()
        if isinstance(exc, LedgerHeldError):
            return max(exc.until - await self._now(), 0.2)
        return 0.5

    async def _after_loss(self) -> float:
        """Redis lost the ledger since this worker last looked: take the epoch now in
        force (made now if missing) and hold every send of the fleet for a full settle
        window from now. Returns the seconds to wait."""
        now = await self._now(fresh=True)
        epoch = await self.ledger.epoch(hold=self.fresh_hold, now=now)
        until = await self.ledger.hold_sends(now + self.fresh_hold)
        log.error(
            "the fleet ledger's Redis lost its data (epoch %s, now %s): every send waits "
            "%.0f s, so that a request in flight from before lands first; items enqueued "
            "again are read back before any send",
            self._epoch,
            epoch.id,
            until - now,
        )
        self._epoch = epoch.id
        return max(until - now, 0.2)

    async def _deferred(  # noqa: PLR0917 - internal, one call site
        self,
        key: str,
        item: BatchItem,
        exc: RateLimitDeferred,
        merchant: int | None,
        records: _ItemRecords,
        ended: Ended,
    ) -> None:
        """Nothing applied (a 429, every earlier send proven absent): slow the merchant's
        lane for the whole fleet and start the item over in its turn.

        The item is new again before anything else is awaited: a worker that dies in
        the merchant's look-up would otherwise leave it ``sent``, and the next run
        would read the bag back and could take a refund another system made in the
        wait for the item's own (the simulator's ``refund_in_429``, worker seed 161)."""
        await records.end(ended)  # new again, only while it holds the bag
        merchant = merchant or await self._merchant_of(item, look_up=True)
        epoch = self._gate_epochs.pop(key, -1)
        if self.pace is not None and merchant is not None:
            await self.pace.limited(merchant, exc.delay, epoch=epoch)
        raise RetryLaterError(str(exc.cause), defer=max(exc.delay, 0.05)) from exc.cause

    def _success_calls(self, item: BatchItem, refund: Any, merchant: int | None) -> list[Any]:
        """The merchant lane's success (its script call; none: unpaced, or no merchant
        known), to ride on the applied write's round trip."""
        if self.pace is None:
            return []
        paid_by = getattr(refund, "merchant_id", None) or merchant
        if paid_by is None:
            return []
        return [self.pace.success_call(paid_by, order_id=item.order_id)]

    async def _now(self, *, fresh: bool = False) -> float:
        """Redis's time now, as this worker's monotonic clock carries it on from the
        last reading (``fresh``: read it again). Workers' wall clocks may disagree by
        minutes; a hold one worker set by its own would not hold another."""
        if fresh or self._offset is None:
            seconds, micros = await resolve(self.ledger.redis.time())
            self._offset = seconds + micros / 1e6 - self.clock.monotonic()
        return self.clock.monotonic() + self._offset

    def _message(self, exc: BaseException) -> str:
        """An error's text as the ledger keeps it: the client's secrets hidden."""
        return self.engine.redactor.text(str(exc))

    def _signed(self, record: LedgerRecord) -> bool:
        return self.ledger.verify(record.key, record.item, record.signature)

    async def _refuse(self, key: str, item: BatchItem, where: str) -> dict[str, Any]:
        """Nothing is sent for an item no producer with the fleet key signed as it
        reads now; the ledger says so, where ``status`` shows it."""
        error = ForgedItemError(
            f"refused: the item in {where} is not signed with this fleet's key "
            "(VIOLET_FLEET_KEY) or was altered after it was; nothing was sent"
        )
        log.warning("item %s: %s", printable(key), error)
        existing = await self.ledger.get(key)
        if existing is None:
            await self.ledger.register(key, item, signed=False)
        elif existing.state in ("sent", "pending"):
            # It may have applied: "failed" would be a false outcome.
            await self.ledger.mark_review(key, str(error))
            return (await self._record(key)).to_dict()
        await self.ledger.mark_failed(key, type(error).__name__, str(error), outcome="refused")
        count_item("fleet", item.kind, "refused")
        return (await self._record(key)).to_dict()

    async def _record(self, key: str) -> LedgerRecord:
        record = await self.ledger.get(key)
        if record is None:
            # Read a moment ago (or written by this run): Redis lost the ledger. The job
            # runs again from its own copy after the hold (run()), never dropped.
            raise LedgerLostError(
                f"item {key} vanished from the ledger under this run: Redis lost its data"
            )
        return record


class _OutsideLedger:
    """The refunds a client handed to calls other than the items of one ledger (their
    owner is not one of its record keys)."""

    __slots__ = ("_known", "_prefix")

    def __init__(self, known: Any, prefix: str) -> None:
        self._known = known
        self._prefix = prefix

    def __contains__(self, refund_id: object) -> bool:
        if not isinstance(refund_id, int) or not self._known.handed(refund_id):
            return False
        owner = self._known.owner(refund_id)
        return owner is None or not owner.startswith(self._prefix)


class _PacedBack(Exception):
    """The merchant's next send slot (``merchant`` None: the fleet rate limit's) is
    further than this send may wait for: no slot was taken, nothing was sent (raised by
    the save before a send, so it ends the driver before its request leaves)."""

    def __init__(self, merchant: int | None, wait: float, limit: float) -> None:
        super().__init__(
            f"merchant {merchant}'s pace: its next send slot is in {wait:.1f}s, further "
            f"than this run may wait for it ({limit:.1f}s, by its patience and its "
            "deadline less a connect timeout); nothing was sent"
            if merchant is not None
            else f"the fleet's rate limit (pace): its next send slot is in {wait:.1f}s, "
            f"further than this run may wait for it ({limit:.1f}s, its deadline less a "
            "connect timeout); nothing was sent"
        )
        self.wait = wait
        self.limit = limit


def _known_merchant(answers: list[Any] | None) -> Any:
    """The merchant of the item's order as the reads with the bag's lock found it (they
    asked after it only for an item that does not say, with merchant pace on), or
    ``_UNREAD``."""
    if answers is None or len(answers) != 2 + BAG_VIEW_READS:
        return _UNREAD
    raw = answers[1]
    return merchant_field(raw.decode() if isinstance(raw, bytes) else raw)


def _short(text: str, limit: int = 200) -> str:
    """Another record's text (a key, a source) as a message quotes it: bounded."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_item(key: str, item: BatchItem) -> bool:
    """``key`` is the content key of ``item`` (whatever its occurrence)."""
    return key.rpartition(":")[0] == item_key(item).rpartition(":")[0]


@attrs.define
class _ItemRecords:
    """The worker's record store seam for one item's ask: a slot of the fleet's send
    budget before each send (once a send: the record is saved again when the send
    leaves later than it says), then the ledger's (:class:`LedgerRecords`), which
    records the send durably, in one script with the lock check."""

    ledger: LedgerRecords
    take_slot: Callable[[PendingRefund], Awaitable[None]]
    budgeted: set[int] = attrs.Factory(set)

    async def load(self) -> PendingRefund | None:
        return await self.ledger.load()

    async def save(self, ask: PendingRefund) -> None:
        if ask.phase is Phase.SENT and ask.sends not in self.budgeted:
            # The last moment before a send: take a slot of the fleet's budget.
            self.budgeted.add(ask.sends)
            await self.take_slot(ask)
        await self.ledger.save(ask)

    async def end(self, ended: Ended) -> None:
        await self.ledger.end(ended)


def _quiet(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
