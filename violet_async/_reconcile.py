"""The async driver of the refund protocol, and the client-wide memory it needs.

``_protocol.py`` decides; this module performs: it sends, reads the bag back, waits,
and feeds what it saw to :func:`_protocol.step` until the ask is applied, proven not
applied, or pending. It is the only place that awaits on an ask's behalf, and every
wait and read is bounded by the call's one deadline.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from typing import Any, Protocol

import attrs

from . import _protocol as protocol
from ._ask import PROCESS_CLOCK, merged, same_machine, with_unnamed
from ._matching import idless_fits, on_bag, unix_time
from ._protocol import Action, Do, Observation, ObsKind, PendingRefund, Phase, Settings
from ._responses import RefundPage, http_date
from ._retry import RetryEvent, RetryHook, RetryPolicy, announce
from ._telemetry import ATTEMPT, count_readback, read_span, reconcile_log
from .exceptions import (
    AmbiguousOutcomeError,
    APITimeoutError,
    BagPendingError,
    RefundAlreadyPresentError,
    VioletError,
)
from .models import Order, OrderBag, OrderRefund, RefundStatus

__all__ = [
    "BagIO",
    "BagLocks",
    "ClockOrigin",
    "KnownRefunds",
    "PendingAsks",
    "RateLimitDeferred",
    "ReadBack",
    "WallWatch",
    "after_failed_send",
    "drive",
    "run_ask",
]


# A refund with one of these statuses moved no money: its ask failed, a run may ask anew.
_NO_MONEY = frozenset({RefundStatus.FAILED, RefundStatus.CANCELED})


class RateLimitDeferred(Exception):
    """A send was answered 429 and the ask asked to defer (``Settings.defer_rate_limited``):
    nothing applied; ``pending`` (phase ABSENT) is sent again by resuming it after
    ``delay`` seconds (the ``Retry-After``, capped, or the backoff). ``cause`` is the 429."""

    def __init__(self, pending: PendingRefund, delay: float, cause: VioletError) -> None:
        super().__init__(str(cause))
        self.pending = pending
        self.delay = delay
        self.cause = cause


class KnownRefunds:
    """Refund ids this client already returned to a caller, with their bag and the ask
    that owns them (bounded, oldest evicted).

    Known is not absent: a refund skipped because it was handed to another call never
    proves that an ask did not apply, and the ask that owns a refund (by its
    ``PendingRefund.ask_id``) may always claim it again: a resume delivered twice gets
    the same refund twice, never a second send."""

    def __init__(self, capacity: int = 10_000) -> None:
        # A dict to look up (and keep each refund's bag and owner), a deque for the
        # order: add is a few C calls on the hot path.
        self._ids: dict[int, tuple[int | None, str | None]] = {}
        self._order: deque[int] = deque()
        # The same refunds by bag and by owner: a batch or fleet call asks both for
        # every ask (_as_owner), and a scan of up to ``capacity`` refunds per call made
        # a long run quadratic.
        self._by_bag: dict[int | None, set[int]] = {}
        self._by_owner: dict[str | None, set[int]] = {}
        self._capacity = capacity
        # The refund each ask (by ask_id) was handed: a resume of it gets it again.
        self._claimed: dict[str, OrderRefund] = {}
        # The last record each ask was parked with here, and the definite failure each
        # ended with (its sends then): a resume of an older copy of the record (a job
        # delivered twice) starts from what this client already knows of the ask.
        self._parked: OrderedDict[str, PendingRefund] = OrderedDict()
        self._failed: OrderedDict[str, tuple[int, VioletError]] = OrderedDict()
        # Refunds handed out from a 2xx without their id: (bag, owner, refund).
        self._idless: deque[tuple[int, str | None, OrderRefund]] = deque(maxlen=capacity)
        # Refunds handed to a call (a first send's answer included, which names no
        # owner), as opposed to those only a caller's records name (a batch journal's,
        # a fleet ledger's): those records account for the latter, not the former.
        self._handed: set[int] = set()

    def learn(self, bag_id: int, refunds: Sequence[OrderRefund]) -> None:
        """A read of ``bag_id`` listed ``refunds``: each record that may be a refund this
        client handed out without its id (same bag, amount and date, as far as both
        say) becomes known, owned by the ask that got it. Several may fit (a 2xx that
        also left out its date): all are bound, so none is claimed by another ask,
        which then ends pending or for review, never with another call's refund."""
        if not self._idless:
            return
        listed = [r for r in refunds if on_bag(r, bag_id)]
        for bag, owner, handed in self._idless:
            if bag != bag_id:
                continue

            def elsewhere(refund_id: int, owner: str | None = owner) -> bool:
                entry = self._ids.get(refund_id)
                return entry is not None and entry[1] != owner

            fits = idless_fits(handed.amount, unix_time(handed.date_created), listed, elsewhere)
            for at in fits:
                one = listed[at]
                if one.id is not None and one.id not in self._ids:
                    self.add(one.id, bag_id, owner)

    def add(
        self,
        refund_id: int | None,
        bag_id: int | None = None,
        owner: str | None = None,
        refund: OrderRefund | None = None,
    ) -> None:
        """``owner``: the ask_id of the ask handed ``refund``."""
        if owner is not None and refund is not None:
            # The first refund an owner was handed stays its claim, unless that one
            # moved no money (FAILED, CANCELED: the run asked anew) and this one may
            # have: then the item's refund is this one. A claim that may have moved
            # money is never replaced.
            held = self._claimed.get(owner)
            if held is None or (held.status in _NO_MONEY and refund.status not in _NO_MONEY):
                self._claimed[owner] = refund
        if refund_id is None:
            if refund is not None and bag_id is not None:
                # A 2xx without the refund's id: remembered by what it carries, so a
                # later read of the bag binds its record to this owner (:meth:`learn`)
                # and another ask can never claim it.
                self._idless.append((bag_id, owner, refund))
            return
        if owner is not None or refund is not None:
            self._handed.add(refund_id)
        entry = self._ids.get(refund_id)
        if entry is not None:
            if owner is not None and entry[1] is None:
                self._unindex(refund_id, entry)
                self._index(refund_id, (entry[0] or bag_id, owner))
            return
        self._index(refund_id, (bag_id, owner))
        self._order.append(refund_id)
        if len(self._order) > self._capacity:
            oldest = self._order.popleft()
            gone = self._ids.get(oldest)
            self._handed.discard(oldest)
            if gone is not None:
                self._unindex(oldest, gone)
                if gone[1] is not None:
                    self._claimed.pop(gone[1], None)

    def _index(self, refund_id: int, entry: tuple[int | None, str | None]) -> None:
        self._ids[refund_id] = entry
        self._by_bag.setdefault(entry[0], set()).add(refund_id)
        self._by_owner.setdefault(entry[1], set()).add(refund_id)

    def _unindex(self, refund_id: int, entry: tuple[int | None, str | None]) -> None:
        del self._ids[refund_id]
        _drop(self._by_bag, entry[0], refund_id)
        _drop(self._by_owner, entry[1], refund_id)

    def claimed(self, ask_id: str) -> OrderRefund | None:
        """The refund the ask ``ask_id`` (any record of it) was already handed in this
        client: a resume of it returns that with no request (a list lagging behind it
        could otherwise prove the ask absent and send a second)."""
        return self._claimed.get(ask_id)

    def parked(self, record: PendingRefund) -> None:
        """The ask of ``record`` was left pending (or for review) with it here."""
        self._remember(self._parked, record.ask_id, record)

    def failed(self, record: PendingRefund, error: VioletError) -> None:
        """The ask of ``record`` definitely did not apply (``error``), after
        ``record.sends`` sends: a resume of an older copy of it fails the same way."""
        self._parked.pop(record.ask_id, None)
        self._remember(self._failed, record.ask_id, (record.sends, error))

    def proven_late(self, record: PendingRefund, error: VioletError | None = None) -> bool:
        """A late answer (to a POST whose caller had cancelled it) proved that the ask of
        ``record`` did not apply: ``record`` (ABSENT) is resumed in its stead, or, with
        ``error`` (a definite refusal), the ask fails again with no request. Kept only
        when this client knows nothing newer of the ask: no refund handed to it, no
        failure, no record parked with more sends (a call that resumed it and sent it
        since the send this answer is of), or with as many that is not that send read
        back and left pending (a resume whose deadline ended before the answer landed:
        it learned nothing of that send, and what its reads saw is kept). True: kept."""
        ask_id = record.ask_id
        if ask_id in self._claimed or ask_id in self._failed:
            return False
        newer = self._parked.get(ask_id)
        if newer is not None:
            if newer.sends > record.sends or (
                newer.sends == record.sends
                and (newer.phase is not Phase.PENDING or newer.needs_review)
            ):
                return False
            record = attrs.evolve(
                record, seen=record.seen | newer.seen, others=record.others | newer.others
            )
        if error is not None:
            self.failed(record, error)
        else:
            self.parked(record)
        return True

    def _remember(self, memory: OrderedDict[str, Any], ask_id: str, value: Any) -> None:
        memory[ask_id] = value
        memory.move_to_end(ask_id)
        if len(memory) > self._capacity:
            memory.popitem(last=False)

    def recall(self, ask: PendingRefund) -> PendingRefund:
        """``ask``, a record being resumed, brought up to what this client knows of its
        ask. A copy older than the one it was parked with here (a resume job delivered
        twice, a stale copy in a queue) forgets refunds the newer one saw, a review it
        was parked for, a later send whose window still runs: the newer record is
        resumed instead (with what either saw). A copy no newer than the ask's definite
        failure here raises that failure again, with no request: the refund it was told
        had failed is never made by a second delivery."""
        failure = self._failed.get(ask.ask_id)
        if failure is not None and ask.sends <= failure[0]:
            raise _again(failure[1])
        newer = self._parked.get(ask.ask_id)
        if newer is None or newer is ask:
            return ask
        # Of copies with as many sends, one whose sends were all proven not applied
        # (ABSENT: a late 429 written through the key's entry by another process) knows
        # better than one parked here "sent, may have applied" (review 30).
        proven = ask.phase is Phase.ABSENT and newer.phase is not Phase.ABSENT
        older = newer.sends < ask.sends or (newer.sends == ask.sends and proven)
        base, other = (ask, newer) if older else (newer, ask)
        return attrs.evolve(
            base,
            seen=base.seen | other.seen,
            others=base.others | other.others,
            needs_review=base.needs_review or other.needs_review,
            answered=base.answered or other.answered,
            unnamed=with_unnamed(base, other.unnamed).unnamed,
        )

    def unnamed(
        self, bag_id: int, *, besides: str | None = None
    ) -> tuple[tuple[int | None, float | None], ...]:
        """What the refunds handed out without their id on ``bag_id`` carry (amount,
        date), except those of the ask ``besides``: a record carries them, so that a
        resume in another process (which never saw them handed out) never claims one."""
        if not self._idless:
            return ()
        return tuple(
            (handed.amount, unix_time(handed.date_created))
            for bag, owner, handed in self._idless
            if bag == bag_id and (besides is None or owner != besides)
        )

    def on_bag(self, bag_id: int, *, besides: str | None = None) -> frozenset[int]:
        """The refunds returned for ``bag_id``, except those owned by the ask
        ``besides`` (for an ask's record, so that a resume in another process never
        claims another call's)."""
        on_bag = self._by_bag.get(bag_id, ())
        if besides is None:
            return frozenset(on_bag)
        return frozenset(r for r in on_bag if self._ids[r][1] != besides)

    def owned_by(self, ask_id: str) -> frozenset[int]:
        """The refunds handed to the ask ``ask_id``."""
        return frozenset(self._by_owner.get(ask_id, ()))

    def owner(self, refund_id: int) -> str | None:
        entry = self._ids.get(refund_id)
        return None if entry is None else entry[1]

    def besides(self, ask_id: str, *, foreign: Container[int] = ()) -> Container[int]:
        """The refunds owned by any call but the ask ``ask_id``. ``foreign``: those of
        them that the caller's own records do not account for (a batch run's: refunds
        handed to calls before the run, and not in its journal): another call's still,
        never claimed, but the guard before a first send (``hold_if_present``) counts
        them as a refund nothing accounts for, as a new process would."""
        return _OthersOf(self, ask_id, foreign)

    def handed_out(self) -> set[int]:
        """The refunds handed to a call of this client so far."""
        return set(self._handed)

    def handed(self, refund_id: int) -> bool:
        """Whether ``refund_id`` was handed to a call of this client."""
        return refund_id in self._handed

    def __contains__(self, refund_id: object) -> bool:
        return refund_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


def _drop(index: dict[Any, set[int]], at: object, refund_id: int) -> None:
    ids = index.get(at)
    if ids is not None:
        ids.discard(refund_id)
        if not ids:
            del index[at]


def _again(error: VioletError) -> VioletError:
    """A fresh copy of ``error`` to raise again (its own traceback, nothing chained)."""
    clone = type(error).__new__(type(error))
    clone.__dict__.update(error.__dict__)
    clone.args = error.args
    return clone


class _OthersOf:
    __slots__ = ("_ask_id", "_foreign", "_known")

    def __init__(self, known: KnownRefunds, ask_id: str, foreign: Container[int] = ()) -> None:
        self._known = known
        self._ask_id = ask_id
        self._foreign = foreign

    def __contains__(self, refund_id: object) -> bool:
        entry = self._known._ids.get(refund_id)  # type: ignore[call-overload]
        return entry is not None and entry[1] != self._ask_id

    def learn(self, bag_id: int, refunds: Sequence[OrderRefund]) -> None:
        self._known.learn(bag_id, refunds)

    def unnamed(self, bag_id: int) -> tuple[tuple[int | None, float | None], ...]:
        return self._known.unnamed(bag_id, besides=self._ask_id)

    @property
    def for_guard(self) -> Container[int]:
        """What the guard before a first send leaves out: the refunds of other calls
        that the caller's records account for (all of them, unless ``foreign``)."""
        return self if not self._foreign else _Accounted(self, self._foreign)


class _Accounted:
    __slots__ = ("_foreign", "_others")

    def __init__(self, others: _OthersOf, foreign: Container[int]) -> None:
        self._others = others
        self._foreign = foreign

    def __contains__(self, refund_id: object) -> bool:
        return refund_id in self._others and refund_id not in self._foreign


#: Bags a client remembers to read before new asks' sends (the oldest go first).
READ_FIRST_BOUND = 10_000

#: Bags a client remembers a cut call on, for as long as it lives (the least recently
#: cut go first): ``PendingAsks.was_cut``.
CUT_BOUND = 10_000


class PendingAsks:
    """Asks this client left pending (AmbiguousOutcomeError), by bag. Until one is
    resumed, no new ask is sent on its bag: it could claim the pending one's refund, or
    have its own claimed by it."""

    def __init__(self) -> None:
        self._by_bag: dict[int, list[PendingRefund]] = {}
        # Asks whose resume was held back by others pending on their bag: by which.
        self._held: dict[str, frozenset[str]] = {}
        # Bags where a call was cut while every send it made stood proven not applied
        # (a 429's wait, a re-send's backoff), or ended so after such a wait: until
        # when (monotonic, wall) every new ask there reads the bag before its send.
        self._read_first: OrderedDict[int, tuple[float, float]] = OrderedDict()
        # The same bags, for as long as this client lives (``CUT_BOUND`` of them, the
        # least recently cut dropped first), with when (monotonic, wall) the latest
        # call there was cut: :meth:`was_cut`, and :meth:`read_first` for a client
        # sharing these asks whose own mark would last longer (review 38).
        self._cut: OrderedDict[int, tuple[float, float]] = OrderedDict()
        # Records a resume took off their bag and drives now (it holds the bag), by bag:
        # still in play for a call that comes meanwhile (:meth:`alike`).
        self._resuming: dict[int, list[PendingRefund]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_bag or self._read_first)

    def cut_while_absent(self, bag_id: int, mono: float, wall: float, life: float) -> None:
        """A call on ``bag_id`` was cut by its caller (or ended) at ``mono``/``wall``
        while nothing it sent had applied (nothing is pending), after a wait during
        which another system may have refunded the same: every new ask on the bag,
        whoever's, reads it before its send (a baseline), so that refund is never taken
        for a repeat's own (simulator seed 1216220), until ``life`` seconds have passed
        on both clocks (a wall clock stepped back keeps it longer). After that, a
        refund made before the cut is older than any window a new send opens.

        By time, not spent by a read: a mark spent by the first ask of the request to
        read the bag was spent by another caller's identical ask (begun before the cut
        or after it: review 33, review 34), or by a cancel of the same body (review
        34), and the cut call's own repeat then sent unread and took another system's
        refund made in the wait for its own."""
        until = (mono + life, wall + life)
        held = self._read_first.pop(bag_id, None)
        if held is not None:
            until = (max(until[0], held[0]), max(until[1], held[1]))
        self._read_first[bag_id] = until
        while len(self._read_first) > READ_FIRST_BOUND:
            self._read_first.popitem(last=False)
        cut = self._cut
        before = cut.get(bag_id)
        cut[bag_id] = (
            (mono, wall) if before is None else (max(mono, before[0]), max(wall, before[1]))
        )
        cut.move_to_end(bag_id)
        while len(cut) > CUT_BOUND:
            cut.popitem(last=False)

    def was_cut(self, bag_id: int) -> bool:
        """Whether a call on ``bag_id`` was cut (or ended) so (:meth:`cut_while_absent`)
        at any time in this client's life, however long ago: the refund another system
        made in its wait can be named by a replayed 2xx answer at any later time, and a
        date that places nothing (none, no UTC offset, the day only) cannot show it to
        be older than the call (review 36, ``Settings.cut_on_bag``). Not counted in
        ``bool(self)``: a client with only these left keeps its calls' fast path except
        on these bags."""
        return bag_id in self._cut

    def read_first(self, bag_id: int, mono: float, wall: float, life: float = 0.0) -> bool:
        """Whether a new ask on ``bag_id`` at ``mono``/``wall`` reads the bag first
        (a mark of ``cut_while_absent`` on it still holds). Marks that lapsed are
        dropped, so a client with none left is empty again (its calls' fast path).

        ``life``: the asking client's own mark life (its clock skew's), when it shares
        these asks with the client that cut (``with_options``): a call cut there within
        that life before now holds too. Marked with the cutting client's shorter life,
        a clone allowing a larger clock skew sent unread after that mark lapsed, and a
        2xx naming another system's refund made in the cut wait passed its own
        ``not_before`` (review 38)."""
        if life > 0.0:
            cut = self._cut.get(bag_id)
            if cut is not None and not _lapsed((cut[0] + life, cut[1] + life), mono, wall):
                return True
        marks = self._read_first
        while marks:
            first = next(iter(marks))
            if not _lapsed(marks[first], mono, wall):
                break
            del marks[first]
        until = marks.get(bag_id)
        if until is None:
            return False
        if _lapsed(until, mono, wall):
            del marks[bag_id]
            return False
        return True

    def on_bag(self, bag_id: int) -> bool:
        return bag_id in self._by_bag

    def resuming(self, record: PendingRefund) -> None:
        """A resume of ``record`` holds its bag now (until :meth:`resumed`)."""
        self._resuming.setdefault(record.bag_id, []).append(record)

    def resumed(self, record: PendingRefund) -> None:
        """The resume of ``record`` (:meth:`resuming`) gave its bag back."""
        records = self._resuming.get(record.bag_id)
        if records is None:
            return
        for index, held in enumerate(records):
            if held is record:
                del records[index]
                break
        if not records:
            del self._resuming[record.bag_id]

    def alike(self, like: PendingRefund) -> tuple[PendingRefund, ...]:
        """The records of ``like``'s request (kind, order, body) on its bag that are
        pending here or being resumed now: a call of that request that comes while one
        is may be the repeat of the call that left it (simulator seed 5079201)."""
        bag_id = like.bag_id
        return tuple(
            record
            for record in (*self._by_bag.get(bag_id, ()), *self._resuming.get(bag_id, ()))
            if _same_request(record, like)
        )

    def records_on(self, bag_id: int) -> tuple[PendingRefund, ...]:
        """The records pending on ``bag_id``, oldest first."""
        return tuple(self._by_bag.get(bag_id, ()))

    def add(self, pending: PendingRefund, *, held: bool = False) -> None:
        """``held``: its resume was held back by the other asks pending on the bag."""
        others = self._by_bag.setdefault(pending.bag_id, [])
        if held:
            self._held[pending.ask_id] = frozenset(r.ask_id for r in others)
        else:
            self._held.pop(pending.ask_id, None)
        others.append(pending)

    def stuck(self, record: PendingRefund, resuming: str | None = None) -> bool:
        """``record`` cannot end by itself: parked for review, or its resume was held
        back by an ask still pending on the bag (or by ``resuming``, the ask resumed
        now). One held back only by asks that have ended since can (review 17)."""
        if record.needs_review:
            return True
        holders = self._held.get(record.ask_id)
        if holders is None:
            return False
        here = {r.ask_id for r in self._by_bag.get(record.bag_id, ())}
        return bool(holders & (here | {resuming}))

    def forget(self, bag_id: int) -> None:
        """Drop the bag's records (their owner, e.g. a fleet ledger, keeps them)."""
        for record in self._by_bag.pop(bag_id, ()):
            self._held.pop(record.ask_id, None)

    def ended(self, bag_id: int, ask_ids: Container[str], like: PendingRefund) -> bool:
        """Take off ``bag_id`` the records of ``ask_ids`` asking ``like``'s request (a
        key's earlier asks, each ended definitely not applied elsewhere: its entry's
        ``lineage``). Whether any was."""
        records = self._by_bag.get(bag_id)
        if not records:
            return False
        gone = [r for r in records if r.ask_id in ask_ids and _same_request(r, like)]
        for record in gone:
            records.remove(record)
            self._held.pop(record.ask_id, None)
        if not records:
            del self._by_bag[bag_id]
        return bool(gone)

    def check(self, bag_id: int, resume: PendingRefund | None) -> PendingRefund | None:
        """A resume takes its own record off the bag, and gets back what both records
        know (:func:`merged`: a resume delivered again with the record it was first
        given must not forget a later record's re-send); a new ask on a bag with a
        pending one raises BagPendingError (nothing was sent)."""
        records = self._by_bag.get(bag_id)
        if not records:
            return resume
        if resume is None:
            raise BagPendingError(
                f"bag {bag_id} has a refund or cancel from this client still pending; "
                "resume it (client.resume(error.pending[0])) before asking again: a new "
                "request now could claim its refund, or be claimed by it. Nothing was sent.",
                pending=records,
            )
        for index, record in enumerate(records):
            if _same_ask(record, resume):
                del records[index]
                self._held.pop(record.ask_id, None)
                if record.ask_id == resume.ask_id:
                    resume = merged(resume, record)
                break
        if resume.idempotency_key is not None:
            # The key's earlier asks on the bag: a resume through the key drives the
            # key's ask now, whose outcome is theirs too (one ask per key).
            records[:] = [r for r in records if not _same_key(r, resume)]
        if not records:
            del self._by_bag[bag_id]
        return resume


def _lapsed(until: tuple[float, float], mono: float, wall: float) -> bool:
    return mono >= until[0] and wall >= until[1]


def _same_key(one: PendingRefund, other: PendingRefund) -> bool:
    return one.idempotency_key == other.idempotency_key and _same_request(one, other)


def _same_request(one: PendingRefund, other: PendingRefund) -> bool:
    return (
        one.kind == other.kind and one.order_id == other.order_id and one.request == other.request
    )


def _same_ask(one: PendingRefund, other: PendingRefund) -> bool:
    if one.ask_id == other.ask_id:
        return True
    return (
        one.kind == other.kind
        and one.order_id == other.order_id
        and one.request == other.request
        and one.first_sent_at is not None
        and other.first_sent_at is not None
        and abs(one.first_sent_at - other.first_sent_at) < 1e-6
    )


class BagLocks:
    """One ask per bag at a time, in a client and the clients derived from it, so two
    calls on one bag can never claim each other's refund. Different bags never wait.

    Uncontended, taking and giving back a bag costs two dict operations.
    """

    def __init__(self) -> None:
        # bag id -> the asks waiting for it, in arrival order (None: held, none waiting).
        self._held: dict[int, deque[asyncio.Future[None]] | None] = {}

    def try_acquire(self, bag_id: int) -> bool:
        if bag_id in self._held:
            return False
        self._held[bag_id] = None
        return True

    async def acquire(self, bag_id: int, timeout: float | None) -> None:
        """Wait for the bag; APITimeoutError (nothing was sent) when ``timeout`` passes."""
        if self.try_acquire(bag_id):
            return
        waiters = self._held[bag_id]
        if waiters is None:
            waiters = self._held[bag_id] = deque()
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(turn)
        try:
            await asyncio.wait_for(turn, timeout)
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                # The bag was handed to us as we gave up: hand it on.
                self.release(bag_id)
            if isinstance(exc, asyncio.TimeoutError):
                raise APITimeoutError(
                    f"another refund or cancel of bag {bag_id} held it past this call's "
                    "deadline; nothing was sent",
                    request_sent=False,
                ) from None
            raise

    def release(self, bag_id: int) -> None:
        waiters = self._held.get(bag_id)
        while waiters:
            turn = waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # ownership passes to this waiter
                return
        self._held.pop(bag_id, None)

    def held(self, bag_id: int) -> bool:
        return bag_id in self._held


@attrs.frozen
class ReadBack:
    """One complete read of a bag: every page of its refunds, and its status if asked."""

    refunds: tuple[OrderRefund, ...]
    bag: OrderBag | None
    server_time: float | None
    unreadable: int = 0
    """Refund records that could not be read (skipped)."""
    listed_late: frozenset[int] = frozenset()
    """Ids listed only on pages answered after the list grew (``RefundPage``)."""


@attrs.frozen
class BagIO:
    """The I/O of one ask on one bag, as the client provides it: one send, a complete
    read of the bag's refunds (every page) and of the order, within a deadline."""

    send_once: Callable[..., Awaitable[OrderRefund]]
    """POST the request once, given the seconds left (and ``before_send=``, run right
    before it leaves, after any login)."""
    read_refunds: Callable[[float | None], Awaitable[RefundPage]]
    """Every page of the bag's refunds, retried on transient failures, by a deadline."""
    read_order: Callable[[float | None], Awaitable[Order]]
    """The order (for the bag's status), likewise."""
    bag_id: int
    path: str
    policy: RetryPolicy
    on_retry: RetryHook | None

    async def send(
        self, remaining: float | None, before_send: Callable[[], Awaitable[None]] | None = None
    ) -> OrderRefund:
        return await self.send_once(remaining, before_send=before_send)

    async def read(self, read_bag: bool, deadline: float | None) -> ReadBack:
        # The bag's status first, then its refunds: the list is then at least as new as
        # the status, so a status that shows the effect is never paired with a list
        # from before it (where another system's refund could pass for ours).
        bag = _with_currency(await self.read_order(deadline), self.bag_id) if read_bag else None
        page = await self.read_refunds(deadline)
        return ReadBack(
            tuple(page.refunds), bag, page.server_time, page.unreadable, page.listed_late
        )

    def send_backoff(self, sends: int, error: VioletError) -> float:
        return self.policy.delay_after(sends, error)

    def server_time(self, error: VioletError) -> float | None:
        headers = getattr(error, "headers", None)
        return http_date(headers.get("Date")) if isinstance(headers, Mapping) else None

    async def announce(self, ask: PendingRefund, cause: VioletError, delay: float) -> None:
        event = RetryEvent(ask.sends - 1, delay, cause, "POST", self.path, ask.doubted)
        await announce(self.on_retry, event)


def _with_currency(order: Order, bag_id: int) -> OrderBag | None:
    """The bag ``bag_id`` of ``order``; one that leaves its ``currency`` out has the
    order's (a bag's currency is its cart's base currency, which the order's is: review
    16, a record in CAD on a bag read without its currency was compared by amount, a
    miss, and the ask was sent again)."""
    bag = order.bag(bag_id)
    if bag is not None and not bag.currency and order.currency:
        bag = attrs.evolve(bag, currency=order.currency)
    return bag


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


#: Seconds by which wall time may run away from monotonic time during an ask before it
#: counts as a step of the wall clock (NTP slews far slower; a step is seconds or hours).
CLOCK_STEP = 2.0


class WallWatch:
    """Tells when this machine's wall clock stepped (NTP, an operator, a VM resumed):
    wall time and monotonic time moved apart by more than :data:`CLOCK_STEP`."""

    __slots__ = ("_clock", "_mono", "_wall")

    def __init__(self, clock: Clock, since: tuple[float, float] | None = None) -> None:
        self._clock = clock
        self._wall, self._mono = since if since is not None else (clock.time(), clock.monotonic())

    def peek(self) -> float:
        """How far the wall clock stepped since the last look, leaving the look as it
        was (0.0: it did not)."""
        return self._since(self._clock.time(), self._clock.monotonic())

    def jump(self) -> float:
        """How far the wall clock stepped since the last look (0.0: it did not)."""
        wall, mono = self._clock.time(), self._clock.monotonic()
        jump = self._since(wall, mono)
        self._wall, self._mono = wall, mono
        return jump

    def _since(self, wall: float, mono: float) -> float:
        jump = (wall - self._wall) - (mono - self._mono)
        return jump if abs(jump) > CLOCK_STEP else 0.0

    def settle(self, ask: PendingRefund) -> tuple[PendingRefund, float]:
        """``ask`` with its times moved onto the wall clock if it stepped, and the step.

        A stamped record (``wall_mono``) moved is stamped anew with this look: its times
        and its stamp name one wall clock. Moved under its old stamp, the record saved
        right after (the send's stamp) was moved by the same step once more when the
        next run resumed it (simulator seed 2093912: a step of 15 h during a re-send's
        backoff put its settle window 15 h ahead, and the batch row was parked for 15 h)."""
        jump = self.jump()
        if not jump:
            return ask, 0.0
        ask = protocol.clock_stepped(ask, jump)
        if ask.wall_mono is not None:
            ask = attrs.evolve(ask, wall_mono=(self._wall, self._mono))
        return ask, jump


#: How fast NTP may slew a wall clock (500 ppm, the kernel's limit): over hours, wall
#: and monotonic time drift apart by this much without any step.
SLEW = 0.0005


class ClockOrigin:
    """Wall and monotonic time read together once, when the client was made: a step of
    the wall clock at any time since (before a call, while it waited for its bag or
    its turn) is seen when a record of an ask is made, not only one during the ask
    (simulator seed 855859: a step of 15 h while a call waited for its bag, with no
    ``Date`` header to place Violet's clock, put its own refund "15 h before the send"
    and the refund that applied was reported a definite failure)."""

    __slots__ = ("_mono", "_wall")

    def __init__(self, clock: Clock) -> None:
        self._wall, self._mono = clock.time(), clock.monotonic()

    def step_at(self, wall: float, mono: float) -> float:
        """How far the wall clock stepped between the origin and ``(wall, mono)``, read
        together (0.0: no more than a slew could explain)."""
        jump = (wall - self._wall) - (mono - self._mono)
        return jump if abs(jump) > CLOCK_STEP + SLEW * abs(mono - self._mono) else 0.0

    def steady(self, clock: Clock) -> float:
        """The wall clock now, or earlier when it stepped forward since the origin:
        what a time limit counted on the wall clock (a key's retention) is held to,
        so that a step forward never ends one early."""
        wall, mono = clock.time(), clock.monotonic()
        return min(wall, wall - self.step_at(wall, mono))

    def as_made(self, clock: Clock) -> float:
        """The wall clock now as it would read had it not stepped since the origin
        (the origin's reading carried forward on the monotonic clock), or as it is when
        it did not: what a call's start is judged by when a refund's date must fall
        after it (``AnswerCheck.not_before``). A step back since then never makes an
        old refund look made after the start (review 36), nor a step forward a new one
        before it (seed 921142's step of 15 h)."""
        wall, mono = clock.time(), clock.monotonic()
        return wall - self.step_at(wall, mono)

    def latest(self, wall: float, mono: float) -> float:
        """``wall`` (read at ``mono``), or later when the wall clock stepped back since
        the origin: what an age counted on the wall clock is judged by on the side of
        review (a step back would make an old record look young)."""
        return max(wall, wall - self.step_at(wall, mono))

    def mark(self, ask: PendingRefund, wall: float, mono: float) -> PendingRefund:
        """``ask``, made from times read at ``(wall, mono)``, judged against this
        machine's clock both as it is and as it was at the origin when it stepped in
        between (its times stay as read: they are on the clock as it is)."""
        jump = self.step_at(wall, mono)
        if not jump:
            return ask
        # Not unsure: its times were read after the step, and it has no reading of
        # Violet's clock yet (every ``Date`` it learns is read on the clock as it is).
        # Unsure, its dates were judged within ``clock_skew`` of the send: with
        # Violet's clock ahead by less than that, another system's refund made a
        # minute before the send passed for its own (simulator seed 922284).
        return attrs.evolve(ask, stepped=ask.stepped + jump)

    def recall(self, ask: PendingRefund) -> PendingRefund:
        """``ask``, a record stamped (``wall_mono``) by a process on this machine, this
        one or another, judged against this machine's clock as it was at the origin too
        when the clock stepped forward between the origin and the stamp by more than the
        record knows of (``stepped``): the process that wrote it may have been made
        after the step, or seen only part of it, and no watch of its own could see it
        (simulator seed 1079285: a second process on a key's store, made after steps of
        18 h, sent the key's ask, a 504 that applied, and ended pending; with no
        ``Date`` header its refund looked 18 h older than the send by its clock, "made
        long before", and this process, resuming it on the key's next call, proved it
        absent and sent it again). Only forward, and only further than the record's
        own reading: the clock as it was is then earlier than every reading the record
        holds, which only widens what a refund's date may be (for review, never a
        claim or proof of absence that the record alone would not give)."""
        if ask.wall_mono is None:
            return ask
        wall, mono = ask.wall_mono
        if mono < self._mono:
            # Stamped before this client was made: the step since the stamp (which the
            # driver moves it by) holds every step this client saw.
            return ask
        jump = self.step_at(wall, mono)
        if jump <= 0.0 or ask.stepped < 0.0 or jump <= ask.stepped:
            return ask
        return attrs.evolve(ask, stepped=jump)


#: Seconds by which a send may leave after the time its saved record gives before the
#: record is saved again (a resume allows one attempt's timeout on top of the time).
RESTAMP_AFTER = 0.25

Announce = Callable[[PendingRefund, VioletError, float], Awaitable[None]]
Save = Callable[[PendingRefund], Awaitable[None]]
Listed = Callable[[frozenset[int]], None]


async def drive(  # noqa: PLR0915 - the driver's one loop over the protocol's steps, on purpose
    ask: PendingRefund,
    action: Action,
    *,
    io: BagIO,
    settings: Settings,
    clock: Clock,
    deadline: float | None,
    known: Container[int],
    last_error: VioletError | None = None,
    save: Save | None = None,
    announce: Announce | None = None,
    patience: float | None = None,
    watch: WallWatch | None = None,
    listed: Listed | None = None,
) -> OrderRefund:
    """Perform ``action`` and every one that follows until the ask ends.

    Returns the refund; raises the last failure when the ask definitely did not apply,
    and AmbiguousOutcomeError carrying the record when it is pending. ``save`` sees the
    record before every send and at the end (the batch journal); ``announce`` is told
    of every re-send (the ``on_retry`` hook); ``listed`` of what the first complete
    read after the ask's first send listed (``PendingRefund.listed_after_send``), after
    every step that knows it (no save: the record a cancel hands out carries it).
    """

    watch = watch or WallWatch(clock)

    async def stamp() -> None:
        # The request leaves now, later than the saved record says when a login, a
        # token renewal or a rate wait came between: the record must say so, or a
        # resume elsewhere (after a crash) would settle too early and send again while
        # this send can still commit. When it is the ask's first send, the window a
        # refund's date must sit in starts now too (nothing of it can have applied
        # before): a refund another system made while it waited for a login is never
        # taken for its own.
        nonlocal ask
        if save is not None:
            ask = await _stamp_leaving(ask, clock, watch, save, unstamped=unstamped)

    unstamped = False  # the saved record says "not sent" until it leaves (_save_planned)

    try:
        while True:
            planned = action.final or action.do is Do.SEND or _waits_absent(ask)
            if planned:
                ask = _stamped(ask, action, known, clock, settings)
            if save is not None and planned:
                unstamped = await _save_planned(ask, action, save)
            if action.final:
                return _end(ask, action, last_error)
            if action.do is Do.SEND and ask.sends > 1 and announce is not None and last_error:
                await announce(ask, last_error, action.delay)
            if action.delay > 0:
                await clock.sleep(action.delay)
            remaining = None if deadline is None else deadline - clock.monotonic()
            ask, _ = watch.settle(ask)
            at = clock.time()
            obs: Observation
            if action.do is Do.SEND:
                ATTEMPT.set(ask.sends)
                try:
                    refund = await io.send(remaining, stamp if save is not None else None)
                except VioletError as exc:
                    last_error = exc
                    obs = Observation.send_failed(
                        at,
                        exc,
                        backoff=io.send_backoff(ask.sends, exc),
                        server_time=io.server_time(exc),
                        received_at=clock.time(),
                    )
                else:
                    obs = Observation.answered(at, refund)
            else:
                obs, failed = await _read_back(
                    ask, action, at, io=io, deadline=deadline, settings=settings, clock=clock
                )
                last_error = last_error or failed
                learn = getattr(known, "learn", None)
                if obs.refunds and obs.kind is ObsKind.READ and learn is not None:
                    # Records of refunds handed out without their id become known.
                    learn(ask.bag_id, obs.refunds)
            ask, jump = watch.settle(ask)
            if jump:
                obs = attrs.evolve(obs, at=obs.at + jump)  # its start moves with the clock
            remaining = None if deadline is None else deadline - clock.monotonic()
            baseline = ask.phase in (Phase.NEW, Phase.ABSENT)
            ask, action = protocol.step(
                ask, obs, settings, clock.time(), remaining, known, patience=patience
            )
            if listed is not None and ask.listed_after_send is not None:
                listed(ask.listed_after_send)
            if obs.kind is not ObsKind.ANSWERED:
                _report(ask, obs, action, baseline=baseline)
    finally:
        ATTEMPT.set(1)


async def _stamp_leaving(
    ask: PendingRefund, clock: Clock, watch: WallWatch, save: Save, *, unstamped: bool
) -> PendingRefund:
    """Save ``ask`` as the send leaving now must have it saved first (:func:`_restamped`),
    and again if that save itself took time (a fleet's send slot, waited for as the
    send is recorded): the request leaves when the saves are done, and a window opened
    before that wait would take a refund another system made during it for its own.

    The time is read on the wall clock as the watch last saw it: a step while it waited
    (the login) moves it with the record's other times (and the send's observation)
    after the send, once (review 17: counted twice, the window opened an hour after the
    send and its own refund was left for review)."""
    for forced in (unstamped, False):
        stamped = _restamped(ask, clock.time() - watch.peek(), unstamped=forced)
        if stamped is None:
            break
        await save(ask := stamped)
    return ask


def _restamped(ask: PendingRefund, now: float, *, unstamped: bool) -> PendingRefund | None:
    """The record as the send leaving ``now`` must save it first (None: as saved).

    Saved again when the request leaves later than its record says (a login, a token
    renewal, a rate wait), or when the record saved says it has not left yet
    (``unstamped``: see :func:`_not_sent_yet`). When the window opens at this send (the
    ask's first, or one after every earlier send was proven not applied: a 429, a
    connection never opened), it opens now.

    A step of the wall clock before a re-send that opens the window anew left the
    record's earlier times, and its reading of Violet's clock, unsure (moved by the
    step; or not, were it a suspend). None of them matters now: Violet's clock is read
    afresh by the Date of this send's answer and what follows (readings that disagree
    make it unsure again). Held to the step's doubt, a refund another system made
    seconds before this send passed for its own (simulator seed 920240). The step
    itself (``stepped``) is kept: a Date agreeing only with the clock after a step of
    hours is still not trusted alone (seed 605311)."""
    opens = _opens_window(ask)
    late = now - (ask.last_sent_at or now) > RESTAMP_AFTER
    afresh = _opens_anew(ask) and ask.clock_unsure and ask.offsets is None
    if not (late or afresh or unstamped):
        return None
    ask = attrs.evolve(ask, first_sent_at=now if opens else ask.first_sent_at, last_sent_at=now)
    if afresh:
        ask = attrs.evolve(ask, server_offset=None, clock_unsure=False)
    return ask


def _opens_window(ask: PendingRefund) -> bool:
    """The window a refund's date must sit in opens at this send: the ask's first, or
    a re-send after every earlier send was proven not applied
    (``protocol._send(proven=True)``)."""
    return ask.first_sent_at == ask.last_sent_at


def _opens_anew(ask: PendingRefund) -> bool:
    """A re-send whose window opens at it (every earlier send proven not applied)."""
    return ask.sends > 1 and _opens_window(ask)


async def _save_planned(ask: PendingRefund, action: Action, save: Save) -> bool:
    """Save ``ask`` as planned (before a send, or as it ends); True when the record
    saved says "not sent" until the request leaves (the stamp saves it sent).

    A re-send that opens the window anew (every earlier send was proven not applied)
    is saved as not sent until it leaves (stamp() saves it sent, right before): a
    caller who cancels, or a process that dies, during a wait before it leaves (a
    429's Retry-After, a backoff, a login) leaves a record that says so. Saved as sent
    at the time it was planned for, a repeat read the bag back and took a refund
    another system made during the wait for the one it never sent (simulator seed
    923128; with no wait but a login that never connected, a batch run resuming a
    429'd row died during it and the next run took another system's refund made 3.6 s
    before that record's time: seed 1097210).

    An ask's first send is not saved here at all: the stamp saves it sent right before
    it leaves (after any login or rate wait), and until then the record stays as it
    was (new, or none). Saved sent before a slow login, a caller who cancelled during
    it (nothing left) had a repeat read the bag back and take a refund another system
    made meanwhile for its own (review 19)."""
    first = action.do is Do.SEND and _first_send(ask)
    unstamped = first or (action.do is Do.SEND and _opens_anew(ask))
    if not first:
        await save(_not_sent_yet(ask) if unstamped else ask)
    return unstamped


def _waits_absent(ask: PendingRefund) -> bool:
    """A 429's wait before the read and re-send: every send so far proven not applied,
    saved so (a caller who cancels during the wait, a process that dies in it, leaves
    a record a resume sends again, never reads back as "may have applied")."""
    return ask.phase is Phase.ABSENT


def _first_send(ask: PendingRefund) -> bool:
    """The ask's first send (its window opens at it; nothing of it was sent before)."""
    return ask.sends == 1 and _opens_window(ask)


def _not_sent_yet(ask: PendingRefund) -> PendingRefund:
    """The record of a re-send that opens the window anew, as it stands until the
    request leaves: every send so far proven not applied (``ABSENT``: a resume sends it
    again, its window from that send)."""
    return attrs.evolve(ask, phase=Phase.ABSENT, sends=ask.sends - 1, settle_until=None)


def _held_back(ask: PendingRefund) -> BagPendingError:
    """Another ask of this client is pending on the bag: a send now could be claimed as
    that one's refund (its record, handed out before this refund existed, cannot name
    it), as for a new ask. Nothing is sent or saved; the caller's record stays as it
    was (the client fills in the pending records)."""
    return BagPendingError(
        f"bag {ask.bag_id} has another refund or cancel from this client still pending; "
        f"this {ask.kind} was not sent again: resume the pending one first "
        "(error.pending), then this record",
        pending=(),
    )


def _stamped(
    ask: PendingRefund, action: Action, known: Container[int], clock: Clock, settings: Settings
) -> PendingRefund:
    """``ask`` as it is saved (before a send) or ends; a send is held back while another
    ask of this client is pending on the bag (:func:`_held_back`)."""
    if action.do is Do.SEND and settings.others_pending:
        raise _held_back(ask)
    unnamed = getattr(known, "unnamed", None)
    if unnamed is not None:
        # Refunds other calls got here without their id: a resume of this record in
        # another process never claims one of them.
        ask = with_unnamed(ask, unnamed(ask.bag_id))
    # What a resume in this process compares with, to see a step of the wall clock
    # between this call and that one. Only on a record whose times are on this
    # process's clock: another process's times (no Date yet to move them here) with
    # this process's readings would be moved by a "step" that is two machines' clocks
    # apart, when that process resumes it.
    here = settings.clock_id or PROCESS_CLOCK
    return attrs.evolve(
        ask,
        wall_mono=(clock.time(), clock.monotonic()) if same_machine(ask.clock, here) else None,
    )


def _end(ask: PendingRefund, action: Action, last_error: VioletError | None) -> OrderRefund:
    """The refund of a final action, or the error that ends the ask."""
    if action.do is Do.RETURN and action.refund is not None:
        return action.refund
    if action.do is Do.FAIL:
        if last_error is not None and ask.note in (
            protocol.BASELINE_READ_FAILED,
            protocol.RESEND_READ_FAILED,
        ):
            # Nothing was sent, or nothing more after sends proven not applied: the
            # ask may be asked again (``outcome_of``).
            last_error._before_send = True
        raise last_error or VioletError(
            f"the {ask.kind} of bag {ask.bag_id} did not apply ({ask.note}); nothing more was sent"
        )
    if action.do is Do.PARK:
        raise _ambiguous(ask, action, last_error)
    if action.do is Do.HOLD:
        raise RefundAlreadyPresentError(ask.note, refunds=action.candidates)
    if action.do is Do.DEFER and last_error is not None:
        raise RateLimitDeferred(ask, action.delay, last_error)
    raise protocol.ProtocolError(f"a final {action.do.value} without what it ends with")


async def _read_back(
    ask: PendingRefund,
    action: Action,
    at: float,
    *,
    io: BagIO,
    deadline: float | None,
    settings: Settings,
    clock: Clock,
) -> tuple[Observation, VioletError | None]:
    """One read-back, as the protocol observes it (and the failure, if it failed)."""
    try:
        with read_span(ask):
            found = await io.read(action.read_bag, deadline)
    except VioletError as exc:
        listed = exc._listed
        return Observation.read_failed(at, exc, backoff=settings.settle_delay, refunds=listed), exc
    return (
        Observation.read(
            at,
            found.refunds,
            found.bag,
            server_time=found.server_time,
            received_at=clock.time(),
            unreadable=found.unreadable,
            listed_late=found.listed_late,
        ),
        None,
    )


async def after_failed_send(
    ask: PendingRefund,
    error: VioletError,
    *,
    io: BagIO,
    settings: Settings,
    clock: Clock,
    deadline: float | None,
    known: Container[int],
    save: Save | None = None,
    sent_mono: float | None = None,
    listed: Listed | None = None,
) -> OrderRefund:
    """Take over an ask whose first send (made inline by the client, so the happy path
    builds no record) failed with ``error``. ``save`` and ``listed`` as for :func:`drive`;
    ``sent_mono`` is the monotonic time it left at (so that a wall clock step during it
    is seen)."""
    sent_at = ask.last_sent_at if ask.last_sent_at is not None else clock.time()
    watch = WallWatch(clock, None if sent_mono is None else (sent_at, sent_mono))
    ask, jump = watch.settle(ask)
    sent_at += jump
    obs = Observation.send_failed(
        sent_at,
        error,
        backoff=io.send_backoff(ask.sends, error),
        server_time=io.server_time(error),
        received_at=clock.time(),
    )
    remaining = None if deadline is None else deadline - clock.monotonic()
    ask, action = protocol.step(ask, obs, settings, clock.time(), remaining, known)
    return await drive(
        ask,
        action,
        io=io,
        settings=settings,
        clock=clock,
        deadline=deadline,
        known=known,
        last_error=error,
        save=save,
        announce=io.announce,
        watch=watch,
        listed=listed,
    )


async def run_ask(
    ask: PendingRefund,
    *,
    io: BagIO,
    settings: Settings,
    clock: Clock,
    deadline: float | None,
    known: Container[int],
    attempt_timeout: float,
    save: Save | None = None,
    patience: float | None = None,
    listed: Listed | None = None,
) -> OrderRefund:
    """An ask from its start: a new one (after a baseline read when asked), or one an
    earlier call or process left sent or pending (read back first). ``save`` and
    ``listed`` as for :func:`drive`."""
    here = settings.clock_id or PROCESS_CLOCK
    if ask.wall_mono is not None and same_machine(ask.clock, here):
        # Left by this process, or another on this machine (one monotonic clock): a
        # step of the wall clock since moves the record's times with it (a forward step
        # must not end a settle window early).
        ask, _ = WallWatch(clock, ask.wall_mono).settle(ask)
    ask, action = protocol.start(ask, settings, clock.time(), attempt_timeout=attempt_timeout)
    return await drive(
        ask,
        action,
        io=io,
        settings=settings,
        clock=clock,
        deadline=deadline,
        known=known,
        save=save,
        announce=io.announce,
        patience=patience,
        listed=listed,
    )


#: What the next action says about the read-back (or send failure) just observed.
_VERDICTS = {
    Do.RETURN: "found",
    Do.SEND: "absent",
    Do.READ: "not yet",
    Do.PARK: "pending",
    Do.HOLD: "already present",
    Do.FAIL: "not applied",
    Do.DEFER: "rate limited, deferred",
}


def _report(ask: PendingRefund, obs: Observation, action: Action, *, baseline: bool) -> None:
    """One INFO line (and a metric) per read-back or failed send: what the protocol
    concluded from it. Ids, counts and times only."""
    verdict = "baseline" if baseline and action.do is Do.SEND else _VERDICTS[action.do]
    if obs.kind is ObsKind.READ:
        count_readback(verdict)
        what = f"read back {len(obs.refunds)} refund(s)"
    elif obs.kind is ObsKind.READ_FAILED:
        count_readback("read failed")
        what = f"read-back failed ({type(obs.error).__name__})"
    else:
        what = f"send {ask.sends} failed ({type(obs.error).__name__})"
    reconcile_log.info(
        "%s of bag %d (order %d): %s: %s%s",
        ask.kind,
        ask.bag_id,
        ask.order_id,
        what,
        verdict,
        f", next in {action.delay:.1f}s" if action.delay else "",
    )


def _ambiguous(
    ask: PendingRefund, action: Action, cause: VioletError | None
) -> AmbiguousOutcomeError:
    what = f"{ask.kind} of bag {ask.bag_id} (order {ask.order_id})"
    first = f"{cause}; " if cause is not None else ""
    hint = (
        "check the bag before doing anything else"
        if ask.needs_review
        else "nothing was re-sent; resume it later with client.resume(error.pending)"
    )
    error = AmbiguousOutcomeError(
        f"{first}the {what} may or may not have applied: {ask.note}. {hint}",
        request=ask.request,
        attempts=ask.sends,
        candidates=action.candidates,
        pending=ask,
    )
    error.__cause__ = cause
    return error
