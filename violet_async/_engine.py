"""The engine: the one driver of an ask, its key path, and its answer to "what if the
caller cancels here?".

- :class:`Engine`: :meth:`Engine.drive` is the one entry point every refund and cancel
  goes through (the client, the key path, the batch runner, the fleet worker, the
  simulator); :func:`engine_of` hands it to them. :class:`Outcome` is the one outcome
  vocabulary the journal's states, the ledger's states and ``BatchResult.outcome`` map
  to (:data:`VOCABULARY`), and :func:`outcome_of` the one error classifier.

- :class:`SendTracker`: what a call knows about its ask at every ``await``, so that a
  call cancelled (or timed out by its caller) after its request may have left is
  recorded as sent-and-unknown before the cancellation propagates: the next call on
  the bag gets ``BagPendingError`` carrying the record, never a blind second POST.
- :class:`KeyedAsks`: ``idempotency_key=`` over a record store (``violet_async.stores``):
  load the entry by key, save it before every send, record the end. Same key and same
  request: the same outcome (returned again, resumed, or joined); same key and another
  request: ``IdempotencyKeyReusedError``, nothing sent.

The protocol itself (when a refund may be re-sent) stays in ``_protocol.py``; the
driver that performs it in ``_reconcile.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Container
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol

import attrs

from ._ask import (
    MAX_KEY_LENGTH,
    PROCESS_CLOCK,
    PROCESS_TOKEN,
    PendingRefund,
    Phase,
    Settings,
    merged,
    on_this_machine,
    sent_once,
    with_unnamed,
)
from ._config import UNSET, _Unset
from ._converter import encode_request
from ._matching import places_nothing
from ._protocol import Cause, classify_send_failure, clock_stepped
from ._reconcile import (
    BagIO,
    ClockOrigin,
    KnownRefunds,
    PendingAsks,
    RateLimitDeferred,
    WallWatch,
    after_failed_send,
    run_ask,
)
from ._redact import Redactor, has_control_character
from ._requests import LATE_ANSWER, AnswerCheck, LateAnswer, RequestPlumbing, drop_late
from ._responses import parse_cancel, parse_refund
from ._retry import SYSTEM_CLOCK, RetryHook, RetryPolicy
from ._retry import Clock as RetryClock
from .exceptions import (
    AmbiguousOutcomeError,
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BagPendingError,
    IdempotencyKeyReusedError,
    RateLimitError,
    RecordStoreError,
    RefundAlreadyPresentError,
    RefundFailedError,
    RequestValidationError,
    ResponseFormatError,
    VioletError,
)
from .models import CancelBagRequest, OrderRefund, RefundBagRequest, RefundStatus
from .models._validators import check_id
from .stores import Claim, KeyEntry, RecordStore

if TYPE_CHECKING:
    from contextvars import Token

    from ._client import VioletClient
    from ._transport import RawResponse, Timeouts

__all__ = [
    "AUTH_PATHS",
    "VOCABULARY",
    "AskRecords",
    "Ended",
    "Engine",
    "KeyRecords",
    "KeyedAsks",
    "Outcome",
    "SendTracker",
    "cancelled_first_send",
    "check_key",
    "engine_of",
    "never_reached",
    "outcome_of",
    "resumable",
    "resume_key",
    "unless_failed",
]

log = logging.getLogger("violet_async.reconcile")

Kind = Literal["refund", "cancel"]
Save = Callable[[PendingRefund], Awaitable[None]]


class AskRecords(Protocol):
    """The record store seam: where the record of one ask lives, bound to its key (a
    batch journal line's, a fleet ledger item's, an idempotency key's entry). Every
    driver hands its implementation to :meth:`Engine.drive`; the engine alone calls
    :meth:`save` (before every send), the driver calls :meth:`load` (its skip and hold
    rules come first) and :meth:`end`.

    Implemented by ``batch.JournalRecords`` (the batch journal),
    ``fleet._ledger.LedgerRecords`` (the fleet ledger) and :class:`KeyRecords` (the
    record stores of ``violet_async.stores``: memory, SQLite, Redis)."""

    async def load(self) -> PendingRefund | None:
        """The ask's record as loaded by its key, to resume (None: a new ask)."""
        ...

    async def save(self, ask: PendingRefund) -> None:
        """Save ``ask`` durably before every send (``Phase.SENT``; ``ABSENT`` while a
        re-send waits to leave) and as the protocol ends it (``PENDING``, ``FAILED``,
        ``APPLIED``). Raising stops the send: nothing leaves."""
        ...

    async def end(self, ended: Ended) -> None:
        """Record how the ask ended, in the one vocabulary (:class:`Outcome`)."""
        ...


_CANCELLED_NOTE = (
    "the call was cancelled after its request may have left; whether it applied is not "
    "known: resume it before asking again"
)


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


# -- cancellation ---------------------------------------------------------------------


def _cancelled(
    record: PendingRefund, now: float, settle_running: float, mono: float | None = None
) -> PendingRefund:
    """``record`` as a caller's cancellation leaves it: pending, doubted, and settled no
    earlier than a request still running at Violet could commit.

    ``mono``: this process's monotonic time read with ``now``. The record's times (and
    its ``wall_mono``, written by this process before its send) are first moved onto
    the wall clock as it is now, if it stepped since; the record then says when it was
    written, so a resume in this process sees a step after it (a window that a step
    made look over would let a re-send race a POST still running at Violet)."""
    if mono is not None:
        # Stamped (wall_mono) only where this process's drive stamped it: its times
        # are on this process's clock.
        record = on_wall_now(record, now, mono)
    settle = max(record.settle_until or 0.0, now + settle_running)
    return attrs.evolve(
        record,
        phase=Phase.PENDING,
        doubted=True,
        settle_until=settle,
        note=_CANCELLED_NOTE,
    )


def on_wall_now(record: PendingRefund, now: float, mono: float) -> PendingRefund:
    """``record`` with its times on this process's wall clock as it reads ``now`` (at
    monotonic ``mono``): moved by any step of the wall clock since the record's
    ``wall_mono`` (written by this process), which then says ``(now, mono)``. A time
    added to the record now (a settle window from ``now``) must never sit beside a
    ``wall_mono`` from before a step: the step would be applied to it once more when
    the record is driven (a window hours long, or hours short)."""
    if record.wall_mono is None:
        return record
    jump = WallWatch(_Frozen(now, mono), record.wall_mono).jump()
    if jump:
        record = clock_stepped(record, jump)
    return attrs.evolve(record, wall_mono=(now, mono))


@attrs.frozen
class _Frozen:
    """A clock read once (wall, monotonic), for WallWatch."""

    wall: float
    mono: float

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - never slept on
        raise NotImplementedError


def cancelled_first_send(
    kind: Kind,
    order_id: int,
    bag_id: int,
    request: RefundBagRequest | CancelBagRequest,
    sent_at: float,
    *,
    now: float,
    settle_running: float,
    clock: str,
    others: frozenset[int],
    mono: tuple[float, float] | None = None,
) -> PendingRefund:
    """The record of a first send (the client's inline happy path) whose caller
    cancelled it once its request may have left. ``mono``: the monotonic times of the
    send and of ``now`` (a step of the wall clock in between moves ``sent_at``)."""
    record = sent_once(kind, order_id, bag_id, request, sent_at, clock=clock, others=others)
    if mono is None:
        return _cancelled(record, now, settle_running)
    record = attrs.evolve(record, wall_mono=(sent_at, mono[0]))
    return _cancelled(record, now, settle_running, mono[1])


class NotSent(Exception):
    """Carries the error of a save right before a send (``AskRecords.save``: a store's
    ``RecordStoreError``, a journal's ``JournalWriteError``, a ledger's lost lock) past
    the driver, which would otherwise take it for a send that may have applied."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class SendTracker:
    """What one call knows of its ask at any ``await``: the latest record (saved before
    every send, or the one being resumed) and whether a request of this call may have
    left. :meth:`on_cancel` turns that into the record a cancellation leaves."""

    def __init__(
        self, record: PendingRefund | None, *, left: bool = False, persist: Save | None = None
    ) -> None:
        self.record = record
        self.left = left
        self._resumed = record is not None and record.phase in (Phase.SENT, Phase.PENDING)
        self._persist = persist
        #: The call waited to send again with every send proven not applied (a 429's
        #: wait): the bag was in play meanwhile.
        self.waited_absent = False

    async def save(self, ask: PendingRefund) -> None:
        """The driver's save (before every send and at the end): to the store, if the
        call has one, then here."""
        if self._persist is not None:
            await self._persist(ask)
        self.record = ask
        if ask.phase is Phase.ABSENT:
            # Every send so far was proven not applied (a re-send waits to leave):
            # nothing of this call, nor of the record it resumed, is outstanding.
            self.left = self._resumed = False
            self.waited_absent = True

    def listed(self, ids: frozenset[int]) -> None:
        """What the first complete read after the ask's first send listed, learned by
        the driver between saves (``PendingRefund.listed_after_send``): the record a
        cancel hands out carries it, with no store write. Without it, the repeat of a
        call cancelled in its read-backs read the bag anew, took the ask's own refund
        (listed only since, dated hours before the send by every reading of Violet's
        clock) for one made long before the send, and sent the ask again (simulator
        seed 318: two refunds)."""
        record = self.record
        if record is not None and record.listed_after_send is None and record.sends > 0:
            self.record = attrs.evolve(record, listed_after_send=ids)

    def watch(self, io: BagIO) -> BagIO:
        """``io`` whose sends mark the moment a request leaves (after any login, after
        the driver's own restamp)."""
        inner = io.send_once

        async def send_once(remaining: float | None, before_send: Any = None) -> OrderRefund:
            async def leaving() -> None:
                if before_send is not None:
                    try:
                        await before_send()
                    except Exception as exc:  # noqa: BLE001 - any save failure
                        # The ask's record could not be brought up to date before
                        # this send (the seam's save failed): it does not leave. Not
                        # a send failure (that would be read back as "may have
                        # applied", and sent again): the call ends.
                        raise NotSent(exc) from None
                self.left = True

            return await inner(remaining, before_send=leaving)

        return attrs.evolve(io, send_once=send_once)

    @property
    def sent_any(self) -> bool:
        """A send of this call (or of the record it resumed) was stamped to leave."""
        return self.record is not None and self.record.sends > 0

    @property
    def cut_while_absent(self) -> bool:
        """Every send of this call (and of the record it resumed) stands proven not
        applied, and it waits to send again (a 429's wait, a re-send's backoff)."""
        return self.record is not None and self.record.phase is Phase.ABSENT

    def on_cancel(
        self, now: float, settle_running: float, mono: float | None = None
    ) -> PendingRefund | None:
        """The record to keep as pending when the caller cancels now (None: nothing of
        this call can have reached Violet, and it resumed nothing)."""
        record = self.record
        if record is None or record.phase in (Phase.NEW, Phase.ABSENT):
            return None
        if self.left:
            return _cancelled(record, now, settle_running, mono)
        if self._resumed:
            return attrs.evolve(record, phase=Phase.PENDING, doubted=True)
        return None


# -- idempotency keys -------------------------------------------------------------------


def clock_id(clock: Clock) -> str:
    """The name of ``clock`` in records (``PendingRefund.clock``): this process's, or
    a clock of its own (a test's or the simulator's), on the machine its ``machine``
    attribute names (its processes share its monotonic clock: ``same_machine``)."""
    if clock is SYSTEM_CLOCK:
        return PROCESS_CLOCK
    name = f"{PROCESS_TOKEN}-{id(clock):x}"
    machine = getattr(clock, "machine", "")
    return f"{name}@{machine}" if isinstance(machine, str) and machine else name


def check_key(key: object) -> str:
    """An idempotency key: a non-empty str of at most 255 characters, no control
    characters (it is logged and stored)."""
    if not isinstance(key, str):
        raise RequestValidationError("idempotency_key", f"must be a str, got {type(key).__name__}")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise RequestValidationError(
            "idempotency_key", f"must be 1 to {MAX_KEY_LENGTH} characters long"
        )
    if has_control_character(key):
        raise RequestValidationError("idempotency_key", "contains a control character")
    return key


@attrs.define
class _Flight:
    """A keyed call running in this process, and the callers waiting to join it."""

    ask: PendingRefund
    joined: asyncio.Future[OrderRefund | None] | None = None
    # The key's ask the flight drives (or found finished) and the key's lineage, once
    # its claim read the key's entry: a record joining it must be that ask's, or one of
    # the key's earlier asks.
    driving: PendingRefund | None = None
    lineage: tuple[str, ...] = ()


AskFn = Callable[..., Awaitable[OrderRefund]]


class KeyedAsks:
    """The key path: at most once per key, across calls and (with a shared store)
    processes.

    ``run`` claims the key in the store, then drives the ask through the client's
    ``_ask`` with a save that writes the store before every send. A second call with
    the key in this process joins the first (one POST, one refund for both); in
    another process it waits for the first's outcome, polling the store, and takes
    the ask over (resuming it, never sending blind) if the first process dies.
    """

    def __init__(
        self,
        store: RecordStore,
        clock: Clock,
        *,
        poll_interval: float = 0.25,
        remember: int = 10_000,
        in_flight: float = 0.0,
        scope: str = "",
        origin: ClockOrigin | None = None,
        on_ended: Callable[[PendingRefund], object] | None = None,
        on_proven: Callable[[PendingRefund], object] | None = None,
        on_earlier: Callable[[PendingRefund, tuple[str, ...]], object] | None = None,
    ) -> None:
        self.store = store
        # Told of a key's new ask (its record) and the key's earlier asks (its entry's
        # lineage: each ended definitely not applied) as a call of the key takes it:
        # the client takes records of those asks it still holds pending off their bag.
        self._on_earlier = on_earlier
        # Told of a proof (ABSENT: every send answered 429) whose save the store
        # refused, the key taken over: the client keeps it for the key's next call.
        self._on_proven = on_proven
        # Told of a resumed record whose ask ended elsewhere (definitely not applied):
        # the client takes it off its bag.
        self._on_ended = on_ended
        # The client's clocks as they read when it was made: a retention counted on the
        # wall clock is held to it (a step forward never ends one early).
        self._origin = origin if origin is not None else ClockOrigin(clock)
        # The client's app id and host: a key is stored under ``scope + " " + key``,
        # so a sandbox and a production client (or two apps) sharing one store never
        # find each other's asks under one key.
        self.scope = scope
        # Seconds a request of an interrupted owner may still be running and then
        # commit (one attempt's timeout plus ``settle_running``), counted from the
        # moment the ask is taken over.
        self._in_flight = in_flight
        self.owner = secrets.token_hex(8)
        self._clock = clock
        self._poll = poll_interval
        self._flights: dict[str, _Flight] = {}
        # Refunds this process returned under a key, so a repeat here never depends on
        # the store's last write (which may have failed or been cut by a cancel): a
        # resume here would not claim a refund this process already handed out.
        # With the key's lineage (the earlier asks its entry held: ``KeyEntry.lineage``).
        self._returned: OrderedDict[str, tuple[PendingRefund, OrderRefund, tuple[str, ...]]] = (
            OrderedDict()
        )
        self._settled: OrderedDict[tuple[Any, ...], OrderRefund] = OrderedDict()
        self._remember = remember
        # Keys a cancelled call gives back "not sent" once its cut write has landed.
        self._giving_back: dict[str, asyncio.Future[None]] = {}

    async def run(  # noqa: PLR0917 - internal, one call site
        self,
        ask_fn: AskFn,
        kind: Kind,
        order_id: int,
        bag_id: int,
        request: RefundBagRequest | CancelBagRequest,
        key: str,
        deadline: float | None,
    ) -> OrderRefund:
        """One keyed refund or cancel (``deadline``: monotonic, bounds a wait for
        another process)."""
        check_key(key)
        check_id("order_id", order_id)
        check_id("bag_id", bag_id)
        wanted = PendingRefund(kind, order_id, bag_id, request)
        bare, key = key, f"{self.scope} {key}"
        while True:
            flight = self._flights.get(key)
            if flight is not None:
                self._same(key, flight.ask, wanted)
                if flight.joined is None:
                    flight.joined = asyncio.get_running_loop().create_future()
                try:
                    refund = await self._join(flight.joined, deadline, key, wanted)
                except _Late as late:
                    raise late.error from None  # this call's own deadline: pending
                except _NotTheKeys:
                    continue  # that record was not the key's: the key is this call's
                if refund is not None:
                    return refund
                continue  # its caller cancelled it: take the ask over
            returned = self._returned.get(key)
            if returned is not None:
                self._same(key, returned[0], wanted)
                return returned[1]
            flight = self._flights[key] = _Flight(wanted)
            try:
                await self._no_unscoped(bare)
                refund = await self._own(ask_fn, wanted, key, bare, deadline)
            except BaseException as exc:
                self._land(key, flight, None, exc)
                raise
            self._land(key, flight, refund, None)
            return refund

    async def _no_unscoped(self, bare: str) -> None:
        """Refuse a key that a row written before keys were scoped still holds: whose
        ask it was (which app, which environment) cannot be told, so it is neither
        returned nor resumed, and nothing is sent while it is kept."""
        store = self.store
        try:
            entry = await store.load(bare)
        except Exception as exc:  # noqa: BLE001 - any store failure: nothing sent
            raise _store_error(bare, "reading", exc) from None
        if entry is None or entry.scope is not None or entry.key != bare:
            return
        finished_at = entry.finished_at
        if finished_at is not None:
            # Past retention as the store counts it when it can say (its clocks are the
            # ones its sweep uses: review 15, a process started after a step); else on
            # this client's steady clock.
            past = getattr(store, "expired", None)
            try:
                gone = (
                    await past(bare, self._clock.time())
                    if past is not None
                    else finished_at + store.retention <= self._origin.steady(self._clock)
                )
            except Exception as exc:  # noqa: BLE001 - any store failure: nothing sent
                raise _store_error(bare, "reading", exc) from None
            if gone:
                return
        raise RecordStoreError(
            f"idempotency key {bare!r} is held by a record written before keys were scoped "
            "by app and host: which app and environment it belongs to cannot be told, so "
            "it is neither returned nor resumed, and nothing was sent. Settle it (its "
            "record: store.load(key)) and delete it, or wait until a finished one passes "
            "the store's retention.",
            key=bare,
        )

    @staticmethod
    def _same(key: str, one: PendingRefund, other: PendingRefund) -> None:
        entry = KeyEntry(key, one)
        if not entry.same_request(other):
            raise _reused(key, one)

    def _land(
        self,
        key: str,
        flight: _Flight,
        refund: OrderRefund | None,
        error: BaseException | None,
    ) -> None:
        """End a flight: hand its joiners the refund or the error (a cancelled owner
        hands them None: they take the ask over)."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        joined = flight.joined
        if joined is None or joined.done():
            return
        if isinstance(error, Exception):
            joined.set_exception(error)
            # Nobody may be left to see it (joiners cancelled): not an unretrieved error.
            joined.add_done_callback(lambda f: f.exception())
        else:
            joined.set_result(refund)

    async def _own(
        self, ask_fn: AskFn, wanted: PendingRefund, key: str, bare: str, deadline: float | None
    ) -> OrderRefund:
        store = self.store
        clock = self._clock
        while True:
            now = clock.time()
            fresh = KeyEntry(
                key, wanted, owner=self.owner, lease_until=now + store.lease, scope=self.scope
            )
            try:
                await self._after_give_back(key)
                claim, entry = await store.claim(fresh, self._lease_now(now))
            except Exception as exc:  # noqa: BLE001 - any store failure: nothing sent
                raise _store_error(key, "claiming", exc) from None
            if claim is Claim.REUSED:
                raise _reused(key, entry.ask)
            self._drives(key, entry)
            if claim is Claim.FINISHED and entry.refund is not None:
                if not _refund_of(entry.refund, wanted):
                    # Not this ask's refund (a row written by someone else): returning
                    # it would report a refund that was never made.
                    raise _store_error(
                        key, "reading", ValueError("its refund is of another bag or order")
                    )
                return entry.refund
            if claim is Claim.OWNED:
                if entry.ask.phase is Phase.NEW and entry.lineage and self._on_earlier is not None:
                    # A new ask of the key: its earlier asks ended, definitely not
                    # applied, wherever they were driven. A pending record of one
                    # that this client still holds (the ask ended in another
                    # process) no longer holds the bag: kept, it refused the key's
                    # every call here with BagPendingError, and its resume only
                    # answered that it had ended.
                    self._on_earlier(entry.ask, entry.lineage)
                return await self._drive(ask_fn, entry, deadline, bare)
            # BUSY: another process works on it; its outcome is ours.
            if deadline is not None and clock.monotonic() + self._poll > deadline:
                raise AmbiguousOutcomeError(
                    f"another process is still working on idempotency key {shown(key)!r} (the "
                    f"{wanted.kind} of bag {wanted.bag_id}) and this call's deadline ended "
                    "first; nothing was sent by this call. Call again with the same key "
                    "for its outcome.",
                    request=wanted.request,
                    attempts=0,
                )
            await clock.sleep(self._poll)

    async def _drive(
        self, ask_fn: AskFn, entry: KeyEntry, deadline: float | None, bare: str | None
    ) -> OrderRefund:
        """Drive the key's ask, within the call's ``deadline`` (monotonic, set when the
        call began: time spent waiting for another caller of the key counts).
        ``bare``: the caller's idempotency key (None: a record kept by its ``ask_id``),
        carried by every record of the ask so that a pending one handed out is resumed
        through this same entry. The key's record goes through :class:`KeyRecords`."""
        key = entry.key
        records = KeyRecords(self, entry)
        self._drives(key, entry)
        heartbeat = asyncio.create_task(self._renew(key))
        resume = await records.load()
        settled = None if resume is None else self._settled.get(_identity(resume))
        if resume is not None and settled is not None:
            # This process already resumed the ask outside the key (client.resume of
            # the pending record) and handed its refund out: a resume here could not
            # claim it again and would, after the settle window, send a second one.
            heartbeat.cancel()
            records.latest = resume
            await records.end(Ended(Outcome.APPLIED, refund=settled))
            return settled
        try:
            refund = await ask_fn(
                entry.ask.kind,
                entry.ask.order_id,
                entry.ask.bag_id,
                entry.ask.request,
                resume=resume,
                records=records,
                keep_cancelled=True,
                deadline_at=deadline,
                key=bare,
                # The store may have lost the key's earlier entry (``KeyEntry.guard``): a
                # new ask reads the bag first and is not sent over a refund like it.
                read_first=entry.guard,
                hold_if_present=entry.guard,
            )
        except NotSent as stopped:
            error = stopped.error
            await records.end(
                Ended(Outcome.NOT_SENT, error=error if isinstance(error, VioletError) else None)
            )
            raise error from None
        except Exception as exc:
            await records.end(_ended_by(exc))
            raise
        finally:
            heartbeat.cancel()
        await records.end(Ended(Outcome.APPLIED, refund=refund))
        return refund

    async def _before_send(
        self, record: KeyEntry, latest: PendingRefund, lineage: tuple[str, ...]
    ) -> bool:
        """Save ``record`` (before a send: nothing of that send has left yet). When the
        caller cancels before the store answers, the write may land all the same,
        saying "sent" for a request that never leaves (or still "sent" from the send
        before, for a re-send whose earlier sends were proven not applied): once it
        has, the key is given back with the record that says what is so (``latest``,
        the last the store took; or ``record``'s own when it says not sent). The
        cancellation goes on at once; this process's next call of the key waits for
        that (:meth:`_after_give_back`). Left "sent", the key's next call read the bag
        back and took a refund another system made after it for its own (review 19)."""
        write = asyncio.ensure_future(self.store.save(record, self.owner))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            ask = record.ask if record.ask.phase is Phase.ABSENT else latest
            back = KeyEntry(record.key, ask, scope=self.scope, lineage=lineage)
            key = record.key
            task = self._giving_back[key] = asyncio.ensure_future(self._write_back(write, back))
            task.add_done_callback(
                lambda done: (
                    self._giving_back.pop(key, None) if self._giving_back.get(key) is done else None
                )
            )
            raise

    async def _write_back(self, write: asyncio.Future[bool], back: KeyEntry) -> None:
        """``back`` once ``write`` (cut by a cancel) has landed or failed."""
        with contextlib.suppress(Exception):
            await write
        try:
            await self.store.save(back, self.owner)
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            log.warning("could not give back key %r: %s", back.key, exc)

    async def proven_late(self, proven: PendingRefund) -> None:
        """A cancelled keyed call's late answer proved its send not applied (``proven``,
        ABSENT: ``Engine._land_late``): written through the key's entry, under the key's
        lease, so that the key's next call in any process sharing the store sends its
        own (reading the bag first) rather than read the send back as "may have
        applied", where another system's identical refund made meanwhile would pass for
        its own (simulator seed 1130819: the key taken over by another process).

        Only while the entry still holds that very send (the same ask, as many sends,
        sent or pending, not for review) and nobody else owns the key; a call of the key
        running in this process resumes from this client's own memory and saves what it
        does, and one that comes while this is written joins it as a flight of the key
        (then takes the key over: this process's calls share one owner in the store, so
        a claim cannot keep them apart). Best effort: a store that fails leaves the
        entry as it was (read back, as before)."""
        bare = proven.idempotency_key
        if bare is None:
            return
        key = f"{self.scope} {bare}"
        if key in self._flights:
            return
        flight = self._flights[key] = _Flight(proven)
        try:
            await self._write_late(key, bare, proven)
        finally:
            self._land(key, flight, None, None)  # a call that joined takes the key over

    async def _write_late(self, key: str, bare: str, proven: PendingRefund) -> None:
        store = self.store
        now = self._clock.time()
        fresh = KeyEntry(
            key, proven, owner=self.owner, lease_until=now + store.lease, scope=self.scope
        )
        try:
            await self._after_give_back(key)
            claim, entry = await store.claim(fresh, self._lease_now(now))
        except Exception as exc:  # noqa: BLE001 - the entry stays as it was
            log.warning("could not record the late answer of key %r: %s", bare, exc)
            return
        if claim is not Claim.OWNED:
            return  # finished, ended, another request, or another owner's now
        held = entry.ask
        if (
            held.ask_id == proven.ask_id
            and held.sends == proven.sends
            and held.phase in (Phase.SENT, Phase.PENDING)
            and not held.needs_review
        ):
            ask = attrs.evolve(
                proven, seen=held.seen | proven.seen, others=held.others | proven.others
            )
            entry = attrs.evolve(entry, ask=ask)
        await self._give_back(entry)

    async def _after_give_back(self, key: str) -> None:
        """Wait for a cancelled call's give-back of ``key`` (:meth:`_before_send`)."""
        task = self._giving_back.get(key)
        if task is not None:
            await asyncio.shield(task)

    async def resume(
        self, ask_fn: AskFn, pending: PendingRefund, deadline: float | None
    ) -> OrderRefund:
        """``client.resume(pending)`` over the store, under the ask's own identity
        (``pending.ask_id``), so that a record resumed twice (a job delivered again with
        the record it was first given, or to two processes sharing the store) is one
        ask: the store's record is merged with ``pending`` before anything is read or
        sent (a later delivery never forgets an earlier one's re-send), it is saved
        before every send, a live owner's lease keeps a second process from resuming it
        at the same time (it waits for the outcome), and a refund one process got is
        returned to the next with no request. In this process a second delivery joins
        the running one.

        A record that carries its call's ``idempotency_key`` is kept under that key's
        own entry instead (the one the keyed call and its repeats use): a resume and a
        repeat of the keyed call, here or in another process sharing the store, are one
        ask under one lease, never two records each free to re-send."""
        bare = pending.idempotency_key
        key = resume_key(self.scope, pending.ask_id) if bare is None else f"{self.scope} {bare}"
        while True:
            flight = self._flights.get(key)
            if flight is not None:
                _same_ask(pending, flight.ask)
                if flight.driving is not None:
                    _may_join(pending, flight.driving, flight.lineage)
                if flight.joined is None:
                    flight.joined = asyncio.get_running_loop().create_future()
                try:
                    refund = await self._join(flight.joined, deadline, key, pending)
                except _Late as late:
                    raise late.error from None  # this call's own deadline: pending
                except _NotTheKeys:
                    continue  # that record was not the key's: this one goes on its own
                except VioletError:
                    # The flight's outcome is this record's only if it is the key's
                    # ask or one of its earlier ones: another ask's failure (a 400
                    # "already refunded" for this record's own refund) is not.
                    if flight.driving is not None:
                        _may_join(pending, flight.driving, flight.lineage, final=True)
                    raise
                if refund is not None:
                    # The flight's claim has read the key's entry by now: this record
                    # gets the refund only as that ask's, or one of the key's earlier.
                    _may_join(pending, flight.driving or flight.ask, flight.lineage, final=True)
                    return _not_another(pending, refund)
                continue  # its caller cancelled it: take the ask over
            returned = self._returned.get(key)
            if returned is not None:
                _same_ask(pending, returned[0])
                _key_ask(pending, returned[0], returned[1], returned[2])
                return _not_another(pending, returned[1])
            flight = self._flights[key] = _Flight(pending)
            try:
                if bare is not None:
                    await self._no_unscoped(bare)
                refund = await self._own_resume(ask_fn, pending, key, bare, deadline)
            except BaseException as exc:
                self._land(key, flight, None, exc)
                raise
            self._land(key, flight, refund, None)
            return refund

    async def _join(
        self,
        joined: asyncio.Future[OrderRefund | None],
        deadline: float | None,
        key: str,
        ask: PendingRefund,
    ) -> OrderRefund | None:
        """The outcome of the flight this call joined, waited for no later than the
        call's own ``deadline`` (monotonic, on the client's clock): then pending, with
        nothing sent by this call (the flight goes on and records its outcome)."""
        shielded = asyncio.shield(joined)
        if deadline is None:
            return await shielded
        clock = self._clock
        poll = self._poll

        async def expire() -> None:
            # Waits on the client's clock, as every wait of a call does (a test's
            # virtual clock moves with them), a poll at a time; between polls a brief
            # pause in real time, so a virtual clock never races ahead of a flight
            # that is waiting on real I/O.
            while (left := deadline - clock.monotonic()) > 0:
                await clock.sleep(min(poll, left))
                await asyncio.sleep(_JOIN_PAUSE)

        timer = asyncio.ensure_future(expire())
        try:
            waits: set[asyncio.Future[Any]] = {shielded, timer}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not shielded.done():
                # This call ends (its deadline, or its caller cancelled it); the flight
                # itself goes on (shielded), and its outcome is nobody's to retrieve here.
                shielded.cancel()
        if not shielded.cancelled():
            return shielded.result()
        record = None if ask.phase is Phase.NEW else attrs.evolve(ask, phase=Phase.PENDING)
        raise _Late(
            AmbiguousOutcomeError(
                f"another call in this process is still working on idempotency key "
                f"{shown(key)!r} (the {ask.kind} of bag {ask.bag_id}) and this call's deadline "
                "ended first; nothing was sent by this call. Call again with the same key for "
                "its outcome.",
                request=ask.request,
                attempts=0 if record is None else record.sends,
                pending=record,
            )
        )

    def _refused(self, claim: Claim, entry: KeyEntry, pending: PendingRefund) -> None:
        """Raise what a resume of ``pending`` ends with when its claim refuses it: the
        key holds another request (:func:`_same_ask`), or the ask ended elsewhere."""
        if claim is Claim.REUSED:
            _same_ask(pending, entry.ask)
        if claim is Claim.ENDED:
            if self._on_ended is not None:
                # Its bag is free again here (review 15: held by it for good).
                self._on_ended(pending)
            raise _ended_before(pending, entry.ask)

    def _drives(self, key: str, entry: KeyEntry) -> None:
        """The flight on ``key`` (if any) read the key's entry: what it holds."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.driving = entry.ask
            flight.lineage = entry.lineage

    async def _own_resume(
        self,
        ask_fn: AskFn,
        pending: PendingRefund,
        key: str,
        bare: str | None,
        deadline: float | None,
    ) -> OrderRefund:
        store = self.store
        clock = self._clock
        # SENT and PENDING start alike (read back first); PENDING here keeps a record
        # this call was handed from being taken for an owner that stopped mid-send. One
        # parked for review with every send proven not applied stays so (``_for_review``).
        mine = (
            pending if pending.phase is Phase.ABSENT else attrs.evolve(pending, phase=Phase.PENDING)
        )
        while True:
            now = clock.time()
            fresh = KeyEntry(
                key, mine, owner=self.owner, lease_until=now + store.lease, scope=self.scope
            )
            try:
                await self._after_give_back(key)
                claim, entry = await store.claim(fresh, self._lease_now(now))
            except Exception as exc:  # noqa: BLE001 - any store failure: nothing sent
                raise _resume_store_error(pending, "claiming", exc) from None
            self._refused(claim, entry, pending)
            self._drives(key, entry)
            if claim is Claim.FINISHED and entry.refund is not None:
                if not _refund_of(entry.refund, pending):
                    raise _resume_store_error(
                        pending, "reading", ValueError("its refund is of another bag or order")
                    )
                _key_ask(pending, entry.ask, entry.refund, entry.lineage)
                return _not_another(pending, entry.refund)
            if claim is Claim.OWNED:
                # Its age on the clock as it was before any step back (review 17: a
                # step back made a swept key's ask look young, and it was sent again).
                wall = self._origin.latest(now, clock.monotonic())
                if _swept(entry, mine, wall, getattr(store, "retention", None)):
                    note = (
                        "its record is older than the record store's retention and the "
                        "store holds no end of it: the key's entry may have been swept "
                        "after the ask ended (a caller told it failed, or handed its "
                        f"refund); a person has to look at bag {mine.bag_id}"
                    )
                    parked, review = _for_review(
                        mine,
                        note,
                        f"the {mine.kind} of bag {mine.bag_id} (order {mine.order_id}) may or "
                        f"may not have applied: {note}. Nothing was read or sent: check the "
                        "bag before doing anything else",
                    )
                    await self._give_back(attrs.evolve(entry, ask=parked))
                    raise review
                if _earlier(pending, entry.ask, entry.lineage):
                    # A record of an earlier ask of the key (it ended definitely not
                    # applied, and the key was called again for the same request): its
                    # resume is a repeat of the keyed call. The key's ask now (sent,
                    # pending) is driven and its outcome is this record's: a refusal
                    # would tell the caller "failed" while the key's money may move.
                    return _not_another(pending, await self._drive(ask_fn, entry, deadline, bare))
                try:
                    _key_ask(pending, entry.ask)
                except AmbiguousOutcomeError:
                    # The key's entry holds another ask: give the claim back, the
                    # entry as it was (its record, refund and end) with no owner.
                    await self._give_back(entry)
                    raise
                if entry.ask.phase is Phase.NEW:
                    # The key's record never left (a claim given back unsent, or a
                    # store this record did not come from): the caller's record was
                    # sent and may have applied. Resume it, never send the new one.
                    entry = attrs.evolve(entry, ask=mine)
                elif entry.ask is not mine:
                    entry = attrs.evolve(entry, ask=merged(entry.ask, mine))
                return await self._drive(ask_fn, entry, deadline, bare)
            # BUSY: another process resumes this ask (or drives the key's ask, of which
            # this record is an earlier one) now; its outcome is ours. A record the key
            # never held is not: review (review 14: it was handed the key's record).
            _may_join(pending, entry.ask, entry.lineage)
            if deadline is not None and clock.monotonic() + self._poll > deadline:
                latest = merged(entry.ask, mine) if entry.ask.ask_id == mine.ask_id else mine
                raise AmbiguousOutcomeError(
                    f"another process is still resuming the {pending.kind} of bag "
                    f"{pending.bag_id} (order {pending.order_id}) and this call's deadline "
                    "ended first; nothing was sent by this call: resume it again later",
                    request=pending.request,
                    attempts=latest.sends,
                    pending=attrs.evolve(latest, phase=Phase.PENDING, doubted=True),
                )
            await clock.sleep(self._poll)

    def _resumed(self, ask: PendingRefund) -> PendingRefund | None:
        """The record a call taking the key resumes (None: a new ask)."""
        # A key's entry always holds a record of its own request (the claim refused
        # any other): the rule's last case never applies here.
        # An absent entry was saved when every send was proven not applied, with no
        # send after it (each is saved before it leaves): sent anew.
        resume = resumable(ask, ask, sent_at=None, absent_unsent=True)
        if resume is None or resume.phase is not Phase.SENT:
            return resume
        # Its owner stopped mid-send (killed, cancelled, stalled past its lease, or its
        # clock stepped): its request may still be running at Violet, however long ago
        # the record says it left. Absence is not provable before then.
        clock = self._clock
        now, mono = clock.time(), clock.monotonic()
        here = clock_id(clock)
        moved_by = 0.0
        if on_this_machine(resume, here):
            # Its times first move onto the wall clock as it is now (a step since its
            # owner wrote it), or the driver would move the window added here again.
            # Also a record of another process on this machine: the driver moves it by
            # the step since its stamp (review 21: a step back of 120 s took the window
            # added here back with it, it looked over at once, and a POST of the dead
            # owner still running at Violet was sent again).
            resume = on_wall_now(resume, now, mono)
        else:
            # Another machine's record: the engine moves its times by the step of this
            # clock since the client was made (the client-origin rule). The window
            # added here is read on this clock as it is now: it is held against that
            # move, or a step back took it back with it (review 21, as above).
            moved_by = self._origin.step_at(now, mono)
        recorded = resume.settle_until
        if recorded is None:
            recorded = (resume.last_sent_at or now) + self._in_flight
        return attrs.evolve(resume, settle_until=max(recorded, now + self._in_flight - moved_by))

    async def _finish(
        self, key: str, ask: PendingRefund, refund: OrderRefund, lineage: tuple[str, ...]
    ) -> OrderRefund:
        """Record the refund under the key: here first (no await), then in the store."""
        if ask.phase is not Phase.APPLIED:
            ask = attrs.evolve(ask, phase=Phase.APPLIED, refund_id=refund.id)
        _bounded_put(self._returned, key, (ask, refund, lineage), self._remember)
        done = KeyEntry(
            key,
            ask,
            refund=refund,
            finished_at=self._clock.time(),
            scope=self.scope,
            lineage=lineage,
        )
        write = asyncio.ensure_future(self.store.save(done, self.owner))
        try:
            # Shielded: a cancel now must not cut the write that ends the key.
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # The refund applied and this call holds it: the caller gets it (as a call
            # without a key would, which has no await here). Raising instead would tell
            # a caller "cancelled" for a refund that was made, and nothing would keep
            # its next call on the bag (without the key) from refunding it again.
            write.add_done_callback(partial(_log_unrecorded, key))
            return refund
        except Exception as exc:  # noqa: BLE001 - the refund applied: return it anyway
            log.warning("could not record the refund of key %r: %s", key, exc)
        return refund

    def settled(self, ask: PendingRefund, refund: OrderRefund) -> None:
        """``ask`` (a record resumed by ``client.resume``) ended with ``refund``: if a
        key holds the same ask, its next call returns this refund."""
        _bounded_put(self._settled, _identity(ask), refund, self._remember)

    async def _release(self, key: str, latest: PendingRefund, lineage: tuple[str, ...]) -> None:
        """Give the key back (nobody owns it; the next call resumes or starts it)."""
        try:
            entry = KeyEntry(key, latest, scope=self.scope, lineage=lineage)
            await self.store.save(entry, self.owner)
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            log.warning("could not release key %r: %s", key, exc)

    async def keep(self, pending: PendingRefund) -> None:
        """Write the record a call without a key left pending where ``client.resume``
        keeps it (by its ``ask_id``), so that a copy of it edited on its way to a
        resume (another amount or bag under the same identity) is refused by every
        process sharing the store, never sent. Best effort: a store that fails here
        leaves the record to the caller, as without a store."""
        key = resume_key(self.scope, pending.ask_id)
        now = self._clock.time()
        fresh = KeyEntry(
            key, pending, owner=self.owner, lease_until=now + self.store.lease, scope=self.scope
        )
        try:
            claim, entry = await self.store.claim(fresh, self._lease_now(now))
        except Exception as exc:  # noqa: BLE001 - the caller holds the record anyway
            log.warning("could not keep the pending record %r: %s", pending.ask_id, exc)
            return
        if claim is Claim.OWNED:
            await self._give_back(entry)

    def _lease_now(self, now: float) -> float:
        """The time a claim judges another owner's lease (and retention) by: the wall
        clock ``now``, or earlier when it stepped forward since this client was made
        (``ClockOrigin.steady``). A step forward longer than the lease made a live
        owner's lease look run out, and another process took its key over while it
        still ran; what the owner learned since its last write was lost (simulator
        seed 931575: its 429, and the key's next call took another system's refund
        for the send's). Held this way, such a lease runs out up to the step later."""
        return min(now, self._origin.steady(self._clock))

    async def _give_back(self, entry: KeyEntry) -> None:
        """Give back a claim taken for nothing (no owner, no lease; all else kept)."""
        back = attrs.evolve(entry, owner=None, lease_until=None)
        try:
            await self.store.save(back, self.owner)
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            log.warning("could not release key %r: %s", entry.key, exc)

    async def _renew(self, key: str) -> None:
        """Keep the lease while the call runs (a dead process stops, and its key is
        taken over after ``store.lease``). Real time: the lease is about processes."""
        store = self.store
        while True:
            await asyncio.sleep(store.lease / 3)
            try:
                if not await store.renew(key, self.owner, self._clock.time() + store.lease):
                    return
            except Exception as exc:  # noqa: BLE001 - tried again next time
                log.warning("could not renew the lease of key %r: %s", key, exc)


class KeyRecords:
    """:class:`AskRecords` over a record store (``violet_async.stores``: memory,
    SQLite, Redis): the entry of one key this process claimed (``KeyedAsks``).

    ``load``: the record the claim read by the key, as a call taking the key resumes
    it. ``save``: the entry written before every send under this process's lease (not
    taken: nothing is sent), and the protocol's end of it (PENDING / FAILED, the key
    given back). ``end``: the refund written under the key (APPLIED), or the key given
    back with the last record the store took (any other end, unless the protocol's
    end of it already gave it back)."""

    __slots__ = ("_keys", "entry", "latest", "released")

    def __init__(self, keys: KeyedAsks, entry: KeyEntry) -> None:
        self._keys = keys
        self.entry = entry
        # The last record the store took (given back as the key's when the call ends
        # without a refund), and whether the protocol's end already gave the key back.
        self.latest = entry.ask
        self.released = False

    async def load(self) -> PendingRefund | None:
        return self._keys._resumed(self.entry.ask)

    async def save(self, ask: PendingRefund) -> None:
        """Before every send (SENT) and at the end (PENDING / FAILED; APPLIED is
        written by :meth:`end`, with its refund)."""
        keys = self._keys
        store = keys.store
        clock = keys._clock
        entry = self.entry
        key = entry.key
        final = ask.phase in (Phase.PENDING, Phase.FAILED)
        if final or ask.phase is Phase.APPLIED:
            self.latest = ask
        if ask.phase is Phase.APPLIED:
            return
        now = clock.time()
        lease_until = now + store.lease
        record = KeyEntry(
            key,
            ask,
            owner=None if final else keys.owner,
            lease_until=None if final else lease_until,
            finished_at=now if ask.phase is Phase.FAILED else None,
            scope=keys.scope,
            lineage=entry.lineage,
        )
        try:
            saved = await (
                store.save(record, keys.owner)
                if final
                else keys._before_send(record, self.latest, entry.lineage)
            )
        except Exception as exc:  # noqa: BLE001 - any store failure: see below
            if final:
                # The SENT record before it still keeps the key from a blind send.
                log.warning("could not record the end of key %r: %s", key, exc)
                return
            raise _store_error(key, "saving", exc) from None
        if final:
            self.released = saved
            _not_taken_over(key, ask, saved)
        elif not saved:
            if ask.phase is Phase.ABSENT and keys._on_proven is not None:
                # Every send of the ask was proven not applied (a 429), but the key
                # was taken over meanwhile: the proof is kept in this client's
                # memory, so that the key's next call here merges it (an absent copy
                # wins; one parked for review stays for review) and reads the bag
                # rather than take another system's identical refund made since for
                # its own (simulator seed 1561189). The store keeps the other owner's.
                keys._on_proven(ask)
            raise RecordStoreError(
                f"idempotency key {shown(key)!r} was taken over by another process while "
                "this call held it (its lease ran out); nothing was sent by this step. "
                "That process drives the ask now: call again with the same key for its "
                "outcome",
                key=shown(key),
            )
        elif clock.time() >= lease_until:
            # The write landed, but this process stalled past the lease it wrote (a
            # GC pause, a frozen container): another process may have taken the key
            # over, read the bag back and sent. This send must not leave now.
            raise RecordStoreError(
                f"recording the send of idempotency key {shown(key)!r} took past its lease "
                f"({store.lease:g} s): another process may have taken it over; nothing "
                "was sent by this step",
                key=shown(key),
            )
        else:
            # Only a record the store took (before every send): one whose save
            # failed is not given back as the key's when the call ends without
            # sending (``_release``). Given back, the stamp of a re-send that never
            # left said "sent", and the key's next call took a refund another
            # system made after it for its own (review 19).
            self.latest = ask

    async def end(self, ended: Ended) -> None:
        keys = self._keys
        entry = self.entry
        if ended.refund is not None:
            await keys._finish(entry.key, self.latest, ended.refund, entry.lineage)
        elif not self.released:
            await keys._release(entry.key, self.latest, entry.lineage)


def _ended_by(exc: BaseException) -> Ended:
    """How an error ended an ask; one that is not an ask's outcome (a bug) leaves its
    send unknown: REVIEW."""
    outcome = outcome_of(exc)
    if outcome is None or not isinstance(exc, (VioletError, RateLimitDeferred)):
        return Ended(Outcome.REVIEW)
    return Ended(outcome, error=exc)


def _not_taken_over(key: str, ask: PendingRefund, saved: bool) -> None:
    """Raise when the end of a keyed ask (``ask``, FAILED or PENDING) was not saved
    because another process took the key over."""
    if not saved and ask.phase is Phase.FAILED:
        # Another process took the key over (this call's lease ran out: a pause, or a
        # wall clock stepped past it) and drives the ask now: it may have sent and
        # applied it. This call's failure is not the key's outcome, and a caller told
        # "failed" could refund again.
        raise RecordStoreError(
            f"idempotency key {shown(key)!r} was taken over by another "
            "process while this call held it (its lease ran out); this call "
            f"ended without sending ({ask.note}). That process drives the ask "
            "now: call again with the same key for its outcome",
            key=shown(key),
        )


def _swept(entry: KeyEntry, mine: PendingRefund, now: float, retention: float | None) -> bool:
    """The store held nothing of ``mine`` but what this resume just wrote (no end, no
    earlier ask), and ``mine`` left longer ago than the store keeps an ended key:
    its entry may have been swept after the ask ended elsewhere (told "failed", or
    its refund handed out), so nothing of the store can say it did not (review 16)."""
    if retention is None or entry.ask.ask_id != mine.ask_id:
        return False
    if entry.finished_at is not None or entry.refund is not None or entry.lineage:
        return False
    sent = mine.last_sent_at if mine.last_sent_at is not None else mine.first_sent_at
    return sent is not None and sent + retention <= now


def resume_key(scope: str, ask_id: str) -> str:
    """Where ``client.resume`` keeps an ask's record in the store: the client's scope,
    then a control character no idempotency key may hold (so no caller's key can name
    it), then the ask's identity."""
    return f"{scope} \x1fresume {ask_id}"


def _same_ask(pending: PendingRefund, stored: PendingRefund) -> None:
    """Refuse a record whose ``ask_id`` the store holds for another request (written
    by someone else): nothing is sent for it. A keyed record whose key holds another
    request (the key reused once its retention ended) is not that key's call, and its
    own request may have applied: review, never a failure (review 14)."""
    if not KeyEntry("", stored).same_request(pending):
        if pending.idempotency_key is not None:
            raise _not_the_keys(pending, stored)
        raise _other_request(pending)


def _earlier(pending: PendingRefund, current: PendingRefund, lineage: tuple[str, ...]) -> bool:
    """``pending`` (a keyed record) is of an ask its key held before ``current`` (the
    key's ask now, sent or pending): it is in the key's ``lineage``."""
    return (
        pending.idempotency_key is not None
        and current.phase is not Phase.NEW
        and current.ask_id != pending.ask_id
        and pending.ask_id in lineage
    )


def _key_ask(
    pending: PendingRefund,
    stored: PendingRefund,
    refund: OrderRefund | None = None,
    lineage: tuple[str, ...] = (),
) -> None:
    """Park for review a keyed record that is not known to be its key's own ask: the
    key's entry holds a record (sent, pending or finished) of another ``ask_id`` (a
    record file edited to name another call's key, written by someone else, or one
    whose key's earlier entry was swept). Resuming through that entry would hand this
    record the other call's refund (a false success, its own refund lost track of) or
    drive the other ask; a refusal would tell a definite failure of a request that may
    have applied: nothing is read or sent for it, and it ends for review
    (:func:`_not_the_keys`). A key's record never sent (NEW) holds no ask yet: the
    caller's record is resumed.

    One case is the key's own call all the same: the key's entry FINISHED (``refund``
    given: its ask applied) for this record's very request (the callers checked it),
    this record's ask is one the key held before (its ``lineage``: the ask ended
    definitely not applied and the key was called again for the same request), and this
    record does not name that refund as another call's (``others``). A keyed call that
    ended pending and whose key was then called again (its ask taken over, failed for
    good, and a new ask of the key applied) is such a record: the key's money moved
    once, as ``refund``, and a refusal here (a definite failure to every driver) would
    have an app refund again. A record edited to name another call's key never had its
    ask in that key's lineage, and goes to review."""
    if pending.idempotency_key is None or stored.phase is Phase.NEW:
        return
    if stored.ask_id == pending.ask_id:
        return
    if (
        refund is not None
        and stored.phase is Phase.APPLIED
        and pending.ask_id in lineage
        and refund.id not in pending.others
    ):
        return
    raise _not_the_keys(pending, stored)


def _may_join(
    pending: PendingRefund,
    driving: PendingRefund,
    lineage: tuple[str, ...],
    *,
    final: bool = False,
) -> None:
    """``pending`` may join (or, ``final``, take the outcome of) the flight that drives
    ``driving``, the key's ask: it is that ask, one of the key's earlier asks
    (``lineage``), or (before the join) the flight's ask is not known yet (NEW)."""
    if pending.idempotency_key is None or driving.ask_id == pending.ask_id:
        return
    if pending.ask_id in lineage:
        return
    if not final and driving.phase is Phase.NEW:
        return
    raise _not_the_keys(pending, driving)


#: Real seconds a joiner pauses between polls of its deadline (see ``KeyedAsks._join``).
_JOIN_PAUSE = 0.01


class _NotTheKeys(AmbiguousOutcomeError):
    """:func:`_not_the_keys`: a record's own review. Another caller that joined its
    flight goes on by itself (it is no outcome of the key's)."""


class _Late(Exception):
    """A joiner's own deadline ended before the flight it joined: ``error`` (pending,
    nothing sent by it) is its outcome, whatever the flight's."""

    def __init__(self, error: AmbiguousOutcomeError) -> None:
        super().__init__(str(error))
        self.error = error


def _not_the_keys(pending: PendingRefund, stored: PendingRefund) -> AmbiguousOutcomeError:
    """The keyed record ``pending`` is not known to be its key's call: the key holds
    another ask (``stored``) and does not list this one among its earlier asks (a
    record edited to name the key, or one whose key's entry of its own ask was swept
    after the store's retention, taking the lineage with it). Neither a success (the
    key's refund may be another call's) nor a failure (this record's own request may
    have applied): for review, with nothing read or sent for it."""
    note = (
        f"idempotency key {pending.idempotency_key!r} holds another ask (ask_id "
        f"{stored.ask_id!r}, not this record's {pending.ask_id!r}) and does not list this "
        "one among its earlier asks: this record is not known to be that key's call (a "
        "record edited to name the key, or one whose earlier entry was swept after the "
        "store's retention). Nothing was read or sent for it: check the bag, this "
        "record's own request may have applied"
    )
    return _for_review(pending, note, note, _NotTheKeys)[1]


def _for_review(
    record: PendingRefund,
    note: str,
    message: str,
    error: type[AmbiguousOutcomeError] = AmbiguousOutcomeError,
) -> tuple[PendingRefund, AmbiguousOutcomeError]:
    """``record`` parked for review (pending, ``note`` its reason; nothing of it is
    read or sent), and the error that hands it out.

    A record whose sends were all proven not applied (``ABSENT``: a 429, a re-send
    waiting to leave) stays so: nothing of it can be on the bag. Made "sent, may have
    applied", its resume read the bag back over the window of a send a 429 had
    answered, and took another system's identical refund made during the wait for its
    own (simulator seed 1202091). Resumed, it stays for review (``protocol.start``)."""
    phase = Phase.ABSENT if record.phase is Phase.ABSENT else Phase.PENDING
    parked = attrs.evolve(record, phase=phase, needs_review=True, note=note)
    return parked, error(message, request=record.request, attempts=record.sends, pending=parked)


def _ended_before(pending: PendingRefund, stored: PendingRefund) -> VioletError:
    """The resumed record's ask (or the key's, of which it is an earlier ask) ended
    definitely not applied in another process, whose caller was told so: the same
    again, with nothing read or sent."""
    message = (
        f"the {pending.kind} of bag {pending.bag_id} (order {pending.order_id}) ended "
        f"definitely not applied before this resume ({stored.note or 'failed'}); nothing "
        "was sent by this call"
    )
    # Said again as it was first said (the protocol's note names the error's class):
    # a 429, or a connection never made, is "not sent" to every driver, never a row's
    # failure; any other end is a failure.
    path = f"/orders/{pending.order_id}/bags/{pending.bag_id}/{_ACTIONS[pending.kind]}"
    if stored.note.startswith(f"{RateLimitError.__name__}:"):
        return RateLimitError(
            message,
            status=429,
            error_code=None,
            body=b"",
            headers={},
            method="POST",
            path=path,
        )
    if stored.note.startswith((f"{APIConnectionError.__name__}:", f"{APITimeoutError.__name__}:")):
        return APIConnectionError(message, method="POST", path=path, request_sent=False)
    return VioletError(message)


_ACTIONS = {"refund": "refunds", "cancel": "cancel"}
_DATE_TOLERANCE = Settings().date_tolerance


def _not_another(pending: PendingRefund, refund: OrderRefund) -> OrderRefund:
    """``refund`` unless ``pending`` names it as another call's (``others``): it is then
    never this record's refund, whatever a store or a key says."""
    if refund.id in pending.others:
        raise RequestValidationError(
            "pending",
            f"the refund {refund.id} its store or key returned is one this record names as "
            "another call's (its 'others'); it is not returned as this record's refund, "
            "and nothing was sent",
        )
    return refund


def _other_request(pending: PendingRefund) -> RequestValidationError:
    return RequestValidationError(
        "pending",
        f"its ask_id {pending.ask_id!r} names another request (another kind, order, bag "
        "or body) in this client or its record store; it is neither resumed nor sent",
    )


def _resume_store_error(pending: PendingRefund, doing: str, exc: BaseException) -> RecordStoreError:
    key = pending.idempotency_key
    return RecordStoreError(
        f"the record store failed {doing} the record of ask {pending.ask_id!r} (the "
        f"{pending.kind} of bag {pending.bag_id}) ({type(exc).__name__}: {exc}); nothing "
        "was sent: resume it again later",
        key=resume_key("", pending.ask_id).lstrip() if key is None else key,
    )


def _refund_of(refund: OrderRefund, ask: PendingRefund) -> bool:
    """False when ``refund`` names another order or bag than ``ask`` (a record without
    them is not refused for it)."""
    return refund.order_id in (None, ask.order_id) and refund.bag_id in (None, ask.bag_id)


def resumable(
    stored: PendingRefund | None,
    wanted: PendingRefund,
    *,
    sent_at: float | None,
    absent_unsent: bool = False,
) -> PendingRefund | None:
    """The one rule for what a driver resumes from the record it loaded by its item's
    key, once its edge has said the ask may have been sent (a store's entry, and in
    time a journal's sent/pending/unknown line and a ledger's sent/pending state):

    - a record of ``wanted``'s request (kind, order, bag, body) never sent (NEW):
      nothing to resume, send anew;
    - sent or pending: as it is;
    - absent, where the edge says no send came after it (``absent_unsent``: a key's
      entry, a journal's "sent" line; each send is saved before it leaves): as it is,
      every send so far proven not applied (a 429 deferred, a re-send waiting to
      leave). Sent anew, its window from that send; read back as doubtful, a refund
      another system made during the wait would pass for its own;
    - absent and parked for review (held back before its re-send left): as it is, for
      review again, nothing read or sent (``protocol.start``);
    - any other phase (applied without its refund, absent, failed: the edge did not
      take it as ended): pending and doubted, keeping what it knows (sends, settle
      window, the refunds it saw), read back first, never sent again blind;
    - no record, one that could not be read (None), or one of another request: the
      ask was sent once at ``sent_at`` (None: when is not known), outcome unknown.
    """
    if stored is None or not KeyEntry("", stored).same_request(wanted):
        return sent_once(
            wanted.kind,
            wanted.order_id,
            wanted.bag_id,
            wanted.request,
            sent_at,
            idempotency_key=wanted.idempotency_key,
        )
    if stored.phase is Phase.NEW:
        return None
    if stored.phase in (Phase.SENT, Phase.PENDING) or (
        stored.phase is Phase.ABSENT and (absent_unsent or stored.needs_review)
    ):
        return stored
    return attrs.evolve(stored, phase=Phase.PENDING, doubted=True)


def _log_unrecorded(key: str, write: asyncio.Future[bool]) -> None:
    if not write.cancelled() and write.exception() is not None:
        log.warning("could not record the refund of key %r: %s", key, write.exception())


def _identity(ask: PendingRefund) -> tuple[Any, ...]:
    """One ask, whichever record of it: what it asked for and when it was first sent."""
    return (ask.kind, ask.order_id, ask.bag_id, ask.request, ask.first_sent_at)


def _bounded_put(mapping: OrderedDict[Any, Any], key: Any, value: Any, bound: int) -> None:
    mapping[key] = value
    if len(mapping) > bound:
        mapping.popitem(last=False)


def shown(key: str) -> str:
    """The caller's key in a stored one (``"<app id> <base URL> <key>"``)."""
    parts = key.split(" ", 2)
    return parts[2] if len(parts) == 3 else key


def _reused(key: str, first: PendingRefund) -> IdempotencyKeyReusedError:
    key = shown(key)
    return IdempotencyKeyReusedError(
        f"idempotency key {key!r} was used for another request (a {first.kind} of bag "
        f"{first.bag_id}, order {first.order_id}, with other details); a key stands for one "
        "request. Nothing was sent.",
        key=key,
    )


def _store_error(key: str, doing: str, exc: BaseException) -> RecordStoreError:
    key = shown(key)
    return RecordStoreError(
        f"the record store failed {doing} idempotency key {key!r} "
        f"({type(exc).__name__}: {exc}); nothing was sent",
        key=key,
    )


# -- the engine: the one driver of an ask -------------------------------------------------


class Engine:
    """The one driver of an ask: bag locks, known refunds, pending asks (this client's,
    kept in its ``Shared``), the inline happy path, and the protocol's driver for
    everything after a failure.

    Every refund and cancel goes through :meth:`drive`: ``VioletClient.refund_bag``,
    ``cancel_bag`` and ``resume``, the key path (:class:`KeyedAsks`), the batch runner,
    the fleet worker and the simulator. It performs what ``_protocol.step`` decides over
    the request layer below it (``RequestPlumbing``: one request, its retries, its
    login) and never calls back up into the client.

    The record store seam, as one ask sees it (:class:`AskRecords`): the caller loads
    its record by its key (``records.load()``: a journal line, a ledger hash, a store's
    ``KeyEntry``) and hands it in as ``resume`` with ``records``; the engine calls
    ``records.save`` before every send (``Phase.SENT``: a failing save stops that send)
    and at the end (``PENDING`` / ``FAILED`` / ``APPLIED``); the caller records the end
    (``records.end``) from what :meth:`drive` returns or raises (:func:`outcome_of`
    names it in one vocabulary, :class:`Outcome`).

    One per client and per ``with_options`` clone (its policy, timeouts and hook);
    clones share the state above.
    """

    __slots__ = ("_io", "_shared", "keys")

    def __init__(self, io: RequestPlumbing) -> None:
        self._io = io
        self._shared = io._shared
        # The client's key path, once it has one: a resume settled here tells it.
        self.keys: KeyedAsks | None = None

    # -- what the batch runner, the fleet worker and the simulator read ----------------

    @property
    def clock(self) -> RetryClock:
        return self._shared.clock

    @property
    def known_refunds(self) -> KnownRefunds:
        """Refunds handed out by asks of this client (and its clones), by owner."""
        return self._shared.known_refunds

    @property
    def unsettled(self) -> PendingAsks:
        """Asks this client left pending, by bag."""
        return self._shared.unsettled

    @property
    def policy(self) -> RetryPolicy:
        return self._io._retry

    @property
    def timeouts(self) -> Timeouts:
        return self._io._timeouts

    @property
    def on_retry(self) -> RetryHook | None:
        return self._io._on_retry

    @property
    def app_id(self) -> int:
        return self._shared.credentials.app_id

    @property
    def redactor(self) -> Redactor:
        """Hides this client's secrets in a text (an error kept in a journal or ledger)."""
        return self._shared.auth.redactor

    # -- driving ---------------------------------------------------------------------

    def settings(
        self,
        bag_id: int,
        *,
        hold_if_present: bool = False,
        defer_rate_limited: bool = False,
        read_first: bool = False,
    ) -> Settings:
        """The protocol's settings for one ask on ``bag_id`` (built only off the happy
        path). ``read_first``: read the bag before a first send even when the policy
        does not."""
        clock = self._shared.clock
        base = self._io._retry.protocol_settings()
        unsettled = self._shared.unsettled
        return attrs.evolve(
            base,
            clock_id=clock_id(clock),
            others_pending=unsettled.on_bag(bag_id),
            hold_if_present=hold_if_present,
            defer_rate_limited=defer_rate_limited,
            read_before_send=base.read_before_send or read_first,
            cut_on_bag=unsettled.was_cut(bag_id),
        )

    async def _wait_for_bag(
        self,
        bag_id: int,
        deadline: float | None,
        resume: PendingRefund | None,
        req: RefundBagRequest | CancelBagRequest,
    ) -> None:
        """Wait for the bag another ask of this client holds, up to the deadline."""
        clock = self._shared.clock
        try:
            await self._shared.bag_locks.acquire(
                bag_id, None if deadline is None else deadline - clock.monotonic()
            )
        except APITimeoutError as exc:
            if resume is None:
                raise  # nothing of this ask was ever sent
            # A resume is of an ask that was sent: "nothing was sent" by this call says
            # nothing of whether it applied. Still pending, as it came.
            raise AmbiguousOutcomeError(
                f"{exc}; the ask it resumes was sent before and may have applied: "
                "resume it again later",
                request=req,
                attempts=resume.sends,
                pending=resume,
            ) from None

    async def drive(  # noqa: PLR0912, PLR0915 - the happy path inline, one function on purpose
        self,
        kind: Kind,
        order_id: int,
        bag_id: int,
        req: RefundBagRequest | CancelBagRequest,
        *,
        resume: PendingRefund | None = None,
        records: AskRecords | None = None,
        patience: float | None = None,
        hold_if_present: bool = False,
        keep_cancelled: bool | None = None,
        defer_rate_limited: bool = False,
        deadline_at: float | _Unset | None = UNSET,
        key: str | None = None,
        item: str | None = None,
        read_first: bool = False,
        foreign: Container[int] = (),
    ) -> OrderRefund:
        """One refund or cancel, by the protocol in ``_protocol.py``: one ask per bag
        at a time, a first send made inline (the happy path builds no record and enters
        no retry machinery), and the driver for everything after a failure.

        ``resume``: the ask's record, loaded by its key (None: a new ask). ``records``:
        the record store seam (:class:`AskRecords`): its ``save`` is called before every
        send. ``keep_cancelled``: when the caller cancels the call after its request may
        have left, keep the ask pending in this client (default: unless ``records`` is
        given; a batch journal or fleet ledger keeps its own). ``deadline_at``: the
        call's (monotonic) when it began before this (a keyed call that waited for
        another caller of its key); default: the policy's deadline from now. ``key``:
        the caller's idempotency key, carried by every record of the ask (so a pending
        one handed out is resumed through the key's record).
        ``item``: the caller's own name of the item this ask is for (a fleet item's
        key): the refunds this client handed to it are its own whichever ask of it got
        them, so an item run again as a new ask (its record lost) gets its refund
        again, with no request, and never takes it for another call's.
        ``read_first``: read the bag before a first send even when the policy does not
        (with ``hold_if_present``: a keyed ask whose store may have lost its entry)."""
        io = self._io
        path = io._bag_path(order_id, bag_id, _ACTIONS[kind])
        shared = self._shared
        clock = shared.clock
        policy = io._retry
        deadline = io._deadline() if isinstance(deadline_at, _Unset) else deadline_at
        locks = shared.bag_locks
        unsettled = shared.unsettled
        waited = not locks.try_acquire(bag_id)
        came_with: tuple[PendingRefund, ...] = ()
        if waited:
            if resume is None and records is None and key is None and item is None:
                # The records of this very request pending here (or being resumed by
                # the call that holds the bag) as this call comes: it may be the
                # repeat of the call that left one, and what it finds once it holds
                # the bag is not what it came to (simulator seed 5079201).
                came_with = unsettled.alike(PendingRefund(kind, order_id, bag_id, req))
            await self._wait_for_bag(bag_id, deadline, resume, req)
        given = resume  # the caller's copy of the record (resume may become a newer one)
        taken: PendingRefund | None = None  # the record this resume holds the bag with
        sent: tuple[float, float] | None = None
        tracker: SendTracker | None = None
        owner: str | None = None
        # A POST this call's caller cancels while it runs is handed here (_kept), when
        # the client keeps cancelled sends (else nothing is set: the POST is cancelled
        # with the call).
        late: LateAnswer | None = None
        late_token: Token[LateAnswer | None] | None = None
        if shared.keep_cancelled_sends:
            late = LateAnswer()
            late_token = LATE_ANSWER.set(late)
        try:
            if resume is not None and shared.landing:
                # A cancelled call's send of this ask may still be answered here: wait
                # for what it proves (only with keep_cancelled_sends; nothing otherwise).
                await self._await_landing(resume.ask_id, deadline)
            if unsettled:
                resume = unsettled.check(bag_id, resume)
            if (
                resume is None
                and (unsettled or unsettled.was_cut(bag_id))
                and unsettled.read_first(bag_id, clock.monotonic(), clock.time(), self.mark_life())
            ):
                read_first = True
            if came_with:
                # A record of this request was pending (or being resumed) when this call
                # came, and has been resumed since, to whatever end: the call that left
                # it is told that end by resuming it (its refund, with no request), as
                # it would have been had it held the bag first. Sent now, its repeat
                # made a second refund of the amount, or was refused "already refunded"
                # and told it failed while its own refund was made.
                _pending_as_it_came(bag_id, kind, came_with)
            if resume is not None:
                taken = resume
                unsettled.resuming(taken)
            if (
                item is not None
                and (claimed := shared.known_refunds.claimed(item))
                and claimed.status is not RefundStatus.FAILED
                and claimed.status is not RefundStatus.CANCELED
            ):
                # This item's refund, handed out here before: no request. (One that
                # moved no money ended the item failed: a run again may ask anew.)
                return claimed
            if resume is not None:
                if claimed := shared.known_refunds.claimed(resume.ask_id):
                    return claimed  # this ask's refund, handed out here before: no request
                # An older copy of a record this client parked (or saw fail) since.
                resume = shared.known_refunds.recall(resume)
            body = encode_request(req)
            parse = AnswerCheck(
                parse_refund if kind == "refund" else parse_cancel,
                order_id,
                bag_id,
                req.amount_refunded if isinstance(req, RefundBagRequest) else None,
                shared.known_refunds,
                req.skus if isinstance(req, RefundBagRequest) else None,
                # No attempt runs longer than this (plus a Date header's own skew): a
                # refund dated earlier, by the answer's own Date, is not this one's; one
                # dated later than that Date by more than the skew carries a wrong date.
                io._timeouts.connect + io._timeouts.read + policy.clock_skew,
                policy.clock_skew,
                # Every send of this call leaves after now: a refund dated before now
                # (less Violet's clock skew and a date's tolerance), by this machine's
                # clock as it read when the client was made (carried on the monotonic
                # clock past any step since), was made before it.
                shared.origin.as_made(clock) - policy.clock_skew - _DATE_TOLERANCE,
            )
            if (
                resume is None
                and records is None
                and not policy.read_before_send
                and not read_first
                and not defer_rate_limited
                # A bag where a call of this client was cut in a wait: its 2xx is
                # judged by the protocol (``Settings.cut_on_bag``: review 36).
                and not unsettled.was_cut(bag_id)
            ):
                if shared.auth.current() is None:
                    # Log in (or renew) before the send is timed: a call cancelled
                    # here sent nothing; one cancelled after ``sent`` may have.
                    waited = True
                    await io._token_within(
                        shared.auth.token(),
                        None if deadline is None else deadline - clock.monotonic(),
                    )
                sent = sent_at, sent_mono = clock.time(), clock.monotonic()
                try:
                    # Unless it waited for the bag or a token, a first send has the
                    # policy's whole deadline: the same value every call, so its
                    # timeout is cached.
                    refund = await io._attempt(
                        "POST",
                        path,
                        body,
                        parse,
                        deadline - sent_mono
                        if waited and deadline is not None
                        else policy.deadline,
                    )
                except VioletError as exc:
                    settings = self.settings(bag_id)
                    if exc._resent_at is not None:
                        # Sent again after a token renewal: the failure is that send's.
                        sent = sent_at, sent_mono = exc._resent_at
                    ask = sent_once(
                        kind,
                        order_id,
                        bag_id,
                        req,
                        sent_at,
                        clock=settings.clock_id,
                        others=shared.known_refunds.on_bag(bag_id),
                    )
                    # When it left by both clocks: a cancel (or a resume here) sees a
                    # step of the wall clock since.
                    ask = attrs.evolve(ask, wall_mono=(sent_at, sent_mono))
                    ask = shared.origin.mark(ask, sent_at, sent_mono)
                    tracker = SendTracker(ask, left=True)
                    refund = await after_failed_send(
                        ask,
                        exc,
                        io=tracker.watch(io._bag_io(order_id, bag_id, path, body, parse)),
                        settings=settings,
                        clock=clock,
                        deadline=deadline,
                        known=shared.known_refunds.besides(owner := item or ask.ask_id),
                        save=tracker.save,
                        sent_mono=sent_mono,
                        listed=tracker.listed,
                    )
            else:
                settings = self.settings(
                    bag_id,
                    hold_if_present=hold_if_present,
                    defer_rate_limited=defer_rate_limited,
                    read_first=read_first,
                )
                if resume is not None and key is not None and resume.idempotency_key != key:
                    resume = attrs.evolve(resume, idempotency_key=key)
                here = settings.clock_id or PROCESS_CLOCK
                if resume is not None and not on_this_machine(resume, here):
                    # Another process's times: the clock they were read by is taken
                    # for this one's as it was when the client was made; a step of this
                    # clock since moves them with it (review 15: a window looked over
                    # an hour early, and the ask was sent again 10 s after a 5xx). (A
                    # process on this machine stamped its record with wall and
                    # monotonic time: ``run_ask`` moves it by the step since, exactly.)
                    jump = shared.origin.step_at(clock.time(), clock.monotonic())
                    if jump:
                        # Also when that process learned Violet's offset (review 16):
                        # with no Date here, nothing else would move them. Its offset,
                        # read against a clock that differs from this one by the step,
                        # is dropped: the record is taken onto this clock, unsure
                        # (``protocol.start``), as one that never learned it. Its stamp
                        # goes too: kept, the process that wrote it would move the
                        # record by the same step again when it resumes it (simulator
                        # seed 921142: a settle window 15 h late).
                        resume = attrs.evolve(
                            clock_stepped(resume, jump), server_offset=None, wall_mono=None
                        )
                elif resume is not None:
                    # A record of this process or another on this machine: judged
                    # against the clock as it was when this client was made too, when it
                    # stepped forward since by more than the record knows of (its
                    # writer made after the step: simulator seed 1079285).
                    resume = shared.origin.recall(resume)
                ask = resume or shared.origin.mark(
                    PendingRefund(
                        kind, order_id, bag_id, req, clock=settings.clock_id, idempotency_key=key
                    ),
                    clock.time(),
                    clock.monotonic(),
                )
                ask, mine, owner = _as_owner(ask, shared.known_refunds, parse, item, foreign)
                tracker = SendTracker(resume, persist=None if records is None else records.save)
                timeouts = io._timeouts
                refund = await run_ask(
                    ask,
                    io=tracker.watch(io._bag_io(order_id, bag_id, path, body, parse)),
                    settings=settings,
                    clock=clock,
                    deadline=deadline,
                    known=mine,
                    attempt_timeout=timeouts.connect + timeouts.read,
                    save=tracker.save,
                    patience=patience,
                    listed=tracker.listed,
                )
        except AmbiguousOutcomeError as exc:
            if exc.pending is not None:
                unsettled.add(exc.pending)
                shared.known_refunds.parked(exc.pending)
            raise
        except BagPendingError as exc:
            if exc.pending:
                raise
            # A resume's send held back by another ask pending on the bag here: its
            # record goes back on the bag (still pending here, keeping new asks off it).
            others = unsettled.records_on(bag_id)
            if resume is not None:
                if others and all(unsettled.stuck(other, resume.ask_id) for other in others):
                    # Every ask holding it back is itself held back (by this one) or
                    # parked for review: none can ever send, so none would ever end
                    # (review 16). A person settles the bag; nothing is sent.
                    note = (
                        f"held back by {len(others)} other ask(s) pending on bag {bag_id} "
                        "here that are held back in turn or parked for review; a person "
                        f"has to look at bag {bag_id}"
                    )
                    parked, review = _for_review(
                        resume,
                        note,
                        f"{exc}; the {kind} of bag {bag_id} (order {order_id}) may or may not "
                        f"have applied: {note}. check the bag before doing anything else",
                    )
                    unsettled.add(parked)
                    shared.known_refunds.parked(parked)
                    raise review from None
                unsettled.add(resume, held=True)
            raise BagPendingError(str(exc), pending=others) from None
        except VioletError as exc:
            if tracker is not None and tracker.record and tracker.record.phase is Phase.FAILED:
                shared.known_refunds.failed(tracker.record, exc)
                if isinstance(exc, RateLimitError) or tracker.waited_absent:
                    # Ended by 429s it could not wait out, every send proven not applied:
                    # its caller's repeat is a new ask, and the bag was in play during
                    # the waits (another system's identical refund made then passed for
                    # the repeat's own). Marked as a cut call's is (review 30); so is a
                    # call ended otherwise after such a wait (review 31: its re-send's
                    # connection refused, APIConnectionError).
                    self.mark_bag(bag_id)
            raise
        except asyncio.CancelledError:
            # The caller cancelled (or timed out) this call: if its request may have
            # left, the bag is pending before the cancellation goes on, so the next
            # call here gets BagPendingError (or, with the key, resumes it), never a
            # blind second POST.
            pending = self._cancelled(kind, order_id, bag_id, req, sent, tracker)
            if pending is not None:
                # With the refunds other calls got on the bag without their id.
                unnamed = shared.known_refunds.unnamed(bag_id, besides=owner or pending.ask_id)
                pending = with_unnamed(pending, unnamed)
                if late is not None and late.task is not None:
                    # Its POST was cut short with its answer on the way: the answer is
                    # awaited apart, and what it proves recorded for the ask's next
                    # resume (the record stays "sent, may have applied" until then).
                    before = tracker.record if tracker is not None else None
                    pending = self._keep_late(
                        late.task,
                        pending,
                        doubted=before is not None and before.doubted,
                        parse=parse,
                        path=path,
                        owner=item or pending.ask_id,
                    )
                    late.task = None
            keep = records is None if keep_cancelled is None else keep_cancelled
            if pending is not None and keep:
                unsettled.add(pending)
            elif pending is None and tracker is not None and tracker.cut_while_absent:
                self.mark_bag(bag_id)
                if given is not None and tracker.record is not None:
                    # A resume cut in its wait: what it proved (every send not applied)
                    # is kept for the next resume of the caller's copy, which still
                    # says "sent, may have applied" (review 34: read back over its
                    # first send's window, it took another system's refund made in
                    # the cut wait for its own).
                    shared.known_refunds.parked(tracker.record)
            raise
        finally:
            if late_token is not None:
                LATE_ANSWER.reset(late_token)
            if late is not None and late.task is not None:
                drop_late(late.task)  # nothing of the call is pending: not awaited
            if taken is not None:
                unsettled.resumed(taken)
            locks.release(bag_id)
        if (
            tracker is not None
            and tracker.waited_absent
            and (refund.status is RefundStatus.FAILED or refund.status is RefundStatus.CANCELED)
        ):
            # A refund that moved no money after a 429's wait (every send before it
            # proven not applied): the caller is told it failed and its repeat is a new
            # ask, while the bag was in play during the wait. Marked as a call ended by
            # an error after such a wait is (review 32: the repeat, answered 500, took
            # another system's identical refund made in the wait for its own).
            self.mark_bag(bag_id)
        shared.known_refunds.add(refund.id, bag_id, owner, refund)
        if given is not None and records is None and self.keys is not None:
            self.keys.settled(given, refund)
        return refund

    async def settle(
        self,
        kind: Kind,
        order_id: int,
        bag_id: int,
        req: RefundBagRequest | CancelBagRequest,
        *,
        passes: tuple[type[BaseException], ...] = (),
        resume: PendingRefund | None = None,
        records: AskRecords | None = None,
        patience: float | None = None,
        hold_if_present: bool = False,
        defer_rate_limited: bool = False,
        item: str | None = None,
        foreign: Container[int] = (),
    ) -> Ended:
        """:meth:`drive` to its end, as one :class:`Ended` (what the batch runner and
        the fleet worker record): a refund (one that moved no money, FAILED or
        CANCELED, is an error, as ``refund_bag`` raises it), or the error, named by
        :func:`outcome_of`.

        Errors of the driver's own ``records.save`` (``passes``: a journal that cannot be
        written),
        a cancellation, and anything that is not an ask's outcome go on as raised.
        ``item``: as for :meth:`drive`. ``foreign``: refunds of other calls the
        caller's records do not account for (:meth:`KnownRefunds.besides`)."""
        try:
            try:
                refund = await self.drive(
                    kind,
                    order_id,
                    bag_id,
                    req,
                    resume=resume,
                    records=records,
                    patience=patience,
                    hold_if_present=hold_if_present,
                    defer_rate_limited=defer_rate_limited,
                    item=item,
                    foreign=foreign,
                )
            except NotSent as stopped:
                # The save right before a send (the stamp) failed: nothing left. Its
                # error goes on as the save raised it (a store's: NOT_SENT).
                raise stopped.error from None
            refund = unless_failed(refund, kind, self._shared.auth.redactor)
        except (RateLimitDeferred, VioletError) as exc:
            outcome = outcome_of(exc)
            if outcome is None or isinstance(exc, passes):
                raise
            return Ended(outcome, error=exc)
        return Ended(Outcome.APPLIED, refund=refund)

    def _keep_late(
        self,
        task: asyncio.Future[RawResponse | None],
        pending: PendingRefund,
        *,
        doubted: bool,
        parse: AnswerCheck,
        path: str,
        owner: str,
    ) -> PendingRefund:
        """Await the answer of a POST whose caller cancelled it after it left (``task``,
        bounded by its own attempt's timeouts) apart from the call, and record what it
        proves for the ask of ``pending`` (the record the cancellation leaves, returned
        as it is: the request left before the cancel, so its settle window stands).
        ``doubted``: the record before that send was (a refusal then proves nothing of
        the earlier sends)."""
        shared = self._shared
        landing = asyncio.ensure_future(
            self._land_late(task, pending, doubted=doubted, parse=parse, path=path, owner=owner)
        )
        shared.late_answers.add(landing)
        landing.add_done_callback(shared.late_answers.discard)
        ask_id = pending.ask_id
        shared.landing[ask_id] = landing

        def landed(done: asyncio.Task[None]) -> None:
            if shared.landing.get(ask_id) is done:
                del shared.landing[ask_id]

        landing.add_done_callback(landed)
        return pending

    async def _await_landing(self, ask_id: str, deadline: float | None) -> None:
        """Wait, up to ``deadline``, for the late answer of this ask's send that a
        cancelled call of this client left on its way (``_keep_late``), before a resume
        or keyed repeat of the ask reads the bag: what it proves (a 429: not applied; a
        2xx: its refund) is then what the resume starts from. Read beside it instead, a
        repeat begun before the answer landed took another system's identical refund,
        made after that send, for its own (simulator seeds 932620 and 1197549). The
        answer is bounded by its own attempt's timeouts; past the deadline the resume
        goes on as before (the answer, landing later, is kept for the next one)."""
        landing = self._shared.landing.get(ask_id)
        if landing is None:
            return
        clock = self._shared.clock
        left = None if deadline is None else max(0.0, deadline - clock.monotonic())
        await asyncio.wait((landing,), timeout=left)

    async def _land_late(
        self,
        task: asyncio.Future[RawResponse | None],
        pending: PendingRefund,
        *,
        doubted: bool,
        parse: AnswerCheck,
        path: str,
        owner: str,
    ) -> None:
        """What a late answer proves, kept for the ask's next resume in this client
        (:meth:`KnownRefunds.recall` and :meth:`KnownRefunds.claimed`), never over
        anything newer this client knows of the ask. A 2xx that reads as this
        request's refund: the ask's refund. Violet's 429 (or a 401, before it did
        anything): not applied (ABSENT: the next resume reads the bag, then sends it
        again). Any other 4xx: failed, as the protocol ends a send refused in time (a refusal
        after a doubted send proves nothing of that one). Anything else (a 5xx, no
        answer, a timeout): nothing, the record stays pending."""
        try:
            resp = await task
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - no answer, a timeout, a close
            return  # proves nothing
        if resp is None:
            return  # the caller had its answer (never handed over so)
        known = self._shared.known_refunds
        bag_id = pending.bag_id
        if 200 <= resp.status < 300:
            try:
                refund = parse(resp, path)
            except VioletError:
                return  # a 2xx that does not read as this request's: read back, as before
            made = refund.id
            if made is not None and (made in (pending.baseline or ()) or made in pending.others):
                return
            if (
                pending.baseline is None
                and self._shared.unsettled.was_cut(bag_id)
                and places_nothing(refund)
            ):
                # A bag where a call of this client was cut in a wait: a replayed answer
                # naming another system's refund made then cannot be told from this
                # send's own by a date that places nothing, nor by a baseline. Proves
                # nothing: the next resume reads back (``Settings.cut_on_bag``, review
                # 36; the late answer returned it, review 38).
                return
            if known.claimed(pending.ask_id) is not None or known.claimed(owner) is not None:
                return
            known.add(made, bag_id, owner, refund)
            log.info(
                "the late answer of a cancelled call on bag %s named its refund %s: "
                "its next resume returns it",
                bag_id,
                made,
            )
            return
        error = self._io._api_error(resp, "POST", path)
        cause = classify_send_failure(error)
        if resp.status == 401 or cause is Cause.RATE_LIMITED:
            absent = attrs.evolve(
                pending,
                phase=Phase.ABSENT,
                doubted=doubted,
                settle_until=None,
                note=f"{type(error).__name__} (answered after the call was cancelled): {error}",
            )
            proven = known.proven_late(absent)
            if self.keys is not None and absent.idempotency_key is not None:
                # The key's entry too: a repeat in another process sharing the store
                # knows it then (this client's memory is its own).
                await self.keys.proven_late(absent)
        elif cause is Cause.REFUSED and not doubted:
            note = f"{type(error).__name__}: {error}"
            failed = attrs.evolve(pending, phase=Phase.FAILED, note=note)
            proven = known.proven_late(failed, error)
        else:
            return
        if proven:
            log.info(
                "the late answer of a cancelled call on bag %s (%s) proved it not applied",
                bag_id,
                resp.status,
            )

    def mark_bag(self, bag_id: int) -> None:
        """Every new ask on ``bag_id`` reads it before its send for a while: a call
        here was cut (or ended) with nothing applied after a wait in which another
        system may have refunded the same (``PendingAsks.cut_while_absent``). For as
        long as a refund made before now could fall in a new send's window: twice the
        clock skew (Violet's clock and ours each off by it) plus the tolerance of a
        date placed by a ``Date`` header, and its second. A 2xx answer naming such a
        refund is refused by the answer's check too (``AnswerCheck.not_before``)."""
        clock = self._shared.clock
        self._shared.unsettled.cut_while_absent(
            bag_id, clock.monotonic(), clock.time(), self.mark_life()
        )

    def mark_life(self) -> float:
        """How long a mark of :meth:`mark_bag` holds for this client's asks: twice
        its clock skew plus a date's tolerance and a second (126 s by default)."""
        return 2 * self._io._retry.clock_skew + _DATE_TOLERANCE + 1.0

    def _cancelled(  # noqa: PLR0917 - internal, one call site
        self,
        kind: Kind,
        order_id: int,
        bag_id: int,
        req: RefundBagRequest | CancelBagRequest,
        sent: tuple[float, float] | None,
        tracker: SendTracker | None,
    ) -> PendingRefund | None:
        """The record a cancelled call leaves pending (None: nothing of it can have
        reached Violet). ``sent``: the wall and monotonic time its first send left at
        (None: it made none inline)."""
        shared = self._shared
        settings = self.settings(bag_id)
        now, mono = shared.clock.time(), shared.clock.monotonic()
        if tracker is not None:
            return tracker.on_cancel(now, settings.settle_running, mono)
        if sent is None:
            # Cancelled waiting for the bag or for a token: nothing left. (Whether the
            # token needs renewing now says nothing: it may have reached its renewal
            # time while the POST was in flight.)
            return None
        record = cancelled_first_send(
            kind,
            order_id,
            bag_id,
            req,
            sent[0],
            now=now,
            mono=(sent[1], mono),
            settle_running=settings.settle_running,
            clock=settings.clock_id,
            others=shared.known_refunds.on_bag(bag_id),
        )
        return shared.origin.mark(record, *sent)


def _as_owner(
    ask: PendingRefund,
    known: KnownRefunds,
    answer: AnswerCheck,
    item: str | None = None,
    foreign: Container[int] = (),
) -> tuple[PendingRefund, Container[int], str]:
    """``ask`` with the refunds other calls got on its bag (never its own), the known
    refunds it may not claim, and its identity (``item``, the caller's item the ask is
    for, when it names one: every ask of one item is one owner). The refunds it already
    got (a resume delivered twice, an item run again) are its own to claim again; every
    other known one is another call's, and an answer naming one is not this ask's."""
    owner = item or ask.ask_id
    answer.known = mine = known.besides(owner, foreign=foreign)
    others = known.on_bag(ask.bag_id, besides=owner)
    own = known.owned_by(owner)
    # A refund this ask already got does not vanish from Violet: a read that misses it
    # (a replica behind) is stale, never evidence of absence.
    ask = attrs.evolve(ask, others=(ask.others | others) - own, seen=ask.seen | own)
    return with_unnamed(ask, known.unnamed(ask.bag_id, besides=owner)), mine, owner


def unless_failed(
    refund: OrderRefund, kind: Kind = "refund", redact: Redactor | None = None
) -> OrderRefund:
    """A 2xx refund that moved no money (status FAILED or CANCELED) is an error carrying
    the refund: for a refund, and for a cancel whose answer carries its refund so (the
    bag was cancelled, the shopper was not refunded). ``redact``: the client's secrets
    are hidden in the reasons the message quotes (Violet's error messages may echo the
    request: review 28)."""
    status = refund.status
    if status is RefundStatus.FAILED or status is RefundStatus.CANCELED:
        reasons = "; ".join(e.error_message or "" for e in refund.errors)
        if redact is not None:
            reasons = redact.text(reasons)
        what = (
            f"refund {refund.id} on bag {refund.bag_id}"
            if kind == "refund"
            else f"bag {refund.bag_id} was cancelled, but its refund {refund.id}"
        )
        raise RefundFailedError(
            f"{what} is {status.value}: no money moved ({reasons or 'no reason given'})",
            refund=refund,
        )
    return refund


def _pending_as_it_came(bag_id: int, kind: Kind, came_with: tuple[PendingRefund, ...]) -> NoReturn:
    """:meth:`Engine.drive`: a new ask came while records of its request were pending
    on the bag (or being resumed), and they have been resumed since."""
    raise BagPendingError(
        f"bag {bag_id} had the same {kind} from this client pending when this call came, "
        "and it has been resumed since; resume it (client.resume(error.pending[0])) for "
        "its outcome before asking again: this call could be its repeat. Nothing was sent.",
        pending=came_with,
    )


def engine_of(client: VioletClient) -> Engine:
    """The engine a client (or ``with_options`` clone) drives its asks with: what the
    batch runner, the fleet worker and the simulator hold instead of the client's
    internals."""
    return client._engine


# -- one outcome vocabulary ---------------------------------------------------------------


class Outcome(enum.Enum):
    """How one ask ended, in the one vocabulary every driver of the engine speaks.

    Facts, not policies: whether a ``NOT_SENT`` or ``FAILED`` item is tried again is
    each edge's own rule (a batch's next run, a fleet's retry of a transient error).
    What each older vocabulary says for each is in :data:`VOCABULARY`.
    """

    APPLIED = "applied"
    """Violet has the refund: a 2xx, or found by reading the bag back (``reconciled``)."""
    PRESENT = "already_present"
    """Not sent: the bag already holds a refund exactly like it that nothing accounts
    for (``RefundAlreadyPresentError``)."""
    FAILED = "failed"
    """Definitely not applied: Violet refused it (or answered a FAILED refund), a
    failure's absence was proven by reading the bag back, or it can never be sent as it
    is (invalid input, a key already used for another request)."""
    NOT_SENT = "not_sent"
    """Nothing of this call reached Violet, for a reason of the moment: refused
    credentials, no connection, another open ask on its bag, a key's record that could
    not be saved before the send (the store keeps what an earlier call of the key did),
    the read before its first send failing so (a 429, a 5xx, no answer). The same ask
    may be made again."""
    DEFERRED = "deferred"
    """Answered 429 and nothing applied: to be sent again in its merchant's turn
    (``RateLimitDeferred``)."""
    PENDING = "pending"
    """May have applied, not proven yet: resume it (``AmbiguousOutcomeError.pending``)
    once its settle window has passed."""
    REVIEW = "review"
    """May have applied, and cannot be told by reading the bag back (no record, or
    ``pending.needs_review``): a person checks the bag."""


@attrs.frozen
class Ended:
    """How one ask ended, as :meth:`Engine.settle` hands it to its driver: its
    :class:`Outcome`, and the refund (``APPLIED``) or the error that says the rest
    (``AmbiguousOutcomeError.pending``, ``RateLimitDeferred.delay``...)."""

    outcome: Outcome
    refund: OrderRefund | None = None
    error: VioletError | RateLimitDeferred | None = None


def never_reached(exc: BaseException) -> bool:
    """The error proves Violet never took the request: credentials refused (401), the
    login itself answered with an error (a 404 from a wrong ``VIOLET_BASE_URL``), or no
    connection could be made (refused, DNS)."""
    if isinstance(exc, AuthenticationError):
        return True
    if isinstance(exc, APIError) and exc.path in AUTH_PATHS:
        return True
    return isinstance(exc, APIConnectionError) and not exc.request_sent


#: Where the client logs in and renews its token: an error answered there came before
#: the ask's own request left.
AUTH_PATHS = frozenset({"/login", "/auth/token"})


def outcome_of(exc: BaseException) -> Outcome | None:
    """The one error classifier: what an error raised by :meth:`Engine.drive` says of
    its ask (None: not an ask's outcome, such as a cancellation or a journal that
    cannot be written; let it go on)."""
    if isinstance(exc, RateLimitDeferred):
        return Outcome.DEFERRED
    if not isinstance(exc, VioletError):
        return None
    if isinstance(exc, AmbiguousOutcomeError):
        pending = exc.pending
        return Outcome.REVIEW if pending is None or pending.needs_review else Outcome.PENDING
    if isinstance(exc, RefundAlreadyPresentError):
        return Outcome.PRESENT
    if isinstance(exc, (BagPendingError, RecordStoreError)) or never_reached(exc):
        return Outcome.NOT_SENT
    if isinstance(exc, RateLimitError):
        # An ask ends on a 429 only when every send of it was proven not applied (the
        # merchant's pace, out of attempts; or the read before a send, answered 429):
        # nothing is wrong with it, and it may be asked again (simulator seed 1321726:
        # a batch row ended "failed" on a read's 429, "fix the rows").
        return Outcome.NOT_SENT
    if exc._before_send and of_the_moment(exc):
        # The read before the ask's first send (its baseline) failed otherwise for a
        # reason of the moment (a 5xx, no answer, an answer that could not be read):
        # nothing was sent (review 31: ended a batch row failed, never sent again
        # without --retry-failed). A refusal (another 4xx) stays FAILED.
        return Outcome.NOT_SENT
    return Outcome.FAILED


def of_the_moment(exc: VioletError) -> bool:
    """A failure that says nothing of the request but the moment (a 429, a 5xx, no
    answer, an answer that could not be read): what ends a baseline read as not sent
    here, and what a fleet worker starts an item over after."""
    if isinstance(exc, (APIConnectionError, RateLimitError, ResponseFormatError)):
        return True
    return isinstance(exc, APIError) and exc.status >= 500


#: The four vocabularies that came before :class:`Outcome`, mapped onto it in one
#: place. They stay as they are on disk and in Redis (journals and ledgers already
#: written must still load, and the batch's ``BatchResult.outcome`` strings are public):
#: each driver maps at its edge. Open states (an ask still being driven) map to the
#: outcome they would end in if the driver stopped there.
VOCABULARY: dict[str, dict[str, Outcome]] = {
    # The protocol's phases (``_protocol.Phase``): where one ask stands.
    "phase": {
        Phase.NEW.value: Outcome.NOT_SENT,
        Phase.SENT.value: Outcome.PENDING,
        Phase.APPLIED.value: Outcome.APPLIED,
        Phase.ABSENT.value: Outcome.NOT_SENT,
        Phase.PENDING.value: Outcome.PENDING,
        Phase.FAILED.value: Outcome.FAILED,
    },
    # The batch journal's line states (``Journal.record``).
    "journal": {
        "sent": Outcome.PENDING,
        "pending": Outcome.PENDING,
        "unknown": Outcome.REVIEW,
        "done": Outcome.APPLIED,
        "present": Outcome.PRESENT,
        "failed": Outcome.FAILED,
        "unsent": Outcome.NOT_SENT,
    },
    # The fleet ledger: its ``outcome`` field when set, else its ``state``.
    "ledger": {
        "new": Outcome.NOT_SENT,
        "sent": Outcome.PENDING,
        "pending": Outcome.PENDING,
        "applied": Outcome.APPLIED,
        "reconciled": Outcome.APPLIED,
        "already_present": Outcome.PRESENT,
        "unknown": Outcome.REVIEW,
        "failed": Outcome.FAILED,
        "refused": Outcome.FAILED,
        # New, nothing sent: its bag is kept open only by items under review.
        "not_sent": Outcome.NOT_SENT,
    },
    # ``BatchResult.outcome``: one item of a batch run (already_* are skips, from an
    # earlier run's journal).
    "batch": {
        "succeeded": Outcome.APPLIED,
        "already_done": Outcome.APPLIED,
        "failed": Outcome.FAILED,
        "already_failed": Outcome.FAILED,
        "unknown": Outcome.REVIEW,
        "not_sent": Outcome.NOT_SENT,
        "already_present": Outcome.PRESENT,
    },
}
