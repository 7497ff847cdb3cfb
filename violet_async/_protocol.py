"""The protocol of one ask: a refund or a cancel of one bag, and when it may be re-sent.

Violet has no idempotency key, so the only thing that keeps a shopper from being
refunded twice is this rule:

    **Re-send only on positive evidence that the earlier send did not apply.**

Evidence is one of: the request provably never left (the connection was never
established); a 429; or read-backs of the bag that all miss it over a *settle window*
long enough for a request still running at Violet to finish and for its refund list to
show it. A few quick reads that miss are not evidence.

Everything here is a decision, never I/O: the observations the driver reports, the
actions it performs, and :func:`step`, a pure function from (record, observation, time)
to (next record, next action). The record of an ask (:class:`PendingRefund`, also what
``AmbiguousOutcomeError.pending`` carries and what the batch journal stores) and its
phases are in ``_ask.py``; the matching rule (which refund on a bag is this ask's) in
``_matching.py``; the driver that performs the actions in ``_reconcile.py``. A
simulator can drive the same ``step``.

Phases and their moves (anything else is a bug and raises ``ProtocolError``)::

    NEW     --baseline read-->  NEW      (read_before_send: note what the bag holds)
    NEW     --send-->           SENT
    SENT    --2xx-->            APPLIED  (the refund came back)
    SENT    --never left-->     SENT     (re-send after backoff; the window of its
                                          refund starts at that send) | FAILED (out
                                          of budget)
    SENT    --429-->            ABSENT   (read the bag after the wait; what it lists
                                          is not this ask's) | FAILED (out of budget)
    ABSENT  --read-->           SENT     (the re-send; its window starts there)
    ABSENT  --read failed-->    ABSENT   (nothing listed: read again, never sent past)
                                         | FAILED (the deadline: nothing more sent)
    SENT    --429 (deferred)--> ABSENT   (DEFER: the caller paces it and sends it again)
    ABSENT  --resume-->         ABSENT   (read the bag first, as after a 429's wait;
                                          a fresh budget; a deferred ask too, once
                                          DEFER's caller has paced it)
    SENT    --4xx-->            FAILED   (nothing applied) | SENT (an earlier send may
                                          have: read back, never a definite failure)
    SENT    --may have applied, read back:
                one clear match            --> APPLIED (reconciled)
                several, or a near match   --> PENDING (ask a human; never guessed)
                a miss inside the window   --> SENT    (read again later)
                a miss after the window    --> ABSENT  --> SENT (the only re-send)
                the deadline ends first    --> PENDING (resume later)
    PENDING --resume-->         SENT     (read back again by the same rule)

Classification of a failed refund / cancel POST (also in README):

=========================================================  ==============================
failure                                                    what it proves
=========================================================  ==============================
connection never established (refused, DNS, connect or     did not apply: re-send with
pool timeout); 429                                         backoff
Violet's application answered: any 5xx whose body is       may have applied and may still
Violet's own error JSON                                    be running (``settle_running``)
a 2xx whose body cannot be read or does not fit the        applied: read back, never
request (another order, bag or amount)                     re-sent; pending if not found
no answer from Violet's application: read timeout,         may have applied and may still
dropped connection, any other 5xx (a gateway's 502 /       be running there
503 / 504 / 524, a proxy's 598 / 599, an HTML 500), or a    (``settle_running``)
1xx / 3xx final answer (a 303 See Other to what it made)
any other 4xx                                              did not apply; but after an
                                                           earlier "may have applied"
                                                           send: read back, then pending
=========================================================  ==============================
"""

from __future__ import annotations

import enum
from collections.abc import Container, Sequence
from typing import Any

import attrs
import orjson

from ._ask import (
    PROCESS_CLOCK,
    PendingRefund,
    Phase,
    ProtocolError,
    Settings,
    clock_stepped,
    on_this_machine,
    with_unnamed,
)
from ._matching import (
    WRONG_OFFSET_SPAN,
    Verdict,
    cannot_tell,
    content,
    judge,
    match,
    needs_bag,
    on_bag,
    on_order,
    placeholder_date,
    places_nothing,
    unix_time,
)
from .exceptions import (
    APIConnectionError,
    APIError,
    CancellationFailedError,
    RateLimitError,
    ResponseFormatError,
    VioletError,
)
from .models import OrderBag, OrderRefund

__all__ = [
    "Action",
    "Cause",
    "Do",
    "ObsKind",
    "Observation",
    "PendingRefund",
    "Phase",
    "ProtocolError",
    "Settings",
    "classify_send_failure",
    "clock_stepped",
    "match",
    "start",
    "step",
]


class Cause(enum.Enum):
    """What a failed send says about whether it applied."""

    NEVER_LEFT = "never_left"
    """The connection was never established: Violet cannot have seen it."""
    RATE_LIMITED = "rate_limited"
    """429: refused before anything was done."""
    REFUSED = "refused"
    """Any other 4xx (or a cancel Violet reports as failed): not applied."""
    ANSWERED = "answered"
    """Violet's application answered with an error (its own 5xx JSON): may have applied,
    and its call to the merchant platform may still be running."""
    NO_ANSWER = "no_answer"
    """No answer from Violet's application: may have applied, may still be running."""
    APPLIED = "applied"
    """A 2xx whose body could not be read or did not fit the request: it applied (a 2xx
    proves it), so it is read back and never sent again."""


def is_violet_error_body(body: bytes) -> bool:
    """True when ``body`` is Violet's own error JSON (``message`` plus ``error_code`` or
    ``status``), as opposed to a gateway's page or text."""
    if not body or body[:1] != b"{":
        return False
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("message"), str)
        and ("error_code" in data or "status" in data)
    )


def classify_send_failure(exc: VioletError) -> Cause:
    """The classification table of this module's docstring, as code."""
    if exc._retries_spent:
        # Getting a token failed (after the auth step's own retries) before the
        # request could leave: not applied, and not worth more logins.
        return Cause.REFUSED
    if isinstance(exc, APIConnectionError):
        return Cause.NO_ANSWER if exc.request_sent else Cause.NEVER_LEFT
    if isinstance(exc, RateLimitError):
        return Cause.RATE_LIMITED
    if isinstance(exc, APIError):
        if exc.status >= 500:
            # Only Violet's own error body proves its application answered: any other
            # 5xx (a gateway's 502/503/504/524, a proxy's 598/599, an HTML 500) may have
            # come while Violet was still working.
            return Cause.ANSWERED if is_violet_error_body(exc.body) else Cause.NO_ANSWER
        if 400 <= exc.status < 500:
            return Cause.REFUSED
        # A 1xx or 3xx as the final answer to a POST (a 303 See Other to what it made,
        # a redirect a proxy added) proves nothing either way: it may have applied.
        return Cause.NO_ANSWER
    if isinstance(exc, CancellationFailedError):
        return Cause.REFUSED
    if isinstance(exc, ResponseFormatError):
        # A 2xx proves it applied, even when its body cannot be read or names another
        # refund; any other answer we could not read may have come from a gateway.
        return Cause.APPLIED if 200 <= exc.status < 300 else Cause.NO_ANSWER
    # Anything else we cannot place: assume the worst.
    return Cause.NO_ANSWER


# -- observations and actions -------------------------------------------------------


class ObsKind(enum.Enum):
    ANSWERED = "answered"
    SEND_FAILED = "send_failed"
    READ = "read"
    READ_FAILED = "read_failed"


@attrs.frozen
class Observation:
    """What the driver saw after performing an action."""

    kind: ObsKind
    at: float
    """Client wall time when the action started (a read counts from its start)."""
    refund: OrderRefund | None = None
    error: VioletError | None = None
    refunds: Sequence[OrderRefund] = ()
    bag: OrderBag | None = None
    """The bag as ``GET /orders/{id}`` shows it, when it was read."""
    server_time: float | None = None
    """Violet's ``Date`` header as Unix time, when the answer had one."""
    received_at: float | None = None
    """Client wall time when that answer arrived."""
    backoff: float = 0.0
    """For a safe failure: how long to wait before sending again (Retry-After or
    jittered backoff, drawn by the driver so step stays deterministic)."""
    unreadable: int = 0
    """Refund records the read-back could not read (skipped): they can only make the
    outcome pending, never a claim and never absence."""
    listed_late: frozenset[int] = frozenset()
    """Ids the read listed only on pages answered after the list grew while it ran:
    each may have been made since the read began (never "listed by the first read
    after the send")."""

    @classmethod
    def answered(cls, at: float, refund: OrderRefund) -> Observation:
        return cls(ObsKind.ANSWERED, at, refund=refund)

    @classmethod
    def send_failed(
        cls,
        at: float,
        error: VioletError,
        *,
        backoff: float = 0.0,
        server_time: float | None = None,
        received_at: float | None = None,
    ) -> Observation:
        return cls(
            ObsKind.SEND_FAILED,
            at,
            error=error,
            backoff=backoff,
            server_time=server_time,
            received_at=received_at,
        )

    @classmethod
    def read(
        cls,
        at: float,
        refunds: Sequence[OrderRefund],
        bag: OrderBag | None = None,
        *,
        server_time: float | None = None,
        received_at: float | None = None,
        unreadable: int = 0,
        listed_late: frozenset[int] = frozenset(),
    ) -> Observation:
        return cls(
            ObsKind.READ,
            at,
            refunds=refunds,
            bag=bag,
            server_time=server_time,
            received_at=received_at,
            unreadable=unreadable,
            listed_late=listed_late,
        )

    @classmethod
    def read_failed(
        cls,
        at: float,
        error: VioletError,
        *,
        backoff: float = 0.0,
        refunds: Sequence[OrderRefund] = (),
    ) -> Observation:
        """``refunds``: what the pages that answered listed (a read that failed on a
        later page); only the read before a re-send after a 429 uses them."""
        return cls(ObsKind.READ_FAILED, at, error=error, backoff=backoff, refunds=refunds)


class Do(enum.Enum):
    SEND = "send"
    READ = "read"
    RETURN = "return"
    FAIL = "fail"
    PARK = "park"
    HOLD = "hold"
    """Not sent: the bag already holds this refund (``Settings.hold_if_present``)."""
    DEFER = "defer"
    """Not applied (a 429): send again after ``delay``, in the caller's own time
    (``Settings.defer_rate_limited``)."""


@attrs.frozen
class Action:
    """What the driver must do next: wait ``delay`` seconds, then the thing."""

    do: Do
    delay: float = 0.0
    refund: OrderRefund | None = None
    """RETURN: the refund to hand the caller."""
    candidates: tuple[OrderRefund, ...] = ()
    """PARK: refunds that could be this ask's."""
    read_bag: bool = False
    """READ: also read the bag's status (``GET /orders/{id}``)."""

    @property
    def final(self) -> bool:
        return self.do in (Do.RETURN, Do.FAIL, Do.PARK, Do.HOLD, Do.DEFER)


# -- transitions --------------------------------------------------------------------


#: How the note of an absent record parked for review begins (said once, however often
#: it is resumed).
_REVIEWED_ABSENT = "parked for review before any re-send left"

#: The note of an ask whose baseline read failed after its own retries: nothing of it
#: was sent (the driver tells such a failure by it: ``_reconcile._end``).
BASELINE_READ_FAILED = "the baseline read failed"

#: The note of an ask whose read before a re-send (every send so far proven not
#: applied) failed until its deadline: nothing more was sent (``_reconcile._end``).
RESEND_READ_FAILED = "the read before a re-send failed; every send was proven not applied"


def _refused(error: VioletError | None) -> bool:
    """A read Violet refused (400, 401, 403, 404): reading again does not mend it."""
    return isinstance(error, APIError) and error.status in (400, 401, 403, 404)


def start(
    ask: PendingRefund, settings: Settings, now: float, *, attempt_timeout: float
) -> tuple[PendingRefund, Action]:
    """The first action for ``ask``: send a new one (after a baseline read if asked),
    read back one that was sent before (resume)."""
    if ask.phase is Phase.NEW:
        if settings.read_before_send and ask.baseline is None:
            return ask, Action(Do.READ, read_bag=False)
        return _send(ask, now)
    if ask.phase in (Phase.SENT, Phase.PENDING):
        settle = ask.settle_until
        if settle is None:
            # Sent by a process that stopped before it learned anything: the send may
            # have run as long as an attempt can, and then still be running at Violet.
            sent = ask.last_sent_at if ask.last_sent_at is not None else now
            settle = sent + attempt_timeout + settings.settle_running
        here = settings.clock_id or PROCESS_CLOCK
        # Another process's times, offset never learned (again, when the record comes
        # back from another process that took it onto its own clock: review 15).
        newly_unsure = ask.clock != here and ask.server_offset is None
        unsure = ask.clock_unsure or newly_unsure
        if newly_unsure and (ask.settle_until is not None or ask.last_sent_at is not None):
            # Its times are another process's clock, offset never learned: allow for
            # that clock being off by as much as the skew tolerance (also for a window
            # built above from its send: review 16, another host's clock 40 s behind
            # ended it 40 s early and the request was sent again while it ran). A
            # record that learned Violet's offset there gets it while no Date here has
            # moved its times (``_after_read``).
            settle += settings.clock_skew
        ask = attrs.evolve(
            ask,
            phase=Phase.SENT,
            settle_until=settle,
            doubted=True,
            reads=0,
            budget_from=ask.sends,
            clock_unsure=unsure,
            # Another process's times, offset never learned: from now on they are
            # taken as this process's clock (the skew allowed for above covers the
            # difference), which dates what it adds (a re-send, its settle window) and
            # sees its own steps between two resumes here (review 14: a step of an
            # hour between them ended a window 10 s after a 5xx).
            clock=here if newly_unsure else ask.clock,
        )
        return ask, Action(Do.READ, read_bag=_reads_bag(ask))
    if ask.phase is Phase.ABSENT:
        if ask.needs_review:
            # Parked for review before any re-send left (held back by another ask on
            # the bag, or a copy parked for review merged into it): nothing is read or
            # sent (seed 1202091; review 28).
            return _still_for_review(ask)
        # Left after a 429 (deferred, or a wait cut short): every earlier send is proven
        # not applied, so it is sent again, with a fresh attempt budget (the caller's
        # pacing bounds the rest).
        here = settings.clock_id or PROCESS_CLOCK
        if ask.clock != here:
            # Another process's record: its window opens at this send, on this clock,
            # and what it learned of Violet's clock there is of that process's clock.
            # Kept, the first Date here "moved" this send's time by the two hosts'
            # difference: its window opened that long before it left, and another
            # system's refund made then passed for its own (review 19).
            ask = attrs.evolve(
                ask,
                clock=here,
                server_offset=None,
                offsets=None,
                offsets_moved=False,
                clock_unsure=False,
                wall_mono=None,
            )
        # The bag is read before the re-send, as a call that waits a 429 out in place
        # does: a record a call left in that wait (its caller cancelled, its process
        # died, its key was taken over: review 27), and a 429 a batch or fleet
        # deferred to its merchant's turn (review 28). Sent at once, another system's
        # refund made during the wait, no Date to date it by, was taken for its own.
        ask = attrs.evolve(ask, budget_from=ask.sends, settle_until=None, reads=0)
        return ask, Action(Do.READ, read_bag=False)
    raise ProtocolError(f"cannot start an ask in phase {ask.phase.value}")


def _send(
    ask: PendingRefund, now: float, delay: float = 0.0, *, proven: bool = False
) -> tuple[PendingRefund, Action]:
    """Send (again) after ``delay``. ``proven``: the answer to the last send proved that
    nothing of this ask applied (a 429, a connection never opened; every earlier send
    was proven absent before that one left): a refund can be this ask's only from this
    send on, so the window its date must sit in (``first_sent_at``, the matching rule's
    "after the send") starts here. A refund another system made while this ask waited
    to send again is then never taken for its own."""
    sent_at = now + delay
    first = ask.first_sent_at if ask.first_sent_at is not None and not proven else sent_at
    return (
        attrs.evolve(
            ask,
            phase=Phase.SENT,
            sends=ask.sends + 1,
            first_sent_at=first,
            last_sent_at=sent_at,
            reads=0,
        ),
        Action(Do.SEND, delay=delay),
    )


def _window_at_last_send(ask: PendingRefund) -> bool:
    """The window a refund of ``ask`` must sit in opened at its last send: every send
    before it was proven not applied by Violet's own answer (a 429, a connection never
    opened), none by read-backs alone (a refund of such a send may still show late)."""
    return ask.first_sent_at is None or ask.first_sent_at == ask.last_sent_at


#: Two ``Date`` readings further apart than this disagree (a Date has whole seconds,
#: and an answer's time in flight blurs it a little more).
OFFSET_DISAGREES = 10.0


def _with_offset(ask: PendingRefund, obs: Observation, here: str) -> PendingRefund:
    """The record with Violet's clock offset learned from ``obs`` (if it had a Date).

    A record whose times were written by another process (resumed elsewhere) has them
    moved onto this process's clock first: the instants Violet's clock gives them stay
    the same. ``Date`` readings that disagree (a CDN stamping its own, a clock that
    jumped) make the clock unsure: every offset between them is kept."""
    if obs.server_time is None or obs.received_at is None:
        return ask
    # The Date header has whole seconds; its half-second middle is the best estimate.
    offset = obs.server_time + 0.5 - obs.received_at
    # A process on this machine read the same wall clock, and its record's stamp let
    # the driver move it by any step since (``run_ask``): its offset is a reading of
    # the same clock, never a reason to move its times (moved by a Date that jumped
    # 3 h, a record's send landed hours early and another system's refund made 10 s
    # before it was claimed in a third process: simulator seed 931604).
    ours = on_this_machine(ask, here)
    if ours or ask.server_offset is None:
        previous = ask.server_offset if ours else None
        offsets = ask.offsets
        if offsets is not None:
            offsets = (min(offsets[0], offset), max(offsets[1], offset))
        elif previous is not None and abs(offset - previous) > OFFSET_DISAGREES:
            offsets = (min(offset, previous), max(offset, previous))
        if offsets == ask.offsets and ask.server_offset == offset and ask.clock == here:
            return ask
        return attrs.evolve(
            ask,
            server_offset=offset,
            clock=here,
            offsets=offsets,
            clock_unsure=ask.clock_unsure or offsets is not None,
        )
    shift = ask.server_offset - offset
    moved = attrs.evolve(
        ask,
        server_offset=offset,
        clock=here,
        first_sent_at=None if ask.first_sent_at is None else ask.first_sent_at + shift,
        last_sent_at=None if ask.last_sent_at is None else ask.last_sent_at + shift,
        settle_until=None if ask.settle_until is None else ask.settle_until + shift,
    )
    if abs(shift) <= OFFSET_DISAGREES:
        return moved
    # The two processes' Date headers disagree: either their clocks do (the shift is
    # right) or one of the headers is not Violet's (a CDN stamping its own: then the
    # times were right as they were). Both readings stand: the settle window ends at
    # the later of the two, and dates are judged against both offsets (unsure).
    # (Offsets the other process kept are moved onto this clock with its times.)
    readings = (offset, offset - shift, *(o - shift for o in ask.offsets or ()))
    return attrs.evolve(
        moved,
        settle_until=None
        if ask.settle_until is None
        else max(ask.settle_until, ask.settle_until + shift),
        offsets=(min(readings), max(readings)),
        offsets_moved=True,
        clock_unsure=True,
    )


def _park(
    ask: PendingRefund,
    note: str,
    candidates: Sequence[OrderRefund] = (),
    *,
    review: bool = False,
) -> tuple[PendingRefund, Action]:
    # Review is sticky: a record a person has to look at never settles by itself.
    parked = attrs.evolve(
        ask, phase=Phase.PENDING, note=note, needs_review=review or ask.needs_review
    )
    return parked, Action(Do.PARK, candidates=tuple(candidates))


def step(
    ask: PendingRefund,
    obs: Observation,
    settings: Settings,
    now: float,
    remaining: float | None,
    known: Container[int] = (),
    *,
    patience: float | None = None,
) -> tuple[PendingRefund, Action]:
    """The next record and action. Pure: no await, no clock, no randomness.

    ``now`` is the client's wall time, ``remaining`` the seconds left of the call's
    deadline (None: no deadline), ``known`` refund ids already handed to callers.
    ``patience`` caps a settle wait: longer, and the ask is parked rather than waited
    for (a batch revisits it later and lets other items through meanwhile).
    """
    ask = _with_offset(ask, obs, settings.clock_id or PROCESS_CLOCK)
    if obs.kind is ObsKind.ANSWERED:
        if ask.phase is not Phase.SENT or obs.refund is None:
            raise ProtocolError(f"an answer in phase {ask.phase.value}")
        made = obs.refund.id
        note = ""
        if made is not None and (made in (ask.baseline or ()) or made in ask.others):
            # The answer names a refund listed before this request left (or handed to
            # another call): not what it made (a replayed or cached answer). A 2xx
            # proves it applied: read back, never sent again.
            note = f"the 2xx answer names refund {made}, which the bag held before this send"
        elif settings.cut_on_bag and ask.baseline is None and places_nothing(obs.refund):
            # Review 36: a call on this bag was cut in a wait during which another
            # system may have refunded the same, and a replayed answer naming that
            # refund cannot be told from this send's own by a date that places nothing
            # (none, no UTC offset, the day only), nor by a baseline (none was read).
            # Read back likewise: never returned as this send's, never sent again.
            note = (
                f"the 2xx answer names refund {made}, whose date cannot place it after "
                "this send, on a bag where a call of this client was cut in a wait"
            )
        if note:
            settle = max(ask.settle_until or 0.0, now + settings.settle_lag)
            ask = attrs.evolve(
                ask, answered=True, doubted=True, settle_until=settle, reads=0, note=note
            )
            return ask, Action(Do.READ, read_bag=_reads_bag(ask))
        return (
            attrs.evolve(ask, phase=Phase.APPLIED, refund_id=obs.refund.id, note="answered"),
            Action(Do.RETURN, refund=obs.refund),
        )
    if obs.kind is ObsKind.SEND_FAILED:
        if ask.phase is not Phase.SENT or obs.error is None:
            raise ProtocolError(f"a send failure in phase {ask.phase.value}")
        return _after_send_failure(ask, obs.error, obs, settings, now, remaining)
    if obs.kind is ObsKind.READ_FAILED:
        if ask.phase not in (Phase.NEW, Phase.SENT, Phase.ABSENT):
            raise ProtocolError(f"a read failure in phase {ask.phase.value}")
        if ask.phase is Phase.ABSENT:
            if ask.needs_review:
                return _still_for_review(ask)
            # The read before a re-send after a 429 failed after its own retries: sent
            # as it was before that read existed (its window opens at the send). What
            # the pages that answered listed was on the bag before the re-send: it
            # joins the baseline, as a whole read's does (simulator seed 1235637: a
            # later page failed, and another system's refund on the first, made 3.7 s
            # before the re-send, was taken for its own). Only records that may be
            # this bag's and order's: a page answered from another bag's list (a cache
            # keyed wrongly, the read's failure) put refunds in the baseline that no
            # list of this bag ever shows, and every later read looked like a replica
            # behind: the ask's own refund was never claimed (review 32).
            listed = tuple(
                r for r in obs.refunds if on_bag(r, ask.bag_id) and on_order(r, ask.order_id)
            )
            if listed:
                return _before_resend(ask, attrs.evolve(obs, refunds=listed), now, known)
            # Nothing listed: the read told nothing of the bag. Sent now, another
            # system's identical refund made during the wait, within
            # ``date_tolerance`` of the re-send (or after it by a ``Date`` running
            # behind), was taken for its own (simulator seed 5062095: a resume's read
            # refused, the re-send answered 500). Not sent until a read answers:
            # read again, and at the deadline it ends as a failed baseline read does:
            # every send so far was proven not applied, and nothing more was sent.
            # With no deadline, or refused (a 400, 401, 403 or 404: no wait mends it),
            # it ends now as a failed baseline read does: read again for ever, the call
            # held its bag and never ended (review 37).
            if remaining is None or obs.backoff >= remaining or _refused(obs.error):
                failed = attrs.evolve(ask, phase=Phase.FAILED, note=RESEND_READ_FAILED)
                return failed, Action(Do.FAIL)
            return ask, Action(Do.READ, delay=obs.backoff, read_bag=False)
        if ask.phase is Phase.NEW:
            # The baseline read failed after its own retries: nothing was sent.
            failed = attrs.evolve(ask, phase=Phase.FAILED, note=BASELINE_READ_FAILED)
            return failed, Action(Do.FAIL)
        if remaining is not None and obs.backoff >= remaining:
            return _park(ask, f"reading the bag back failed ({obs.error}) before the deadline")
        return ask, Action(Do.READ, delay=obs.backoff, read_bag=_reads_bag(ask))
    # A read-back.
    if ask.phase is Phase.NEW:
        if settings.hold_if_present and (guarded := _guard(ask, obs, known)) is not None:
            return guarded
        baseline = frozenset(r.id for r in obs.refunds if r.id is not None)
        return _send(attrs.evolve(ask, baseline=baseline), now)
    if ask.phase is Phase.ABSENT:
        if ask.needs_review:
            return _still_for_review(ask)
        return _before_resend(ask, obs, now, known)
    if ask.phase is not Phase.SENT:
        raise ProtocolError(f"a read-back in phase {ask.phase.value}")
    return _after_read(ask, obs, settings, now, remaining, known, patience)


def _before_resend(
    ask: PendingRefund, obs: Observation, now: float, known: Container[int]
) -> tuple[PendingRefund, Action]:
    """The read before a re-send after a 429 (every send so far proven not applied):
    nothing it lists is this ask's (whole, or the pages that answered of one that
    failed)."""
    if (not _window_at_last_send(ask) or ask.doubted) and (late := _listed_since(ask, obs, known)):
        # ...unless an earlier send was proven absent by read-backs alone: a refund
        # like this one listed since may be that send's, shown late, or another
        # system's made during the wait. Which cannot be told (review 28: taken
        # into the baseline, the ask was sent again and refunded twice). Also once a
        # later 429 moved the window to a re-send (``doubted``: some send may have
        # applied): review 32, the first read after the 429s missed that send's
        # refund, the read after a second 429 put it in the baseline, and the ask was
        # sent again and refunded twice (or, out of attempts, told "failed").
        note = (
            f"bag {ask.bag_id} lists a refund like this one that the read proving an "
            "earlier send absent did not: that send's, shown late, or another's; "
            "not sent again"
        )
        return _park(ask, note, late, review=True)
    listed = frozenset(r.id for r in obs.refunds if r.id is not None)
    baseline = (ask.baseline or frozenset()) | listed
    return _send(attrs.evolve(ask, baseline=baseline), now, proven=True)


def _guard(
    ask: PendingRefund, obs: Observation, known: Container[int]
) -> tuple[PendingRefund, Action] | None:
    """``hold_if_present``: what the guard read before a first send says (None: send).
    Only refunds on this bag not handed to other calls are looked at (``known``'s
    ``for_guard``, when it has one: those other calls the caller's records account
    for)."""
    accounted: Container[int] = getattr(known, "for_guard", known)
    candidates = tuple(
        r for r in obs.refunds if on_bag(r, ask.bag_id) and (r.id is None or r.id not in accounted)
    )
    if candidates and obs.bag is None and not ask.reads and needs_bag(ask):
        # Only the bag's total tells whether a refund it holds is this whole-bag refund
        # or cancel (an item re-run after its record was lost): read it once more with
        # the bag (``reads`` counts that read until the send). A bag with no refund
        # needs no second read.
        return attrs.evolve(ask, reads=1), Action(Do.READ, read_bag=True)
    # A record naming another order under this bag's id is never this order's refund
    # (review 25), nor proof that it holds one: for a person, never "present" (review
    # 27: held as present, the caller was told the shopper's refund existed).
    foreign = tuple(
        r
        for r in candidates
        if not on_order(r, ask.order_id)
        and content(ask, r, obs.refunds, obs.bag) is not Verdict.MISS
    )
    candidates = tuple(r for r in candidates if on_order(r, ask.order_id))
    present = tuple(r for r in candidates if content(ask, r, obs.refunds, obs.bag) is Verdict.MATCH)
    unnamed = _known_unnamed(ask, known).unnamed
    if present and all(_maybe_unnamed(r, unnamed) for r in present):
        # Each may be a refund another call here got without its id (review 16: its
        # record, dated further from that answer than ``learn`` binds, was "a refund
        # exactly like it that nothing accounts for", and a second row asking the same
        # was never sent): neither present nor absent can be told. A person looks.
        note = (
            f"bag {ask.bag_id} holds a refund like this one that may be one another call "
            "got without its id; whether it is this one's cannot be told; not sent"
        )
        return _park(ask, note, review=True, candidates=present)
    if present:
        note = f"bag {ask.bag_id} already holds a refund like this one; not sent"
        held = attrs.evolve(ask, phase=Phase.FAILED, note=note)
        return held, Action(Do.HOLD, candidates=present)
    if foreign:
        note = (
            f"bag {ask.bag_id} lists a refund like this one that names another order: "
            "whether the bag holds this one cannot be told; not sent"
        )
        return _park(ask, note, review=True, candidates=foreign)
    unsure = tuple(r for r in candidates if cannot_tell(ask, r, obs.refunds, obs.bag))
    if unsure:
        note = (
            f"bag {ask.bag_id} holds a refund that may be this one, and what it refunded "
            "cannot be told (the bag or its total unread, or an amount missing); not sent"
        )
        return _park(ask, note, review=True, candidates=unsure)
    if obs.unreadable:
        note = (
            f"{obs.unreadable} refund record(s) on bag {ask.bag_id} could not be read: "
            "whether it already holds this refund cannot be told; not sent"
        )
        return _park(ask, note, review=True)
    return None


def _still_for_review(ask: PendingRefund) -> tuple[PendingRefund, Action]:
    """An ABSENT record a person was asked to look at (held back from its re-send by
    another ask under review, or a copy parked for review merged into it:
    ``KnownRefunds.recall``): review is sticky, nothing is sent while a person may be
    settling the bag by hand (review 28: a late 429 kept in one client sent the ask
    again that another client had parked for review).

    It stays ABSENT: every send of it was proven not applied, so nothing on the bag is
    its refund. Parked as "sent, may have applied", a later resume read the bag back
    over the window of a send a 429 had answered, and took another system's identical
    refund made during the wait for its own (simulator seed 1202091)."""
    note = ask.note
    if not note.startswith(_REVIEWED_ABSENT):
        note = (
            f"{_REVIEWED_ABSENT} ({note}); each send of it was proven not applied: "
            f"a person has to look at bag {ask.bag_id} and decide whether to send it"
        )
    return attrs.evolve(ask, note=note), Action(Do.PARK)


def _listed_since(
    ask: PendingRefund, obs: Observation, known: Container[int]
) -> tuple[OrderRefund, ...]:
    """The refunds ``obs`` lists on the ask's bag and order that its baseline (the read
    that last proved it absent) did not, no other call was handed, and that may carry
    what it asks."""
    before = ask.baseline or frozenset()
    return tuple(
        r
        for r in obs.refunds
        if on_bag(r, ask.bag_id)
        and on_order(r, ask.order_id)
        and (r.id is None or (r.id not in before and r.id not in ask.others and r.id not in known))
        and content(ask, r, obs.refunds, obs.bag) is not Verdict.MISS
    )


def _maybe_unnamed(refund: OrderRefund, unnamed: Sequence[tuple[int | None, float | None]]) -> bool:
    """``refund`` may be one of the refunds handed out without their id (``unnamed``:
    amount, date): the same amount (as far as both say), dated within the widest a
    clock or a wrongly labelled offset can put it from that answer."""
    when = unix_time(refund.date_created)
    for amount, date in unnamed:
        if amount is not None and refund.amount is not None and amount != refund.amount:
            continue
        if (
            date is None
            or when is None
            or placeholder_date(date)
            or placeholder_date(when)
            or abs(when - date) <= WRONG_OFFSET_SPAN
        ):
            return True
    return False


def _known_unnamed(ask: PendingRefund, known: Container[int]) -> PendingRefund:
    """``ask`` with the refunds other calls here got without their id (a record made by
    a failed first send does not carry them yet): the matching rule keeps every record
    that may be one of them from this ask (``_matching.idless_fits``)."""
    unnamed = getattr(known, "unnamed", None)
    return ask if unnamed is None else with_unnamed(ask, unnamed(ask.bag_id))


def _first_listing(ask: PendingRefund, listed: frozenset[int], obs: Observation) -> PendingRefund:
    """``ask`` with the ids the first complete read after its first send listed: a
    refund listed later that this read did not appeared since, whatever its date
    (``judge``). One listed only on pages answered after the list grew while the read
    ran (``Observation.listed_late``) was not listed by it: it may have been made
    since the read began."""
    if ask.listed_after_send is not None or ask.first_sent_at is None or obs.unreadable:
        return ask
    return attrs.evolve(ask, listed_after_send=listed - obs.listed_late)


def _after_read(
    ask: PendingRefund,
    obs: Observation,
    settings: Settings,
    now: float,
    remaining: float | None,
    known: Container[int],
    patience: float | None,
) -> tuple[PendingRefund, Action]:
    """A read-back of a sent ask: claim, keep reading, park, or (only on a clean, fresh,
    complete read after the window) prove it absent and send again."""
    # Refunds handed to other callers are remembered in the record, so that a resume in
    # another process (which does not know them) never claims one.
    listed = frozenset(r.id for r in obs.refunds if r.id is not None)
    others = frozenset(i for i in listed if i in known)
    # Refunds do not vanish from Violet: a read that misses one seen before (by this
    # ask, in its baseline, or handed to a caller) came from a replica behind it.
    stale = not (ask.seen <= listed and ask.others <= listed and (ask.baseline or listed) <= listed)
    ask = _first_listing(
        _known_unnamed(attrs.evolve(ask, reads=ask.reads + 1, others=ask.others | others), known),
        listed,
        obs,
    )
    reading = judge(
        ask,
        obs.refunds,
        obs.bag,
        known,
        settings,
        read_server_time=obs.server_time,
        read_at=obs.received_at,
    )
    verdict, found = reading.verdict, reading.found
    if not reading.seen <= ask.seen:
        ask = attrs.evolve(ask, seen=ask.seen | reading.seen)
    settle = ask.settle_until if ask.settle_until is not None else now
    if ask.clock != (settings.clock_id or PROCESS_CLOCK):
        # Another process's times that learned Violet's offset there, and no Date here
        # has moved them onto this clock yet (``_with_offset``): that clock may be off
        # by as much as the skew tolerance (review 16: a host 40 s behind, no Date
        # here: the window ended 40 s early and the request was sent again).
        settle += settings.clock_skew
    after_window = obs.at >= settle
    if verdict is Verdict.MATCH and obs.unreadable:
        note = (
            f"refund {found[0].id} on bag {ask.bag_id} matches this request, but "
            f"{obs.unreadable} refund record(s) on the bag could not be read and could be it"
        )
        return _park(ask, note, found, review=True)
    if verdict is Verdict.MATCH and stale:
        if after_window:
            note = f"the list of bag {ask.bag_id} came from a replica behind an earlier read"
            return _park(ask, note, found)
        return _read_again(ask, settings, now, remaining, settle, patience)
    if verdict is Verdict.MATCH and settings.others_pending:
        note = (
            f"refund {found[0].id} on bag {ask.bag_id} matches this request, but another "
            "ask on this bag is still pending and it could be that one's"
        )
        return _park(ask, note, found, review=True)
    if verdict is Verdict.MATCH:
        refund = attrs.evolve(found[0], reconciled=True)
        return (
            attrs.evolve(ask, phase=Phase.APPLIED, refund_id=refund.id, note="found by read-back"),
            Action(Do.RETURN, refund=refund),
        )
    if verdict is Verdict.MANY:
        note = f"{len(found)} refunds on bag {ask.bag_id} match this request: which one it made"
        return _park(ask, f"{note} cannot be told", found, review=True)
    if verdict is Verdict.NEAR:
        note = (
            f"a refund on bag {ask.bag_id} almost matches this request (other details "
            "differ, or its record leaves out or leaves open what would tell)"
        )
        return _park(ask, note, found, review=True)
    if verdict is Verdict.UNDATED:
        note = f"a refund on bag {ask.bag_id} matches this request but {reading.doubt}"
        if ask.baseline is not None:
            note += (
                "; that the read before the send did not list it proves nothing (a replica "
                "behind, or another system refunding in between), so it may be another's"
            )
        return _park(ask, note, found, review=True)
    if not after_window:
        return _read_again(ask, settings, now, remaining, settle, patience)
    # After the window, and no refund this ask can claim. Each of these rules absence
    # out; only a clean, fresh, complete read with nothing of ours on it proves it.
    if verdict is Verdict.OWNED:
        note = (
            f"the only refunds on bag {ask.bag_id} that match this request were handed to "
            "other calls: that proves nothing about this one"
        )
        return _park(ask, note, found, review=True)
    if stale:
        note = (
            f"the list of bag {ask.bag_id} came from a replica behind an earlier read "
            "(a refund seen before is missing): not evidence of absence"
        )
        return _park(ask, note)
    if obs.unreadable:
        note = (
            f"{obs.unreadable} refund record(s) on bag {ask.bag_id} could not be read: "
            "absence cannot be proven"
        )
        return _park(ask, note, review=True)
    if ask.answered:
        note = (
            f"Violet answered a send with a 2xx (it applied), but no refund for it shows on "
            f"bag {ask.bag_id}; it is never sent again"
        )
        return _park(ask, note, review=True)
    if ask.needs_review:
        note = f"parked for review before ({ask.note}); a person has to look at bag {ask.bag_id}"
        return _park(ask, note, review=True)
    if verdict is Verdict.EFFECT_WITHOUT_REFUND:
        # The bag moved (REFUNDED / CANCELED) but no refund of ours shows after the
        # window: someone else's doing, or a list lagging beyond it. A person looks
        # (resume still reads again).
        note = f"bag {ask.bag_id} shows this request's effect, but no refund for it shows"
        return _park(ask, note, review=True)
    if ask.refused_after_doubt:
        # Waiting longer cannot tell which send, if any, applied: a person looks.
        note = "a re-send was refused after an earlier send may have applied; no refund shows"
        return _park(ask, note, review=True)
    if reading.other_currency:
        # A listed refund differs from this ask only in an amount given in a currency
        # of its own: only the bag's currency tells whether that amount compares.
        if ask.reads_bag:
            note = (
                f"a refund on bag {ask.bag_id} gives its amount in a currency of its own "
                "and the bag's currency could not be read: it may be this one"
            )
            return _park(ask, note, review=True)
        return attrs.evolve(ask, reads_bag=True), Action(Do.READ, read_bag=True)
    # Proven absent: every read missed it, the last one after the settle window.
    absent = attrs.evolve(
        ask,
        phase=Phase.ABSENT,
        settle_until=None,
        baseline=listed,
        seen=frozenset(),
        note="proven absent after the settle window",
    )
    if absent.sends - absent.budget_from >= settings.max_attempts:
        return attrs.evolve(
            absent, phase=Phase.FAILED, note="not applied; out of attempts"
        ), Action(Do.FAIL)
    return _send(absent, now)


def _reads_bag(ask: PendingRefund) -> bool:
    """Read-backs of this ask read the bag too: a cancel or a whole-bag refund always,
    an amount once a refund in a currency of its own was listed."""
    return ask.reads_bag or needs_bag(ask)


#: How much further than a settle window's own length (``settle_running`` and the clock
#: skew allowed for) a call without a deadline waits for a window whose end only an
#: unsure clock reading put there, before it parks the ask instead.
UNSURE_WAIT = 3600.0


def _unsure_wait(settings: Settings) -> float:
    return settings.settle_running + settings.clock_skew + UNSURE_WAIT


def _read_again(
    ask: PendingRefund,
    settings: Settings,
    now: float,
    remaining: float | None,
    settle: float,
    patience: float | None,
) -> tuple[PendingRefund, Action]:
    """Inside the window: read again, backing off, the last read at the window's end.
    (The exponent is capped: a window hours long, after a wall clock stepped back,
    makes thousands of reads, and 2 ** 1100 is no float.)"""
    delay = min(
        settings.settle_delay * 2 ** min(max(ask.reads - 1, 0), 30), settings.max_settle_delay
    )
    delay = min(delay, max(settle - now, 0.0))
    if remaining is None and ask.clock_unsure and settle - now > _unsure_wait(settings):
        # Only an unsure clock puts a window this far out (a Date header or a wall
        # clock step hours off, kept as the later reading): a call without a deadline
        # does not wait hours for it, holding the bag (simulator seeds 921612, 923160,
        # 924704, 930149: a resume read for hours). Nothing is sent; resume it later.
        note = (
            f"the settle window ends in {settle - now:.1f}s by one reading of an unsure "
            "clock (a Date header or a wall clock step hours off); parked until then, "
            "nothing was re-sent"
        )
        return _park(ask, note)
    if patience is not None and delay > patience:
        return _park(ask, f"the settle window ends in {settle - now:.1f}s; parked until then")
    if remaining is not None and delay >= remaining:
        note = (
            f"the call's deadline ended {max(settle - now, 0.0):.1f}s before the settle "
            "window did, and the bag does not show this request yet"
        )
        return _park(ask, note)
    return ask, Action(Do.READ, delay=delay, read_bag=_reads_bag(ask))


def _after_send_failure(
    ask: PendingRefund,
    error: VioletError,
    obs: Observation,
    settings: Settings,
    now: float,
    remaining: float | None,
) -> tuple[PendingRefund, Action]:
    cause = classify_send_failure(error)
    note = f"{type(error).__name__}: {error}"
    if cause is Cause.RATE_LIMITED and settings.defer_rate_limited:
        # Nothing applied (every earlier send was proven absent before this one left):
        # the caller sends it again after the merchant's pace allows.
        deferred = attrs.evolve(ask, phase=Phase.ABSENT, settle_until=None, note=note)
        return deferred, Action(Do.DEFER, delay=obs.backoff)
    if cause in (Cause.NEVER_LEFT, Cause.RATE_LIMITED):
        out_of_budget = ask.sends - ask.budget_from >= settings.max_attempts or (
            remaining is not None and obs.backoff >= remaining
        )
        if out_of_budget:
            return attrs.evolve(ask, phase=Phase.FAILED, note=note), Action(Do.FAIL)
        if cause is Cause.RATE_LIMITED:
            # Proven not applied, and the merchant's pace to wait for before the
            # re-send: the bag is read when the wait is over, and what it lists then
            # is not this ask's (simulator seeds 1141662, 1145746: another system's
            # identical refund made during the wait, the re-send's answer a 500, and
            # with readings of the clock that disagree its date could not rule it out:
            # it was claimed). Reading the refund list does not call the merchant's
            # platform, whose limit answered the 429.
            waiting = attrs.evolve(ask, phase=Phase.ABSENT, settle_until=None, reads=0, note=note)
            return waiting, Action(Do.READ, delay=obs.backoff, read_bag=False)
        # A connection that never opened changes nothing of what the sends before it
        # left open: an earlier send proven absent by read-backs alone may still show
        # late, and the window stays at it, as for a re-send answered (``_after_read``;
        # review 28: moved to this send, that send's refund listed late was "made
        # before the send" and the ask was refunded twice).
        return _send(
            attrs.evolve(ask, note=note), now, obs.backoff, proven=_window_at_last_send(ask)
        )
    if cause is Cause.REFUSED:
        if not ask.doubted:
            return attrs.evolve(ask, phase=Phase.FAILED, note=note), Action(Do.FAIL)
        window = settings.settle_lag
        ask = attrs.evolve(ask, refused_after_doubt=True)
    elif cause is Cause.APPLIED:
        # Violet's application answered 2xx: only list lag to wait out, and never a
        # re-send, whatever the reads show.
        window = settings.settle_lag
        ask = attrs.evolve(ask, answered=True)
    else:
        # Violet's own 5xx proves only that its application answered: the platform call
        # behind it may still be running (a timeout inside Violet), like no answer.
        window = settings.settle_running
    failed_at = obs.received_at if obs.received_at is not None else now
    settle = max(ask.settle_until or 0.0, failed_at + window)
    ask = attrs.evolve(ask, doubted=True, settle_until=settle, reads=0, note=note)
    return ask, Action(Do.READ, read_bag=_reads_bag(ask))
