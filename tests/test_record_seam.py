"""The record store seam (issue 25, point 3): one protocol, ``AskRecords`` (load the
record by its key; save before every send; record the end), implemented by the key
stores (``KeyRecords``), the batch journal (``JournalRecords``) and the fleet ledger
(``LedgerRecords``); the client's key path, the batch runner and the fleet worker hand
theirs to the engine, which alone saves before a send.

Each driver is run with its implementation swapped for one that records what it is
asked (and, at what moment, how many POSTs Violet had seen), or whose save fails: a
failed save sends nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from violet_async import RecordStoreError, RefundBagRequest
from violet_async import _engine as engine_module
from violet_async import batch as batch_module
from violet_async._engine import AskRecords, Ended, KeyRecords, Outcome
from violet_async.batch import BatchItem, JournalWriteError, run_batch
from violet_async.stores import KeyEntry, MemoryStore
from violet_async.testing import FakeViolet

from . import _fleet_redis

redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for every test here


def _bag(n: int) -> tuple[int, int]:
    """FakeViolet's n-th seeded order and its bag."""
    return 100_000 + n, 200_000 + n


def _posts(fake: FakeViolet, bag_id: int) -> int:
    return len(fake.ledger.posts_per_bag.get(bag_id, []))


def _recording(base: type[Any], calls: list[tuple[Any, ...]], posts: Any) -> type[Any]:
    """``base`` (an AskRecords) that notes every call, with the POSTs seen when a
    record is saved."""

    class Recording(base):  # type: ignore[misc,valid-type]
        async def load(self) -> Any:
            found = await super().load()
            calls.append(("load", None if found is None else found.phase.value))
            return found

        async def save(self, ask: Any) -> None:
            calls.append(("save", ask.phase.value, posts()))
            await super().save(ask)

        async def end(self, ended: Ended, **fields: Any) -> None:
            calls.append(("end", ended.outcome))
            await super().end(ended, **fields)

    return Recording


def _refusing(base: type[Any], error: BaseException) -> type[Any]:
    """``base`` whose save of a record before a send fails with ``error``."""

    class Refusing(base):  # type: ignore[misc,valid-type]
        async def save(self, ask: Any) -> None:
            if ask.phase.value == "sent":
                raise error
            await super().save(ask)

    return Refusing


def test_each_store_of_records_is_one_protocol() -> None:
    """The journal's, the ledger's and the key stores' implementations, and the
    runners' wrappers, have the three operations of AskRecords (mypy --strict checks
    the same of their signatures in tests/typing/records.py)."""
    from violet_async.fleet import _worker
    from violet_async.fleet._ledger import LedgerRecords

    for cls in (
        KeyRecords,
        batch_module.JournalRecords,
        batch_module._ItemRecords,
        LedgerRecords,
        _worker._ItemRecords,
    ):
        for name in ("load", "save", "end"):
            assert callable(getattr(cls, name)), (cls, name)
    assert {"load", "save", "end"} <= set(vars(AskRecords))


# -- the client's key path ------------------------------------------------------------


async def test_the_key_path_saves_through_its_store_records_before_the_post(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A keyed refund: the key's record is loaded, saved sent before the POST leaves,
    and its end recorded, all through KeyRecords."""
    o1, b1 = _bag(1)
    calls: list[tuple[Any, ...]] = []
    async with FakeViolet(orders=1, seed=31) as fake:
        recording = _recording(KeyRecords, calls, lambda: _posts(fake, b1))
        monkeypatch.setattr(engine_module, "KeyRecords", recording)
        async with fake.client(store=MemoryStore()) as client:
            refund = await client.refund_bag(o1, b1, amount_refunded=100, idempotency_key="k")
    assert refund.id is not None
    assert calls == [
        ("load", None),
        ("save", "sent", 0),  # durable before the POST left
        ("save", "applied", 1),
        ("end", Outcome.APPLIED),
    ]
    assert _posts(fake, b1) == 1


class _NoSentSave(MemoryStore):
    """A store that cannot write a record that says sent (its disk is full)."""

    async def save(self, entry: KeyEntry, owner: str) -> bool:
        if entry.ask.phase.value == "sent":
            raise OSError("no space left on device")
        return await super().save(entry, owner)


async def test_a_failed_save_of_the_key_path_sends_nothing() -> None:
    o1, b1 = _bag(1)
    async with FakeViolet(orders=1, seed=32) as fake:
        async with fake.client(store=_NoSentSave()) as client:
            with pytest.raises(RecordStoreError, match="nothing was sent"):
                await client.refund_bag(o1, b1, amount_refunded=100, idempotency_key="k")
        assert _posts(fake, b1) == 0


# -- the batch runner -----------------------------------------------------------------


async def test_the_batch_saves_through_its_journal_records_before_the_post(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A batch row: its line's record is loaded, saved sent before the POST leaves, and
    its end recorded ("done"), all through JournalRecords; the journal's lines are the
    ones it always wrote."""
    o1, b1 = _bag(1)
    calls: list[tuple[Any, ...]] = []
    journal = tmp_path / "run.jsonl"
    item = BatchItem.refund(1, o1, b1, RefundBagRequest(amount_refunded=100))
    async with FakeViolet(orders=1, seed=33) as fake, fake.client() as client:
        recording = _recording(batch_module.JournalRecords, calls, lambda: _posts(fake, b1))
        monkeypatch.setattr(batch_module, "JournalRecords", recording)
        results = [r async for r in run_batch(client, [item], journal=journal)]
    assert [r.outcome for r in results] == ["succeeded"]
    assert calls == [
        ("load", None),
        ("save", "sent", 0),  # durable before the POST left
        ("save", "applied", 1),
        ("end", Outcome.APPLIED),
    ]
    assert _posts(fake, b1) == 1
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [line["state"] for line in lines if "state" in line] == ["sent", "done"]
    done = lines[-1]
    assert list(done)[-4:] == ["refund_id", "reconciled", "amount", "first_sent"]


async def _drain(results: AsyncIterator[Any]) -> None:
    async for _ in results:
        pass


async def test_a_failed_save_of_the_batch_journal_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The journal cannot write the line that says sent: nothing is sent, and the run
    stops with the journal's error at once (before: the engine took the stopped send
    for a send failure, read the bag back and tried again until its deadline)."""
    o1, b1 = _bag(1)
    item = BatchItem.refund(1, o1, b1, RefundBagRequest(amount_refunded=100))
    refusing = _refusing(batch_module.JournalRecords, JournalWriteError("disk full"))
    monkeypatch.setattr(batch_module, "JournalRecords", refusing)
    async with FakeViolet(orders=1, seed=34) as fake, fake.client() as client:
        with pytest.raises(JournalWriteError):
            # At once: the stopped send is no send failure to read back and retry
            # until the deadline (60 s of real time).
            await asyncio.wait_for(
                _drain(run_batch(client, [item], journal=tmp_path / "run.jsonl")), 10
            )
        assert _posts(fake, b1) == 0


# -- the fleet worker -----------------------------------------------------------------


async def _fleet_run(
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    records: Any,
    seed: int,
    *,
    amount: int = 100,
    registered: bool = True,
) -> tuple[Any, FakeViolet]:
    """One fleet item through a worker whose ledger records are ``records`` (given the
    fake, for its POST count): what the run returned or raised, and the fake.
    ``registered``: the producer added it to the ledger (else the job's copy is all
    there is, as after Redis lost the ledger)."""
    pytest.importorskip("redis")
    from redis.asyncio import Redis

    from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, _worker, item_key

    o1, b1 = _bag(1)
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushall()
        await RedisLedger(redis).new_fleet()
        async with FakeViolet(orders=1, seed=seed) as fake, fake.client() as client:
            monkeypatch.setattr(_worker, "LedgerRecords", records(fake, b1))
            worker = FleetWorker(client, RedisLedger(redis), BagLocks(redis))
            item = BatchItem.refund(1, o1, b1, RefundBagRequest(amount_refunded=amount))
            key = item_key(item)
            if registered:
                await worker.ledger.register(key, item)
            try:
                done: Any = await worker.run(key, item, worker.ledger.sign(key, item))
            except Exception as exc:  # noqa: BLE001 - returned for the test to judge
                done = exc
        return done, fake
    finally:
        await redis.aclose()


async def test_the_fleet_saves_through_its_ledger_records_before_the_post(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """A fleet item: its ledger record is loaded, saved sent before the POST leaves,
    and its end recorded (applied, in one round trip with the read-back), all through
    LedgerRecords."""
    from violet_async.fleet._ledger import LedgerRecords

    calls: list[tuple[Any, ...]] = []
    b1 = _bag(1)[1]

    def records(fake: FakeViolet, bag_id: int) -> type[Any]:
        return _recording(LedgerRecords, calls, lambda: _posts(fake, bag_id))

    done, fake = await _fleet_run(redis_url, monkeypatch, records, seed=35)
    assert isinstance(done, dict)
    assert done["state"] == "applied"
    assert calls == [
        ("load", None),
        ("save", "sent", 0),
        ("save", "applied", 1),
        ("end", Outcome.APPLIED),
    ]
    assert _posts(fake, b1) == 1


async def test_a_failed_save_of_the_fleet_ledger_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    from violet_async.fleet import RetryLaterError
    from violet_async.fleet._ledger import LedgerRecords, LockLostError

    b1 = _bag(1)[1]

    def records(fake: FakeViolet, bag_id: int) -> type[Any]:
        return _refusing(LedgerRecords, LockLostError("the bag's lock is another's now"))

    done, fake = await _fleet_run(redis_url, monkeypatch, records, seed=36)
    assert isinstance(done, RetryLaterError)
    assert _posts(fake, b1) == 0


@pytest.mark.parametrize("registered", [True, False])
async def test_the_fleet_records_an_end_without_a_refund_through_its_ledger_records(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, *, registered: bool
) -> None:
    """A refusal (a 4xx: more than the bag holds) ends the item: recorded by
    LedgerRecords.end, in the ledger's words: failed, or for review when the item was
    run from the job's copy (the ledger lost it: it may have applied before)."""
    from violet_async.fleet._ledger import LedgerRecords

    calls: list[tuple[Any, ...]] = []

    def records(fake: FakeViolet, bag_id: int) -> type[Any]:
        return _recording(LedgerRecords, calls, lambda: _posts(fake, bag_id))

    done, _ = await _fleet_run(
        redis_url, monkeypatch, records, seed=37, amount=10**9, registered=registered
    )
    assert isinstance(done, dict)
    assert calls == [
        ("load", None),
        ("save", "sent", 0),
        ("save", "failed", 1),
        ("end", Outcome.FAILED),
    ]
    if registered:
        assert (done["state"], done["outcome"], done["error"]) == (
            "failed",
            "failed",
            "BadRequestError",
        )
    else:
        assert (done["state"], done["needs_review"]) == ("pending", True)
        assert "the ledger lost this item's record" in done["message"]


@pytest.mark.parametrize("outcome", [Outcome.PENDING, Outcome.APPLIED])
async def test_an_end_the_ledger_has_no_word_for_is_never_recorded_failed(
    redis_url: str, outcome: Outcome
) -> None:
    """LedgerRecords.end with an outcome it does not map (PENDING with no record to
    keep, APPLIED with no refund): the item may have applied, so it is left for review
    (outcome ``unknown``), never ``failed`` (definitely not applied: final, and a
    failed item is one a person may enqueue again). Before: ``failed``."""
    pytest.importorskip("redis")
    from redis.asyncio import Redis

    from violet_async._ask import sent_once
    from violet_async.fleet import BagLocks, RedisLedger, item_key
    from violet_async.fleet._ledger import LedgerRecords

    o1, b1 = _bag(1)
    redis = Redis.from_url(redis_url)
    try:
        await redis.flushall()
        ledger = RedisLedger(redis)
        await ledger.new_fleet()
        item = BatchItem.refund(1, o1, b1, RefundBagRequest(amount_refunded=100))
        key = item_key(item)
        await ledger.register(key, item)
        async with BagLocks(redis).hold(b1) as held:
            record = await ledger.get(key)
            assert record is not None
            records = LedgerRecords(
                ledger,
                record,
                held.key,
                held.token,
                clock=lambda: 1_700_000_000.0,
                epoch=lambda: None,
                stamp=_stamp,
                redact=str,
            )
            ask = sent_once("refund", o1, b1, item.request, 1_700_000_000.0)
            await records.save(ask)  # sent: the POST may have left
            await records.end(Ended(outcome))
            after = await ledger.get(key)
        assert after is not None
        assert (after.state, after.outcome) == ("failed", "unknown")
    finally:
        await redis.aclose()


async def _stamp() -> float:
    return 1_700_000_000.0


@pytest.mark.parametrize("outcome", [Outcome.APPLIED, Outcome.DEFERRED])
async def test_an_end_the_journal_has_no_word_for_is_left_for_review(
    tmp_path: Any, outcome: Outcome
) -> None:
    """JournalRecords.end with an outcome it does not map: APPLIED with no refund (a
    "done" line would tell the next run, and the audit, that the item has its refund,
    naming none), DEFERRED (no line state). Left "unknown" (for review), after the
    "sent" line that says the POST may have left. Before: "done", or a KeyError with
    no line written."""
    from violet_async._ask import sent_once
    from violet_async._journal import Journal

    o1, b1 = _bag(1)
    item = BatchItem.refund(1, o1, b1, RefundBagRequest(amount_refunded=100))
    path = tmp_path / "run.jsonl"
    journal = await Journal.open(path, input_id=None)
    try:
        records = batch_module.JournalRecords(journal, item, "k")
        await records.save(sent_once("refund", o1, b1, item.request, 1_700_000_000.0))
        await records.end(Ended(outcome))
    finally:
        await journal.aclose()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["state"] for line in lines if "state" in line] == ["sent", "unknown"]
