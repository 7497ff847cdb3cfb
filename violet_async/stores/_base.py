"""The record store seam: what a store keeps for one idempotency key, the one rule that
decides what a call finds under its key, and the protocol every store implements.

A store only has to do three things atomically per key: **claim** (read the entry,
apply :func:`decide`, write what it says), **save** (write the entry if this caller
still owns it) and **load**. Everything else (when to send, what to return) is the
engine's (``violet_async._engine``), so MemoryStore, SQLiteStore and RedisStore cannot
disagree on the rule.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import orjson

from .._ask import PendingRefund, Phase
from .._converter import converter, structure
from ..exceptions import RequestValidationError
from ..models import OrderRefund

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_RETENTION",
    "Claim",
    "KeyEntry",
    "RecordStore",
    "check_seconds",
    "decide",
]

#: Seconds a finished key (applied, or definitely not applied) is kept: a repeat of
#: the call within this time returns the same refund with no request to Violet.
#: Stripe keeps its keys 24 hours; so do we. Unfinished keys are never dropped.
DEFAULT_RETENTION = 24 * 3600.0

#: Seconds a call owns its key without renewing it. A call renews it every third of
#: this while it runs; a process that dies stops renewing, and after this long another
#: process may resume its ask (by the protocol: read back first, never a blind send).
DEFAULT_LEASE = 30.0


class Claim(enum.Enum):
    """What a call found under its key."""

    OWNED = "owned"
    """The call owns the key now: send a new ask, or resume the one recorded."""
    FINISHED = "finished"
    """The ask applied: return its refund again, send nothing."""
    BUSY = "busy"
    """Another live caller owns the key: wait for its outcome."""
    REUSED = "reused"
    """The key was used for another request: refuse, send nothing."""
    ENDED = "ended"
    """The ask being resumed (its ``ask_id``, or one of the key's earlier asks) ended
    definitely not applied: say so again, send nothing (a resume delivered again after
    another process told its caller "failed" must not send it anew: review 14)."""


LINEAGE = 32
"""How many earlier asks of one key (same request) a key's entry remembers."""


@attrs.frozen
class KeyEntry:
    """Everything a store keeps under one idempotency key."""

    key: str
    ask: PendingRefund
    """The ask's record: NEW when claimed, SENT before every send, then its end."""
    refund: OrderRefund | None = None
    """The refund, once the ask applied (returned again to a repeat of the call)."""
    owner: str | None = None
    """The client (process) working on the ask now; None: nobody."""
    lease_until: float | None = None
    """Unix time until which ``owner`` holds the key without renewing it."""
    finished_at: float | None = None
    """Unix time the ask ended (applied or definitely not applied); None: it has not."""
    scope: str | None = None
    """The app id and base URL of the client that wrote it (part of ``key`` too); None:
    written before keys were scoped."""
    lineage: tuple[str, ...] = ()
    """The ``ask_id`` of each earlier ask the key held for this same request (each
    ended definitely not applied and the key was called again), oldest first: a
    pending record of one of them is the key's own call, and the key's refund is its
    outcome. At most :data:`LINEAGE` kept."""
    guard: bool = False
    """A new ask of the key reads the bag before it is sent, and is held back (not
    sent: ``RefundAlreadyPresentError``) when the bag already holds a refund exactly
    like it that nothing accounts for. Set by a store that cannot tell whether it lost
    the key's earlier entry (RedisStore, while its epoch is young or after Redis lost
    its data); kept on the key's entry from then on. MemoryStore and SQLiteStore never
    set it."""

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def same_request(self, ask: PendingRefund) -> bool:
        """True when ``ask`` asks for exactly what this entry's ask asked for."""
        return self.ask.same_request(ask)

    def to_json(self) -> bytes:
        refund = None
        if self.refund is not None:
            refund = converter.unstructure(self.refund)
        data = {
            "v": 1,
            "key": self.key,
            "ask": self.ask.to_dict(),
            "refund": refund,
            "owner": self.owner,
            "lease_until": self.lease_until,
            "finished_at": self.finished_at,
            "scope": self.scope,
            "lineage": list(self.lineage),
        }
        if self.guard:
            data["guard"] = True
        return orjson.dumps(data)

    @classmethod
    def from_json(cls, raw: bytes | str) -> KeyEntry:
        """Read an entry written by :meth:`to_json` (ValueError when it cannot be:
        anything in a shared file or Redis may have been written by someone else)."""
        try:
            data: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc.msg})") from None
        if not isinstance(data, dict) or data.get("v") != 1 or not isinstance(data.get("key"), str):
            raise ValueError("not a violet_async key entry (version 1)")
        ask = PendingRefund.from_dict(data.get("ask"))
        refund: OrderRefund | None = None
        stored = data.get("refund")
        if stored is not None:
            if not isinstance(stored, dict):
                raise ValueError("its refund is not an object")
            body = orjson.dumps(stored)
            refund = structure(stored, OrderRefund, body=body, status=200, method="", path="")
            refund = attrs.evolve(
                refund,
                reconciled=stored.get("reconciled") is True,
                request_id=stored.get("request_id")
                if isinstance(stored.get("request_id"), str)
                else None,
            )
        owner = data.get("owner")
        scope = data.get("scope")
        lineage = data.get("lineage")
        if not isinstance(lineage, list) or not all(isinstance(one, str) for one in lineage):
            lineage = []
        return cls(
            key=data["key"],
            ask=ask,
            refund=refund,
            owner=owner if isinstance(owner, str) else None,
            lease_until=_number(data.get("lease_until")),
            finished_at=_number(data.get("finished_at")),
            scope=scope if isinstance(scope, str) else None,
            lineage=tuple(lineage[-LINEAGE:]),
            guard=data.get("guard") is True,
        )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def decide(
    current: KeyEntry | None,
    fresh: KeyEntry,
    *,
    now: float,
    retention: float,
    expired: bool | None = None,
) -> tuple[Claim, KeyEntry, KeyEntry | None]:
    """The rule for a call claiming ``fresh.key`` (``fresh``: its NEW ask, owned by the
    caller, with a lease). Returns what the call found, the entry as it stands after
    the claim, and the entry to write (None: write nothing). Pure: every store applies
    it inside its own atomic step.

    - nothing there: the call owns a fresh entry;
    - a finished entry past retention, for another request: the key is free again
      (the call owns a fresh entry). For the same request it still answers as below:
      retention is measured on the wall clock, which can step, so it only bounds what
      a store prunes, never turns a made refund into a new ask;
    - another request under the key: REUSED, nothing written (whatever its state);
    - applied: FINISHED (the refund is in the entry);
    - definitely not applied: ENDED for a resume of that very ask (or of one of the
      key's earlier asks), nothing written; for a new ask the key is free again, the
      call owns a fresh entry (a second try cannot refund twice what never applied
      once);
    - owned by another caller whose lease runs: BUSY;
    - a new ask never sent, claimed for a resume of one of the key's earlier asks:
      ENDED (that ask failed; nothing written);
    - otherwise (new, sent or pending, nobody alive on it): the call takes it over and
      resumes the recorded ask, never sending blind.

    ``expired``: whether ``current`` is finished and past retention, as the store
    counts it (on a clock a step of the wall clock cannot move, review 14); None: by
    the wall clock alone (``finished_at + retention <= now``).
    """
    if expired is None:
        expired = (
            current is not None
            and current.finished_at is not None
            and current.finished_at + retention <= now
        )
    if current is None:
        return Claim.OWNED, fresh, fresh
    if not current.same_request(fresh.ask):
        if expired:
            return Claim.OWNED, fresh, fresh
        return Claim.REUSED, current, None
    if current.ask.phase is Phase.APPLIED and current.refund is not None:
        return Claim.FINISHED, current, None
    if current.ask.phase is Phase.FAILED:
        if fresh.ask.ask_id == current.ask.ask_id or fresh.ask.ask_id in current.lineage:
            # A resume of the ask that failed (or of an earlier one of the key, which
            # failed too): its caller was told so; nothing of it is sent again.
            return Claim.ENDED, current, None
        # The key is free again for the same request: the failed ask joins its lineage
        # (a pending record of it, resumed later, is the key's own call).
        lineage = (*current.lineage, current.ask.ask_id)[-LINEAGE:]
        fresh = attrs.evolve(fresh, lineage=lineage)
        return Claim.OWNED, fresh, fresh
    alive = current.owner is not None and (current.lease_until or 0.0) > now
    if alive and current.owner != fresh.owner:
        return Claim.BUSY, current, None
    if current.ask.phase is Phase.NEW and fresh.ask.ask_id in current.lineage:
        # A resume of one of the key's earlier asks (each ended definitely not applied)
        # while the key holds a repeat never sent: its caller was told "failed"; it is
        # not sent anew through the repeat's entry (review 16: a second delivery of a
        # resume job, after a repeat of the key was held back unsent, sent it again).
        return Claim.ENDED, current, None
    taken = attrs.evolve(current, owner=fresh.owner, lease_until=fresh.lease_until)
    return Claim.OWNED, taken, taken


class SweepClock:
    """When a store may drop finished keys: retention counted on the wall clock the
    calls pass (``now``, shared by processes) and on this process's monotonic clock at
    once. The wall clock steps (NTP, an operator): a step forward past the retention
    would make every finished key look old and the next sweep would drop them all, and
    the same request under a dropped key would be sent again. The cutoff is the earlier
    of the two readings, so a step forward never sweeps; a step back only delays it.
    ``monotonic``: the clock (default ``time.monotonic``; a test's ``FakeClock.monotonic``)."""

    def __init__(self, monotonic: Callable[[], float] | None = None) -> None:
        self._monotonic = monotonic or time.monotonic
        self._ref: tuple[float, float] | None = None

    def monotonic(self) -> float:
        """The monotonic clock's reading now."""
        return self._monotonic()

    def cutoff(self, now: float, retention: float) -> float:
        """Finished keys ending at or before this may be dropped."""
        mono = self._monotonic()
        if self._ref is None:
            self._ref = (now, mono)
        wall, at = self._ref
        steady = wall + (mono - at)
        return min(now, steady) - retention


def check_seconds(name: str, value: float) -> None:
    """A store's ``retention`` / ``lease`` must be a positive number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise RequestValidationError(name, f"must be a number of seconds > 0, got {value!r}")


class RecordStore(Protocol):
    """Where keyed asks are kept (``VioletClient(store=...)``).

    Implementations: :class:`~violet_async.stores.MemoryStore`,
    :class:`~violet_async.stores.SQLiteStore`, :class:`~violet_async.stores.RedisStore`.
    Every method may raise; the engine turns a failure into ``RecordStoreError`` and,
    before a send, sends nothing.
    """

    lease: float
    """Seconds an owner holds a key without renewing it."""
    retention: float
    """Seconds a finished key is kept."""

    async def claim(self, fresh: KeyEntry, now: float) -> tuple[Claim, KeyEntry]:
        """Apply :func:`decide` to what is stored under ``fresh.key`` and write what it
        says, atomically. Returns the claim and the entry as it stands after it."""
        ...

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        """Write ``entry`` if ``owner`` still owns the key (durably, before returning:
        a send follows). False, and nothing written, when it does not."""
        ...

    async def renew(self, key: str, owner: str, lease_until: float) -> bool:
        """Move the lease of ``owner`` on ``key`` to ``lease_until`` (only the lease);
        False when ``owner`` no longer owns it."""
        ...

    async def load(self, key: str) -> KeyEntry | None:
        """The entry under ``key``, if any."""
        ...

    async def aclose(self) -> None:
        """Let go of connections and files (idempotent)."""
        ...
