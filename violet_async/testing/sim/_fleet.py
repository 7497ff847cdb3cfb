"""Worker mode: the real fleet worker (``FleetWorker``, through the engine, as the product
runs it) with the real ``RedisLedger`` and ``BagLocks``, on an in-memory Redis
(``_redis.py``) in virtual time.

A producer registers every ask as a signed item (a new fleet: no hold) and enqueues one
job per item. The first worker process runs every job (and may die at a time, or right
after the n-th write to an item's record: ``worker_dies``), every job is delivered again
to a second worker (each sent or pending one twice at once with ``resume_twice``), and
after the faults stop, the jobs not finished run on more workers. A job handed back
(``RetryLaterError``: a settle window, a busy bag, a hold after a loss, weather) runs
again after its ``defer``, as an arq job is retried. With ``redis_loss`` the Redis
restarts empty at a moment of the run: jobs then run from their own signed copies.

Merchant pacing (``FleetPace``) is on, as it is by default in the product: a
merchant's 429 (``merchant_429``) hands the job back and slows that merchant's lane for
every worker, on the in-memory Redis's clock (the simulator's). Items carry their
signed ``merchant_id`` when the schedule says the input has the column
(``merchant_ids_known``); otherwise workers learn it from the refunds they get and
``GET /orders/{id}``. The fleet's shared rate limit (``FleetRateLimit``) is off, as it
is by default.

What stays a stand-in: Redis itself (its scripts are written again in Python and held
to a real redis-server by ``tests/test_fleet_memory_redis.py``), and arq's queue (a job
per item, retried in place; ``refund_job`` adds only its exceptions' mapping to arq's).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import attrs

from ..._ask import PendingRefund, Phase
from ..._engine import Outcome
from ...batch import BatchItem
from ._kinds_more import MERCHANT_BASE
from ._redis import MemoryRedisServer
from ._violet import ASK_LABEL
from ._vloop import SimClock

__all__ = ["FLEET_KEY", "run_workers"]

#: The simulated fleet's key (``VIOLET_FLEET_KEY``): not a secret of the client's.
FLEET_KEY = "sim-fleet-key-not-a-secret-0123"
#: Times one worker runs a job handed back before the job goes back to the queue.
JOB_REPEATS = 12
#: The longest a job handed back waits before it runs again (the queue's own clock).
LONGEST_DEFER = 3_600.0
#: Workers pace each merchant (``FleetPace``), as the product does by default (set
#: here, not read from the environment: a seed replays the same wherever it runs).
MERCHANT_PACE = True


@attrs.define
class FleetState:
    """What the run's checks need to know of the fleet's ledger."""

    server: MemoryRedisServer
    #: Asks a worker ran, and those run again from the job's copy after a loss.
    started: set[str] = attrs.field(factory=set)
    reregistered: set[str] = attrs.field(factory=set)
    lost_at: float | None = None


class _TimedEngine:
    """The worker's engine, its calls timed against the deadline (what the simulator
    checks of every call)."""

    def __init__(self, engine: Any, world: Any, name: str) -> None:
        self._engine = engine
        self._world = world
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._engine, attr)

    async def settle(self, *args: Any, **kwargs: Any) -> Any:
        world = self._world
        started = world.loop.time()
        ended = await self._engine.settle(*args, **kwargs)
        world.check_deadline(f"{self._name} {ASK_LABEL.get()}", started)
        return ended


async def run_workers(world: Any) -> None:
    """Worker mode (see the module docstring)."""
    from ...fleet._ledger import RedisLedger, keyed_items  # noqa: PLC0415 - the fleet extra

    s = world.s
    server = MemoryRedisServer(SimClock(world.loop).time)
    fleet = world.fleet_ledger = FleetState(server)
    producer = RedisLedger(cast(Any, server.client()), fleet_key=FLEET_KEY)
    items = [
        BatchItem(
            n + 1,
            "cancel" if a.kind == "cancel" else "refund",
            world.ids[a.bag][0],
            world.ids[a.bag][1],
            world.request(a),
            MERCHANT_BASE + s.merchants[a.bag] if s.merchant_ids_known else None,
        )
        for n, a in enumerate(s.asks)
    ]
    await producer.new_fleet(now=server.clock())  # nothing of it can be in flight
    jobs = []
    for (key, item), ask in zip(keyed_items(items), s.asks, strict=True):
        await producer.register(key, item)
        jobs.append((ask.label, key, item, producer.sign(key, item)))
    server.writes = 0  # worker_dies counts the workers' writes
    if s.ledger_loss is not None:

        def lose() -> None:
            server.lose()
            # What a replica may hide from an ask is what its record saw: gone with it.
            world.violet.forget_shown()
            fleet.lost_at = world.loop.time()
            world.violet.count("world:ledger_loss")
            world.note("the ledger's Redis restarts EMPTY: every record and the epoch are gone")

        world.loop.call_later(s.ledger_loss, lose)
    crash = s.crashes[0] if s.crashes else None
    # After a loss the file is enqueued again (docs/fleet.md), and the first worker,
    # the one that made the refunds, may take the jobs it finished before the loss.
    again_at = (
        world.loop.time() + s.ledger_loss
        if s.ledger_loss is not None and s.loss_same_worker
        else None
    )
    await _process(world, "w1", jobs, crash.at if crash else None, s.worker_dies, again_at=again_at)
    await _process(world, "w2", jobs, None, 0, twice=s.resume_twice)
    await world.quiesce()
    for n in range(3):
        todo = [
            j
            for j in jobs
            if world.final.get(j[0]) is None or world.final[j[0]].what in ("pending", "crashed")
        ]
        if not todo:
            break
        await _process(world, f"w{n + 3}", todo, None, 0)


async def _process(  # noqa: PLR0915 - one worker process, its jobs and its death
    world: Any,
    name: str,
    jobs: list[tuple[str, str, BatchItem, str]],
    crash_at: float | None,
    dies_after: int,
    *,
    twice: bool = False,
    again_at: float | None = None,
) -> None:
    """One worker process: a ``FleetWorker`` on its own connection and client, running
    ``jobs`` at once; it dies at ``crash_at`` or right after the ``dies_after``-th write
    to an item's record (its requests in flight cut, its lock left to expire).
    ``again_at``: the (loop) time the ledger is lost; a job this process finished before
    it runs once more here after it (the file enqueued again, taken by the same worker,
    whose client still knows the refunds it made)."""
    from ...fleet._ledger import LedgerHeldError, LedgerLostError, RedisLedger  # noqa: PLC0415
    from ...fleet._lock import BagLocks  # noqa: PLC0415
    from ...fleet._worker import FleetWorker, RetryLaterError  # noqa: PLC0415

    fleet: FleetState = world.fleet_ledger
    server = fleet.server
    redis = server.client()
    ledger = RedisLedger(cast(Any, redis), fleet_key=FLEET_KEY)
    base, transport = world.client(name)
    worker = FleetWorker(base, ledger, BagLocks(cast(Any, redis)), merchant_pace=MERCHANT_PACE)
    worker.engine = cast(Any, _TimedEngine(worker.engine, world, name))
    tasks: list[asyncio.Task[None]] = []
    dead = False

    def die(why: str) -> None:
        nonlocal dead
        dead = True
        redis.closed = True
        transport.dead = True
        world.note(f"{name} DIES {why}")
        for task in tasks:
            task.cancel()

    def wrote(count: int) -> None:
        if dies_after and count == dies_after and not dead:
            world.violet.count("world:worker_dies")
            die(f"right after ledger write {count}")

    redis.on_write = wrote

    async def job(label: str, key: str, item: BatchItem, signature: str) -> None:
        ASK_LABEL.set(label)
        await run_job(label, key, item, signature)
        if again_at is not None and world.loop.time() < again_at:
            await asyncio.sleep(again_at - world.loop.time() + 1.0)
            world.note(f"{name} {label}: the job enqueued again after the loss, same worker")
            await run_job(label, key, item, signature)

    async def run_job(label: str, key: str, item: BatchItem, signature: str) -> None:
        for _ in range(JOB_REPEATS):
            if (
                fleet.lost_at is not None
                and label in fleet.started
                and not server.exists(ledger.record_key(key))
            ):
                fleet.reregistered.add(label)  # it runs again from the job's copy
            fleet.started.add(label)
            try:
                summary = await worker.run(key, item, signature)
            except RetryLaterError as exc:
                if isinstance(exc.__cause__, (LedgerLostError, LedgerHeldError)):
                    world.violet.count("world:ledger_refused_send")
                elif exc.__cause__ is None and "'s pace:" in str(exc):
                    # Its merchant's lane (FleetPace) holds its send for later.
                    world.violet.count("world:merchant_paced")
                wait = min(max(exc.defer, 0.05), LONGEST_DEFER)
                world.note(f"{name} {label}: handed back ({exc}); runs again in {wait:g}s")
                await asyncio.sleep(wait)
                continue
            world.saw(_seen(world, label, item, summary, await ledger.get(key)))
            return
        # Handed back every time: the job goes back to the queue, for a later worker.
        record = await ledger.get(key)
        world.saw(_seen(world, label, item, None, record))

    async def copy(label: str, key: str, item: BatchItem, signature: str) -> None:
        record = await ledger.get(key)
        if record is not None and record.state in ("sent", "pending"):
            await job(label, key, item, signature)  # a resume job comes twice

    async with base:
        tasks.extend(asyncio.ensure_future(job(*j)) for j in jobs)
        if twice:
            tasks.extend(asyncio.ensure_future(copy(*j)) for j in jobs)
        if crash_at is not None:
            done, _ = await asyncio.wait(tasks, timeout=crash_at)
            if len(done) < len(tasks) and not dead:
                die(f"at +{crash_at:g}s")
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            world.violations.append(
                f"[error] {name}: a job raised {type(result).__name__}: {result}"
            )


def _seen(
    world: Any, label: str, item: BatchItem, summary: dict[str, Any] | None, record: Any
) -> Any:
    """What the job's caller learns: the ledger's summary of the item (``summary``: the
    run's; None: handed back every time, the record as it stands)."""
    from ._run import Seen  # noqa: PLC0415 - _run imports this module

    if summary is None:
        if (
            record is None
            or record.state in ("new", "sent")
            or (record.state == "pending" and not record.needs_review)
        ):
            pending = record.pending() if record is not None and record.ask else None
            return Seen(
                label,
                "pending" if pending else "crashed",
                pending=pending,
                error="the job was handed back every time",
            )
        summary = record.to_dict()
    state, outcome = summary["state"], summary["outcome"]
    message = f"{summary.get('error') or ''}: {summary.get('message') or ''}"
    if state == "applied":
        return Seen(label, "refund", summary["refund_id"])
    if state == "failed" and outcome == Outcome.PRESENT.value:
        return Seen(label, "held", error=message)
    if state == "failed" and outcome != "unknown":
        return Seen(label, "failed", error=message)
    if state == "new" and outcome == "not_sent":
        # Nothing sent: its bag waits on an item under review (the file enqueued again
        # runs it once that one is settled).
        return Seen(label, "not_sent", error=message)
    # Pending for review, or failed "unknown": a person looks; the reason is the
    # ledger's message.
    pending = record.pending() if record is not None and record.ask else None
    if pending is None:
        pending = PendingRefund(item.kind, item.order_id, item.bag_id, item.request)
    pending = attrs.evolve(
        pending,
        phase=Phase.PENDING,
        needs_review=True,
        note=pending.note or summary.get("message") or "",
    )
    return Seen(label, "review", error=message, pending=pending)
