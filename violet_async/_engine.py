"""The engine's key path and its answer to "what if the caller cancels here?".

Two things live here, both about one ask across calls:

- :class:`SendTracker`: what a call knows about its ask at every ``await``, so that a
  call cancelled (or timed out by its caller) after its request may have left is
  recorded as sent-and-unknown before the cancellation propagates: the next call on
  the bag gets ``BagPendingError`` carrying the record, never a blind second POST.
- :class:`KeyedAsks`: ``idempotency_key=`` over a record store (``violet_async.stores``):
  load the entry by key, save it before every send, record the end. Same key and same
  request: the same outcome (returned again, resumed, or joined); same key and another
  request: ``IdempotencyKeyReusedError``, nothing sent.

The protocol itself (when a refund may be re-sent) stays in ``_protocol.py``; the
driver that performs it in ``_reconcile.py``. The client hands this module its ``_ask``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Literal, Protocol

import attrs

from ._ask import PendingRefund, Phase, merged, sent_once
from ._protocol import clock_stepped
from ._reconcile import BagIO, WallWatch
from ._redact import has_control_character
from .exceptions import (
    AmbiguousOutcomeError,
    IdempotencyKeyReusedError,
    RecordStoreError,
    RequestValidationError,
)
from .models import CancelBagRequest, OrderRefund, RefundBagRequest
from .models._validators import check_id
from .stores import Claim, KeyEntry, RecordStore

__all__ = ["KeyedAsks", "SendTracker", "cancelled_first_send", "check_key", "resume_key"]

log = logging.getLogger("violet_async.reconcile")

Kind = Literal["refund", "cancel"]
Save = Callable[[PendingRefund], Awaitable[None]]

#: The longest idempotency key accepted (Stripe's limit).
MAX_KEY_LENGTH = 255

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
    if mono is not None and record.wall_mono is not None:
        jump = WallWatch(_Frozen(now, mono), record.wall_mono).jump()
        if jump:
            record = clock_stepped(record, jump)
    settle = max(record.settle_until or 0.0, now + settle_running)
    return attrs.evolve(
        record,
        phase=Phase.PENDING,
        doubted=True,
        settle_until=settle,
        note=_CANCELLED_NOTE,
        wall_mono=(now, mono) if mono is not None else record.wall_mono,
    )


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
    """Carries a ``RecordStoreError`` raised right before a send past the driver, which
    would otherwise take it for a send that may have applied."""

    def __init__(self, error: RecordStoreError) -> None:
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

    async def save(self, ask: PendingRefund) -> None:
        """The driver's save (before every send and at the end): to the store, if the
        call has one, then here."""
        if self._persist is not None:
            await self._persist(ask)
        self.record = ask

    def watch(self, io: BagIO) -> BagIO:
        """``io`` whose sends mark the moment a request leaves (after any login, after
        the driver's own restamp)."""
        inner = io.send_once

        async def send_once(remaining: float | None, before_send: Any = None) -> OrderRefund:
            async def leaving() -> None:
                if before_send is not None:
                    try:
                        await before_send()
                    except RecordStoreError as exc:
                        # The key's record could not be brought up to date before
                        # this send: it does not leave. Not a send failure (that
                        # would be read back as "may have applied"): the call ends.
                        raise NotSent(exc) from None
                self.left = True

            return await inner(remaining, before_send=leaving)

        return attrs.evolve(io, send_once=send_once)

    def on_cancel(
        self, now: float, settle_running: float, mono: float | None = None
    ) -> PendingRefund | None:
        """The record to keep as pending when the caller cancels now (None: nothing of
        this call can have reached Violet, and it resumed nothing)."""
        record = self.record
        if record is None or record.phase is Phase.NEW:
            return None
        if self.left:
            return _cancelled(record, now, settle_running, mono)
        if self._resumed:
            return attrs.evolve(record, phase=Phase.PENDING, doubted=True)
        return None


# -- idempotency keys -------------------------------------------------------------------


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
    ) -> None:
        self.store = store
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
        self._returned: OrderedDict[str, tuple[PendingRefund, OrderRefund]] = OrderedDict()
        self._settled: OrderedDict[tuple[Any, ...], OrderRefund] = OrderedDict()
        self._remember = remember

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
                refund = await asyncio.shield(flight.joined)
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
                refund = await self._own(ask_fn, wanted, key, deadline)
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
        if finished_at is not None and finished_at + store.retention <= self._clock.time():
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
        self, ask_fn: AskFn, wanted: PendingRefund, key: str, deadline: float | None
    ) -> OrderRefund:
        store = self.store
        clock = self._clock
        while True:
            now = clock.time()
            fresh = KeyEntry(
                key, wanted, owner=self.owner, lease_until=now + store.lease, scope=self.scope
            )
            try:
                claim, entry = await store.claim(fresh, now)
            except Exception as exc:  # noqa: BLE001 - any store failure: nothing sent
                raise _store_error(key, "claiming", exc) from None
            if claim is Claim.REUSED:
                raise _reused(key, entry.ask)
            if claim is Claim.FINISHED and entry.refund is not None:
                if not _refund_of(entry.refund, wanted):
                    # Not this ask's refund (a row written by someone else): returning
                    # it would report a refund that was never made.
                    raise _store_error(
                        key, "reading", ValueError("its refund is of another bag or order")
                    )
                return entry.refund
            if claim is Claim.OWNED:
                return await self._drive(ask_fn, entry, deadline)
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

    async def _drive(self, ask_fn: AskFn, entry: KeyEntry, deadline: float | None) -> OrderRefund:
        """Drive the key's ask, within the call's ``deadline`` (monotonic, set when the
        call began: time spent waiting for another caller of the key counts)."""
        store = self.store
        clock = self._clock
        key = entry.key
        owner = self.owner
        latest = entry.ask
        released = False

        async def persist(ask: PendingRefund) -> None:
            """Before every send (SENT) and at the end (PENDING / FAILED; APPLIED is
            written below, with its refund)."""
            nonlocal latest, released
            latest = ask
            if ask.phase is Phase.APPLIED:
                return
            final = ask.phase in (Phase.PENDING, Phase.FAILED)
            now = clock.time()
            lease_until = now + store.lease
            record = KeyEntry(
                key,
                ask,
                owner=None if final else owner,
                lease_until=None if final else lease_until,
                finished_at=now if ask.phase is Phase.FAILED else None,
                scope=self.scope,
            )
            try:
                saved = await store.save(record, owner)
            except Exception as exc:  # noqa: BLE001 - any store failure: see below
                if final:
                    # The SENT record before it still keeps the key from a blind send.
                    log.warning("could not record the end of key %r: %s", key, exc)
                    return
                raise _store_error(key, "saving", exc) from None
            if final:
                released = saved
            elif not saved:
                raise RecordStoreError(
                    f"idempotency key {shown(key)!r} was taken over by another process while "
                    "this call held it (its lease ran out); nothing was sent by this step",
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

        heartbeat = asyncio.create_task(self._renew(key))
        resume = self._resumed(entry.ask)
        settled = None if resume is None else self._settled.get(_identity(resume))
        if resume is not None and settled is not None:
            # This process already resumed the ask outside the key (client.resume of
            # the pending record) and handed its refund out: a resume here could not
            # claim it again and would, after the settle window, send a second one.
            heartbeat.cancel()
            return await self._finish(key, resume, settled)
        try:
            refund = await ask_fn(
                entry.ask.kind,
                entry.ask.order_id,
                entry.ask.bag_id,
                entry.ask.request,
                resume=resume,
                save=persist,
                keep_cancelled=True,
                deadline_at=deadline,
            )
        except NotSent as stopped:
            await self._release(key, latest)
            raise stopped.error from None
        except Exception:
            if not released:
                await self._release(key, latest)
            raise
        finally:
            heartbeat.cancel()
        return await self._finish(key, latest, refund)

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
        the running one."""
        key = resume_key(self.scope, pending.ask_id)
        while True:
            flight = self._flights.get(key)
            if flight is not None:
                _same_ask(pending, flight.ask)
                if flight.joined is None:
                    flight.joined = asyncio.get_running_loop().create_future()
                refund = await asyncio.shield(flight.joined)
                if refund is not None:
                    return refund
                continue  # its caller cancelled it: take the ask over
            returned = self._returned.get(key)
            if returned is not None:
                _same_ask(pending, returned[0])
                return returned[1]
            flight = self._flights[key] = _Flight(pending)
            try:
                refund = await self._own_resume(ask_fn, pending, key, deadline)
            except BaseException as exc:
                self._land(key, flight, None, exc)
                raise
            self._land(key, flight, refund, None)
            return refund

    async def _own_resume(
        self, ask_fn: AskFn, pending: PendingRefund, key: str, deadline: float | None
    ) -> OrderRefund:
        store = self.store
        clock = self._clock
        # SENT and PENDING start alike (read back first); PENDING here keeps a record
        # this call was handed from being taken for an owner that stopped mid-send.
        mine = attrs.evolve(pending, phase=Phase.PENDING)
        while True:
            now = clock.time()
            fresh = KeyEntry(
                key, mine, owner=self.owner, lease_until=now + store.lease, scope=self.scope
            )
            try:
                claim, entry = await store.claim(fresh, now)
            except Exception as exc:  # noqa: BLE001 - any store failure: nothing sent
                raise _resume_store_error(pending, "claiming", exc) from None
            if claim is Claim.REUSED:
                raise _other_request(pending)
            if claim is Claim.FINISHED and entry.refund is not None:
                if not _refund_of(entry.refund, pending):
                    raise _resume_store_error(
                        pending, "reading", ValueError("its refund is of another bag or order")
                    )
                return entry.refund
            if claim is Claim.OWNED:
                if entry.ask is not mine:
                    entry = attrs.evolve(entry, ask=merged(entry.ask, mine))
                return await self._drive(ask_fn, entry, deadline)
            # BUSY: another process resumes this ask now; its outcome is ours.
            if deadline is not None and clock.monotonic() + self._poll > deadline:
                latest = merged(entry.ask, mine)
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
        resume = _resumable(ask)
        if resume is None or resume.phase is not Phase.SENT:
            return resume
        # Its owner stopped mid-send (killed, cancelled, stalled past its lease, or its
        # clock stepped): its request may still be running at Violet, however long ago
        # the record says it left. Absence is not provable before then.
        now = self._clock.time()
        recorded = resume.settle_until
        if recorded is None:
            recorded = (resume.last_sent_at or now) + self._in_flight
        return attrs.evolve(resume, settle_until=max(recorded, now + self._in_flight))

    async def _finish(self, key: str, ask: PendingRefund, refund: OrderRefund) -> OrderRefund:
        """Record the refund under the key: here first (no await), then in the store."""
        if ask.phase is not Phase.APPLIED:
            ask = attrs.evolve(ask, phase=Phase.APPLIED, refund_id=refund.id)
        _bounded_put(self._returned, key, (ask, refund), self._remember)
        done = KeyEntry(key, ask, refund=refund, finished_at=self._clock.time(), scope=self.scope)
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

    async def _release(self, key: str, latest: PendingRefund) -> None:
        """Give the key back (nobody owns it; the next call resumes or starts it)."""
        try:
            await self.store.save(KeyEntry(key, latest, scope=self.scope), self.owner)
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            log.warning("could not release key %r: %s", key, exc)

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


def resume_key(scope: str, ask_id: str) -> str:
    """Where ``client.resume`` keeps an ask's record in the store: the client's scope,
    then a control character no idempotency key may hold (so no caller's key can name
    it), then the ask's identity."""
    return f"{scope} \x1fresume {ask_id}"


def _same_ask(pending: PendingRefund, stored: PendingRefund) -> None:
    """Refuse a record whose ``ask_id`` the store holds for another request (written
    by someone else): nothing is sent for it."""
    if not KeyEntry("", stored).same_request(pending):
        raise _other_request(pending)


def _other_request(pending: PendingRefund) -> RequestValidationError:
    return RequestValidationError(
        "pending",
        f"its ask_id {pending.ask_id!r} names another request (another kind, order, bag "
        "or body) in this client or its record store; it is neither resumed nor sent",
    )


def _resume_store_error(pending: PendingRefund, doing: str, exc: BaseException) -> RecordStoreError:
    return RecordStoreError(
        f"the record store failed {doing} the record of ask {pending.ask_id!r} (the "
        f"{pending.kind} of bag {pending.bag_id}) ({type(exc).__name__}: {exc}); nothing "
        "was sent: resume it again later",
        key=resume_key("", pending.ask_id).lstrip(),
    )


def _refund_of(refund: OrderRefund, ask: PendingRefund) -> bool:
    """False when ``refund`` names another order or bag than ``ask`` (a record without
    them is not refused for it)."""
    return refund.order_id in (None, ask.order_id) and refund.bag_id in (None, ask.bag_id)


def _resumable(ask: PendingRefund) -> PendingRefund | None:
    """What a call that owns a key resumes: nothing for an ask never sent (NEW); an ask
    sent once (any other phase a row may hold: sent, pending, or applied without its
    refund) is read back as pending, never sent again blind."""
    if ask.phase is Phase.NEW:
        return None
    if ask.phase in (Phase.SENT, Phase.PENDING):
        return ask
    return attrs.evolve(ask, phase=Phase.PENDING, doubted=True)


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
