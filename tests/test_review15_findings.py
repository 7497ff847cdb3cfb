"""Review 15: ways the SDK reported a false outcome for a refund, made a second one, or
could never make the one it owes, each against a server scripted here (refunds counted
by its own record, ``Scripted.made``), on a virtual clock. Each test names the scenario,
what the SDK did, and the true outcome (one refund per ask; pending or review is a true
outcome)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import attrs

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    PendingRefund,
    RefundBagRequest,
    RetryPolicy,
    VioletClient,
)
from violet_async._ask import Phase
from violet_async._engine import Outcome, outcome_of
from violet_async._retry import Clock
from violet_async._transport import Timeouts
from violet_async.exceptions import RecordStoreError
from violet_async.stores import SQLiteStore
from violet_async.stores._base import KeyEntry
from violet_async.testing import FakeClock

from .test_review11_findings import _ended
from .test_review14_findings import Scripted, _client, _serve

ORDER, BAG = 15, 25
HOUR = 3600.0
REQUEST = RefundBagRequest(amount_refunded=500)


# -- 1. a new call on a bag whose unkeyed ask ended in another process -----------------


async def test_a_new_call_on_the_bag_after_an_unkeyed_ask_ended_elsewhere_can_send(
    tmp_path: Path,
) -> None:
    """Scenario: process one (SQLiteStore shared with worker two) refunds 5.00 with no
    key: 500, not applied, pending X (unsettled in process one's client). A job resumes
    X in worker two: proven absent, re-sent, 429, no attempts left: FAILED, told so.
    Process one then resumes X itself (the app was told to): ENDED, nothing sent. The
    app asks again for the shopper's refund in process one.

    Main: X stays on process one's bag (the engine never ran): the new call is
    BagPendingError, and the resume of X is ENDED, every time: the bag can never be
    refunded again by process one.

    True outcome: after X is known ended, a new call sends (one refund)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["lost", "busy", "ok"])
    path = tmp_path / "keys.db"
    async with (
        _serve(server) as url,
        SQLiteStore(path, monotonic=clock.monotonic) as one_store,
        SQLiteStore(path, monotonic=clock.monotonic) as two_store,
        _client(url, clock, deadline=3.0, store=one_store) as one,
        _client(url, clock, store=two_store, attempts=1) as two,
    ):
        first = await _ended(one.refund_bag(ORDER, BAG, REQUEST))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        record = first.pending.to_json()
        clock.advance(2_000.0)
        told = await _ended(two.resume(PendingRefund.from_json(record)))
        assert not isinstance(told, OrderRefund)
        assert outcome_of(told) is Outcome.NOT_SENT, repr(told)  # a 429: not applied
        clock.advance(60.0)
        ended = await _ended(one.resume(PendingRefund.from_json(record)))
        assert not isinstance(ended, OrderRefund)
        assert outcome_of(ended) is Outcome.NOT_SENT, repr(ended)  # true: X never applied
        outcomes: list[object] = []
        for _ in range(3):  # ask again; resume what the error names, as it says
            again = await _ended(one.refund_bag(ORDER, BAG, REQUEST))
            outcomes.append(again)
            if isinstance(again, OrderRefund):
                break
            pending = getattr(again, "pending", None)
            if isinstance(pending, (list, tuple)) and pending:
                outcomes.append(await _ended(one.resume(pending[0])))
            clock.advance(60.0)
    assert len(server.made) == 1, [repr(o)[:120] for o in outcomes]
    assert isinstance(outcomes[-1], OrderRefund)


# -- 2. another process's record resumed here after a step since this client was made ---


async def test_a_step_here_before_another_process_record_is_resumed_does_not_end_its_window() -> (
    None
):
    """Scenario (no ``Date`` headers): process zero's POST is answered 500 (Violet's own
    5xx: the platform call behind it may still run for ``settle_running``, 60 s) and its
    deadline parks it pending: record R, its times on zero's clock, on a job queue.
    This process's client has been running since before; its machine's wall clock
    steps forward 1 h (NTP), which its ``ClockOrigin`` sees. Ten seconds after the 500
    (real time) the job resumes R here.

    Main: the origin marks only asks made here (``Engine`` marks a new ask, a failed
    first send, a cancelled one); R is another process's record: ``protocol.start``
    takes it onto this clock (``clock=here``) with the skew allowed for, and compares
    its settle window with the stepped clock: ended an hour ago. One read proves
    absence and the request is sent again 10 s after a 5xx whose platform call may
    still commit: it does, a second refund. This process knows its clock stepped
    an hour since its client was made (the fix for seed 855859 uses exactly that).

    True outcome: nothing sent before the window (60 s of real time) has passed:
    pending (one refund)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["applied_lost", "ok"], dated=False)
    server.hide = True  # its platform call has not committed yet (it does within 60 s)
    async with (
        _serve(server) as url,
        _client(url, clock, deadline=3.0) as zero,
        _client(url, clock, deadline=5.0) as here,
    ):
        first = await _ended(zero.refund_bag(ORDER, BAG, REQUEST))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        record = attrs.evolve(first.pending, clock="0123456789abcdef", wall_mono=None)
        clock.step_wall(HOUR)
        server.stepped = HOUR
        clock.advance(10.0)
        again = await _ended(here.resume(record))
        server.hide = False  # committed, within the settle window
    assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"
    assert isinstance(again, AmbiguousOutcomeError), repr(again)


# -- 3. a file of the previous release, opened first after a step -----------------------


async def test_a_file_of_the_previous_release_opened_after_a_step_keeps_a_fresh_key(
    tmp_path: Path,
) -> None:
    """Scenario: the app runs the previous release (its SQLiteStore has no
    ``violet_clock`` table and no ``finished_steady`` column): a keyed refund under K
    applies. A minute later the app is upgraded (the machine does not reboot), and
    right then the machine's wall clock steps forward 30 h (NTP). The app's retry of
    the call (same key, same request) lands in the upgraded process, whose store is the
    first to open the file with this release, after the step.

    Main: the file has no steady reading from before the step: ``_steady`` takes the
    stepped wall clock for the file's first, the process's own ``SweepClock`` does the
    same, and the row's ``finished_steady`` is NULL (so only the wall cutoff counts):
    the key, finished a minute ago, looks 30 h old. The sweep deletes it and the retry
    sends the same request again: a second refund. (The docstring promises a step
    "never sweeps keys early, in a process started before the step or after it".)

    True outcome: the retry returns the one refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, [])
    path = tmp_path / "keys.db"
    key = "rma-review15-upgrade"
    async with _serve(server) as url:
        async with (
            SQLiteStore(path, monotonic=clock.monotonic) as old_store,
            _client(url, clock, store=old_store) as old,
        ):
            made = await old.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key)
        # What the previous release left: no clock table, no steady column.
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("DROP TABLE violet_clock")
            conn.execute("DROP INDEX violet_keys_unstamped")
            conn.execute("ALTER TABLE violet_keys DROP COLUMN finished_steady")
            conn.commit()
        clock.advance(60.0)
        clock.step_wall(30 * HOUR)
        server.stepped = 30 * HOUR
        async with (
            SQLiteStore(path, monotonic=clock.monotonic) as store,
            _client(url, clock, store=store) as client,
        ):
            # A claim of another key (it sweeps). Its own outcome is not this test's:
            # this process, made after the step, reads its clock 30 h off Violet's, so
            # the refund its 2xx names is dated 30 h before the call began by this
            # machine's clock, and it ends for review (review 35: a 2xx naming a refund
            # made before the call is never returned as its own).
            other = await _ended(
                client.refund_bag(ORDER, 33, REQUEST, idempotency_key="rma-review15-other")
            )
            assert isinstance(other, (OrderRefund, AmbiguousOutcomeError)), other
            again = await _ended(client.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
    assert server.on_bag(BAG) == [made.id], f"bag {BAG} refunded {len(server.on_bag(BAG))} times"
    assert isinstance(again, OrderRefund)
    assert again.id == made.id


# -- 4. a record resumed in another process, then back in its first one ----------------


class _Ahead:
    """Another process's clock on the same virtual time: its wall clock ``ahead``
    seconds ahead of ``base`` (within ``clock_skew``); monotonic time and sleeps are
    ``base``'s."""

    def __init__(self, base: FakeClock, ahead: float) -> None:
        self.base = base
        self.ahead = ahead

    def monotonic(self) -> float:
        return self.base.monotonic()

    def time(self) -> float:
        return self.base.time() + self.ahead

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)


def _client_on(url: str, clock: Clock, deadline: float) -> VioletClient:
    return VioletClient(
        4242,
        "review15-app-secret-0123456789abcdef",
        username="review15-user",
        password="review15-password-0123",
        base_url=url,
        clock=clock,
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=deadline, max_attempts=3),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


async def test_a_record_back_in_its_first_process_keeps_the_skew_for_the_other_s_window() -> None:
    """Scenario (no ``Date`` headers): two worker processes, P's wall clock 50 s ahead
    of Q's (within ``clock_skew``, 60 s; Q's is Violet's). P's POST is answered 500
    (not applied) and its deadline parks it: record R. The job resumes R in Q: proven
    absent, sent again: answered 500 by Violet while its platform call runs on (it
    commits, and lists, a little later: ``settle_running`` is 60 s); Q's deadline
    parks it pending, settle window to Q's t + 60. Fifteen seconds later the job
    resumes that record back in P.

    Main: when Q took R on, ``protocol.start`` allowed for P's clock (``settle +=
    clock_skew``) and took the record onto Q's clock (``clock=here``). Back in P the
    record names Q's clock, but it is unsure already, so it is not "newly" unsure: no
    skew is allowed for Q's window, which P's clock (50 s ahead) reads as ended 15 s
    after Q's 500. One read (the refund not listed yet) proves absence and P sends a
    third time: the platform call of Q's send commits too: two refunds.

    True outcome: P sends nothing before Q's window has passed in real time: pending
    (one refund)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, ["lost", "applied_lost", "ok"], dated=False)
    async with (
        _serve(server) as url,
        _client_on(url, _Ahead(clock, 50.0), deadline=3.0) as p,
        _client_on(url, clock, deadline=5.0) as q,
    ):
        first = await _ended(p.refund_bag(ORDER, BAG, REQUEST))
        assert isinstance(first, AmbiguousOutcomeError)
        assert first.pending is not None
        clock.advance(2_000.0)
        server.hide = True  # Q's re-send's platform call has not committed yet
        again = await _ended(q.resume(first.pending))
        assert isinstance(again, AmbiguousOutcomeError)
        assert again.pending is not None
        assert server.posts == 2
        clock.advance(15.0)
        third = await _ended(p.resume(again.pending))
        server.hide = False  # committed, within Q's settle window
    assert len(server.made) == 1, f"bag {BAG} refunded {len(server.made)} times"
    assert isinstance(third, AmbiguousOutcomeError), repr(third)


# -- 5. a legacy row, a process started after a step, a file that saw the step ---------


async def test_a_legacy_keys_row_is_kept_for_a_process_started_after_a_step(
    tmp_path: Path,
) -> None:
    """Scenario: a rolling upgrade. A process of this release has used the SQLiteStore
    (the file keeps its steady clock reading, ``violet_clock``). A process of the
    release before keys were scoped, on the same file, makes a keyed refund under K (a
    bare-key row, no ``finished_steady``). A minute later the machine's wall clock
    steps forward 30 h (NTP), and a new process of this release starts; the web app's
    retry of K (same request) lands in it.

    Main: ``KeyedAsks._no_unscoped`` judges the row's retention on the client's
    ``ClockOrigin`` alone, read after the step (nothing to see): the row, finished a
    minute ago, "passed retention", the key is free, and the retry sends: a second
    refund. The file's own steady clock (read before the step, as the store's sweep
    uses it: the same row is not swept) would have kept it.

    True outcome: refused (``RecordStoreError``, nothing sent); one refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Scripted(clock, [])
    path = tmp_path / "keys.db"
    key = "rma-review15-legacy"
    async with _serve(server) as url:
        async with (
            SQLiteStore(path, monotonic=clock.monotonic) as new_store,
            _client(url, clock, store=new_store) as new,
            _client(url, clock) as old,
        ):
            await new.refund_bag(ORDER, 31, REQUEST, idempotency_key="rma-review15-early")
            made = await old.refund_bag(ORDER, BAG, REQUEST)
            ask = attrs.evolve(
                PendingRefund("refund", ORDER, BAG, REQUEST),
                phase=Phase.APPLIED,
                refund_id=made.id,
            )
            legacy = KeyEntry(key, ask, refund=made, finished_at=clock.time())
            await new_store.claim(legacy, clock.time())
        with contextlib.closing(sqlite3.connect(path)) as conn:  # the older release's row
            conn.execute("UPDATE violet_keys SET finished_steady = NULL WHERE key = ?", (key,))
            conn.commit()
        clock.advance(60.0)
        clock.step_wall(30 * HOUR)
        server.stepped = 30 * HOUR
        async with (
            SQLiteStore(path, monotonic=clock.monotonic) as store,
            _client(url, clock, store=store) as client,
        ):
            again = await _ended(client.refund_bag(ORDER, BAG, REQUEST, idempotency_key=key))
            kept = await store.load(key)
    assert server.on_bag(BAG) == [made.id], f"bag {BAG} refunded {len(server.on_bag(BAG))} times"
    assert kept is not None  # the store's own sweep kept the row
    assert isinstance(again, RecordStoreError), repr(again)
