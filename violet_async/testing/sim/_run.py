"""Schedules: what the simulated world does (drawn from one seed), running one through
the real client, batch runner and journal, the invariants checked on every schedule,
and shrinking a failing one to the fewest faults that still fail."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from ... import _journal
from ..._ask import PendingRefund
from ..._client import VioletClient
from ..._engine import Outcome, engine_of, outcome_of
from ..._retry import RetryPolicy
from ..._transport import Timeouts
from ...batch import BatchItem, run_batch
from ...exceptions import (
    AmbiguousOutcomeError,
    BagPendingError,
    RateLimitError,
    RecordStoreError,
    VioletError,
)
from ...models import CancelBagRequest, RefundBagRequest, SkuRefund
from .._faults import ServerQuirks
from .._state import RuleViolation
from . import _fleet, _kinds_answers, _kinds_more, _kinds_order, _kinds_review, _named
from ._kinds_answers import ANSWER_KINDS
from ._kinds_more import MORE_KINDS, MerchantLimit, SecondCaller
from ._kinds_order import ORDER_KINDS
from ._kinds_review import REVIEW_KINDS, ReviewWorld
from ._violet import (
    ASK_LABEL,
    AUTH_KINDS,
    CANCEL_SHAPES,
    POST_KINDS,
    READ_KINDS,
    WORLD_POST_KINDS,
    WORLD_READ_KINDS,
    SimFault,
    SimTransport,
    SimViolet,
)
from ._vloop import SimClock, SimDeadlock, VirtualTimeLoop

__all__ = ["CI_KINDS", "WORLD_KINDS", "Schedule", "SimResult", "generate", "shrink", "simulate"]

#: The world kinds a schedule can switch on (``generate(seed, kinds=...)``), each drawn
#: from a second random stream so that a seed's schedule without them is unchanged:
#: - ``status_lag``: a bag's status moves minutes after its refund or cancel;
#: - ``dates``: refund dates with day precision (``T00:00:00Z``) or epoch milliseconds;
#: - ``date_headers``: ``Date`` headers that jump (one answer hours off) or disagree
#:   with the refund dates (a CDN's clock, hours off);
#: - ``clock_steps``: the client's wall clock steps (NTP), monotonic untouched;
#: - ``wrong_bag``: a 2xx naming another bag and another refund (committed);
#: - ``cancel_shapes``: a committed cancel answered as the older page's bare refund, with
#:   ``cancelled_bags: []``, or with only another bag's entry;
#: - ``stale_replica``: list reads from a replica that hides refunds it already showed
#:   (shows, hides, shows), and review-parked asks resumed by their caller;
#: - ``junk``: a list read carrying a record nobody can read;
#: - ``fulfilled``: fulfilled bags (a cancel answers CANCELLATION_FAILURE);
#: - ``old_refunds``: refunds made before the run on the merchant's platform (EXTERNAL,
#:   no transaction id) or by another app, hours old, some of an asked amount;
#: - ``late_listed``: refunds another system made minutes before the run (EXTERNAL or
#:   another app's, of an amount an ask asks for) that the bag's list shows only seconds
#:   into it (a replica behind): a baseline read misses them;
#: - ``date_lag``: ``Date`` headers minutes behind the clock that dates refunds (a load
#:   balancer stamping its own, inside the minutes a ``Date`` is taken for Violet's),
#:   and another system's refund of an asked amount made seconds to minutes before the
#:   run (a kind of its own, not ``dates``: the seeds recorded with ``dates`` replay
#:   unchanged);
#: - ``resume_twice``: every resume job delivered twice to the same client;
#: - ``caller_cancel``: a caller cancels its call at a random await and repeats it,
#:   with the same idempotency key (half of them) or without one;
#: - ``record_shapes``: refund lists that leave ``skus`` out of every record, and
#:   refund attempts that moved no money (FAILED or CANCELED, of an asked amount or a
#:   bag's total) listed on bags from before the run;
#: - ``merchant_429``, ``two_clients_one_store``, ``redis_loss``, ``worker_dies``: see
#:   ``_kinds_more``;
#: - ``refund_answers``, ``keyed_resume``: see ``_kinds_answers``;
#: - ``key_clock``, ``resume_elsewhere``, ``refund_in_429``, ``early_resume``: see
#:   ``_kinds_review``;
#: - ``other_order``: see ``_kinds_order``.
WORLD_KINDS = (
    "status_lag",
    "dates",
    "date_headers",
    "clock_steps",
    "wrong_bag",
    "cancel_shapes",
    "stale_replica",
    "junk",
    "fulfilled",
    "old_refunds",
    "resume_twice",
    "caller_cancel",
    "late_listed",
    "record_shapes",
    "date_lag",
    *MORE_KINDS,
    *ANSWER_KINDS,
    *REVIEW_KINDS,
    *ORDER_KINDS,
)
#: The world kinds CI's seeds switch on: those the code on main holds under (the others
#: find bugs whose fixes have not landed yet; see ``benchmarks/simulate.py --kinds``).
CI_KINDS = frozenset(
    {
        "cancel_shapes",
        "fulfilled",
        "junk",
        "old_refunds",
        "caller_cancel",
        "wrong_bag",
        "merchant_429",
        "two_clients_one_store",
        "worker_dies",
    }
)

APP_ID = 11
#: The deadline tolerance, in virtual seconds.
DEADLINE_SLACK = 1e-6


@attrs.frozen
class BagSpec:
    price: int
    quantity: int
    shipping: int
    fulfilled: bool = False


@attrs.frozen
class OldRefund:
    """A refund on a bag from before the run, ``age`` seconds old, made by the
    merchant's platform (EXTERNAL) or by another app."""

    bag: int
    amount: int
    age: float
    external: bool
    listed_in: float = 0.0
    """Seconds into the run before the bag's list shows it (0: from the start)."""
    reason: str | None = "Refunded on the platform"


@attrs.frozen
class CallerCancel:
    """The caller of ask ``label`` cancels its call ``after`` seconds in (at whatever
    await it is), then makes the same call again ``again`` seconds later."""

    label: str
    after: float
    again: float
    keyed: bool = False
    """Both calls carry the idempotency key ``key-<label>``."""


@attrs.frozen
class AskSpec:
    label: str
    bag: int
    kind: str
    amount: int | None
    """None: the whole bag (refund)."""
    skus: bool
    reason: str | None
    start: float


@attrs.frozen
class Actor:
    at: float
    bag: int
    amount: int


@attrs.frozen
class Crash:
    at: float | None = None
    """Virtual seconds into the run."""
    write: int | None = None
    """Or: during the run's n-th journal write (1-based), torn at ``cut`` of it."""
    cut: float = 0.5


@attrs.frozen
class Schedule:
    """Everything a simulated run does, drawn from ``seed`` by :func:`generate`;
    replaying the same Schedule replays the run exactly."""

    seed: int
    mode: str
    """"direct" (concurrent calls in one client), "batch" (run_batch with a journal,
    crashes and resumes) or "worker" (jobs redelivered to a second worker)."""
    bags: tuple[BagSpec, ...]
    asks: tuple[AskSpec, ...]
    max_attempts: int = 4
    deadline: float | None = 60.0
    settle_running: float = 60.0
    settle_lag: float = 5.0
    jitter: bool = False
    read_before_send: bool = False
    connect: float = 5.0
    read: float = 30.0
    concurrency: int = 4
    max_latency: float = 0.2
    naive_dates: bool = False
    skew: float = 0.0
    date_header: bool = True
    trim_reasons: bool = False
    page_size: int | None = None
    lags: tuple[float, ...] = (0.0,)
    post_faults: tuple[SimFault | None, ...] = ()
    read_faults: tuple[SimFault | None, ...] = ()
    auth_faults: tuple[SimFault | None, ...] = ()
    actors: tuple[Actor, ...] = ()
    crashes: tuple[Crash, ...] = ()
    # -- world kinds (WORLD_KINDS; all off by default) ---------------------------
    kinds: frozenset[str] = frozenset()
    bag_status_lag: float = 0.0
    date_style: str = "iso"
    day_zone: float = 0.0
    """With ``date_style`` "day": the UTC offset (seconds) of the zone whose midnight
    each date is written at (``2025-06-15T00:00:00+09:00``; 0: ``...T00:00:00Z``)."""
    day_zone_utc: bool = False
    """With a ``day_zone``: that midnight written in UTC (``2025-06-14T15:00:00+0000``),
    as a platform storing the day converts it (review 39)."""
    date_bias: float = 0.0
    date_jumps: tuple[float, ...] = ()
    date_lag: float = 0.0
    """Seconds every ``Date`` header runs behind the clock that dates refunds."""
    clock_steps: tuple[tuple[float, float], ...] = ()
    """(virtual seconds into the run, step in seconds) of the client's wall clock."""
    old_refunds: tuple[OldRefund, ...] = ()
    resume_twice: bool = False
    resume_review: bool = False
    cancels: tuple[CallerCancel, ...] = ()
    cancel_shapes: tuple[str | None, ...] = ()
    """The shape of the n-th applied cancel's answer (None: Violet's 202 body)."""
    replica_lag: float = 0.0
    """Every other list read of an ask that was parked comes from a replica this far
    behind (it hides what it already showed that ask)."""
    listed_without_skus: bool = False
    """The bag's refund list leaves ``skus`` out of every record."""
    dead_refunds: tuple[OldRefund, ...] = ()
    """Refund attempts from before the run that moved no money (``external``: CANCELED,
    else FAILED)."""
    # -- _kinds_more ---------------------------------------------------------------
    merchants: tuple[int, ...] = ()
    """Each bag's merchant (an index from ``_kinds_more.MERCHANT_BASE``)."""
    merchant_limits: tuple[MerchantLimit, ...] = ()
    merchant_ids_known: bool = False
    """Batch and worker items carry their merchant's id (else the batch, or the fleet,
    learns it)."""
    second_callers: tuple[SecondCaller, ...] = ()
    shared_store: str = ""
    """The record store two client processes share: "memory" or "sqlite"."""
    worker_dies: int = 0
    """The first worker dies right after its n-th ledger write (0: never)."""
    ledger_loss: float | None = None
    """Virtual seconds into the worker run when the ledger loses everything."""
    keyed_resume: bool = False
    """The first process resumes a keyed call's pending record (``_kinds_answers``)."""
    loss_same_worker: bool = False
    """After the loss, the first worker runs again the jobs it finished before it (the
    file enqueued again, taken by the worker whose client made those refunds)."""
    review: ReviewWorld | None = None
    """What ``_kinds_review``'s kinds drew (None: none of them)."""
    keep_cancelled_sends: bool = False
    """Every client of the run is made with ``keep_cancelled_sends`` (a cancelled call's
    POST runs on apart and its late answer is kept): on in the worlds where callers
    cancel their calls (``caller_cancel``, a second caller's cut), drawn from nothing,
    so every other schedule runs as before."""
    other_order: tuple[str, float] | None = None
    """``_kinds_order``: (ask label, seconds after its first POST) when its bag lists
    another order's refund of its amount and reason."""

    def fault_count(self) -> int:
        return (
            sum(f is not None for f in (*self.post_faults, *self.read_faults, *self.auth_faults))
            + len(self.actors)
            + len(self.crashes)
            + sum(bool(j) for j in self.date_jumps)
            + bool(self.date_lag)
            + len(self.clock_steps)
            + len(self.old_refunds)
            + len(self.dead_refunds)
            + self.listed_without_skus
            + len(self.cancels)
            + sum(c is not None for c in self.cancel_shapes)
            + len(self.merchant_limits)
            + len(self.second_callers)
            + bool(self.worker_dies)
            + (self.ledger_loss is not None)
            + (self.review is not None)
            + (self.other_order is not None)
        )

    def describe(self) -> str:
        def faults(name: str, items: tuple[SimFault | None, ...]) -> str:
            shown = [f"#{i}:{f}" for i, f in enumerate(items) if f is not None]
            return f"{name}: {', '.join(shown) or '-'}"

        asks = "; ".join(
            f"{a.label}={a.kind} bag{a.bag} amount={a.amount} skus={a.skus} "
            f"reason={a.reason!r} at+{a.start:g}"
            for a in self.asks
        )
        return "\n".join(
            [
                f"seed {self.seed} mode={self.mode} asks: {asks}",
                f"policy: attempts={self.max_attempts} deadline={self.deadline} "
                f"settle_running={self.settle_running} settle_lag={self.settle_lag} "
                f"jitter={self.jitter} read_before_send={self.read_before_send} "
                f"timeouts={self.connect}+{self.read} concurrency={self.concurrency}"
                + (" keep_cancelled_sends=True" if self.keep_cancelled_sends else ""),
                f"server: naive_dates={self.naive_dates} skew={self.skew:g} "
                f"date_header={self.date_header} trim={self.trim_reasons} "
                f"page_size={self.page_size} lags={self.lags} max_latency={self.max_latency}",
                faults("post faults", self.post_faults),
                faults("read faults", self.read_faults),
                faults("auth faults", self.auth_faults),
                f"actors: {list(self.actors) or '-'}",
                f"crashes: {list(self.crashes) or '-'}",
                *([] if not self.kinds else [self._describe_world()]),
            ]
        )

    def _describe_world(self) -> str:
        jumps = [f"#{i}:{j:+g}" for i, j in enumerate(self.date_jumps) if j]
        fulfilled = [i for i, b in enumerate(self.bags) if b.fulfilled]
        return (
            f"world kinds: {sorted(self.kinds)}\n"
            f"world: bag_status_lag={self.bag_status_lag:g} date_style={self.date_style} "
            f"day_zone={self.day_zone:+g}{' (in UTC)' if self.day_zone_utc else ''} "
            f"date_bias={self.date_bias:+g} date_jumps={jumps or '-'} "
            f"date_lag={self.date_lag:g} "
            f"clock_steps={list(self.clock_steps) or '-'} fulfilled={fulfilled or '-'} "
            f"old_refunds={list(self.old_refunds) or '-'} resume_twice={self.resume_twice} "
            f"resume_review={self.resume_review} cancels={list(self.cancels) or '-'} "
            f"cancel_shapes={list(self.cancel_shapes) or '-'} replica_lag={self.replica_lag:g}\n"
            f"world: merchants={list(self.merchants) or '-'} "
            f"merchant_limits={list(self.merchant_limits) or '-'} "
            f"merchant_ids_known={self.merchant_ids_known} "
            f"second_callers={list(self.second_callers) or '-'} "
            f"shared_store={self.shared_store or '-'} worker_dies={self.worker_dies} "
            f"ledger_loss={self.ledger_loss} loss_same_worker={self.loss_same_worker}\n"
            f"world: listed_without_skus={self.listed_without_skus} "
            f"dead_refunds={list(self.dead_refunds) or '-'}"
            + (f"\n{self.review.describe()}" if self.review is not None else "")
            + (f"\nworld: other_order={self.other_order}" if self.other_order else "")
        )


def _fault(rng: random.Random, kinds: tuple[str, ...], late_max: float) -> SimFault:
    kind = rng.choice(kinds)
    if kind == "rate_limit":
        return SimFault(kind, delay=rng.choice((0.0, 1.0, 3.0)))
    if kind.startswith("gateway"):
        return SimFault(kind, status=rng.choice((502, 503, 504, 524)))
    if kind.startswith("violet"):
        return SimFault(kind, status=rng.choice((500, 503)))
    if kind.endswith("_late"):
        # Commit "before / after / long after" the answer: anything Violet may still
        # be running within the settle window (less the list lag that follows it).
        tricky = (0.5, 2.5, 7.0, late_max / 2, late_max)
        delay = rng.choice(tricky) if rng.random() < 0.6 else rng.uniform(0.0, late_max)
        return SimFault(kind, delay=round(min(delay, late_max), 3))
    return SimFault(kind)


def generate(
    seed: int, *, mode: str | None = None, kinds: frozenset[str] | set[str] = frozenset()
) -> Schedule:
    """The schedule of ``seed``: every choice from ``random.Random(seed)``; the world
    ``kinds`` (see WORLD_KINDS) from a second stream, laid over it."""
    unknown = set(kinds) - set(WORLD_KINDS)
    if unknown:
        raise ValueError(f"unknown world kinds {sorted(unknown)}; choose from {WORLD_KINDS}")
    base = _generate(seed, mode=mode)
    return _world(base, frozenset(kinds)) if kinds else base


def _world(s: Schedule, kinds: frozenset[str]) -> Schedule:
    """``s`` with the world ``kinds`` drawn from their own stream."""
    rng = random.Random(f"world:{s.seed}")
    changes: dict[str, Any] = {"kinds": kinds}
    post = list(s.post_faults)
    reads = list(s.read_faults)
    if "status_lag" in kinds and rng.random() < 0.6:
        changes["bag_status_lag"] = rng.choice((30.0, 120.0, 600.0))
    if "dates" in kinds and not s.naive_dates and rng.random() < 0.5:
        changes["date_style"] = rng.choice(("day", "epoch"))
    if "date_headers" in kinds and s.date_header:
        if rng.random() < 0.4:
            changes["date_bias"] = rng.choice((-10_800.0, 10_800.0, -54_000.0, 54_000.0))
        changes["date_jumps"] = tuple(
            rng.choice((-54_000.0, -10_800.0, -120.0, 120.0, 10_800.0, 54_000.0))
            if rng.random() < 0.08
            else 0.0
            for _ in range(80)
        )
    if "clock_steps" in kinds and rng.random() < 0.6:
        changes["clock_steps"] = tuple(
            (
                round(rng.uniform(0, 40), 3),
                rng.choice((-54_000.0, -10_800.0, -30.0, 30.0, 10_800.0, 54_000.0)),
            )
            for _ in range(rng.randint(1, 2))
        )
    if "wrong_bag" in kinds:
        for i in range(len(post)):
            if rng.random() < 0.1:
                post[i] = SimFault(rng.choice(WORLD_POST_KINDS))
    if "cancel_shapes" in kinds:
        changes["cancel_shapes"] = tuple(
            rng.choice(CANCEL_SHAPES) if rng.random() < 0.5 else None for _ in range(6)
        )
    if "junk" in kinds:
        for i in range(len(reads)):
            if rng.random() < 0.1:
                reads[i] = SimFault(rng.choice(WORLD_READ_KINDS))
    if "stale_replica" in kinds:
        changes["resume_review"] = True
        if rng.random() < 0.7:
            changes["replica_lag"] = rng.choice((8.0, 30.0, 120.0, 600.0))
    if "fulfilled" in kinds:
        changes["bags"] = tuple(attrs.evolve(b, fulfilled=rng.random() < 0.3) for b in s.bags)
    if "old_refunds" in kinds and rng.random() < 0.5:
        olds = []
        for _ in range(rng.randint(1, 2)):
            bag = rng.randrange(len(s.bags))
            asked = [a.amount for a in s.asks if a.bag == bag and a.amount is not None]
            amount = rng.choice([*asked, 50, 130]) if asked else rng.choice((50, 130))
            age = rng.choice((3_600.0, 20 * 3_600.0, 3 * 86_400.0))
            olds.append(OldRefund(bag, amount, age, rng.random() < 0.5))
        changes["old_refunds"] = tuple(olds)
    if "resume_twice" in kinds:
        changes["resume_twice"] = rng.random() < 0.7
    if "caller_cancel" in kinds and s.mode == "direct":
        changes["cancels"] = tuple(
            CallerCancel(
                a.label,
                round(rng.uniform(0.0, 20.0), 3),
                rng.choice((0.0, 1.0, 70.0)),
                keyed=rng.random() < 0.5,
            )
            for a in s.asks
            if rng.random() < 0.4
        )
    if "late_listed" in kinds:
        changes["old_refunds"] = (*changes.get("old_refunds", ()), *_late_listed(s))
    changes.update(
        _record_shapes(s, kinds),
        **_date_lag(s, kinds, changes.get("old_refunds", ())),
        **_day_zone(s.seed, changes.get("date_style", s.date_style)),
    )
    changes["post_faults"] = tuple(post)
    changes["read_faults"] = tuple(reads)
    labels = tuple(a.label for a in s.asks)
    bags = Counter(a.bag for a in s.asks)
    alone = frozenset(a.label for a in s.asks if bags[a.bag] == 1)
    changes.update(_kinds_more.draw(s.seed, s.mode, len(s.bags), labels, kinds, alone))
    return _keeps_cancelled_sends(
        _review(_answers(attrs.evolve(s, **changes, **_kinds_order.draw(s, kinds)), kinds), kinds)
    )


def _day_zone(seed: int, style: str) -> dict[str, float | bool]:
    """With day-precision dates: the zone whose midnight they are written at, drawn
    from its own stream (every other draw of the seed stays as it was). Review 38: a
    day written as midnight in the platform's own zone (``...T00:00:00+09:00``) was
    read as that moment, hours before the send: the ask's own refund proven absent."""
    if style != "day":
        return {}
    zones = (0.0, 0.0, 32_400.0, 19_800.0, -18_000.0)
    rng = random.Random(f"day_zone:{seed}")
    zone = rng.choice(zones)
    # Review 39: that midnight written in UTC, an exact-looking moment.
    return {"day_zone": zone, "day_zone_utc": bool(zone) and rng.random() < 0.5}


def _keeps_cancelled_sends(s: Schedule) -> Schedule:
    """``s`` with ``keep_cancelled_sends`` on where a caller cancels a call (nothing
    drawn: every other schedule stays as it was)."""
    if s.cancels or any(c.cancel_after is not None for c in s.second_callers):
        return attrs.evolve(s, keep_cancelled_sends=True)
    return s


def _answers(s: Schedule, kinds: frozenset[str]) -> Schedule:
    """``s`` with ``_kinds_answers``' kinds of ``kinds`` laid over it."""
    if not kinds & set(ANSWER_KINDS):
        return s
    post = list(s.post_faults)
    more = _kinds_answers.draw(s, kinds, post)
    return attrs.evolve(s, **more, post_faults=tuple(post))


def _review(s: Schedule, kinds: frozenset[str]) -> Schedule:
    """``s`` with ``_kinds_review``'s kinds of ``kinds`` laid over it."""
    if not kinds & set(REVIEW_KINDS):
        return s
    return attrs.evolve(s, **_kinds_review.draw(s, kinds))


def _date_lag(s: Schedule, kinds: frozenset[str], olds: tuple[OldRefund, ...]) -> dict[str, Any]:
    """Remaining risk (e), from its own stream (schedule changes; none without the
    ``date_lag`` kind): ``Date`` headers 60 s or 170 s behind the refund clock (inside
    ``TRUSTED_DATE``), and another system's refund (another app's: not EXTERNAL) of
    what an ask asks for (amount and reason), made 30 s or 100 s before the run,
    listed from the start; a caller resumes asks parked for review, minutes later. By
    the headers' clock that refund was made after the run began; it is never an ask's
    own. (Drawn where this machine's clock is not behind Violet's: the rule holds
    while one of the two clocks is not behind the one that dates refunds.)"""
    if "date_lag" not in kinds:
        return {}
    rng = random.Random(f"world-date-lag:{s.seed}")
    if rng.random() >= 0.7 or not s.date_header or s.skew > 0:
        # With no Date, nothing lags; with this machine's clock behind Violet's too,
        # both readings run behind the refund clock and dates cannot tell (remaining
        # risk (e)).
        return {}
    changes: dict[str, Any] = {"date_lag": rng.choice((60.0, 170.0)), "resume_review": True}
    asked = [a for a in s.asks if a.amount is not None]
    if asked:
        ask = rng.choice(asked)
        assert ask.amount is not None
        age = rng.choice((30.0, 100.0))
        made = OldRefund(ask.bag, ask.amount, age, external=False, reason=ask.reason)
        changes["old_refunds"] = (*olds, made)
    return changes


def _late_listed(s: Schedule) -> list[OldRefund]:
    """Refunds another system made 10 minutes to 90 minutes before the run, of an
    amount an ask asks for, that the list shows only 0.2 to 12 s into the run: a
    baseline read may miss them. (From their own stream: the draws of the other kinds
    stay as they were.) Older than any reading of the clock can stretch to the send
    (a skew up to 300 s, a tolerance up to 60 s), so none may pass for an ask's own."""
    rng = random.Random(f"world-late-listed:{s.seed}")
    asked = [a for a in s.asks if a.amount is not None]
    if not asked or rng.random() >= 0.6:
        return []
    made = []
    for _ in range(rng.randint(1, 2)):
        ask = rng.choice(asked)
        assert ask.amount is not None
        age = rng.choice((600.0, 1_800.0, 5_400.0))
        listed_in = round(rng.uniform(0.2, 12.0), 3)
        made.append(OldRefund(ask.bag, ask.amount, age, rng.random() < 0.5, listed_in))
    return made


def _record_shapes(s: Schedule, kinds: frozenset[str]) -> dict[str, Any]:
    """``record_shapes``: lists without ``skus`` and dead attempts of an asked amount
    (or a bag's total), 1 to 120 minutes before the run. (From their own stream.)"""
    if "record_shapes" not in kinds:
        return {}
    rng = random.Random(f"world-record-shapes:{s.seed}")
    dead = []
    for _ in range(rng.choice((0, 1, 1, 2))):
        ask = rng.choice(s.asks)
        bag = s.bags[ask.bag]
        amount = ask.amount if ask.amount is not None else bag.price * bag.quantity + bag.shipping
        age = rng.choice((60.0, 600.0, 7_200.0))
        dead.append(OldRefund(ask.bag, amount, age, rng.random() < 0.3))
    return {"listed_without_skus": rng.random() < 0.5, "dead_refunds": tuple(dead)}


def _generate(seed: int, *, mode: str | None = None) -> Schedule:
    rng = random.Random(seed)
    mode = mode or rng.choice(("direct", "direct", "batch", "worker"))
    settle_running = rng.choice((20.0, 60.0))
    settle_lag = rng.choice((2.0, 5.0))
    lag_max = rng.choice((0.0, settle_lag / 2, settle_lag))
    late_max = max(settle_running - lag_max - 0.01, 0.0)
    nbags = rng.randint(1, 4)
    bags = tuple(
        BagSpec(rng.choice((500, 1000, 2500)), rng.randint(1, 3), rng.choice((0, 500)))
        for _ in range(nbags)
    )
    asks: list[AskSpec] = []
    nasks = rng.randint(1, 5)
    for i in range(nasks):
        bag = i if mode != "direct" else rng.randrange(nbags)
        if mode != "direct" and i >= nbags:
            break
        spec = bags[bag]
        kind = "cancel" if rng.random() < 0.15 else "refund"
        shape = rng.random()
        amount: int | None
        skus = False
        if kind == "cancel" or shape < 0.2:
            amount = None
        elif shape < 0.4:
            amount, skus = spec.price, True
        else:
            amount = rng.choice((100, 250, spec.price // 2, spec.price))
        reason = rng.choice((None, "Customer requested refund.", "Damaged in transit  "))
        asks.append(
            AskSpec(f"A{i}", bag, kind, amount, skus, reason, rng.choice((0.0, 0.0, 0.3, 2.0)))
        )
    rate = rng.choice((0.1, 0.3, 0.6))

    def faults(kinds: tuple[str, ...], n: int, p: float) -> tuple[SimFault | None, ...]:
        return tuple(_fault(rng, kinds, late_max) if rng.random() < p else None for _ in range(n))

    post = faults(POST_KINDS, 14, rate)
    reads = faults(READ_KINDS, 40, rate / 2)
    auth = faults(AUTH_KINDS, 4, rate / 2)
    naive = rng.random() < 0.15
    date_header = rng.random() < 0.85
    skew = rng.choice((0.0, 0.0, rng.uniform(-300, 300)))
    if not date_header:
        skew = max(min(skew, 50.0), -50.0)  # beyond clock_skew without a Date is risk (a)
    actors = tuple(
        Actor(rng.uniform(0, 40), rng.randrange(nbags), rng.choice((50, 75, 130)))
        for _ in range(rng.choice((0, 0, 0, 1, 2)))
    )
    crashes: tuple[Crash, ...] = ()
    if mode == "batch":
        crashes = tuple(
            Crash(at=round(rng.uniform(0, 30), 3))
            if rng.random() < 0.4
            else Crash(write=rng.randint(1, 3 * len(asks) + 2), cut=rng.random())
            for _ in range(rng.choice((0, 1, 2, 2, 3)))
        )
    elif mode == "worker" and rng.random() < 0.7:
        crashes = (Crash(at=round(rng.uniform(0, 40), 3)),)
    deadline = rng.choice((15.0, 30.0, 60.0, 120.0, None))
    return Schedule(
        seed=seed,
        mode=mode,
        bags=bags,
        asks=tuple(asks),
        max_attempts=rng.choice((1, 2, 4)),
        deadline=deadline,
        settle_running=settle_running,
        settle_lag=settle_lag,
        jitter=rng.random() < 0.5,
        read_before_send=rng.random() < 0.5,
        connect=rng.choice((1.0, 5.0)),
        read=rng.choice((3.0, 10.0, 30.0)),
        concurrency=rng.randint(1, 4),
        max_latency=rng.choice((0.05, 0.5, 2.0)),
        naive_dates=naive,
        skew=round(skew, 3),
        date_header=date_header,
        trim_reasons=rng.random() < 0.3,
        page_size=rng.choice((None, None, 1, 2)),
        lags=tuple(round(rng.uniform(0, lag_max), 3) for _ in range(5)),
        post_faults=post,
        read_faults=reads,
        auth_faults=auth,
        actors=actors,
        crashes=crashes,
    )


@attrs.define
class Seen:
    """One outcome a caller saw."""

    label: str
    what: str
    """"refund", "failed", "pending", "review", "crashed", "joined" (a caller without
    a key resumed another ask's record with its request: the outcome is that ask's)
    (and with _kinds_more: "not_sent", told nothing applied, or "held", not sent: the
    bag holds it)."""
    refund_id: int | None = None
    error: str = ""
    pending: PendingRefund | None = None
    who: str = ""
    """The caller (its commits' label): the ask's, or another process's (``label~2``)."""
    at: float = 0.0
    """Virtual time it was seen."""


@attrs.define
class SimResult:
    schedule: Schedule
    violations: list[str]
    trace: list[str]
    injected: Counter[str]
    outcomes: Counter[str]
    virtual_seconds: float = 0.0
    excused: list[str] = attrs.Factory(list)
    """Violations that are a named remaining risk, counted instead (``_named``)."""

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def kinds(self) -> set[str]:
        """The kinds of violation found ("double", "attribution", "deadline", ...)."""
        return {v[1 : v.index("]")] for v in self.violations if v.startswith("[")}

    def report(self) -> str:
        head = "SIMULATION VIOLATION" if self.violations else "SIMULATION, NO VIOLATION"
        lines = [f"{head}, seed {self.schedule.seed}:"]
        lines += [f"  ! {v}" for v in self.violations]
        lines += [f"  named {v}" for v in self.excused]
        lines.append("schedule:")
        lines += [f"  {line}" for line in self.schedule.describe().splitlines()]
        lines.append("trace:")
        lines += [f"  {line}" for line in self.trace]
        kinds = sorted(self.schedule.kinds)
        lines.append(
            f"replay: simulate({self.schedule.seed}, mode={self.schedule.mode!r}"
            + (f", kinds={set(kinds)!r}" if kinds else "")
            + f") or python benchmarks/simulate.py --seed {self.schedule.seed} "
            f"--mode {self.schedule.mode}" + (f" --kinds {','.join(kinds)}" if kinds else "")
        )
        return "\n".join(lines)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


@contextlib.contextmanager
def _captured_logs() -> Iterator[_Capture]:
    handler = _Capture()
    root = logging.getLogger()
    sdk = logging.getLogger("violet_async")
    old = sdk.level
    sdk.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        sdk.setLevel(old)


def simulate(
    seed_or_schedule: int | Schedule,
    *,
    mode: str | None = None,
    kinds: frozenset[str] | set[str] = frozenset(),
) -> SimResult:
    """Run one schedule (a seed with the world ``kinds`` switched on, or a Schedule)
    and check every invariant."""
    schedule = (
        generate(seed_or_schedule, mode=mode, kinds=kinds)
        if isinstance(seed_or_schedule, int)
        else seed_or_schedule
    )
    state = random.getstate()
    random.seed(schedule.seed)  # the client's backoff jitter
    loop = VirtualTimeLoop()
    world = _World(schedule, loop)
    # The journal stamps lines with time.time(): on virtual time, a torn line tears at
    # the same byte on every replay.
    real_time = getattr(_journal, "time")  # noqa: B009
    setattr(_journal, "time", _WallTime(world.clock))  # noqa: B010
    try:
        with _captured_logs() as logs, tempfile.TemporaryDirectory() as tmp:
            world.journal = Path(tmp) / "sim.journal.jsonl"
            try:
                loop.run_until_complete(world.main())
            except SimDeadlock as exc:
                world.violations.append(f"[deadlock] {exc}")
            except BaseException as exc:  # noqa: BLE001 - a bug the simulation found
                world.violations.append(f"[error] unexpected {type(exc).__name__}: {exc}")
            world.check_secrets(logs.lines)
    finally:
        setattr(_journal, "time", real_time)  # noqa: B010
        _close(loop)
        random.setstate(state)
    return SimResult(
        schedule,
        world.violations,
        world.violet.trace,
        Counter(world.violet.injected),
        Counter(s.what for s in world.final.values()),
        loop.time() - 1000.0,
        world.excused,
    )


class _WallTime:
    def __init__(self, clock: SimClock) -> None:
        self.time = clock.time


class SteppedClock(SimClock):
    """The client's clock: its wall time steps (NTP) while monotonic time does not."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__(loop)
        self._step = 0.0

    def step(self, seconds: float) -> None:
        self._step += seconds

    def time(self) -> float:
        return super().time() + self._step


def _close(loop: VirtualTimeLoop) -> None:
    try:
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


class _World:
    def __init__(self, schedule: Schedule, loop: VirtualTimeLoop) -> None:
        self.s = schedule
        self.loop = loop
        #: Violet's clock, and the client's (whose wall clock may step; see clock_steps).
        self.server_clock = SimClock(loop)
        self.clock = SteppedClock(loop)
        latency = random.Random(schedule.seed * 7 + 1)
        quirks = ServerQuirks(
            naive_dates=schedule.naive_dates,
            server_clock_skew=schedule.skew,
            trim_reasons=schedule.trim_reasons,
            page_size=schedule.page_size,
            bag_status_lag=schedule.bag_status_lag,
            listed_without_skus=schedule.listed_without_skus,
        )
        self.secret = f"sim-app-secret-{schedule.seed}"
        self.password = f"sim-password-{schedule.seed}"
        self.violet = SimViolet(
            self.server_clock,
            app_id=APP_ID,
            app_secret=self.secret,
            username="sim@example.com",
            password=self.password,
            quirks=quirks,
            post_faults=schedule.post_faults,
            read_faults=schedule.read_faults,
            auth_faults=schedule.auth_faults,
            lags=schedule.lags,
            latencies=lambda: latency.uniform(0.005, schedule.max_latency),
            date_header=schedule.date_header,
            date_jumps=schedule.date_jumps,
            date_bias=schedule.date_bias - schedule.date_lag,
            date_style=schedule.date_style,
            day_zone=schedule.day_zone,
            day_zone_utc=schedule.day_zone_utc,
            cancel_shapes=schedule.cancel_shapes,
            replica_lag=schedule.replica_lag,
        )
        self.ids: list[tuple[int, int]] = []
        #: Which ask each record (by ask_id) was made for: the label the call that left
        #: it pending ran under. A caller without a key may resume another ask's
        #: record (see ``call``): its outcome is that ask's.
        self.record_owner: dict[str, str] = {}
        #: Records resumed by a caller other than their ask's.
        self.taken: set[str] = set()
        #: Every ask by label, with the repeats that are asks of their own (``again``).
        self.asks: dict[str, AskSpec] = {a.label: a for a in schedule.asks}
        for n, bag in enumerate(schedule.bags):
            merchant = {}
            if schedule.merchants:
                merchant["merchant_id"] = _kinds_more.MERCHANT_BASE + schedule.merchants[n]
            order = self.violet.store.add_order(
                [
                    {
                        "skus": [{"quantity": bag.quantity, "price": bag.price}],
                        "shipping": bag.shipping,
                        "fulfilled": bag.fulfilled,
                        **merchant,
                    }
                ]
            )
            self.ids.append((order.id, next(iter(order.bags))))
        if schedule.merchant_limits:
            self.violet.post_gate = _kinds_more.MerchantGate(
                self.violet,
                {
                    bag_id: _kinds_more.MERCHANT_BASE + m
                    for (_, bag_id), m in zip(self.ids, schedule.merchants, strict=True)
                },
                schedule.merchant_limits,
            )
        _kinds_review.arm(self)
        _kinds_order.arm(self)
        self.world_counts()
        self.violations: list[str] = []
        #: Every ``[attribution]`` violation with what the ask saw, and the named risks
        #: counted instead of flagged (``check_named``).
        self.attributions: list[tuple[str, Seen]] = []
        self.excused: list[str] = []
        self.seen: list[Seen] = []
        self.final: dict[str, Seen] = {}
        self.errors: list[str] = []
        #: Asks two client processes call with one key (two_clients_one_store).
        self.two_processes = {c.label for c in schedule.second_callers}
        self.journal: Path | None = None
        self.clients = 0
        #: _kinds_review: the first process's client, the early-resume job worker's,
        #: the asks that ended in worker two (when), those resumed early, their tasks.
        self.main_client: VioletClient | None = None
        self.job_client: VioletClient | None = None
        #: The record store of each process whose client runs asks, by its client's
        #: name ("app", early_resume's "job"): for ``_named.risk_d``.
        self.process_stores: dict[str, Any] = {}
        self.review_ended: dict[str, float] = {}
        self.review_early: set[str] = set()
        self.review_tasks: list[asyncio.Future[None]] = []
        self.policy = RetryPolicy(
            max_attempts=schedule.max_attempts,
            deadline=schedule.deadline,
            settle_running=schedule.settle_running,
            settle_lag=schedule.settle_lag,
            jitter=schedule.jitter,
            read_before_send=schedule.read_before_send,
        )
        self.timeouts = Timeouts(connect=schedule.connect, read=schedule.read)

    # -- helpers ------------------------------------------------------------

    def world_counts(self) -> None:
        """The world kinds this schedule switched on, counted like faults, and the
        refunds from before the run made."""
        s, count = self.s, self.violet.count
        store = self.violet.store
        if s.bag_status_lag:
            count("world:bag_status_lag")
        if s.date_style != "iso":
            count(f"world:dates_{s.date_style}")
        if s.date_style == "day" and s.day_zone:
            count("world:dates_day_zone_utc" if s.day_zone_utc else "world:dates_day_zone")
        if s.date_bias:
            count("world:date_header_disagrees")
        if s.date_lag:
            count("world:date_header_lags")
        fulfilled = sum(b.fulfilled for b in s.bags)
        if fulfilled:
            count("world:fulfilled_bag", fulfilled)
        if s.resume_twice and s.mode in ("direct", "worker"):
            count("world:resume_delivered_twice")
        if s.merchant_limits:
            count("world:merchant_limited", len(s.merchant_limits))
        if s.second_callers and s.mode == "direct":
            count(f"world:second_caller_{s.shared_store}", len(s.second_callers))
        for old in s.old_refunds:
            order_id, bag_id = self.ids[old.bag]
            bag = store.bag(order_id, bag_id)
            try:
                record = store.commit_refund(
                    bag,
                    {"amount_refunded": old.amount, "reason": old.reason},
                    status="EXTERNAL" if old.external else "COMPLETED",
                    route="external",
                    age_seconds=old.age,
                )
            except RuleViolation:
                continue
            if old.listed_in:
                store.list_late(record["id"], bag_id, old.listed_in)
                count("world:late_listed_refund")
            self.violet._committed(None, bag, record)
            count("world:old_external_refund" if old.external else "world:old_refund")
        for dead in s.dead_refunds:
            order_id, bag_id = self.ids[dead.bag]
            status = "CANCELED" if dead.external else "FAILED"
            record = store.dead_refund(
                store.bag(order_id, bag_id), dead.amount, status=status, age_seconds=dead.age
            )
            self.violet.commit_at[record["id"]] = store.clock.monotonic() - dead.age
            count("world:dead_refund")
        if s.listed_without_skus:
            count("world:listed_without_skus")
        for at, step in s.clock_steps:

            def jump(step: float = step) -> None:
                self.clock.step(step)
                count("clock:step")
                self.note(f"the client's wall clock steps {step:+g}s")

            self.loop.call_later(at, jump)

    def note(self, text: str) -> None:
        self.violet.note(f"   client: {text}")

    def client(
        self, name: str, store: Any = None, *, clock: Any = None
    ) -> tuple[VioletClient, SimTransport]:
        """A client (``clock``: another process's view of this machine's clocks, whose
        records name a clock of their own; default the world's)."""
        clock = clock if clock is not None else self.clock
        transport = SimTransport(self.violet, name, clock.time)
        client = VioletClient(
            APP_ID,
            self.secret,
            username="sim@example.com",
            password=self.password,
            base_url="https://sim.violet.invalid/v1",
            retry=self.policy,
            timeouts=self.timeouts,
            clock=clock,
            store=store,
            keep_cancelled_sends=self.s.keep_cancelled_sends,
            _transport=transport,
            # Auth times renewals by time.time(), not by clock= (see the report of the
            # run that built this): on virtual time its "refused fresh tokens, wait
            # 60 s" rule would never end.
            _auth_now=clock.time,
        )
        # Each record the client keeps pending belongs to the ask whose call left it.
        unsettled = engine_of(client).unsettled
        add = unsettled.add

        def owned(pending: PendingRefund, *, held: bool = False) -> None:
            label = ASK_LABEL.get()
            if label is not None:
                self.record_owner.setdefault(pending.ask_id, label)
            add(pending, held=held)

        setattr(unsettled, "add", owned)  # noqa: B010
        return client, transport

    def request(self, ask: AskSpec) -> RefundBagRequest | CancelBagRequest:
        if ask.kind == "cancel":
            return CancelBagRequest(reason=ask.reason)
        bag = self.s.bags[ask.bag]
        skus = None
        if ask.skus:
            order_id, bag_id = self.ids[ask.bag]
            sku_id = self.violet.store.bag(order_id, bag_id).skus[0].order_sku_id
            skus = [SkuRefund(order_sku_id=sku_id, quantity_refunded=1, amount_refunded=bag.price)]
        return RefundBagRequest(amount_refunded=ask.amount, skus=skus, reason=ask.reason)

    def saw(self, seen: Seen) -> None:
        seen.who = seen.who or seen.label
        if seen.what == "refund" and seen.refund_id is None:
            # A 2xx without the refund's id (refund_answers): the refund its caller's
            # own send got, if any answer to it came without one.
            mine = [r for w, r in self.violet.idless if (w or "").split("~")[0] == seen.label]
            seen.refund_id = mine[-1] if len(mine) == 1 else None
        seen.at = self.loop.time()
        if seen.pending is not None:
            self.record_owner.setdefault(seen.pending.ask_id, seen.label)
        self.seen.append(seen)
        self.final[seen.label] = seen
        self.errors.append(seen.error)
        if seen.pending is not None:
            self.errors.append(seen.pending.to_json())
        if seen.what in ("pending", "review"):
            self.violet.parked(seen.label)
        if seen.what == "pending":
            _kinds_review.parked(self, seen)
        self.note(
            f"{seen.label} saw {seen.what}"
            + (f" refund {seen.refund_id}" if seen.refund_id else "")
            + (f" ({seen.error[:160]})" if seen.error else "")
        )

    def outcome_of(self, label: str, exc: BaseException) -> Seen:
        """What a caller saw, by the engine's one classifier: pending, review, or (any
        end without a refund that cannot have applied) failed."""
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, RateLimitError) and "merchant_429" in self.s.kinds:
            # Nothing applied, by the error's contract: the caller may send it again.
            return Seen(label, "not_sent", error=error)
        if isinstance(exc, RecordStoreError):
            # Not sent by this call (a key taken over by another process, a store that
            # failed): the key's outcome is not this call's to tell; the keyed caller
            # calls again with the key for it.
            return Seen(label, "not_sent", error=error)
        outcome = outcome_of(exc)
        if outcome in (Outcome.PENDING, Outcome.REVIEW):
            pending = exc.pending if isinstance(exc, AmbiguousOutcomeError) else None
            return Seen(label, outcome.value, error=error, pending=pending)
        return Seen(label, "failed", error=error)

    def check_deadline(self, label: str, started: float) -> None:
        if self.s.deadline is None:
            return
        took = self.loop.time() - started
        if took > self.s.deadline + DEADLINE_SLACK:
            # Known: an attempt that logs in or renews its token keeps the time left from
            # before (RequestPlumbing._attempt), so it can end past the deadline.
            # ... by at most the time logins / renewals took inside the call.
            now = self.loop.time()
            spans = [(max(a, started), min(b, now)) for a, b in self.violet.auth_calls]
            spans = [(a, b) for a, b in spans if a < b]
            authed = bool(spans) and took - self.s.deadline <= (
                max(b for _, b in spans) - min(a for a, _ in spans) + DEADLINE_SLACK
            )
            self.violations.append(
                f"[{'deadline-auth' if authed else 'deadline'}] {label}: the call took "
                f"{took:.3f}s of virtual time, past its "
                f"{self.s.deadline:g}s deadline"
            )

    async def quiesce(self) -> None:
        """Faults stop; every request still running at Violet lands."""
        self.violet.stop_faults()
        await asyncio.sleep(
            self.s.settle_running + self.s.settle_lag + self.s.connect + self.s.read
        )
        self.note("faults stopped; every late commit has landed")

    # -- the run ------------------------------------------------------------

    async def main(self) -> None:
        store = self.violet.store
        for actor in self.s.actors:
            order_id, bag_id = self.ids[actor.bag]
            bag = store.bag(order_id, bag_id)
            self.loop.call_later(
                actor.at,
                self.violet.other_actor_refund,
                bag,
                actor.amount,
                "Refunded by another system",
            )
        if self.s.mode == "batch":
            await self.run_batch()
        elif self.s.mode == "worker":
            await self.run_workers()
        else:
            await self.run_direct()
        self.check()
        self.check_more()

    async def call(
        self,
        client: VioletClient,
        ask: AskSpec,
        resume: PendingRefund | None,
        *,
        repeat: bool = False,
        key: str | None = None,
        limited: int = 0,
        who: str | None = None,
    ) -> Seen:
        """One call of ``ask`` (or a resume of it) by caller ``who`` (default: the
        ask's); returns what its caller saw."""
        ASK_LABEL.set(who or ask.label)
        order_id, bag_id = self.ids[ask.bag]
        started = self.loop.time()
        failure: VioletError | None = None
        self.note(f"{ask.label}: {'resume' if resume else ask.kind} bag {bag_id}")
        try:
            if resume is not None:
                refund = await client.resume(resume)
            elif ask.kind == "cancel":
                refund = await client.cancel_bag(
                    order_id,
                    bag_id,
                    self.request(ask),  # type: ignore[arg-type]
                    idempotency_key=key,
                )
            else:
                refund = await client.refund_bag(
                    order_id,
                    bag_id,
                    self.request(ask),  # type: ignore[arg-type]
                    idempotency_key=key,
                )
        except BagPendingError as exc:
            request = self.request(ask)
            alike = [p for p in exc.pending if p.request == request]
            own = [p for p in alike if self.record_owner.get(p.ask_id) == ask.label]
            if repeat and alike and key is None:
                # The call it repeats may have left its ask pending: the caller resumes
                # the record with its request (as the error says). (A keyed call
                # resumes its own ask itself: a record it is refused with is another
                # ask's, and its refund is not this caller's.)
                self.check_deadline(ask.label, started)
                record = (own or alike)[0]
                owner = self.record_owner.get(record.ask_id, ask.label)
                if owner != ask.label:
                    # Another ask's record with the same request: without a key nothing
                    # tells the two apart. What the resume gets is that ask's outcome
                    # (its record, its refund), and this caller's ask joins it.
                    self.taken.add(record.ask_id)
                    self.violet.count("caller:joined")
                    self.saw(Seen(ask.label, "joined", error=f"joined {owner}"))
                return await self.call(client, self.asks[owner], record, who=who)
            seen = self.outcome_of(ask.label, exc)
        except VioletError as exc:
            seen = self.outcome_of(ask.label, exc)
            failure = exc
        else:
            seen = Seen(ask.label, "refund", refund.id)
        seen.who = who or ask.label
        self.saw(seen)
        self.check_deadline(ask.label, started)
        if (
            seen.what == "not_sent"
            and isinstance(failure, RateLimitError)
            and limited < _kinds_more.CALLER_429_TRIES
        ):
            # 429 (nothing applied): the caller waits as told and calls again.
            await asyncio.sleep(_kinds_more.retry_after(failure))
            return await self.call(
                client, ask, resume, repeat=repeat, key=key, limited=limited + 1, who=who
            )
        return seen

    async def run_direct(self) -> None:
        seconds = {c.label: c for c in self.s.second_callers}
        assert self.journal is not None
        review = self.s.review
        if review is not None and review.retention and seconds:
            stores = _kinds_review.open_stores(self, self.s.shared_store, self.journal)
        else:
            stores = _kinds_more.open_stores(self.s.shared_store if seconds else "", self.journal)
        first = stores[0] if stores[0] is not None else _kinds_review.elsewhere_store(self)
        client, _ = self.client("app", first)
        self.main_client = client
        self.process_stores["app"] = first
        if review is not None and review.early:
            self.job_client = self.client("job", clock=_kinds_review.ProcessClock(self.clock))[0]
            self.process_stores["job"] = None  # the job's client keeps no store
        async with client, _kinds_more.SecondClient(self, stores) as other:
            cancels = {c.label: c for c in self.s.cancels}

            async def later(ask: AskSpec) -> None:
                await asyncio.sleep(ask.start)
                cut = cancels.get(ask.label)
                if ask.label in seconds:
                    # Two processes call it with one key: see _kinds_more.
                    await other.first(client, ask, cut)
                    return
                if cut is None:
                    await self.call(client, ask, None)
                    return
                key = f"key-{ask.label}" if cut.keyed else None
                task = asyncio.ensure_future(self.call(client, ask, None, key=key))
                done, _ = await asyncio.wait([task], timeout=cut.after)
                if done:
                    return
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                self.violet.count("caller:cancel_keyed" if key else "caller:cancel")
                self.note(f"{ask.label}: the caller cancelled its call at +{cut.after:g}s")
                await asyncio.sleep(cut.again)
                if key is None:
                    ask = self.again(client, ask)
                await self.call(client, ask, None, repeat=True, key=key)

            keyed_clock = review is not None and bool(review.retention)
            await asyncio.gather(
                *(later(ask) for ask in self.s.asks),
                *(
                    _kinds_review.second_process(other, spec) if keyed_clock else other.second(spec)
                    for spec in self.s.second_callers
                ),
                *(_kinds_review.reuse(other, spec) for spec in (review.reusers if review else ())),
            )
            while self.review_tasks:
                await self.review_tasks.pop()
        if self.job_client is not None:
            await self.job_client.aclose()
        await self.resolve_pendings()

    def again(self, client: VioletClient, ask: AskSpec) -> AskSpec:
        """The ask an unkeyed repeat of ``ask``'s cancelled call makes: the same, unless
        another caller resumed (took) the record the cancelled call left and nothing of
        it is pending here any more. The SDK is then asked anew, with nothing to tie the
        repeat to that record: a second ask (``A0+``), whose refund is its own."""
        records = {i for i, label in self.record_owner.items() if label == ask.label}
        if not records & self.taken:
            return ask
        pending = engine_of(client).unsettled.records_on(self.ids[ask.bag][1])
        if any(p.ask_id in records for p in pending):
            return ask
        repeat = attrs.evolve(ask, label=f"{ask.label}+")
        self.asks[repeat.label] = repeat
        self.note(f"{ask.label}: its record was taken by another caller; the repeat is new")
        return repeat

    async def resolve_pendings(self) -> None:
        await self.quiesce()
        review = self.s.review
        # Three rounds of this process's resumes; resume_elsewhere's workers take a
        # round of their own first (with them in round 0, a slow world's last resume
        # could end in its deadline, pending, with no round left: seed 2405079).
        elsewhere = review is not None and review.elsewhere
        for round_ in range(4 if elsewhere else 3):
            # A caller may resume an ask parked for review too (once): it must read
            # again and never re-send by itself.
            todo = [
                s
                for s in self.final.values()
                if s.what == "pending"
                or (round_ == 0 and self.s.resume_review and s.what == "review" and s.pending)
            ]
            if not todo:
                return
            if not round_ and self.s.date_lag:
                # Resumed minutes later: every read's Date is then past a refund made
                # before the send (the lagging header no longer marks it "later than
                # the read").
                await asyncio.sleep(self.s.date_lag + 60.0)
            if round_:
                # A resume job tried again later, as a queue backs off: past the lag of
                # any replica the last round may have read (shows, hides, shows).
                await asyncio.sleep(max(self.s.replica_lag, 60.0) + 1.0)
            if not round_ and elsewhere:
                await _kinds_review.resume_elsewhere(self, todo)
                continue
            client, _ = self.client(f"resume{round_}")
            # A round's resumes wait for their windows at most an hour in all (each
            # waiting an hour, three records in three rounds passed the loop's horizon
            # with every call within its deadline: seed 940480).
            until = self.loop.time() + 3_600.0
            async with client:
                for seen in todo:
                    assert seen.pending is not None
                    ask = self.asks[seen.label]
                    wait = (seen.pending.settle_until or 0.0) - self.clock.time()
                    wait = min(wait, until - self.loop.time())
                    if wait > 0:
                        await asyncio.sleep(wait)
                    await self.call(client, ask, seen.pending)
                    if self.s.resume_twice:
                        # The job queue delivers the same resume job again.
                        self.note(f"{ask.label}: the resume job is delivered again")
                        await self.call(client, ask, seen.pending)

    # -- workers: the fleet's worker, jobs redelivered (see _fleet) ------------

    async def run_workers(self) -> None:
        await _fleet.run_workers(self)

    # -- batch: run_batch + journal, crashes, torn lines, resume -----------------

    async def run_batch(self) -> None:
        items = [
            BatchItem(
                n + 1,
                "cancel" if a.kind == "cancel" else "refund",
                *self.ids[a.bag],
                self.request(a),
                _kinds_more.MERCHANT_BASE + self.s.merchants[a.bag]
                if self.s.merchant_ids_known
                else None,
            )
            for n, a in enumerate(self.s.asks)
        ]
        labels = {item.line: ask.label for item, ask in zip(items, self.s.asks, strict=True)}
        for item in items:
            self.violet.bag_labels[item.bag_id] = labels[item.line]
        runs = [*self.s.crashes, None, None, None]
        for n, crash in enumerate(runs):
            if crash is None and n == len(self.s.crashes):
                await self.quiesce()
            if crash is None and n > len(self.s.crashes):
                if not any(s.what in ("pending", "crashed") for s in self.final.values()):
                    break
                await asyncio.sleep(self.s.settle_running)
            await self.batch_run(f"run{n}", items, labels, crash)

    async def batch_run(  # noqa: PLR0915 - one run, its crash and its journal hook
        self, name: str, items: list[BatchItem], labels: dict[int, str], crash: Crash | None
    ) -> None:
        assert self.journal is not None
        client, transport = self.client(name)
        writes = 0
        dead = False
        task: asyncio.Task[None] | None = None
        opened: list[Any] = []  # the run's Journal, once it has written

        def die(why: str) -> None:
            nonlocal dead
            dead = True
            transport.dead = True
            self.note(f"{name} CRASHED {why}")
            # A dead process holds no lock: the OS releases its flock on the journal.
            for journal in opened:
                if journal._lock_fd is not None:
                    _journal._unlock(journal._lock_fd)
            if task is not None:
                task.cancel()

        def hook(call: Callable[..., Any], future: asyncio.Future[Any]) -> bool:
            nonlocal writes
            # The journal hands its writes to the executor as (Journal._write_durably, data).
            fn = getattr(call, "func", None)
            target: tuple[Any, ...] = getattr(call, "args", ())
            if getattr(fn, "__name__", "") != "_write_durably":
                return False
            if dead:
                future.set_result(None)  # a dead process writes nothing more
                return True
            if not opened:
                opened.append(fn.__self__)  # type: ignore[union-attr]
            writes += 1
            if crash is not None and crash.write == writes:
                journal = fn.__self__  # type: ignore[union-attr]
                data: bytes = target[0]
                cut = int(len(data) * crash.cut)
                os.write(journal._fd, data[:cut])
                die(f"during journal write {writes} ({cut} of {len(data)} bytes written)")
                future.set_result(None)
                return True
            return False

        async def consume() -> None:
            async with client:
                async for result in run_batch(
                    client, items, concurrency=self.s.concurrency, journal=self.journal
                ):
                    label = labels[result.item.line]
                    if result.outcome in ("succeeded", "already_done"):
                        self.saw(Seen(label, "refund", result.refund_id))
                    elif result.outcome in ("failed", "already_failed"):
                        self.saw(Seen(label, "failed", error=str(result.error_class)))
                    elif result.outcome == "not_sent":
                        # Never reached Violet this run: the next run sends it (like an
                        # item a crash cut short).
                        self.saw(Seen(label, "crashed", error=str(result.error_class)))
                    else:
                        error = result.error
                        if isinstance(error, BaseException):
                            self.saw(self.outcome_of(label, error))
                        else:
                            self.saw(Seen(label, "pending"))

        self.loop.executor_hook = hook
        self.note(f"{name}: run_batch starts")
        task = asyncio.ensure_future(consume())
        if crash is not None and crash.at is not None:
            self.loop.call_later(
                crash.at, lambda: None if task.done() else die(f"at +{crash.at:g}s")
            )
        await asyncio.gather(task, return_exceptions=True)
        if dead:
            for journal in opened:
                await _bury(journal)
            for label in labels.values():
                if self.final.get(label, Seen("", "")).what not in ("refund", "failed"):
                    self.final[label] = Seen(label, "crashed")
        elif task.exception() is not None:
            exc = task.exception()
            self.violations.append(f"[error] {name}: run_batch raised {type(exc).__name__}: {exc}")
        self.loop.executor_hook = None

    # -- invariants ---------------------------------------------------------

    def check(self) -> None:
        commits: dict[str, list[int]] = {}
        maker: dict[int, str | None] = {}
        for commit in self.violet.commits:
            # Two processes calling one ask with one key make its commits together.
            label = commit.label.split("~")[0] if commit.label is not None else None
            maker[commit.refund_id] = label
            if label is not None:
                commits.setdefault(label, []).append(commit.refund_id)
        # Known: while an ask is pending (its lock released), another ask on the same bag
        # whose request carries everything the first asked for can claim its refund, or
        # have its own claimed by the first's resume; then one of them sends again (or
        # both report one refund).
        pended = {s.label for s in self.seen if s.what == "pending"}
        overlap: set[str] = set()
        for seen in self.seen:
            maker_label = maker.get(seen.refund_id or -1)
            if (
                seen.what == "refund"
                and maker_label not in (None, seen.label)
                and (seen.label in pended or maker_label in pended)
            ):
                overlap.update({seen.label, maker_label})
        torn = self.s.mode == "batch" and any(c.write is not None for c in self.s.crashes)
        for label, ids in commits.items():
            if len(ids) > 1 and label in overlap:
                self.violations.append(
                    f"[overlap-after-pending] {label}: {len(ids)} refunds for one ask: {ids}"
                )
            elif len(ids) > 1 and torn:
                self.violations.append(
                    f"[torn-journal] {label}: {len(ids)} refunds for one ask: {ids}"
                )
            elif len(ids) > 1:
                self.violations.append(f"[double] {label}: {len(ids)} refunds for one ask: {ids}")
        for seen in self.seen:
            mine = commits.get(seen.label, [])
            if seen.what == "refund" and seen.refund_id not in mine and seen.label in overlap:
                self.violations.append(
                    f"[overlap-after-pending] {seen.label} resumed and was handed refund "
                    f"{seen.refund_id}, made by {maker.get(seen.refund_id or -1)}"
                )
            elif seen.what == "refund" and seen.refund_id not in mine:
                who = maker.get(seen.refund_id or -1, "nobody")
                text = (
                    f"[attribution] {seen.label} was handed refund {seen.refund_id}, "
                    f"made by {who or 'another actor'}"
                )
                self.violations.append(text)
                self.attributions.append((text, seen))
            if seen.what == "failed" and mine and seen.label in self.two_processes:
                continue  # _kinds_more.check: which caller's call applied, and when
            if seen.what == "failed" and mine:
                self.violations.append(
                    f"[{'torn-journal' if torn else 'failed-but-applied'}] {seen.label} was "
                    f"told it failed ({seen.error[:120]}) but refund(s) {mine} were made for it"
                )
        for label, seen in self.final.items():
            if seen.what == "review" and (seen.pending is None or not seen.pending.note):
                self.violations.append(
                    f"[unparked] {label} ended unknown without a reason: {seen.error[:160]}"
                )
            if seen.what == "pending" and self.still_settling(seen, commits.get(label, [])):
                # Parked with a reason the world still holds: its settle window, by some
                # reading of an unsure clock, has hours to run, and nothing it sent has
                # applied (a refund of its own would be a violation: read, not claimed).
                self.violet.count("parked:settling")
                continue
            if seen.what in ("pending", "crashed"):
                refused = seen.pending is not None and "re-send was refused" in seen.pending.note
                kind = "liveness-refused" if refused else "liveness"
                self.violations.append(
                    f"[{kind}] {label} still {seen.what} after faults stopped and resumes ran"
                    + (f": {seen.pending.note}" if seen.pending is not None else "")
                )

    def check_more(self) -> None:
        _kinds_more.check(self)
        _kinds_answers.check(self)
        _kinds_review.check(self)
        self.check_named()

    def check_named(self) -> None:
        """An ``[attribution]`` violation that is README's remaining risk (b), by every
        condition of ``_named.risk_b``, is counted (``named:risk_b``) and listed in the
        seed's report, not flagged; so is a ``[double]`` that is remaining risk (d), by
        every condition of ``_named.risk_d`` (``named:risk_d``), and a ``[double]`` or
        ``[failed-but-applied]`` that is remaining risk (g) by ``_named.risk_g``
        (``named:risk_g``)."""
        for text, seen in dict(self.attributions).items():  # once per ask and refund
            if text not in self.violations:
                continue  # counted already (_kinds_review._within_tolerance)
            excused, why = _named.risk_b(self, seen.label, seen.refund_id)
            if excused:
                self.violations[:] = [v for v in self.violations if v != text]
                self.violet.count("named:risk_b")
                self.excused.append(f"risk (b): {why}")
        for text in list(self.violations):
            if not text.startswith("[double] "):
                continue
            label = text.split()[1].rstrip(":")
            ids = [int(i) for i in text.split("[")[-1].rstrip("]").split(", ")]
            excused, why = _named.risk_d(self, label, ids)
            if excused:
                self.violations.remove(text)
                self.violet.count("named:risk_d")
                self.excused.append(f"risk (d): {why}")
        for text in list(self.violations):
            if not text.startswith(("[double] ", "[failed-but-applied] ")):
                continue
            excused, why = _named.risk_g(self, text)
            if excused:
                self.violations.remove(text)
                self.violet.count("named:risk_g")
                self.excused.append(f"risk (g): {why}")
        for text in dict.fromkeys(self.violations):  # once each: a caller told twice
            if not text.startswith("[failed-but-applied] "):
                continue
            excused, why = _named.risk_d_failed(self, text)
            if excused:
                self.violations[:] = [v for v in self.violations if v != text]
                self.violet.count("named:risk_d_failed")
                self.excused.append(f"risk (d), told failed: {why}")

    def still_settling(self, seen: Seen, made: list[int]) -> bool:
        """``seen`` (a final pending) waits out a settle window that has not ended on
        the client's clock, says so, and made no refund the client could read (every
        record epoch-dated is unreadable to it): a true outcome, not a hang."""
        pending = seen.pending
        # Epoch-dated records are unreadable to the client: none can be proven its own.
        return (
            pending is not None
            and (not made or self.s.date_style == "epoch")
            and ("settle window" in pending.note or "reading the bag back failed" in pending.note)
            and pending.settle_until is not None
            and pending.settle_until > self.clock.time()
        )

    def check_secrets(self, lines: list[str]) -> None:
        secrets = [s for s in self.violet.secrets if s]
        for text in [*lines, *self.errors]:
            for secret in secrets:
                if secret in text:
                    self.violations.append(
                        f"[secret] a secret leaked into a log line or error: {text[:200]}"
                    )
                    return


def shrink(result: SimResult, *, budget: int = 400) -> SimResult:
    """The schedule with the fewest faults (and quirks) that still fails the same way
    (its first violation's kind): greedily
    drop one fault, actor, crash, ask or quirk at a time while the run still fails."""
    best = result
    runs = 0
    # Keep failing the same way: the first violation's kind must stay.
    wanted = (
        {result.violations[0][1 : result.violations[0].index("]")]} if result.violations else set()
    )

    def candidates(s: Schedule) -> Iterator[Schedule]:
        for name in ("post_faults", "read_faults", "auth_faults"):
            items: tuple[SimFault | None, ...] = getattr(s, name)
            for i, fault in enumerate(items):
                if fault is not None:
                    changes: dict[str, Any] = {name: (*items[:i], None, *items[i + 1 :])}
                    yield attrs.evolve(s, **changes)
        for name in ("actors", "crashes", "asks"):
            items2: tuple[Any, ...] = getattr(s, name)
            for i in range(len(items2)):
                if name == "asks" and len(items2) == 1:
                    continue
                cut: dict[str, Any] = {name: items2[:i] + items2[i + 1 :]}
                yield attrs.evolve(s, **cut)
        quirks: dict[str, Any] = {
            "naive_dates": False,
            "skew": 0.0,
            "date_header": True,
            "trim_reasons": False,
            "page_size": None,
            "lags": (0.0,),
            "jitter": False,
            "bag_status_lag": 0.0,
            "date_style": "iso",
            "day_zone": 0.0,
            "day_zone_utc": False,
            "date_bias": 0.0,
            "date_jumps": (),
            "date_lag": 0.0,
            "clock_steps": (),
            "old_refunds": (),
            "resume_twice": False,
            "resume_review": False,
            "cancels": (),
            "cancel_shapes": (),
            "replica_lag": 0.0,
            "merchant_limits": (),
            "second_callers": (),
            "worker_dies": 0,
            "ledger_loss": None,
            "keyed_resume": False,
            "loss_same_worker": False,
            "other_order": None,
        }
        for name, plain in quirks.items():
            if getattr(s, name) != plain:
                plainer: dict[str, Any] = {name: plain}
                yield attrs.evolve(s, **plainer)

    changed = True
    while changed and runs < budget:
        changed = False
        for candidate in candidates(best.schedule):
            runs += 1
            attempt = simulate(candidate)
            if attempt.kinds & wanted:
                best = attempt
                changed = True
                break
            if runs >= budget:
                break
    return best


async def _bury(journal: Any) -> None:
    """What the OS does for a process that died: its journal's file descriptors close
    (and its lock goes), with no last flush. A journal the dying run closed itself is
    already let go."""
    journal._closed = True
    journal._flusher.cancel()  # its end closes the descriptors
    await asyncio.shield(journal._released)
