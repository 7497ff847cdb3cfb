"""World kinds of the simulator's second round: per-merchant 429s, two client processes
on one record store, a fleet ledger that loses its data, and a worker that dies between
two ledger writes.

Each kind is drawn from its own random stream (``"<kind>:<seed>"``), so switching one
on changes nothing else in a seed's schedule (and the seeds that found bugs keep
replaying them). ``_run.py`` lays :func:`draw`'s changes over a schedule and calls the
hooks below; everything a kind does at run time lives here.

- ``merchant_429``: bags belong to one of two merchants; a limited merchant's platform
  takes refund and cancel POSTs at most ``rate`` a second (a token bucket of one) and
  answers the rest with Violet's 429 JSON (``Retry-After`` for some merchants, none for
  others), before anything is looked at: nothing applied. A direct caller told
  ``RateLimitError`` (nothing applied) calls again after the ``Retry-After`` (or 30 s),
  a few times; a batch paces the merchant itself; the simulator's worker hands the job
  back. Invariants: a 429 never ends an ask as a definite failure (``failed``), and an
  ask told "not sent" made no refund.
- ``two_clients_one_store``: a second client (another process: its own transport, pool,
  token and key owner) calls the same asks with the same ``idempotency_key`` as the
  first (only asks alone on their bag: another ask on the bag pending in one process
  is not stopped in the other: remaining risk (c) in docs), through one shared record
  store (a ``MemoryStore`` object standing for one
  SQLite file; a real ``SQLiteStore`` on a temp file for one schedule in ten), some of
  its calls cancelled at a random await and repeated. Each caller repeats a call told
  "another process is still working on it" (or pending) with the key, as the error says.
  Invariants: at most one refund per key; every answer either caller got is the true
  one (its refund is the key's own; a failure made no refund).
- ``redis_loss`` (worker mode): the fleet's Redis restarts empty at a random moment
  (every record, lock and the epoch gone). The real ``FleetWorker`` and ``RedisLedger``
  run on the simulator's in-memory Redis (``_redis.py``, ``_fleet.py``): an epoch
  written at first use (a new fleet: no hold), a record of a send refused when the
  epoch is gone or replaced, a new epoch holding every send for ``settle_running +
  connect + read``, jobs run again from their signed copies with ``read_before_send``
  and ``hold_if_present``. In half the seeds (``loss_same_worker``) the first worker
  also runs again, after the loss, the jobs it finished before it: its client still
  knows the refunds it made for them.
- ``worker_dies`` (worker mode): the first worker dies right after the n-th write to
  an item's record (before the next; n drawn over the first writes of the run), its
  requests in flight cut and its bag locks left to expire; every job is delivered again
  to another worker.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ..._transport import RawResponse
from ...exceptions import (
    RateLimitError,
    RefundAlreadyPresentError,
)
from ...stores import MemoryStore, SQLiteStore
from .._ratelimit import AppRateLimit

if TYPE_CHECKING:
    from ._violet import SimViolet

__all__ = [
    "MORE_KINDS",
    "MerchantGate",
    "MerchantLimit",
    "SecondCaller",
    "draw",
]

MORE_KINDS = ("merchant_429", "two_clients_one_store", "redis_loss", "worker_dies")

#: Merchant ids of the simulated bags (Violet's own are five digits).
MERCHANT_BASE = 20001
#: Times a direct caller calls again after a 429 (nothing applied) before it gives up
#: and the ask ends "not_sent".
CALLER_429_TRIES = 6
#: Seconds a caller waits after a 429 without ``Retry-After``.
CALLER_429_WAIT = 30.0
#: Times a keyed caller repeats its call (another process still at it, or pending).
KEYED_REPEATS = 6
KEYED_WAIT = 30.0
#: Times the simulator's worker runs a job handed back (a lost or held ledger, a 429).
JOB_REPEATS = 8


@attrs.frozen
class MerchantLimit:
    """Merchant ``merchant`` (an index from MERCHANT_BASE) takes at most ``rate`` refund
    and cancel POSTs a second; beyond, Violet's 429 (with ``Retry-After`` or without)."""

    merchant: int
    rate: float
    retry_after: bool


@attrs.frozen
class SecondCaller:
    """A second process calls ask ``label`` with the same idempotency key as the first,
    ``start`` seconds after it; it cancels that call ``cancel_after`` seconds in (None:
    never) and repeats it ``again`` seconds later."""

    label: str
    start: float
    cancel_after: float | None = None
    again: float = 0.0


def draw(  # noqa: PLR0917 - one call site
    seed: int,
    mode: str,
    nbags: int,
    labels: tuple[str, ...],
    kinds: frozenset[str],
    alone: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The schedule changes of the kinds in MORE_KINDS that ``kinds`` switches on
    (``alone``: the asks no other ask shares a bag with)."""
    changes: dict[str, Any] = {}
    if "merchant_429" in kinds:
        rng = random.Random(f"merchant_429:{seed}")
        merchants = rng.randint(1, 2)
        changes["merchants"] = tuple(rng.randrange(merchants) for _ in range(nbags))
        changes["merchant_limits"] = tuple(
            MerchantLimit(m, rng.choice((0.05, 0.2, 1.0)), rng.random() < 0.5)
            for m in range(merchants)
            if rng.random() < 0.8
        )
        changes["merchant_ids_known"] = rng.random() < 0.5
    if "two_clients_one_store" in kinds and mode == "direct":
        rng = random.Random(f"two_clients_one_store:{seed}")
        seconds = tuple(
            SecondCaller(
                label,
                rng.choice((0.0, 0.0, 0.3, 5.0, 40.0)),
                round(rng.uniform(0.0, 20.0), 3) if rng.random() < 0.4 else None,
                rng.choice((0.0, 1.0, 70.0)),
            )
            for label in labels
            if rng.random() < 0.7 and label in alone
        )
        if seconds:
            changes["second_callers"] = seconds
            changes["shared_store"] = "sqlite" if rng.random() < 0.1 else "memory"
    if "worker_dies" in kinds and mode == "worker":
        rng = random.Random(f"worker_dies:{seed}")
        changes["worker_dies"] = rng.randint(1, 2 * len(labels) + 2)
    if "redis_loss" in kinds and mode == "worker":
        rng = random.Random(f"redis_loss:{seed}")
        loss = rng.choice((0.5, 2.0, rng.uniform(0.0, 30.0), rng.uniform(30.0, 120.0)))
        changes["ledger_loss"] = round(loss, 3)
        # The file enqueued again after the loss reaches the worker that made the
        # refunds (its client still knows them) in half the seeds.
        changes["loss_same_worker"] = rng.random() < 0.5
    return changes


class MerchantGate:
    """Each limited merchant's token bucket, in Violet's (virtual) time: a POST over the
    rate is answered 429 before anything is looked at."""

    def __init__(
        self,
        violet: SimViolet,
        merchant_of_bag: dict[int, int],
        limits: tuple[MerchantLimit, ...],
    ) -> None:
        self.violet = violet
        self.merchant_of_bag = merchant_of_bag
        clock = violet.clock.monotonic
        self.buckets = {
            MERCHANT_BASE + lim.merchant: (AppRateLimit(lim.rate, burst=1.0, clock=clock), lim)
            for lim in limits
        }
        #: Asks a merchant's 429 answered.
        self.limited: set[str] = set()

    def __call__(self, bag_id: int, label: str | None) -> RawResponse | None:
        merchant = self.merchant_of_bag.get(bag_id)
        found = self.buckets.get(merchant) if merchant is not None else None
        if found is None:
            return None
        bucket, limit = found
        if not self.violet.faults_on:
            # Faults stopped: the merchant's platform keeps its limit, but the
            # simulator's "every pending resolves" needs its sends through.
            return None
        if bucket.take():
            return None
        self.violet.count("world:merchant_429")
        self.limited.add((label or "").split("~")[0])
        headers: dict[str, str] = {}
        if limit.retry_after:
            wait = bucket.until_token()
            headers["Retry-After"] = f"{max(wait, 0.01):.2f}"
        return self.violet._error(429, "Too Many Requests", 4290, **headers)


def retry_after(exc: RateLimitError) -> float:
    """The seconds a caller waits before calling again after ``exc`` (its Retry-After,
    or CALLER_429_WAIT)."""
    lowered = {k.lower(): v for k, v in exc.headers.items()}
    try:
        value = float(lowered.get("retry-after", ""))
    except ValueError:
        return CALLER_429_WAIT
    return min(max(value, 0.01), 600.0)


# -- two_clients_one_store -------------------------------------------------------------


def open_stores(kind: str, beside: Path) -> tuple[Any, Any]:
    """The record store each of the two client processes opens: one MemoryStore object
    (standing for one SQLite file), or two SQLiteStores on one temp file; (None, None)
    when the kind is off."""
    if kind == "memory":
        shared = MemoryStore()
        return shared, shared
    if kind == "sqlite":
        path = beside.parent / "keys.sqlite3"
        return SQLiteStore(path), SQLiteStore(path)
    return None, None


class SecondClient:
    """The second process of ``two_clients_one_store``: its own client on the shared
    store; and both processes' keyed callers."""

    def __init__(self, world: Any, stores: tuple[Any, Any]) -> None:
        self.world = world
        self.stores = stores
        self.client: Any = None

    async def __aenter__(self) -> SecondClient:
        if self.stores[1] is not None:
            self.client = self.world.client("app2", self.stores[1])[0]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.client is not None:
            await self.client.aclose()
        closed: list[Any] = []
        for store in self.stores:
            if store is not None and all(store is not c for c in closed):
                closed.append(store)
                await store.aclose()

    async def keyed(self, client: Any, ask: Any, who: str | None = None) -> None:
        """A keyed caller: calls, and repeats the call with the key while it is told
        "another process is still working on it", the ask is pending, or the key was
        taken over by another process (as the error says to)."""
        world = self.world
        resume = None
        for _ in range(KEYED_REPEATS):
            seen = await world.call(
                client, ask, resume, key=None if resume else f"key-{ask.label}", who=who
            )
            store_said = seen.what == "not_sent" and seen.error.startswith("RecordStoreError")
            if seen.what not in ("pending", "review") and not store_said:
                return
            if world.s.keyed_resume and who is None and seen.pending is not None:
                # keyed_resume (_kinds_answers): the first process resumes the keyed
                # call's record it was handed, as the error says it may.
                resume = seen.pending
                world.violet.count("caller:keyed_resume")
            await asyncio.sleep(KEYED_WAIT)

    async def first(self, client: Any, ask: Any, cut: Any) -> None:
        """The first process's caller of a two-process ask (cancelled and repeated when
        ``cut``, as caller_cancel draws it, always with the key)."""
        if cut is None:
            await self.keyed(client, ask)
            return
        await self._cut(client, ask, cut.after, cut.again, "caller:cancel_keyed")

    async def second(self, spec: SecondCaller) -> None:
        world = self.world
        ask = next(a for a in world.s.asks if a.label == spec.label)
        await asyncio.sleep(ask.start + spec.start)
        who = f"{ask.label}~2"
        if spec.cancel_after is None:
            await self.keyed(self.client, ask, who)
            return
        await self._cut(
            self.client, ask, spec.cancel_after, spec.again, "caller:second_cancel", who
        )

    async def _cut(  # noqa: PLR0917 - internal
        self, client: Any, ask: Any, after: float, again: float, count: str, who: str | None = None
    ) -> None:
        world = self.world
        task = asyncio.ensure_future(self.keyed(client, ask, who))
        done, _ = await asyncio.wait([task], timeout=after)
        if done:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        world.violet.count(count)
        world.note(f"{ask.label}: a caller cancelled its keyed call at +{after:g}s")
        await asyncio.sleep(again)
        await self.keyed(client, ask, who)


def _after_loss(world: Any) -> None:
    """An item told "failed" before the ledger lost its record (true then: nothing had
    applied), whose job then ran again from its copy and applied it, ends applied (or
    for review): what the ledger says last is true (counted, not a violation). Any
    other failed-but-applied stays one (an item run again from its copy after a loss is
    never told "failed": it may have applied before the loss)."""
    ledger = getattr(world, "fleet_ledger", None)
    if ledger is None or not ledger.reregistered or ledger.lost_at is None:
        return
    kept = []
    for text in world.violations:
        label = text.split()[1] if text.startswith("[failed-but-applied] ") else ""
        if label not in ledger.reregistered:
            kept.append(text)
            continue
        told = [x.at for x in world.seen if x.label == label and x.what == "failed"]
        made = [c.at for c in world.violet.commits if c.label == label]
        final = world.final.get(label)
        if (
            told
            and max(told) < ledger.lost_at
            and min(made) > max(told)
            and final is not None
            and final.what != "failed"
        ):
            # Told "failed" (true then), its record lost, the job run again applied it,
            # and the item ends applied (or for review, when its refund cannot be told
            # its own): what the ledger says last is true.
            world.violet.count("world:failed_then_applied_after_loss")
            continue
        kept.append(text)
    world.violations[:] = kept


# -- invariants -------------------------------------------------------------------------


def check(world: Any) -> None:
    """The invariants of these kinds, on top of ``_World.check``:

    - a merchant's 429 to its send never ends an ask as a definite failure
      (merchant_429; a 429 to a read before any send is the base world's: it ends the
      item not sent (seed 1321726), as a 5xx or no answer to that read does (review 31));
    - an ask told "not sent" (a 429: nothing applied) made no refund nobody was handed;
    - with two processes on one key (two_clients_one_store): a caller told the call
      failed while the key's refund had already been made, or whose own send applied
      after its last answer said it failed, was told a false outcome.
    """
    commits = world.violet.commits
    _after_loss(world)
    handed = {s.refund_id for s in world.seen if s.what == "refund"}
    by_who: dict[str, list[Any]] = {}
    for commit in commits:
        if commit.label is not None:
            by_who.setdefault(commit.label, []).append(commit)
    last: dict[str, Any] = {}
    for seen in world.seen:
        last[seen.who] = seen
    gate = world.violet.post_gate
    limited: set[str] = gate.limited if isinstance(gate, MerchantGate) else set()
    for seen in world.seen:
        if seen.label in limited and seen.what == "failed" and "RateLimitError" in seen.error:
            world.violations.append(
                f"[rate-limit-failed] {seen.label} ended as a definite failure on a 429: "
                f"{seen.error[:160]}"
            )
        own = by_who.get(seen.who, [])
        # Applied before it was told, or after by its own send when that was its last
        # answer (a later call of the caller reports what came after).
        false = [
            c.refund_id
            for c in own
            if c.refund_id not in handed and (c.at <= seen.at or last.get(seen.who) is seen)
        ]
        if seen.what == "not_sent" and false:
            world.violations.append(
                f"[not-sent-but-applied] {seen.label} was told nothing applied "
                f"({seen.error[:120]}) but refund(s) {false} were made for it and handed "
                "to nobody"
            )
        if seen.what == "failed" and seen.label in world.two_processes:
            key_commits = [c for c in commits if (c.label or "").split("~")[0] == seen.label]
            before = [c.refund_id for c in key_commits if c.at <= seen.at]
            after = [c.refund_id for c in own if c.at > seen.at]
            if before or (after and last.get(seen.who) is seen):
                world.violations.append(
                    f"[failed-but-applied] {seen.who} was told its keyed call failed "
                    f"({seen.error[:120]}) but the key's refund(s) "
                    f"{before or after} were made"
                    + (" before" if before else " by its own send, after")
                )


__all__ += [
    "RefundAlreadyPresentError",
    "SecondClient",
    "open_stores",
    "retry_after",
]
