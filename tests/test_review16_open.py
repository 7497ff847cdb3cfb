"""Review 16, left open: findings against a server scripted here (``Hostile`` of
``test_review16_findings``) that this branch did not fix; see each docstring for why."""

from __future__ import annotations

from pathlib import Path

import attrs

from violet_async import AmbiguousOutcomeError, OrderRefund, PendingRefund
from violet_async.exceptions import BagPendingError
from violet_async.stores import RedisStore, SQLiteStore
from violet_async.testing import FakeClock

from ._fleet_redis import redis_url  # noqa: F401 - the fixture
from .test_review16_findings import BAG, ORDER, REQUEST, Hostile, _client, _ended, _serve

# -- 1. two records pending on one bag in one client hold each other back for good ------


async def test_two_records_pending_on_one_bag_in_one_client_end() -> None:
    """Scenario: this client's refund X of 5.00 is answered Violet's own 500 (nothing
    applied) and its deadline parks it pending. A job hands this client record R of
    another process (the shopper's other 5.00, also answered 500, nothing applied) on
    the same bag. The app resumes both, as the errors say, every two minutes, for an
    hour.

    Main: resuming R finds X pending on the bag (``settings.others_pending``): once R is
    proven absent its re-send is held back (``_held_back``), and R goes back on the
    bag; resuming X then finds R pending and is held back the same way. Neither ever
    ends: no refund, no failure, no review, for as long as the app keeps trying (the
    ``BagPendingError`` says "resume the pending one first", which is the other).

    True outcome: each ask ends (applied, failed, or parked for review by a person):
    one of them at least may send, or the client says a person must look."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["lost", "lost"])
    async with (
        _serve(server) as url,
        _client(url, clock, deadline=3.0) as zero,
        _client(url, clock, deadline=30.0) as here,
    ):
        x = await _ended(here.refund_bag(ORDER, BAG, REQUEST))
        r = await _ended(zero.refund_bag(ORDER, BAG, REQUEST))
        assert isinstance(x, AmbiguousOutcomeError)
        assert x.pending is not None
        assert isinstance(r, AmbiguousOutcomeError)
        assert r.pending is not None
        records = {
            "x": x.pending,
            "r": PendingRefund.from_json(
                attrs.evolve(r.pending, clock="0123456789abcdef", wall_mono=None).to_json()
            ),
        }
        outcomes: list[str] = []
        ends: dict[str, object] = {}
        for _ in range(30):
            clock.advance(120.0)
            for name in ("r", "x"):
                if name in ends:
                    continue
                got = await _ended(here.resume(records[name]))
                outcomes.append(f"{name}: {type(got).__name__}")
                if isinstance(got, AmbiguousOutcomeError) and got.pending is not None:
                    if got.pending.needs_review:
                        ends[name] = got
                    else:
                        records[name] = got.pending
                elif not isinstance(got, BagPendingError):
                    ends[name] = got
            if len(ends) == 2:
                break
    assert len(server.made) <= 2
    made = [e for e in ends.values() if isinstance(e, OrderRefund)]
    assert len(made) == len(server.made)
    assert len(ends) == 2, f"never ended after an hour: {outcomes[-4:]}"


# -- 2. a RedisStore whose Redis restarted empty ------------------------------------------


async def test_a_keyed_repeat_after_redis_lost_its_data_sends_nothing_blind(
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    """Scenario: ``VIOLET_STORE=redis://...`` (the arq example's setup). Worker one's
    keyed refund is applied by Violet, answered with its own 500, and its deadline parks
    it pending: the key's entry in Redis says so. Redis then restarts empty (no
    persistence, or a failover to a replica that had not received the write; here its
    keys are deleted). The job (or the web app's retry) runs the call again with the
    same key, in worker two.

    Main: worker two's claim finds nothing under the key and owns a fresh ask: the
    request is sent again at once, no read-back: a second refund. RedisStore neither
    checks that Redis keeps its writes (the fleet ledger refuses ``appendonly no``
    unless told) nor notices a Redis that lost its data (the fleet ledger's epoch).

    True outcome: nothing sent blind: the second call reads the bag back first (or is
    refused), one refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["applied_lost", "ok"])
    prefix = "review16-lost:"
    key = "rma-review16-redis-lost"
    async with (
        _serve(server) as url,
        RedisStore(redis_url, prefix=prefix) as one_store,
        RedisStore(redis_url, prefix=prefix) as two_store,
        _client(url, clock, deadline=3.0, store=one_store) as one,
        _client(url, clock, deadline=600.0, store=two_store) as two,
    ):
        server.hide = True  # the list lags: worker one's deadline parks it pending
        first = await _ended(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        server.hide = False
        lost = await one_store._redis.keys(f"{prefix}*")
        assert lost  # the key's pending entry
        await one_store._redis.delete(*lost)  # Redis restarted empty
        clock.advance(120.0)
        again = await _ended(two.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
    assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"
    assert isinstance(again, (OrderRefund, AmbiguousOutcomeError)), repr(again)


# -- 3. a keyed record told FAILED, resumed after its key's retention --------------------


async def test_a_keyed_record_told_failed_is_not_sent_again_after_retention(
    tmp_path: Path,
) -> None:
    """Scenario: processes share a SQLiteStore (retention 600 s here; 24 h by default).
    Process one's keyed refund (key K) is answered Violet's own 500 (nothing applied);
    its deadline parks it: record X, on a job queue. The job resumes X in worker two:
    proven absent, re-sent, 429, no attempts left: FAILED, and its caller is told so.
    The queue delivers the resume job once more, after K's retention (a queue that
    retries for longer than the store keeps finished keys).

    Main: K's FAILED entry was swept with its retention; the resume finds no entry and
    owns it fresh with X's record: X, told FAILED, is read back, proven absent and
    sent again (it applies). ``Claim.ENDED`` only holds while the entry does.

    True outcome: a record whose ask ended (or may have) and whose key's entry is gone
    is not sent again: failed, or review; nothing sent.

    Why open: a store cannot tell "swept after it finished" from "never held here" (a
    record of another store, or of a process with the default MemoryStore). A fix
    keeps the ``ask_id`` of every ended ask longer than retention (a compact tombstone),
    or refuses a resume of a keyed record older than retention (review)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hostile(clock, ["lost", "busy", "ok"])
    path = tmp_path / "keys.db"
    key = "rma-review16-swept"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic, retention=600.0) as one_store,
        SQLiteStore(path, monotonic=clock.monotonic, retention=600.0) as two_store,
        SQLiteStore(path, monotonic=clock.monotonic, retention=600.0) as three_store,
        _client(url, clock, deadline=3.0, store=one_store) as one,
        _client(url, clock, store=two_store, attempts=1) as two,
        _client(url, clock, store=three_store) as three,
    ):
        first = await _ended(one.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        record = first.pending.to_json()
        clock.advance(120.0)
        told = await _ended(two.resume(PendingRefund.from_json(record)))
        assert not isinstance(told, (OrderRefund, AmbiguousOutcomeError)), repr(told)
        posts = server.posts
        clock.advance(700.0)
        await one.refund_bag(ORDER, 99, REQUEST, idempotency_key="rma-review16-other")
        posts += 1  # that one's own POST, on another bag
        again = await _ended(three.resume(PendingRefund.from_json(record)))
    assert server.posts == posts, f"X was sent again after its caller was told {told!r}"
    assert not isinstance(again, OrderRefund), repr(again)
