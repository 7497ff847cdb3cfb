"""The protocol of one ask: a refund or a cancel of one bag, and when it may be re-sent.

Violet has no idempotency key, so the only thing that keeps a shopper from being
refunded twice is this rule:

    **Re-send only on positive evidence that the earlier send did not apply.**

Evidence is one of: the request provably never left (the connection was never
established); a 429; or read-backs of the bag that all miss it over a *settle window*
long enough for a request still running at Violet to finish and for its refund list to
show it. A few quick reads that miss are not evidence.

Everything here is a decision, never I/O: the record of an ask (:class:`PendingRefund`,
also what ``AmbiguousOutcomeError.pending`` carries and what the batch journal stores),
the observations the driver reports, and :func:`step`, a pure function from (record,
observation, time) to (next record, next action). The driver in ``_reconcile.py``
performs the actions; a simulator can drive the same ``step``.

Phases and their moves (anything else is a bug and raises ``ProtocolError``)::

    NEW     --baseline read-->  NEW      (read_before_send: note what the bag holds)
    NEW     --send-->           SENT
    SENT    --2xx-->            APPLIED  (the refund came back)
    SENT    --never left/429--> SENT     (re-send after backoff) | FAILED (out of budget)
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
Violet's application answered: 500, or any 5xx whose       may have applied; only list
body is Violet's own error JSON; an unreadable 2xx         lag to wait out (``settle_lag``)
no answer from Violet's application: read timeout,         may have applied and may still
dropped connection, a gateway's 502 / 503 / 504 / 524      be running there
without Violet's error JSON                                (``settle_running``)
any other 4xx                                              did not apply; but after an
                                                           earlier "may have applied"
                                                           send: read back, then pending
=========================================================  ==============================
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Container, Sequence
from datetime import datetime
from typing import Any, Literal

import attrs
import orjson

from ._converter import converter, request_from_dict
from .exceptions import (
    APIConnectionError,
    APIError,
    CancellationFailedError,
    RateLimitError,
    RequestValidationError,
    ResponseFormatError,
    VioletError,
)
from .models import BagStatus, CancelBagRequest, OrderBag, OrderRefund, RefundBagRequest

__all__ = [
    "Action",
    "Cause",
    "Observation",
    "PendingRefund",
    "Phase",
    "ProtocolError",
    "Settings",
    "classify_send_failure",
    "start",
    "step",
]

Kind = Literal["refund", "cancel"]


class Phase(enum.Enum):
    """Where one ask stands."""

    NEW = "new"
    """Not sent yet."""
    SENT = "sent"
    """Sent at least once; its outcome is being established."""
    APPLIED = "applied"
    """Violet has the refund (answered, or found by reading the bag back)."""
    ABSENT = "absent"
    """Proven not applied: the only state a re-send leaves from."""
    PENDING = "pending"
    """Not proven either way yet (deadline) or not provable (conflicting refunds)."""
    FAILED = "failed"
    """Definitely not applied."""


class Cause(enum.Enum):
    """What a failed send says about whether it applied."""

    NEVER_LEFT = "never_left"
    """The connection was never established: Violet cannot have seen it."""
    RATE_LIMITED = "rate_limited"
    """429: refused before anything was done."""
    REFUSED = "refused"
    """Any other 4xx (or a cancel Violet reports as failed): not applied."""
    ANSWERED = "answered"
    """Violet's application answered with an error: may have applied; list lag only."""
    NO_ANSWER = "no_answer"
    """No answer from Violet's application: may have applied, may still be running."""


_GATEWAY_STATUSES = frozenset({502, 503, 504, 520, 521, 522, 523, 524, 525, 526, 527, 529})


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
            if exc.status in _GATEWAY_STATUSES and not is_violet_error_body(exc.body):
                return Cause.NO_ANSWER
            return Cause.ANSWERED
        return Cause.REFUSED
    if isinstance(exc, CancellationFailedError):
        return Cause.REFUSED
    if isinstance(exc, ResponseFormatError):
        # An answer we could not read: Violet did answer, and may have acted.
        return Cause.ANSWERED if 200 <= exc.status < 300 else Cause.NO_ANSWER
    # Anything else we cannot place: assume the worst.
    return Cause.NO_ANSWER


# -- the record ------------------------------------------------------------------


@attrs.frozen
class PendingRefund:
    """The record of one refund or cancel ask, everything the protocol knows about it.

    ``AmbiguousOutcomeError.pending`` carries one (phase PENDING): store it anywhere
    (:meth:`to_json` / :meth:`from_json`) and ``await client.resume(pending)`` later,
    in this process or another. The batch journal stores the same record.

    Times are Unix seconds by the client's clock.
    """

    kind: Kind
    """``"refund"`` or ``"cancel"``."""
    order_id: int
    bag_id: int
    request: RefundBagRequest | CancelBagRequest
    """Exactly what was (or will be) sent."""
    phase: Phase = Phase.NEW
    sends: int = 0
    """How many times the request was sent, in every process that worked on it."""
    first_sent_at: float | None = None
    """When it was first sent."""
    last_sent_at: float | None = None
    """When it was last sent."""
    settle_until: float | None = None
    """Absence can only be concluded by a read-back started at or after this time."""
    doubted: bool = False
    """Some send of this request may have applied (so a later refusal proves nothing)."""
    refused_after_doubt: bool = False
    """A re-send was refused after a doubted send: the outcome can only be read."""
    needs_review: bool = False
    """Parked on conflicting evidence (several or near matches, an undated match):
    waiting will not settle it, a person has to look at the bag."""
    baseline: frozenset[int] | None = None
    """Refund ids on the bag before the last send (read_before_send, or the read that
    proved the earlier send absent). With a baseline, matching needs no clock."""
    server_offset: float | None = None
    """Violet's clock minus ours, in seconds, estimated from ``Date`` headers."""
    reads: int = 0
    """Read-backs since the last send."""
    budget_from: int = 0
    """Sends made before the current call (a resume gets a fresh attempt budget)."""
    refund_id: int | None = None
    """The refund, once applied."""
    note: str = ""
    """Why the ask stands where it does, for people."""

    # -- persistence ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what :meth:`from_dict` reads back)."""
        return {
            "v": 1,
            "kind": self.kind,
            "order_id": self.order_id,
            "bag_id": self.bag_id,
            "request": converter.unstructure(self.request),
            "phase": self.phase.value,
            "sends": self.sends,
            "first_sent_at": self.first_sent_at,
            "last_sent_at": self.last_sent_at,
            "settle_until": self.settle_until,
            "doubted": self.doubted,
            "refused_after_doubt": self.refused_after_doubt,
            "needs_review": self.needs_review,
            "baseline": sorted(self.baseline) if self.baseline is not None else None,
            "server_offset": self.server_offset,
            "reads": self.reads,
            "budget_from": self.budget_from,
            "refund_id": self.refund_id,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: Any) -> PendingRefund:
        """Read a record written by :meth:`to_dict`; a malformed one raises
        ``RequestValidationError`` naming the field (nothing is sent from it)."""
        if not isinstance(data, dict):
            raise RequestValidationError("pending", "must be a JSON object")
        try:
            kind = data["kind"]
            if kind not in ("refund", "cancel"):
                raise RequestValidationError("pending.kind", "must be 'refund' or 'cancel'")
            request: RefundBagRequest | CancelBagRequest
            if kind == "refund":
                request = request_from_dict(RefundBagRequest, data["request"])
            else:
                request = request_from_dict(CancelBagRequest, data["request"])
            baseline = data.get("baseline")
            return cls(
                kind=kind,
                order_id=_int(data, "order_id"),
                bag_id=_int(data, "bag_id"),
                request=request,
                phase=Phase(data.get("phase", "pending")),
                sends=_int(data, "sends", minimum=0),
                first_sent_at=_opt_float(data, "first_sent_at"),
                last_sent_at=_opt_float(data, "last_sent_at"),
                settle_until=_opt_float(data, "settle_until"),
                doubted=bool(data.get("doubted", True)),
                refused_after_doubt=bool(data.get("refused_after_doubt", False)),
                needs_review=bool(data.get("needs_review", False)),
                baseline=(
                    frozenset(_ids(baseline, "pending.baseline")) if baseline is not None else None
                ),
                server_offset=_opt_float(data, "server_offset"),
                reads=_int(data, "reads", minimum=0) if "reads" in data else 0,
                budget_from=_int(data, "budget_from", minimum=0) if "budget_from" in data else 0,
                refund_id=data.get("refund_id") if isinstance(data.get("refund_id"), int) else None,
                note=str(data.get("note", "")),
            )
        except KeyError as exc:
            raise RequestValidationError(f"pending.{exc.args[0]}", "is missing") from None
        except ValueError as exc:
            if isinstance(exc, RequestValidationError):
                raise
            raise RequestValidationError("pending", str(exc)) from None

    def to_json(self) -> str:
        """The record as a JSON string."""
        return orjson.dumps(self.to_dict()).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> PendingRefund:
        """Read a record written by :meth:`to_json`."""
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise RequestValidationError("pending", f"not JSON ({exc.msg})") from None
        return cls.from_dict(data)


def _int(data: dict[str, Any], key: str, *, minimum: int = 1) -> int:
    value = data[key]
    if type(value) is not int or value < minimum:
        raise ValueError(f"pending.{key} must be an integer >= {minimum}")
    return value


def _opt_float(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"pending.{key} must be a number")
    return float(value)


def _ids(values: Any, field: str) -> list[int]:
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise ValueError(f"{field} must be a list of refund ids")
    return values


# -- observations and actions -------------------------------------------------------


@attrs.frozen
class Settings:
    """The parts of RetryPolicy the protocol reads (kept apart so a simulator or a
    worker can drive it without a client)."""

    max_attempts: int = 4
    settle_running: float = 60.0
    settle_lag: float = 5.0
    settle_delay: float = 1.0
    max_settle_delay: float = 8.0
    clock_skew: float = 60.0
    date_tolerance: float = 5.0
    read_before_send: bool = False
    hold_if_present: bool = False
    """With read_before_send: when the bag already holds a refund that carries exactly
    what this ask asks for (and no caller was handed it), do not send: HOLD. The batch
    runner's guard against a row refunded by an earlier run whose journal is gone."""


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
    ) -> Observation:
        return cls(
            ObsKind.READ,
            at,
            refunds=refunds,
            bag=bag,
            server_time=server_time,
            received_at=received_at,
        )

    @classmethod
    def read_failed(cls, at: float, error: VioletError, *, backoff: float = 0.0) -> Observation:
        return cls(ObsKind.READ_FAILED, at, error=error, backoff=backoff)


class Do(enum.Enum):
    SEND = "send"
    READ = "read"
    RETURN = "return"
    FAIL = "fail"
    PARK = "park"
    HOLD = "hold"
    """Not sent: the bag already holds this refund (``Settings.hold_if_present``)."""


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
        return self.do in (Do.RETURN, Do.FAIL, Do.PARK, Do.HOLD)


class ProtocolError(AssertionError):
    """An impossible move (a bug in the SDK, never a server's doing)."""


# -- matching -----------------------------------------------------------------------


class Verdict(enum.Enum):
    MATCH = "match"
    MISS = "miss"
    MANY = "many"
    NEAR = "near"
    UNDATED = "undated"
    EFFECT_WITHOUT_REFUND = "effect_without_refund"


def needs_bag(ask: PendingRefund) -> bool:
    """A cancel, or a whole-bag refund, can only be matched with the bag's status."""
    if ask.kind == "cancel":
        return True
    request = ask.request
    return (
        isinstance(request, RefundBagRequest)
        and request.amount_refunded is None
        and request.skus is None
    )


def _strip(text: str | None) -> str | None:
    return text.strip() if text is not None else None


def _content(
    ask: PendingRefund, refund: OrderRefund, refunds: Sequence[OrderRefund], bag: OrderBag | None
) -> Verdict:
    """Does ``refund`` carry what was asked? MATCH, NEAR (close, not the same) or MISS."""
    request = ask.request
    near = False
    if (
        _strip(request.reason)
        and refund.reason is not None
        and _strip(refund.reason) != _strip(request.reason)
    ):
        near = True
    if isinstance(request, CancelBagRequest):
        if bag is None or bag.status is not BagStatus.CANCELED:
            return Verdict.MISS
        return Verdict.NEAR if near else Verdict.MATCH
    if request.amount_refunded is not None:
        if refund.amount != request.amount_refunded:
            return Verdict.MISS
    elif request.skus is None:
        # A whole-bag refund: the bag must read REFUNDED, and this refund must be what
        # was left on it before it.
        if bag is None or bag.status is not BagStatus.REFUNDED:
            return Verdict.MISS
        others = sum(r.amount for r in refunds if r is not refund and r.id != refund.id)
        if bag.total is None or refund.amount != bag.total - others:
            near = True
    if request.skus is not None:
        if not refund.skus:
            near = True
        else:
            asked = Counter((s.order_sku_id, s.quantity_refunded) for s in request.skus)
            got = Counter((s.order_sku_id, s.quantity_refunded) for s in refund.skus)
            if asked != got:
                if request.amount_refunded is None:
                    return Verdict.MISS
                near = True
    shipped = refund.shipping.amount if refund.shipping is not None else None
    if request.shipping is not None and shipped is not None and shipped != request.shipping.amount:
        near = True
    return Verdict.NEAR if near else Verdict.MATCH


def _timestamp(when: datetime) -> float | None:
    """Unix time of an aware datetime; None for a naive one (server local, unknown)."""
    if when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
        return None
    return when.timestamp()


def match(
    ask: PendingRefund,
    refunds: Sequence[OrderRefund],
    bag: OrderBag | None,
    known: Container[int],
    settings: Settings,
) -> tuple[Verdict, tuple[OrderRefund, ...]]:
    """Which refund on the bag, if any, this ask made.

    A refund is a candidate when it is on this bag, was not already handed to a caller
    (``known``), and is new: not in the baseline when there is one; otherwise created no
    earlier than the first send (by Violet's clock, estimated from ``Date`` headers,
    less a tolerance). A date without an offset, or none, can neither rule a refund in
    nor out: if only such a date separates a refund from ours, the verdict is UNDATED.
    """
    sent = ask.first_sent_at if ask.baseline is None else None
    tolerance = settings.date_tolerance if ask.server_offset is not None else settings.clock_skew
    earliest = None if sent is None else sent + (ask.server_offset or 0.0) - tolerance
    exact: list[OrderRefund] = []
    near: list[OrderRefund] = []
    undated: list[OrderRefund] = []
    for refund in refunds:
        if refund.bag_id is not None and refund.bag_id != ask.bag_id:
            continue
        if refund.id is not None and refund.id in known:
            continue
        if ask.baseline is not None:
            if refund.id is not None and refund.id in ask.baseline:
                continue
            dated: bool | None = True
        elif refund.date_created is None or refund.id is None:
            dated = None
        else:
            created = _timestamp(refund.date_created)
            if created is None:
                dated = None
            elif earliest is not None and created < earliest:
                continue  # made before this ask was first sent
            else:
                dated = True
        verdict = _content(ask, refund, refunds, bag)
        if verdict is Verdict.MISS:
            continue
        if dated is None:
            undated.append(refund)
        elif verdict is Verdict.MATCH:
            exact.append(refund)
        else:
            near.append(refund)
    if len(exact) > 1:
        return Verdict.MANY, tuple(exact)
    if undated:
        return Verdict.UNDATED, tuple(exact + undated)
    if exact:
        return Verdict.MATCH, tuple(exact)
    if near:
        return Verdict.NEAR, tuple(near)
    if bag is not None and _effect_visible(ask, bag):
        return Verdict.EFFECT_WITHOUT_REFUND, ()
    return Verdict.MISS, ()


def _effect_visible(ask: PendingRefund, bag: OrderBag) -> bool:
    """The bag's state already shows what this ask would do (a re-send would be refused
    or, worse, apply): CANCELED for a cancel, REFUNDED for a whole-bag refund."""
    if ask.kind == "cancel":
        return bag.status is BagStatus.CANCELED
    return needs_bag(ask) and bag.status is BagStatus.REFUNDED


# -- transitions --------------------------------------------------------------------


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
        ask = attrs.evolve(
            ask,
            phase=Phase.SENT,
            settle_until=settle,
            doubted=True,
            reads=0,
            budget_from=ask.sends,
        )
        return ask, Action(Do.READ, read_bag=needs_bag(ask))
    raise ProtocolError(f"cannot start an ask in phase {ask.phase.value}")


def _send(ask: PendingRefund, now: float, delay: float = 0.0) -> tuple[PendingRefund, Action]:
    sent_at = now + delay
    return (
        attrs.evolve(
            ask,
            phase=Phase.SENT,
            sends=ask.sends + 1,
            first_sent_at=ask.first_sent_at if ask.first_sent_at is not None else sent_at,
            last_sent_at=sent_at,
            reads=0,
        ),
        Action(Do.SEND, delay=delay),
    )


def _offset(ask: PendingRefund, obs: Observation) -> float | None:
    if obs.server_time is None or obs.received_at is None:
        return ask.server_offset
    # The Date header has whole seconds; its half-second middle is the best estimate.
    return obs.server_time + 0.5 - obs.received_at


def _park(
    ask: PendingRefund,
    note: str,
    candidates: Sequence[OrderRefund] = (),
    *,
    review: bool = False,
) -> tuple[PendingRefund, Action]:
    parked = attrs.evolve(ask, phase=Phase.PENDING, note=note, needs_review=review)
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
    ask = attrs.evolve(ask, server_offset=_offset(ask, obs))
    if obs.kind is ObsKind.ANSWERED:
        if ask.phase is not Phase.SENT or obs.refund is None:
            raise ProtocolError(f"an answer in phase {ask.phase.value}")
        return (
            attrs.evolve(ask, phase=Phase.APPLIED, refund_id=obs.refund.id, note="answered"),
            Action(Do.RETURN, refund=obs.refund),
        )
    if obs.kind is ObsKind.SEND_FAILED:
        if ask.phase is not Phase.SENT or obs.error is None:
            raise ProtocolError(f"a send failure in phase {ask.phase.value}")
        return _after_send_failure(ask, obs.error, obs, settings, now, remaining)
    if obs.kind is ObsKind.READ_FAILED:
        if ask.phase not in (Phase.NEW, Phase.SENT):
            raise ProtocolError(f"a read failure in phase {ask.phase.value}")
        if ask.phase is Phase.NEW:
            # The baseline read failed after its own retries: nothing was sent.
            failed = attrs.evolve(ask, phase=Phase.FAILED, note="the baseline read failed")
            return failed, Action(Do.FAIL)
        if remaining is not None and obs.backoff >= remaining:
            return _park(ask, f"reading the bag back failed ({obs.error}) before the deadline")
        return ask, Action(Do.READ, delay=obs.backoff, read_bag=needs_bag(ask))
    # A read-back.
    if ask.phase is Phase.NEW:
        if settings.hold_if_present:
            present = tuple(
                r
                for r in obs.refunds
                if (r.bag_id is None or r.bag_id == ask.bag_id)
                and (r.id is None or r.id not in known)
                and _content(ask, r, obs.refunds, obs.bag) is Verdict.MATCH
            )
            if present:
                note = f"bag {ask.bag_id} already holds a refund like this one; not sent"
                held = attrs.evolve(ask, phase=Phase.FAILED, note=note)
                return held, Action(Do.HOLD, candidates=present)
        baseline = frozenset(r.id for r in obs.refunds if r.id is not None)
        return _send(attrs.evolve(ask, baseline=baseline), now)
    if ask.phase is not Phase.SENT:
        raise ProtocolError(f"a read-back in phase {ask.phase.value}")
    ask = attrs.evolve(ask, reads=ask.reads + 1)
    verdict, found = match(ask, obs.refunds, obs.bag, known, settings)
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
        note = f"a refund on bag {ask.bag_id} almost matches this request (other details differ)"
        return _park(ask, note, found, review=True)
    if verdict is Verdict.UNDATED:
        note = (
            f"a refund on bag {ask.bag_id} matches this request but its date has no offset "
            "(or none), so whether it predates this request cannot be told"
        )
        return _park(ask, note, found, review=True)
    settle = ask.settle_until if ask.settle_until is not None else now
    if verdict is Verdict.MISS and obs.at >= settle:
        if ask.refused_after_doubt:
            note = "a re-send was refused after an earlier send may have applied; no refund shows"
            return _park(ask, note)
        # Proven absent: every read missed it, the last one after the settle window.
        absent = attrs.evolve(
            ask,
            phase=Phase.ABSENT,
            settle_until=None,
            baseline=frozenset(r.id for r in obs.refunds if r.id is not None),
            note="proven absent after the settle window",
        )
        if absent.sends - absent.budget_from >= settings.max_attempts:
            return attrs.evolve(
                absent, phase=Phase.FAILED, note="not applied; out of attempts"
            ), Action(Do.FAIL)
        return _send(absent, now)
    if verdict is Verdict.EFFECT_WITHOUT_REFUND and obs.at >= settle:
        note = f"bag {ask.bag_id} shows this request's effect, but no refund for it shows yet"
        return _park(ask, note)
    # Inside the window: read again, backing off, the last read at the window's end.
    delay = min(settings.settle_delay * 2 ** max(ask.reads - 1, 0), settings.max_settle_delay)
    delay = min(delay, max(settle - now, 0.0))
    if patience is not None and delay > patience:
        return _park(ask, f"the settle window ends in {settle - now:.1f}s; parked until then")
    if remaining is not None and delay >= remaining:
        note = (
            f"the call's deadline ended {max(settle - now, 0.0):.1f}s before the settle "
            "window did, and the bag does not show this request yet"
        )
        return _park(ask, note)
    return ask, Action(Do.READ, delay=delay, read_bag=needs_bag(ask))


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
    if cause in (Cause.NEVER_LEFT, Cause.RATE_LIMITED):
        out_of_budget = ask.sends - ask.budget_from >= settings.max_attempts or (
            remaining is not None and obs.backoff >= remaining
        )
        if out_of_budget:
            return attrs.evolve(ask, phase=Phase.FAILED, note=note), Action(Do.FAIL)
        return _send(attrs.evolve(ask, note=note), now, obs.backoff)
    if cause is Cause.REFUSED:
        if not ask.doubted:
            return attrs.evolve(ask, phase=Phase.FAILED, note=note), Action(Do.FAIL)
        window = settings.settle_lag
        ask = attrs.evolve(ask, refused_after_doubt=True)
    else:
        window = settings.settle_running if cause is Cause.NO_ANSWER else settings.settle_lag
    failed_at = obs.received_at if obs.received_at is not None else now
    settle = max(ask.settle_until or 0.0, failed_at + window)
    ask = attrs.evolve(ask, doubted=True, settle_until=settle, reads=0, note=note)
    return ask, Action(Do.READ, read_bag=needs_bag(ask))
