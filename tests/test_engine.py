"""One engine: every refund and cancel is driven by ``Engine.drive`` (the client, its key
path, ``resume``, the batch runner, the fleet worker), and every driver names an ask's
end in one vocabulary (``Outcome``) that the older ones map onto in one place."""

from __future__ import annotations

import ast
import contextlib
import typing
from pathlib import Path
from typing import Any

import pytest

from violet_async import (
    AmbiguousOutcomeError,
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    BagPendingError,
    IdempotencyKeyReusedError,
    RecordStoreError,
    RefundAlreadyPresentError,
    RefundBagRequest,
    RefundFailedError,
    RequestValidationError,
    RetryPolicy,
    ServerError,
    VioletError,
)
from violet_async import batch as batch_module
from violet_async._ask import Phase, sent_once
from violet_async._engine import VOCABULARY, Engine, Outcome, engine_of, outcome_of
from violet_async._reconcile import RateLimitDeferred
from violet_async.batch import BatchItem, run_batch
from violet_async.testing import FakeClock, FakeViolet

from . import _fleet_redis
from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client

redis_url = _fleet_redis.redis_url  # the session's redis-server
fleet_key = _fleet_redis.fleet_key  # VIOLET_FLEET_KEY for every test here

PACKAGE = Path(batch_module.__file__).resolve().parent


# -- one driver -----------------------------------------------------------------------


@pytest.fixture
def drives(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, bool]]:
    """Every call of Engine.drive: (kind, bag, resumed)."""
    seen: list[tuple[str, int, bool]] = []
    real = Engine.drive

    async def counted(
        self: Engine, kind: Any, order_id: int, bag_id: int, *a: Any, **k: Any
    ) -> Any:
        seen.append((kind, bag_id, k.get("resume") is not None))
        return await real(self, kind, order_id, bag_id, *a, **k)

    monkeypatch.setattr(Engine, "drive", counted)
    return seen


def _bag(n: int) -> tuple[int, int]:
    """FakeViolet's n-th seeded order and its bag."""
    return 100_000 + n, 200_000 + n


async def test_every_client_call_is_driven_by_the_engine(
    drives: list[tuple[str, int, bool]],
) -> None:
    """refund_bag, cancel_bag, a keyed refund and resume all go through Engine.drive, and
    a with_options clone has its own engine over the same state."""
    (o1, b1), (o2, b2), (o3, b3) = _bag(1), _bag(2), _bag(3)
    async with FakeViolet(orders=3, seed=4) as fake, fake.client() as client:
        await client.refund_bag(o1, b1, amount_refunded=100)
        await client.cancel_bag(o2, b2)
        first = await client.refund_bag(o3, b3, amount_refunded=100, idempotency_key="k-1")
        again = await client.refund_bag(o3, b3, amount_refunded=100, idempotency_key="k-1")
        pending = sent_once("refund", o1, b1, RefundBagRequest(amount_refunded=50), 0.0)
        with contextlib.suppress(VioletError):
            await client.resume(pending)
        clone = client.with_options(retry=RetryPolicy(max_attempts=2))
        assert engine_of(clone) is not engine_of(client)
        assert engine_of(clone).known_refunds is engine_of(client).known_refunds
        assert engine_of(clone).policy.max_attempts == 2
        assert engine_of(client).policy.max_attempts != 2
    assert again == first
    assert drives == [
        ("refund", b1, False),
        ("cancel", b2, False),
        ("refund", b3, False),  # the second keyed call is answered by the key path
        ("refund", b1, True),
    ]


async def test_a_batch_item_is_driven_by_the_engine(
    drives: list[tuple[str, int, bool]],
) -> None:
    (o1, b1), (o2, b2) = _bag(1), _bag(2)
    async with FakeViolet(orders=2, seed=5) as fake, fake.client() as client:
        items = [
            BatchItem.refund(1, o1, b1, RefundBagRequest(amount_refunded=100)),
            BatchItem.cancel(2, o2, b2),
        ]
        results = [r async for r in run_batch(client, items)]
    assert sorted(r.outcome for r in results) == ["succeeded", "succeeded"]
    assert sorted(drives) == [("cancel", b2, False), ("refund", b1, False)]


async def test_a_fleet_job_is_driven_by_the_engine(
    drives: list[tuple[str, int, bool]], redis_url: str
) -> None:
    """job -> worker -> engine -> protocol: the worker holds an engine, and its item is
    driven by it (never through the client's refund_bag)."""
    pytest.importorskip("redis")
    from redis.asyncio import Redis

    from violet_async.fleet import BagLocks, FleetWorker, RedisLedger, item_key

    redis = Redis.from_url(redis_url)
    try:
        await redis.flushall()
        await RedisLedger(redis).new_fleet()
        o1, b1 = _bag(1)
        async with FakeViolet(orders=1, seed=6) as fake, fake.client() as client:
            worker = FleetWorker(client, RedisLedger(redis), BagLocks(redis))
            assert isinstance(worker.engine, Engine)
            assert worker.engine.policy.read_before_send
            item = BatchItem.refund(1, o1, b1, RefundBagRequest(amount_refunded=100))
            key = item_key(item)
            done = await worker.run(key, item, worker.ledger.sign(key, item))
        assert done["state"] == "applied"
        assert VOCABULARY["ledger"][done["outcome"]] is Outcome.APPLIED
        assert drives == [("refund", b1, False)]
    finally:
        await redis.aclose()


# -- one outcome vocabulary -----------------------------------------------------------


def _api(cls: type[APIError], status: int, path: str) -> APIError:
    return cls("x", status=status, error_code=None, body=b"", headers={}, method="POST", path=path)


def _pending(*, needs_review: bool = False) -> Any:
    ask = sent_once("refund", 1, 2, RefundBagRequest(amount_refunded=1), 0.0)
    return (
        ask.__class__.from_dict({**ask.to_dict(), "phase": "pending"})
        if not needs_review
        else (ask.__class__.from_dict({**ask.to_dict(), "phase": "pending", "needs_review": True}))
    )


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (AmbiguousOutcomeError("x", request=None, attempts=1), Outcome.REVIEW),
        (AmbiguousOutcomeError("x", request=None, attempts=1, pending=_pending()), Outcome.PENDING),
        (
            AmbiguousOutcomeError(
                "x", request=None, attempts=1, pending=_pending(needs_review=True)
            ),
            Outcome.REVIEW,
        ),
        (RefundAlreadyPresentError("x", refunds=()), Outcome.PRESENT),
        (BagPendingError("x", pending=()), Outcome.NOT_SENT),
        (RecordStoreError("x", key="k"), Outcome.NOT_SENT),
        (_api(AuthenticationError, 401, "/orders/1/bags/2/refunds"), Outcome.NOT_SENT),
        (_api(ServerError, 503, "/login"), Outcome.NOT_SENT),
        (APIConnectionError("x", request_sent=False), Outcome.NOT_SENT),
        (APIConnectionError("x", request_sent=True), Outcome.FAILED),
        (_api(ServerError, 500, "/orders/1/bags/2/refunds"), Outcome.FAILED),
        (_api(BadRequestError, 400, "/orders/1/bags/2/refunds"), Outcome.FAILED),
        (RequestValidationError("amount_refunded", "bad"), Outcome.FAILED),
        (IdempotencyKeyReusedError("x", key="k"), Outcome.FAILED),
        (
            RateLimitDeferred(_pending(), 1.0, _api(ServerError, 429, "/")),
            Outcome.DEFERRED,
        ),
        (ValueError("not an ask's"), None),
    ],
)
def test_outcome_of_names_each_end_once(error: BaseException, outcome: Outcome | None) -> None:
    """The one error classifier every driver uses (batch, fleet, simulator)."""
    assert outcome_of(error) is outcome


def _strings_of(node: ast.AST) -> set[str]:
    """A string constant, or ``Outcome.X.value``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    text = ast.unparse(node)
    if text.startswith("Outcome.") and text.endswith(".value"):
        return {Outcome[text.split(".")[1]].value}
    return set()


def _written(path: Path, call: str, *, arg: int, keyword: str) -> set[str]:
    """The constant states ``call(...)`` is given in ``path`` (its positional ``arg``
    and its ``keyword``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = (
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        )
        if name != call:
            continue
        given = [kw.value for kw in node.keywords if kw.arg == keyword]
        if given:  # the keyword wins (``_ended``'s state over its outcome)
            found |= _strings_of(given[0])
        elif len(node.args) > arg:
            found |= _strings_of(node.args[arg])
    return found


def test_every_vocabulary_maps_onto_one_outcome() -> None:
    """Each state a phase, a journal line, a ledger record or a BatchResult can hold is
    mapped onto Outcome, and each mapping is read from the source that writes it: a new
    state written anywhere without a mapping fails here."""
    assert set(VOCABULARY["phase"]) == {p.value for p in Phase}
    assert set(VOCABULARY["batch"]) == set(typing.get_args(batch_module.Outcome))
    from violet_async.fleet._ledger import FAILED_OUTCOMES, STATES

    ledger_outcomes = set()
    for path in (PACKAGE / "fleet").glob("*.py"):
        ledger_outcomes |= _written(path, "mark_failed", arg=99, keyword="outcome")
        ledger_outcomes |= _written(path, "mark_applied", arg=99, keyword="outcome")
        ledger_outcomes |= _written(path, "mark_applied_and_read", arg=99, keyword="outcome")
    # The ledger's seam writes its failed ends' outcomes from one map (LedgerRecords).
    for outcome, word in FAILED_OUTCOMES.items():
        assert VOCABULARY["ledger"][word] is outcome
    ledger_outcomes |= set(FAILED_OUTCOMES.values())
    assert {"already_present", "unknown", "failed", "refused"} <= ledger_outcomes
    assert set(VOCABULARY["ledger"]) >= set(STATES) | ledger_outcomes
    journal = _written(PACKAGE / "batch.py", "record", arg=2, keyword="state")
    # The journal's seam writes every end's state from one map (JournalRecords.end).
    for outcome, state in batch_module._JOURNAL_STATES.items():
        assert VOCABULARY["journal"][state] is outcome
    journal |= set(batch_module._JOURNAL_STATES.values())
    # "sent" / "pending" are written as ask.phase.value (the phases are mapped above).
    assert {"done", "present", "unsent"} <= journal
    assert set(VOCABULARY["journal"]) >= journal | {"sent", "pending"}
    # Every vocabulary says each end its own way, but none has an end Outcome lacks.
    for words in VOCABULARY.values():
        assert set(words.values()) <= set(Outcome)


async def test_a_batch_item_on_a_bag_the_caller_left_pending_is_never_sent(
    tmp_path: Path,
) -> None:
    """The caller's own call on the bag ended pending (its commit lands after its
    deadline). A batch row for the same refund through that client is not sent
    (BagPendingError, the engine's NOT_SENT), ends ``failed`` in the batch's words, and
    a later run over the same journal skips it (it may be that very refund): one POST."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=30.0)])
    journal = tmp_path / "run.jsonl"
    item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=300))
    async with hostile_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        with pytest.raises(AmbiguousOutcomeError) as first:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300)
        assert outcome_of(first.value) is Outcome.PENDING
        [result] = [r async for r in run_batch(client, [item], journal=journal)]
        [again] = [r async for r in run_batch(client, [item], journal=journal)]
    assert (result.outcome, result.error_class, result.sent) == ("failed", "BagPendingError", False)
    assert outcome_of(result.error) is Outcome.NOT_SENT  # type: ignore[arg-type]
    assert again.outcome == "already_failed"
    assert server.posts == 1


async def test_settle_names_the_end_and_lets_the_drivers_own_errors_through() -> None:
    """Engine.settle: a 2xx refund is APPLIED with the refund; a 2xx whose status is
    FAILED is FAILED with RefundFailedError (as refund_bag raises it); an error of the
    driver's own save named in ``passes`` goes on as raised, nothing sent."""
    clock = FakeClock()
    server = Hostile(
        clock, script=[Step(200), Step(200, answer={"status": "FAILED", "errors": []})]
    )
    request = RefundBagRequest(amount_refunded=300)

    class Refusing:
        async def load(self) -> None:
            return None

        async def save(self, ask: Any) -> None:
            raise RecordStoreError("the driver's own record could not be written", key="k")

        async def end(self, ended: Any) -> None:
            raise AssertionError("the driver records the end")

    async with hostile_client(server, retry=RetryPolicy(deadline=20.0)) as client:
        engine = engine_of(client)
        applied = await engine.settle("refund", ORDER_ID, BAG_ID, request)
        failed = await engine.settle("refund", ORDER_ID, BAG_ID, request)
        with pytest.raises(RecordStoreError):
            await engine.settle(
                "refund", ORDER_ID, BAG_ID, request, records=Refusing(), passes=(RecordStoreError,)
            )
    assert applied.outcome is Outcome.APPLIED
    assert applied.refund is not None
    assert applied.refund.id == server.ours[0]
    assert (failed.outcome, failed.refund) == (Outcome.FAILED, None)
    assert isinstance(failed.error, RefundFailedError)
    assert server.posts == 2  # the refused save sent nothing
