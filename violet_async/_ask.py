"""The record of one ask (a refund or a cancel of one bag): its phase and everything the
refund protocol knows about it, JSON round-trippable so that it can be stored anywhere
(``AmbiguousOutcomeError.pending``, the batch journal, a worker ledger) and resumed in
another process. The transitions between phases live in ``_protocol.py``.
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
import secrets
from typing import Any, Literal

import attrs
import orjson

from ._converter import converter, request_from_dict
from ._redact import has_control_character
from .exceptions import RequestValidationError
from .models import CancelBagRequest, RefundBagRequest

__all__ = [
    "PROCESS_CLOCK",
    "PROCESS_TOKEN",
    "Kind",
    "PendingRefund",
    "Phase",
    "ProtocolError",
    "Settings",
    "checked_key",
    "clock_stepped",
    "machine_name",
    "merged",
    "on_this_machine",
    "same_machine",
    "sent_once",
]

Kind = Literal["refund", "cancel"]

#: The longest idempotency key accepted (Stripe's limit).
MAX_KEY_LENGTH = 255


def _read(path: str) -> str | None:
    """The text of a small file of ``/proc`` (None: it cannot be read)."""
    try:
        with open(path, encoding="ascii") as file:
            return file.read(512)
    except (OSError, ValueError):
        return None


def machine_name(boot: str, offsets: str) -> str:
    """The name of the machine's monotonic clock as a process sees it: ``boot`` (its
    ``boot_id``, shortened), and its time namespace's monotonic offset when it has one
    (``offsets``: ``/proc/self/timens_offsets``). Processes in two time namespaces of
    one boot (a container made with its own, one restored by CRIU, whose monotonic
    clock goes on from its checkpoint) read one ``boot_id`` but monotonic clocks that
    differ by the offset: a record's stamp, taken for one of this machine's, moved its
    times by that offset (review 21: 500 s back, a settle window ended while the send
    still ran, and the refund was sent again). Empty: no machine is named (the boot
    cannot be read)."""
    boot = boot.strip().replace("-", "")[:16]
    if not boot:
        return ""
    for line in offsets.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "monotonic" and fields[1:] != ["0", "0"]:
            return f"{boot}~{fields[1]}.{fields[2]}"
    return boot


def _machine() -> str:
    """This process's machine (:func:`machine_name`). Empty where a time namespace
    exists but its offsets cannot be read."""
    boot = _read("/proc/sys/kernel/random/boot_id") or ""
    offsets = _read("/proc/self/timens_offsets")
    if offsets is None:
        # No file: a kernel without time namespaces (before Linux 5.6), one monotonic
        # clock for the boot; unless this process is in one whose offsets are hidden.
        try:
            os.readlink("/proc/self/ns/time")
        except OSError:
            offsets = ""
        else:
            return ""
    return machine_name(boot, offsets)


#: This process, as the clock names of records begin.
PROCESS_TOKEN = secrets.token_hex(8)

#: This process's clock, as records name it: times recorded here are in this clock.
#: ``<process>@<machine>``: records of two processes on one machine (one boot, one
#: time namespace's monotonic offset) share a monotonic clock, and a step of the wall
#: clock between their writes is measured exactly (:func:`same_machine`). Just
#: ``<process>`` where the machine cannot be named.
PROCESS_CLOCK = f"{PROCESS_TOKEN}@{_machine()}".rstrip("@")


def same_machine(one: str, other: str) -> bool:
    """Whether two clock names (``PendingRefund.clock``) name processes on one machine
    (one boot, one monotonic offset: :func:`machine_name`): one process's clock (the
    same name), or two ending in the same ``@<machine>``."""
    if one == other:
        return True
    _, at, machine = one.rpartition("@")
    return bool(at and machine) and other.rpartition("@")[1:] == (at, machine)


def on_this_machine(ask: PendingRefund, here: str) -> bool:
    """Whether ``ask``'s times are on the wall clock of ``here`` (this process's clock
    name) as it can place them: written by this process, or by another on this machine
    that stamped them (``wall_mono``), so that a step since is measured exactly."""
    return ask.clock == here or (ask.wall_mono is not None and same_machine(ask.clock, here))


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
    """When it was first sent by a send that could have applied: where the window of
    its refund starts (a send after a 429 or a connection never opened moves it to
    that send, since every earlier send is proven not applied)."""
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
    others: frozenset[int] = frozenset()
    """Refunds on the bag this ask saw handed to other callers: never its own, in any
    process that resumes it."""
    server_offset: float | None = None
    """Violet's clock minus the clock of the process that recorded the times above, in
    seconds, estimated from ``Date`` headers (a process with another clock shifts the
    times when it learns its own offset)."""
    clock_unsure: bool = False
    """The times above came from a process whose clock offset was never learned: dates
    are compared with the wide ``clock_skew`` tolerance."""
    clock: str = attrs.field(factory=lambda: PROCESS_CLOCK)
    """Which process's clock the times above are in (a record resumed elsewhere has its
    times moved onto the new clock once that process learns Violet's offset)."""
    reads: int = 0
    """Read-backs since the last send."""
    budget_from: int = 0
    """Sends made before the current call (a resume gets a fresh attempt budget)."""
    refund_id: int | None = None
    """The refund, once applied."""
    note: str = ""
    """Why the ask stands where it does, for people."""
    ask_id: str = attrs.field(factory=lambda: secrets.token_hex(8))
    """This ask's identity, kept through every copy of the record (JSON, journal,
    ledger): a client remembers which refund it handed to which ask, so a resume
    delivered twice gets its own refund back both times, and no other ask claims it."""
    seen: frozenset[int] = frozenset()
    """Refunds a read-back of this ask saw that could be its own (or that only another
    call's ownership kept from being so). They do not vanish from Violet: a later read
    that misses one is a stale replica, never evidence of absence."""
    listed_after_send: frozenset[int] | None = None
    """The ids the first complete read-back after the ask's first send listed (None: no
    such read yet). A refund a later read lists that this one did not appeared since
    the request left (a list never hides a refund made hours ago): it is never taken
    for one "made long before the send", whatever its date says, for that date may be
    on another clock than every reading of Violet's (simulator seed 1115630: Date
    headers and a stepped wall clock both 15 h ahead of the clock that dates refunds;
    the ask's own refund behind a 502 was skipped as a day old and sent again)."""
    answered: bool = False
    """Violet answered a send with a 2xx whose body could not be read or did not fit the
    request: it applied, so this ask is never sent again, only read back."""
    offsets: tuple[float, float] | None = None
    """The lowest and highest clock offset the ``Date`` headers gave when they disagreed
    (None: they never did). Dates are then judged against every offset in between."""
    stepped: float = 0.0
    """How far this process's wall clock stepped while the ask ran (its times above were
    moved with it): a ``Date`` header that agrees with the clock as it was before the
    step is then as good as one that agrees with it now."""
    wall_mono: tuple[float, float] | None = None
    """Wall and monotonic time read together when the record was last written, by the
    process ``clock`` names: a resume in that process sees whether its wall clock
    stepped in between (monotonic time never does)."""
    unnamed: tuple[tuple[int | None, float | None], ...] = ()
    """Refunds on the bag handed to other calls from a 2xx that left out their id, as
    ``(amount, date_created)`` (cents; Unix seconds by Violet's clock; None where the
    answer left it out): a listed refund that may be one of them is another call's for
    this record, in any process that resumes it (never claimed, never proof of absence:
    review)."""
    reads_bag: bool = False
    """Read-backs read the bag too (``GET /orders/{id}``): one listed a refund that
    differs from this ask only in an amount given in a currency of its own
    (``refund_currency``), which only the bag's currency can tell apart from this ask's
    amount. A bag that cannot be read then leaves the ask for review, never absent."""
    idempotency_key: str | None = None
    """The ``idempotency_key`` of the call that made this ask (None: it had none).
    ``client.resume`` of a record with a key resumes it through the key's own record in
    the client's store, so a resume and a repeat of the keyed call, in any process
    sharing the store, are one ask: one owner at a time, one refund for both."""
    offsets_moved: bool = False
    """``offsets`` holds a reading no ``Date`` header gave: a record of another clock
    was moved onto this one by Date headers that disagreed with its own, and its times
    as they were (had one of the headers not been Violet's) are a reading too. Only
    then does a claim's bar sit ``clock_skew`` below the earlier readings; readings
    that Date headers gave on this clock are each held to ``date_tolerance``
    (:func:`~violet_async._matching.no_baseline_window`)."""
    scope: str | None = attrs.field(default=None, eq=False)
    """The app id and Violet host of the client that handed the record out (as its
    keys are scoped; None: a record from before records carried it, or one kept by a
    batch journal or a fleet ledger). ``client.resume`` refuses a record of another
    app or host: order and bag ids are only unique within one environment, and a
    resume there would read, and could refund, another shopper's bag (review 25)."""

    # -- persistence ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what :meth:`from_dict` reads back)."""
        data: dict[str, Any] = {
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
            "others": sorted(self.others),
            "server_offset": self.server_offset,
            "clock_unsure": self.clock_unsure,
            "clock": self.clock,
            "reads": self.reads,
            "budget_from": self.budget_from,
            "refund_id": self.refund_id,
            "note": self.note,
            "ask_id": self.ask_id,
            "seen": sorted(self.seen),
            "answered": self.answered,
            "offsets": list(self.offsets) if self.offsets is not None else None,
            "wall_mono": list(self.wall_mono) if self.wall_mono is not None else None,
            "stepped": self.stepped,
        }
        if self.idempotency_key is not None:
            # Only when set: records without a key read and write as they always did.
            data["idempotency_key"] = self.idempotency_key
        if self.unnamed:
            data["unnamed"] = [list(one) for one in self.unnamed]
        if self.reads_bag:
            data["reads_bag"] = True
        if self.listed_after_send is not None:
            # Only when set: records without it read and write as they always did.
            data["listed_after_send"] = sorted(self.listed_after_send)
        if self.offsets_moved:
            data["offsets_moved"] = True
        if self.scope is not None:
            # Only when set: records without it read and write as they always did.
            data["scope"] = self.scope
        return data

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
                baseline=_opt_ids(data, "baseline"),
                others=frozenset(_ids(data.get("others", []), "pending.others")),
                server_offset=_opt_float(data, "server_offset"),
                clock_unsure=bool(data.get("clock_unsure", False)),
                clock=str(data.get("clock", "")),
                reads=_int(data, "reads", minimum=0) if "reads" in data else 0,
                budget_from=_int(data, "budget_from", minimum=0) if "budget_from" in data else 0,
                refund_id=data.get("refund_id") if isinstance(data.get("refund_id"), int) else None,
                note=str(data.get("note", "")),
                ask_id=_ask_id(data),
                seen=frozenset(_ids(data.get("seen", []), "pending.seen")),
                answered=bool(data.get("answered", False)),
                offsets=_offsets(data.get("offsets")),
                wall_mono=_pair(data.get("wall_mono"), "wall_mono"),
                stepped=_opt_float(data, "stepped") or 0.0,
                idempotency_key=checked_key(data.get("idempotency_key")),
                unnamed=_unnamed(data.get("unnamed", [])),
                reads_bag=bool(data.get("reads_bag", False)),
                listed_after_send=_opt_ids(data, "listed_after_send"),
                offsets_moved=bool(data.get("offsets_moved", False)),
                scope=_scope(data.get("scope")),
            )
        except KeyError as exc:
            raise RequestValidationError(f"pending.{exc.args[0]}", "is missing") from None
        except ValueError as exc:
            if isinstance(exc, RequestValidationError):
                raise
            raise RequestValidationError("pending", str(exc)) from None

    def same_request(self, other: PendingRefund) -> bool:
        """True when ``other`` asks for exactly what this record asks for (kind, order,
        bag and request)."""
        return (
            self.kind == other.kind
            and self.order_id == other.order_id
            and self.bag_id == other.bag_id
            and self.request == other.request
        )

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


def _scope(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RequestValidationError("pending.scope", "must be a non-empty str")
    return value


def sent_once(
    kind: Kind,
    order_id: int,
    bag_id: int,
    request: RefundBagRequest | CancelBagRequest,
    at: float | None,
    *,
    baseline: frozenset[int] | None = None,
    others: frozenset[int] = frozenset(),
    clock: str | None = None,
    ask_id: str | None = None,
    idempotency_key: str | None = None,
) -> PendingRefund:
    """The record of an ask sent once, at ``at`` (``None``: when is not known), whose
    outcome is not known: what a failed send, a torn journal line or a dead worker's
    ledger entry leaves."""
    record = PendingRefund(
        kind,
        order_id,
        bag_id,
        request,
        Phase.SENT,
        sends=1,
        first_sent_at=at,
        last_sent_at=at,
        baseline=baseline,
        others=others,
        clock=clock or PROCESS_CLOCK,
        idempotency_key=idempotency_key,
    )
    return attrs.evolve(record, ask_id=ask_id) if ask_id else record


def merged(one: PendingRefund, other: PendingRefund) -> PendingRefund:
    """What two records of one ask (the same ``ask_id``) know together: a resume
    delivered again with the record it was first given must not forget what a later
    record of the same ask learned (a re-send, its settle window, a doubt).

    The record with more sends (then one whose sends were all proven not applied, then
    the later send, then the later settle window) is the base: its phase, clock,
    baseline and read counts describe its last send, and its first send (where the
    window of this ask's refund starts: ``_protocol._send``) when it has more sends. On
    top of it: the most sends, the earliest first send (of two records with as many
    sends) and latest last send, the latest settle window, every doubt, review, answer
    and bag read (OR), and every refund either saw as possibly its own or as another
    call's (union). Records of two asks: ``one``."""
    if one.ask_id != other.ask_id:
        return one
    one, other = _on_one_wall_clock(one, other)
    base = max(one, other, key=_freshness)
    firsts = [t for t in (one.first_sent_at, other.first_sent_at) if t is not None]
    if base.first_sent_at is not None and one.sends != other.sends:
        # The record with more sends knows where the window of this ask's refund
        # starts: a send after a 429 (or a connection never opened) moves it past the
        # sends proven not applied, and the older copy must not move it back (a refund
        # another system made meanwhile would pass for this ask's).
        firsts = [base.first_sent_at]
    lasts = [t for t in (one.last_sent_at, other.last_sent_at) if t is not None]
    settles = [t for t in (one.settle_until, other.settle_until) if t is not None]
    return attrs.evolve(
        base,
        sends=max(one.sends, other.sends),
        first_sent_at=min(firsts) if firsts else None,
        last_sent_at=max(lasts) if lasts else None,
        settle_until=max(settles) if settles else None,
        doubted=one.doubted or other.doubted,
        refused_after_doubt=one.refused_after_doubt or other.refused_after_doubt,
        needs_review=one.needs_review or other.needs_review,
        answered=one.answered or other.answered,
        clock_unsure=one.clock_unsure or other.clock_unsure,
        seen=one.seen | other.seen,
        others=one.others | other.others,
        idempotency_key=one.idempotency_key or other.idempotency_key,
        unnamed=with_unnamed(one, other.unnamed).unnamed,
        reads_bag=one.reads_bag or other.reads_bag,
        listed_after_send=_fewer(one.listed_after_send, other.listed_after_send),
    )


def _fewer(one: frozenset[int] | None, other: frozenset[int] | None) -> frozenset[int] | None:
    """Two copies' ``listed_after_send``: the ids both listed (a refund only one copy's
    first read listed may have appeared since the other's send), or the one known."""
    if one is None or other is None:
        return other if one is None else one
    return one & other


def clock_stepped(ask: PendingRefund, jump: float) -> PendingRefund:
    """The record after this machine's wall clock stepped by ``jump`` seconds (NTP, an
    operator) while the ask ran, as the driver measures it (wall time against monotonic
    time): its times move onto the new wall clock, and the clock is unsure from then on
    (dates are judged against every reading of it)."""

    def moved(when: float | None) -> float | None:
        return None if when is None else when + jump

    # Violet's clock did not move: every offset learned before the step did. (Were it
    # no step but a suspend, whose wall time is right and monotonic time paused, the
    # moved times with the moved offset still name the same instants on Violet's
    # clock; only the settle window grows.)
    offsets = ask.offsets
    if offsets is not None:
        offsets = (offsets[0] - jump, offsets[1] - jump)
    return attrs.evolve(
        ask,
        first_sent_at=moved(ask.first_sent_at),
        last_sent_at=moved(ask.last_sent_at),
        settle_until=moved(ask.settle_until),
        server_offset=None if ask.server_offset is None else ask.server_offset - jump,
        offsets=offsets,
        clock_unsure=True,
        stepped=ask.stepped + jump,
    )


#: Seconds by which two records' wall and monotonic readings may disagree before the
#: wall clock counts as stepped between their writes (as ``_reconcile.CLOCK_STEP``).
_STEP = 2.0


def _on_one_wall_clock(
    one: PendingRefund, other: PendingRefund
) -> tuple[PendingRefund, PendingRefund]:
    """Two records of one ask, the times of the one written first moved by any step of
    the wall clock between the two writes (their ``wall_mono``, taken by the process
    whose clock both name, or by two processes on one machine), so that the later or
    earlier of two times is an instant, not an artefact of the step (a settle window
    15 h back looking later than one from now)."""
    if one.wall_mono is None or other.wall_mono is None or not same_machine(one.clock, other.clock):
        # (Two processes on one machine share its monotonic clock: their stamps
        # measure a step between the writes as one process's do. Left apart, a copy
        # of a record moved by a step kept the earlier send time of a copy that was
        # not, and another system's refund made before the send was claimed:
        # simulator seed 931888.)
        return one, other
    (wall_one, mono_one), (wall_other, mono_other) = one.wall_mono, other.wall_mono
    jump = (wall_other - wall_one) - (mono_other - mono_one)
    if abs(jump) <= _STEP:
        return one, other
    if mono_one <= mono_other:
        return attrs.evolve(clock_stepped(one, jump), wall_mono=other.wall_mono), other
    return one, attrs.evolve(clock_stepped(other, -jump), wall_mono=one.wall_mono)


def _freshness(record: PendingRefund) -> tuple[int, bool, float, float]:
    # Of two copies with as many sends, one ABSENT knows that its last send was proven
    # not applied (a late 429 written through the key's entry); the other, "sent, may
    # have applied", only never learned it: read back over that send's window, another
    # system's identical refund made meanwhile passed for its own (review 30).
    return (
        record.sends,
        record.phase is Phase.ABSENT,
        record.last_sent_at if record.last_sent_at is not None else -math.inf,
        record.settle_until if record.settle_until is not None else -math.inf,
    )


def _ask_id(data: dict[str, Any]) -> str:
    """The record's identity; a record written before identities existed gets one
    derived from what it holds, so that every load of it names the same ask."""
    value = data.get("ask_id")
    if isinstance(value, str) and value:
        return value
    fields = [data.get(k) for k in ("kind", "order_id", "bag_id", "request", "first_sent_at")]
    digest = hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"v1-{digest[:16]}"


def checked_key(value: Any) -> str | None:
    """A record's idempotency key, checked as a call's own key is (it names the store
    record a resume goes through)."""
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_KEY_LENGTH
        or has_control_character(value)
    ):
        raise RequestValidationError(
            "pending.idempotency_key",
            f"must be a str of 1 to {MAX_KEY_LENGTH} characters with no control characters",
        )
    return value


def _offsets(value: Any) -> tuple[float, float] | None:
    pair = _pair(value, "offsets")
    return None if pair is None else (min(pair), max(pair))


def _pair(value: Any, field: str) -> tuple[float, float] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    ):
        raise ValueError(f"pending.{field} must be a list of two numbers")
    return (float(value[0]), float(value[1]))


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


#: A listed refund dated at most this many seconds before the 2xx that handed out a
#: refund without its id may be that refund, and so may one dated later (a platform
#: may stamp a refund when it has processed it, seconds or minutes after); so may any
#: the ask judging the read could claim by its date (``_matching.idless_fits``).
IDLESS_EARLIER = 60.0

#: At most this many id-less refunds of other calls are kept in a record (the newest).
UNNAMED = 64


def with_unnamed(
    ask: PendingRefund, more: tuple[tuple[int | None, float | None], ...]
) -> PendingRefund:
    """``ask`` knowing ``more`` id-less refunds of other calls too (each once)."""
    if not more:
        return ask
    known = ask.unnamed
    fresh = tuple(one for one in dict.fromkeys(more) if one not in known)
    if not fresh:
        return ask
    return attrs.evolve(ask, unnamed=(*known, *fresh)[-UNNAMED:])


def _unnamed(values: Any) -> tuple[tuple[int | None, float | None], ...]:
    def number(v: Any) -> bool:
        return v is None or (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        )

    if not isinstance(values, list) or not all(
        isinstance(one, list)
        and len(one) == 2
        and (one[0] is None or type(one[0]) is int)
        and number(one[1])
        for one in values
    ):
        raise RequestValidationError(
            "pending.unnamed", "must be a list of [amount or null, date or null] pairs"
        )
    return tuple((one[0], None if one[1] is None else float(one[1])) for one in values[-UNNAMED:])


def _opt_ids(data: dict[str, Any], key: str) -> frozenset[int] | None:
    values = data.get(key)
    return None if values is None else frozenset(_ids(values, f"pending.{key}"))


def _ids(values: Any, field: str) -> list[int]:
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise ValueError(f"{field} must be a list of refund ids")
    return values


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
    clock_id: str = ""
    """The clock this process reads times from (empty: this process's system clock):
    a record whose times came from another clock has them moved onto this one."""
    others_pending: bool = False
    """Another ask on this bag, from this client, is still pending: a refund read back
    could be that one's, so a match is for a person to confirm, never claimed."""
    hold_if_present: bool = False
    """With read_before_send: when the bag already holds a refund that carries exactly
    what this ask asks for (and no caller was handed it), do not send: HOLD. The batch
    runner's guard against a row refunded by an earlier run whose journal is gone."""
    defer_rate_limited: bool = False
    """A 429 to a send ends the ask ABSENT with DEFER (proven not applied; send again
    after the delay) instead of waiting in place: a batch or a fleet paces the merchant
    and sends it again in its turn, while other asks go through (its resume reads the
    bag first, as a call waiting in place does)."""
    cut_on_bag: bool = False
    """This client cut (or ended) a call on this bag, at any time in its life, after a
    wait in which another system may have refunded the same (``PendingAsks.was_cut``):
    a 2xx to a send made without a baseline, naming a refund whose date cannot place it
    after the send (none, no UTC offset, the day only), may be a replayed answer naming
    that refund. It is read back, never returned (review 36)."""


class ProtocolError(AssertionError):
    """An impossible move (a bug in the SDK, never a server's doing)."""
