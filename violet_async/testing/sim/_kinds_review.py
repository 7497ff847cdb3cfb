"""World kinds of the classes reviews 14 and 15 found with scripted servers: record
stores whose retention meets a stepped wall clock, a resume delivered to another
worker after the ask ended there, another system's refund made while a call waits out
a 429, and a pending record resumed seconds later in another process whose wall clock
steps.

Each is drawn from its own random stream (``"<kind>:<seed>"``), so a seed's schedule
with them off is what it always was. ``_run.py`` lays :func:`draw`'s changes over a
schedule and calls the hooks below.

- ``key_clock`` (direct): the record store the processes share keeps finished keys
  for a short ``retention`` (5 or 15 minutes) counted on this machine's clocks (its
  monotonic clock is the simulator's, shared by both processes), and the wall clock
  steps by more than that retention: back while a keyed call runs and forward once it
  has ended, or forward only. A second process repeats each keyed call (same key, same
  request) 30 s to 2 min after the first, after a first keyed call of its own on
  another bag (whose claim sweeps the store); in half the SQLite schedules it opens the
  file only then, after the steps. Some keys are also used by a third caller for
  another request (another amount or reason) within the retention. Invariants: at most
  one refund per key (``double``); a key used for another request within its retention
  sends nothing (``key-reused``).
- ``resume_elsewhere`` (direct): every pending record is resumed, after faults stop, by
  worker two and then by worker three, two processes on one ``SQLiteStore`` (and the
  first process too, in half the schedules). In half the schedules worker two's sends
  are all answered 429 (the ask ends definitely not applied there). Invariant: a resume
  in another process of an ask that ended (failed, not sent) sends nothing
  (``sent-after-ended``); and the base world's.
- ``refund_in_429`` (every mode): one asked amount's first POST is answered 429 with
  ``Retry-After: 20`` (nothing applied); 10 s later another app refunds the same
  amount with the same reason on the bag (listed COMPLETED, like this app's own); the
  ask's next POST, if the other refund was made before it, is answered Violet's own
  500 (not applied). Drawn only where Violet sends a ``Date`` header. Invariant: the
  base world's ``attribution`` (that refund is never the ask's).
- ``early_resume`` (direct): a job worker (another process, its client made at the
  start) resumes an unkeyed call's pending record 10 s after it was parked, and again
  10 s after that if it is still pending; the wall clock steps (+-1 h) 5 s before each
  (in half the schedules no ``Date`` header places Violet's clock). Invariant: the
  base world's ``double``.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import attrs

from ..._transport import RawResponse
from ...stores import MemoryStore, SQLiteStore
from .._state import RuleViolation
from ._kinds_more import SecondCaller

__all__ = ["REVIEW_KINDS", "ReviewWorld", "check", "draw"]

REVIEW_KINDS = ("key_clock", "resume_elsewhere", "refund_in_429", "early_resume")

#: The matching rule's ``date_tolerance`` (and a second for the POST's way there).
TOLERANCE = 6.0
#: Seconds after a call was parked pending that the job worker resumes its record.
EARLY_RESUME = 10.0


@attrs.frozen
class ReviewWorld:
    """What this module's kinds drew for one schedule."""

    retention: float = 0.0
    """key_clock: the shared store's retention (0: the default store, real clocks)."""
    late_store: bool = False
    """key_clock: the second process opens its SQLiteStore at its first call."""
    probe: int | None = None
    """key_clock: the bag of the second process's own keyed call before its repeats."""
    reusers: tuple[SecondCaller, ...] = ()
    """key_clock: callers of these keys with another request."""
    elsewhere: bool = False
    elsewhere_429: bool = False
    elsewhere_first: bool = False
    """resume_elsewhere: the first process's client shares the store too."""
    in_429: tuple[int, ...] = ()
    """refund_in_429: the bags whose first POST is answered 429."""
    early: bool = False
    early_steps: tuple[float, ...] = ()

    def describe(self) -> str:
        return (
            f"review world: retention={self.retention:g} late_store={self.late_store} "
            f"probe={self.probe} reusers={list(self.reusers) or '-'} "
            f"elsewhere={self.elsewhere} elsewhere_429={self.elsewhere_429} "
            f"elsewhere_first={self.elsewhere_first} in_429={list(self.in_429) or '-'} "
            f"early={self.early} early_steps={list(self.early_steps) or '-'}"
        )


def draw(s: Any, kinds: frozenset[str]) -> dict[str, Any]:
    """The schedule changes of this module's kinds in ``kinds`` over ``s``."""
    changes: dict[str, Any] = {}
    drawn: dict[str, Any] = {}
    if "key_clock" in kinds and s.mode == "direct":
        _key_clock(s, changes, drawn)
    if "resume_elsewhere" in kinds and s.mode == "direct":
        rng = random.Random(f"resume_elsewhere:{s.seed}")
        if rng.random() < 0.7:
            drawn["elsewhere"] = True
            drawn["elsewhere_429"] = rng.random() < 0.5
            drawn["elsewhere_first"] = rng.random() < 0.5
    if "refund_in_429" in kinds:
        rng = random.Random(f"refund_in_429:{s.seed}")
        asked = sorted({a.bag for a in s.asks if a.kind == "refund" and a.amount is not None})
        if asked and s.date_header and rng.random() < 0.5:
            drawn["in_429"] = (rng.choice(asked),)
    if "early_resume" in kinds and s.mode == "direct":
        rng = random.Random(f"early_resume:{s.seed}")
        if rng.random() < 0.6:
            drawn["early"] = True
            drawn["early_steps"] = tuple(rng.choice((-3_600.0, 3_600.0)) for _ in range(2))
            if rng.random() < 0.5 and not drawn.get("in_429") and not s.date_lag:
                # (refund_in_429's class and date_lag's are drawn only where a Date is
                # sent: date_lag's refund, made 30 s before the run, with no Date is
                # remaining risk (b), taken for an ask's own within clock_skew; seed
                # 930911.)
                changes["date_header"] = False
    if drawn:
        changes["review"] = ReviewWorld(**drawn)
    return changes


class ProcessClock:
    """Another process's view of this machine's clocks: the same wall clock (steps
    and all) and monotonic clock, but a clock object of its own, so the records its
    client writes name another process's clock."""

    def __init__(self, machine: Any) -> None:
        self._machine = machine

    @property
    def machine(self) -> str:
        """The machine's name (one monotonic clock for its processes)."""
        return str(getattr(self._machine, "machine", ""))

    def monotonic(self) -> float:
        return float(self._machine.monotonic())

    def time(self) -> float:
        return float(self._machine.time())

    async def sleep(self, seconds: float) -> None:
        await self._machine.sleep(seconds)


def _key_clock(s: Any, changes: dict[str, Any], drawn: dict[str, Any]) -> None:
    """key_clock's draws over ``s`` (into ``changes`` and ``drawn``)."""
    rng = random.Random(f"key_clock:{s.seed}")
    on_bag: dict[int, int] = {}
    for a in s.asks:
        on_bag[a.bag] = on_bag.get(a.bag, 0) + 1
    alone = [a for a in s.asks if on_bag[a.bag] == 1]
    if alone and rng.random() < 0.6:
        retention = rng.choice((300.0, 900.0))
        seconds = s.second_callers
        if not seconds:
            seconds = tuple(
                SecondCaller(a.label, rng.choice((30.0, 60.0, 120.0)))
                for a in alone
                if rng.random() < 0.8
            ) or (SecondCaller(alone[0].label, 60.0),)
            changes["second_callers"] = seconds
            changes["shared_store"] = "sqlite" if rng.random() < 0.5 else "memory"
        store = changes.get("shared_store", s.shared_store)
        k = rng.choice((1.5, 3.0))
        steps: tuple[tuple[float, float], ...]
        if rng.random() < 0.5:
            # Back while the keyed calls run, put right once they ended.
            steps = ((round(rng.uniform(0.0, 3.0), 3), -k * retention),)
            steps += ((round(rng.uniform(15.0, 28.0), 3), k * retention),)
        else:
            steps = tuple(
                (round(rng.uniform(3.0, 28.0), 3), k * retention / n)
                for n in [rng.choice((1, 2))]
                for _ in range(n)
            )
        changes["clock_steps"] = tuple(sorted((*s.clock_steps, *steps)))
        labels = {c.label for c in seconds}
        drawn["reusers"] = tuple(
            SecondCaller(a.label, rng.choice((30.0, 60.0, 120.0)))
            for a in alone
            if a.label in labels and rng.random() < 0.3
        )
        drawn["retention"] = retention
        drawn["late_store"] = store == "sqlite" and rng.random() < 0.5
        if rng.random() < 0.7:
            drawn["probe"] = len(s.bags)
            changes["bags"] = (*changes.get("bags", s.bags), s.bags[0])
            if s.merchants:
                # The probe's bag is the first bag's merchant's.
                changes["merchants"] = (*s.merchants, s.merchants[0])


# -- key_clock --------------------------------------------------------------------------


def open_stores(world: Any, kind: str, beside: Path) -> tuple[Any, Any]:
    """The stores of ``two_clients_one_store`` with key_clock's retention on the
    machine's clocks (the simulator's monotonic clock); the second is None when it
    opens the file only at its first call."""
    r: ReviewWorld = world.s.review
    mono = world.clock.monotonic
    if kind == "memory":
        shared = MemoryStore(retention=r.retention, monotonic=mono)
        return shared, shared
    path = beside.parent / "keys.sqlite3"
    first = SQLiteStore(path, retention=r.retention, monotonic=mono)
    return first, None if r.late_store else SQLiteStore(path, retention=r.retention, monotonic=mono)


async def second_process(other: Any, spec: Any) -> None:
    """key_clock's second process: its store opened now (late_store), a keyed call of
    its own on the probe bag first, then the repeat of ``spec``'s keyed call."""
    world = other.world
    r: ReviewWorld = world.s.review
    ask = next(a for a in world.s.asks if a.label == spec.label)
    await asyncio.sleep(ask.start + spec.start)
    if other.client is None:
        path = world.journal.parent / "keys.sqlite3"
        store = SQLiteStore(path, retention=r.retention, monotonic=world.clock.monotonic)
        other.stores = (other.stores[0], store)
        other.client = world.client("app2", store, clock=ProcessClock(world.clock))[0]
        world.violet.count("world:store_opened_after_step")
    if r.probe is not None and spec.label == min(c.label for c in world.s.second_callers):
        probe = attrs.evolve(ask, label="P", bag=r.probe, kind="refund", amount=100, skus=False)
        world.asks["P"] = probe
        await world.call(other.client, probe, None, key="key-P")
        world.violet.count("world:probe_claim")
    who = f"{ask.label}~2"
    if spec.cancel_after is None:
        await other.keyed(other.client, ask, who)
        return
    await other._cut(other.client, ask, spec.cancel_after, spec.again, "caller:second_cancel", who)


async def reuse(other: Any, spec: SecondCaller) -> None:
    """A caller of ``spec``'s key with another request, within the key's retention."""
    world = other.world
    ask = next(a for a in world.s.asks if a.label == spec.label)
    await asyncio.sleep(ask.start + spec.start)
    if ask.kind == "refund" and ask.amount is not None and ask.amount > 1:
        changed = attrs.evolve(ask, label=f"{ask.label}^", amount=ask.amount - 1)
    else:
        changed = attrs.evolve(ask, label=f"{ask.label}^", reason="Another request")
    world.asks[changed.label] = changed
    world.violet.count("world:key_reused")
    client = other.client if other.client is not None else world.main_client
    await world.call(client, changed, None, key=f"key-{ask.label}")


def _error(violet: Any, status: int, message: str, code: int, retry_after: str = "") -> RawResponse:
    """Violet's JSON error answer (with ``Retry-After`` when given)."""
    headers = {"Retry-After": retry_after} if retry_after else {}
    answer: RawResponse = violet._error(status, message, code, **headers)
    return answer


# -- resume_elsewhere ---------------------------------------------------------------------


class Elsewhere429:
    """Worker two's sends (labels ending ``~w2``) answered 429, chained before any other
    gate."""

    def __init__(self, world: Any, then: Any) -> None:
        self.world = world
        self.then = then
        self.on = False
        #: Present so that MerchantGate-like checks find its limited asks.
        self.limited: set[str] = set()

    def __call__(self, bag_id: int, label: str | None) -> RawResponse | None:
        if self.on and (label or "").endswith("~w2"):
            self.world.violet.count("world:elsewhere_429")
            return _error(self.world.violet, 429, "Too Many Requests", 4290, "1")
        return self.then(bag_id, label) if self.then is not None else None


async def resume_elsewhere(world: Any, todo: list[Any]) -> None:
    """Worker two, then worker three, resume every pending record (two processes on one
    SQLiteStore)."""
    r: ReviewWorld = world.s.review
    path = world.journal.parent / "elsewhere.sqlite3"
    gate = Elsewhere429(world, world.violet.post_gate)
    world.violet.post_gate = gate
    for n in (2, 3):
        store = SQLiteStore(path)
        client, _ = world.client(f"worker{n}", store, clock=ProcessClock(world.clock))
        async with client:
            gate.on = r.elsewhere_429 and n == 2
            for seen in todo:
                ask = world.asks[seen.label]
                record = seen.pending
                world.note(f"{ask.label}: its resume job is delivered to worker {n}")
                got = await world.call(client, ask, record, who=f"{ask.label}~w{n}")
                world.violet.count(f"world:resumed_in_worker{n}")
                if n == 2 and got.what in ("failed", "not_sent"):
                    world.review_ended[ask.label] = world.loop.time()
        await store.aclose()
    gate.on = False
    world.violet.post_gate = gate.then


def elsewhere_store(world: Any) -> Any:
    """The first process's store when it shares resume_elsewhere's file."""
    r = world.s.review
    if r is None or not r.elsewhere or not r.elsewhere_first:
        return None
    return SQLiteStore(world.journal.parent / "elsewhere.sqlite3")


# -- refund_in_429 ------------------------------------------------------------------------


class In429:
    """The drawn ask's first POST: 429 (Retry-After 20), and another app's refund of
    the same amount and reason on its bag 10 s later; that ask's next POST, once the
    other refund is made: Violet's own 500 before anything applied."""

    def __init__(self, world: Any, asks: dict[int, Any]) -> None:
        self.world = world
        self.asks = asks
        self.posts: dict[str, int] = {}
        self.made: set[str] = set()
        #: The other app's refund (id, when made) and the ask's next POST's arrival.
        self.other: dict[str, tuple[int, float]] = {}
        self.resent_at: dict[str, float] = {}

    def __call__(self, bag_id: int, label: str | None) -> RawResponse | None:
        ask = self.asks.get(bag_id)
        violet = self.world.violet
        if ask is None or not violet.faults_on or (label or "").split("~")[0] != ask.label:
            return None
        n = self.posts[ask.label] = self.posts.get(ask.label, 0) + 1
        if n == 2:
            self.resent_at[ask.label] = violet.clock.monotonic()
        if n == 1:
            violet.count("world:refund_in_429")
            order_id = self.world.ids[ask.bag][0]
            bag = violet.store.bag(order_id, bag_id)
            self.world.loop.call_later(
                10.0,
                self._another_app,
                violet,
                bag,
                ask,
                violet.answering,
            )
            return _error(violet, 429, "Too Many Requests", 4290, "20")
        if n == 2 and ask.label in self.made:
            violet.count("world:resend_500_after_other")
            return _error(violet, 500, "Internal error", 5000)
        return None

    def _another_app(self, violet: Any, bag: Any, ask: Any, who: str) -> None:
        """Another app (or the merchant's admin through Violet) refunds ``ask``'s
        amount with its reason on ``bag``: listed COMPLETED, like one of this app's.
        Only while the ask waits (sent again before it, that send's window holds the
        other refund: one nobody can tell from the ask's own, remaining risk (a))."""
        if self.posts.get(ask.label, 0) > 1:
            violet.count("world:in_429_sent_before_other")
            return
        told = violet.transports.get(who)
        if told is not None and told.dead:
            # The process told of the 429 died during the wait: before it recorded the
            # 429, or after a later run recorded a send that then never left (each
            # record says "sent, outcome unknown"): the other refund is then one nobody
            # can tell from the ask's own (remaining risk (a)). A crash after the other
            # refund is made stays in the kind.
            violet.count("world:in_429_died_in_wait")
            return
        try:
            record = violet.store.commit_refund(
                bag,
                {"amount_refunded": ask.amount, "reason": ask.reason},
                status="COMPLETED",
                route="external",
            )
        except RuleViolation as exc:
            violet.note(f"ACTOR refund {ask.amount} on bag {bag.id} refused: {exc.message}")
            return
        self.made.add(ask.label)
        self.other[ask.label] = (record["id"], violet.clock.monotonic())
        violet._committed(None, bag, record)


def arm(world: Any) -> None:
    """Lay this module's Violet-side gates over the world's."""
    r: ReviewWorld | None = world.s.review
    if r is None or not r.in_429:
        return
    bags = {}
    for n in r.in_429:
        ask = next(a for a in world.s.asks if a.bag == n and a.amount is not None)
        if any(_twin(other, ask) for other in world.s.asks):
            # Another ask of the same request on the bag: the other app's refund would
            # fall inside that ask's send window, one nobody can tell from its own
            # (remaining risk (b); seed 931782): not drawn there.
            world.violet.count("world:in_429_twin_on_bag")
            continue
        bags[world.ids[n][1]] = ask
    if bags:
        world.violet.clean_gate = In429(world, bags)


def _twin(other: Any, ask: Any) -> bool:
    """``other`` is another ask of ``ask``'s request (a refund of the same amount and
    reason) on its bag."""
    return bool(
        other.label != ask.label
        and other.bag == ask.bag
        and other.kind == ask.kind
        and other.amount == ask.amount
        and other.reason == ask.reason
    )


# -- early_resume ---------------------------------------------------------------------------


def parked(world: Any, seen: Any) -> None:
    """A first-process call of an unkeyed ask was parked pending: its job resumes it in
    another process, 10 s later (and again), the wall clock stepping before each."""
    r: ReviewWorld | None = world.s.review
    if (
        r is None
        or not r.early
        or seen.pending is None
        or seen.who != seen.label
        or seen.label in world.two_processes
        or seen.label in world.review_early
        or world.job_client is None
    ):
        return
    world.review_early.add(seen.label)
    world.review_tasks.append(asyncio.ensure_future(_early(world, seen)))


async def _early(world: Any, seen: Any) -> None:
    r: ReviewWorld = world.s.review
    ask = world.asks[seen.label]
    record = seen.pending
    for step in r.early_steps:
        await asyncio.sleep(EARLY_RESUME / 2)
        world.clock.step(step)
        world.violet.count("clock:step")
        world.note(f"the client's wall clock steps {step:+g}s (before an early resume)")
        await asyncio.sleep(EARLY_RESUME / 2)
        world.violet.count("world:early_resume")
        got = await world.call(world.job_client, ask, record, who=f"{ask.label}~j")
        if got.what != "pending" or got.pending is None:
            return
        record = got.pending


# -- invariants -------------------------------------------------------------------------------


def check(world: Any) -> None:
    """key-reused: a key used for another request within its retention sent it;
    sent-after-ended: a resume in worker three of an ask that ended in worker two sent."""
    r: ReviewWorld | None = world.s.review
    if r is None:
        return
    gate = world.violet.clean_gate
    if isinstance(gate, In429):
        _within_tolerance(world, gate)
    for commit in world.violet.commits:
        label = commit.label or ""
        if label.endswith("^"):
            world.violations.append(
                f"[key-reused] {label[:-1]}'s key, used for another request within its "
                f"retention ({r.retention:g}s), sent it: refund {commit.refund_id}"
            )
        base = label.split("~")[0]
        ended = world.review_ended.get(base)
        if label.endswith("~w3") and ended is not None and commit.at > ended:
            world.violations.append(
                f"[sent-after-ended] {base} ended definitely not applied in worker two; "
                f"worker three's resume of its record then made refund {commit.refund_id}"
            )


def _within_tolerance(world: Any, gate: In429) -> None:
    """refund_in_429: the ask sent again (a run after a crash does not wait out the
    429) less than ``date_tolerance`` (5 s) after the other app's refund: that refund
    is within the tolerance of the only send that could have made it, one nobody can
    tell from the ask's own (remaining risk (a)): counted, not a violation."""
    kept = []
    for text in world.violations:
        parts = text.split()
        label = parts[1] if text.startswith("[attribution] ") else ""
        other = gate.other.get(label)
        resent = gate.resent_at.get(label)
        if (
            other is not None
            and resent is not None
            and f"refund {other[0]}," in text
            and resent - other[1] < TOLERANCE
        ):
            world.violet.count("world:in_429_within_tolerance")
            continue
        kept.append(text)
    world.violations[:] = kept
