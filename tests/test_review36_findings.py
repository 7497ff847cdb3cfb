"""Review 36: scenarios tried against 3d424f2 (``AnswerCheck.not_before``) that HOLD.

A genuine 2xx (the refund this call made) is returned, never read back nor sent
again, whatever the clocks do that the check's bound allows for: Violet's clock
behind this machine's by less than ``clock_skew`` + ``date_tolerance`` or ahead by
an hour, a wall clock step forward or back before the call or while its POST runs,
day-precision, missing or offset-less dates, a cancel. Beyond the bound (this
machine 70 s ahead of Violet) the genuine 2xx is read back: pending or found, never
sent twice. A cancelled call's late 2xx (``keep_cancelled_sends``) is its keyed
repeat's refund under the same clocks, and is never sent twice beyond the bound.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    RefundBagRequest,
    RetryPolicy,
    VioletClient,
)
from violet_async.batch import BatchItem, run_batch
from violet_async.stores import MemoryStore, SQLiteStore
from violet_async.testing import FakeClock

from .hostile import (
    APP_ID,
    BAG_ID,
    ORDER_ID,
    SECRET,
    VIOLET_500,
    Hostile,
    Step,
    hostile_client,
    serve,
)
from .test_review27_findings import NoDate

AMOUNT = 300
RETRY = RetryPolicy(max_attempts=3, deadline=120.0, jitter=False)

# name: (server options, wall step before the call, wall step as the POST arrives)
GENUINE: dict[str, tuple[dict[str, Any], float, float]] = {
    "violet-50s-behind": ({"server_skew": -50.0}, 0.0, 0.0),
    "violet-50s-behind-no-date": ({"server_skew": -50.0, "no_date": True}, 0.0, 0.0),
    "violet-an-hour-ahead": ({"server_skew": 3600.0}, 0.0, 0.0),
    "step-forward-1h-before-call": ({}, 3600.0, 0.0),
    "step-forward-1h-before-call-no-date": ({"no_date": True}, 3600.0, 0.0),
    "step-back-1h-before-call": ({}, -3600.0, 0.0),
    "step-forward-1h-during-post": ({}, 0.0, 3600.0),
    "step-back-1h-during-post": ({}, 0.0, -3600.0),
    "step-back-1h-during-post-no-date": ({"no_date": True}, 0.0, -3600.0),
    "day-dates": ({"day_dates": True}, 0.0, 0.0),
    "day-dates-violet-50s-behind": ({"day_dates": True, "server_skew": -50.0}, 0.0, 0.0),
    "null-dates": ({"null_dates": True}, 0.0, 0.0),
    "naive-dates": ({"naive_dates": True}, 0.0, 0.0),
}


def _server(clock: FakeClock, options: dict[str, Any], script: list[Step]) -> Hostile:
    options = dict(options)
    cls = NoDate if options.pop("no_date", False) else Hostile
    return cls(clock, script=script, **options)


@pytest.mark.parametrize("case", list(GENUINE))
@pytest.mark.parametrize("kind", ["refund", "cancel"])
async def test_a_genuine_2xx_is_returned(case: str, kind: str) -> None:
    options, before, during = GENUINE[case]
    clock = FakeClock()
    server = _server(clock, options, [Step(200, wall_step=during)])
    async with hostile_client(server, retry=RETRY, store=MemoryStore()) as client:
        clock.advance(1.0)
        clock.step_wall(before)
        clock.advance(1.0)
        if kind == "refund":
            got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        else:
            got = await client.cancel_bag(ORDER_ID, BAG_ID)
    assert server.posts == 1
    assert server.reads == 0, "a genuine 2xx read back"
    assert server.ours == [got.id]


@pytest.mark.parametrize("no_date", [False, True])
async def test_this_machine_70s_ahead_reads_a_genuine_2xx_back_never_sends_twice(
    no_date: bool,
) -> None:
    clock = FakeClock()
    server = _server(clock, {"server_skew": -70.0, "no_date": no_date}, [Step(200)])
    async with hostile_client(server, retry=RETRY, store=MemoryStore()) as client:
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
        clock.advance(600.0)
        pending = got.pending if isinstance(got, AmbiguousOutcomeError) else None
        if pending is not None:
            try:
                got = await client.resume(pending)
            except AmbiguousOutcomeError as exc:
                got = exc
    assert server.posts == 1, "sent twice"
    assert len(server.ours) == 1
    assert server.reads >= 1, "beyond the bound the 2xx is read back (the price, documented)"
    if isinstance(got, OrderRefund):
        assert got.id == server.ours[0]


class Held:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self) -> None:
        await self.release.wait()


LATE: dict[str, dict[str, Any]] = {
    "violet-50s-behind": {"server_skew": -50.0},
    "violet-70s-behind": {"server_skew": -70.0},
    "violet-70s-behind-no-date": {"server_skew": -70.0, "no_date": True},
    "violet-an-hour-ahead": {"server_skew": 3600.0},
}


@pytest.mark.parametrize("case", list(LATE))
async def test_a_cancelled_calls_late_2xx_is_never_sent_twice(case: str) -> None:
    clock = FakeClock()
    held = Held()
    server = _server(clock, LATE[case], [Step(200)])
    server.on_answer = held
    key = "rma-review36-late"
    async with hostile_client(
        server, keep_cancelled_sends=True, retry=RETRY, store=MemoryStore()
    ) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=key)
        )
        await asyncio.wait_for(server.post_arrived.wait(), 5.0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(call, 5.0)
        server.on_answer = None
        held.release.set()
        late = tuple(getattr(client._shared, "late_answers", ()))
        if late:
            await asyncio.wait_for(asyncio.gather(*late), 5.0)
        outcomes: list[object] = []
        for wait in (2.0, 600.0, 3600.0):
            clock.advance(wait)
            try:
                outcomes.append(
                    await client.refund_bag(
                        ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=key
                    )
                )
            except AmbiguousOutcomeError as exc:
                outcomes.append(exc)
    assert server.posts == 1, f"sent twice: {outcomes}"
    assert len(server.ours) == 1
    for got in outcomes:
        if isinstance(got, OrderRefund):
            assert got.id == server.ours[0]


def _in(seconds: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds, timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


REPLAYED: dict[str, tuple[float, dict[str, Any], dict[str, Any], float]] = {
    # Review 35's story with no step: refused by not_before (no Date, or one behind).
    "no-step-no-date": (0.0, {"no_date": True}, {}, 0.0),
    "no-step-date-100s-behind": (0.0, {"header_skew": -100.0}, {}, 0.0),
    # A step forward before the cut: not_before is the clock as it was before it.
    "step-forward-10min-no-date": (600.0, {"no_date": True}, {}, 0.0),
    # A placeholder date (a backend's stand-in): day 0, long before the call.
    "placeholder-date-no-date": (
        0.0,
        {"no_date": True},
        {"date_created": "1970-01-01T00:00:00Z"},
        0.0,
    ),
    # A step between the cut and the repeat: forward (the mark lapses on both clocks,
    # not_before is the clock as it was) or back (the mark holds on the wall clock).
    "step-forward-10min-after-cut-no-date": (0.0, {"no_date": True}, {}, 600.0),
    "step-back-10min-after-cut-no-date": (0.0, {"no_date": True}, {}, -600.0),
    # Relabelled an hour ahead, with Violet's Date: more than clock_skew after it.
    "an-hour-ahead-with-date": (0.0, {}, {"date_created": "LATER"}, 0.0),
    # Day-precision, yesterday's.
    "yesterday-day-date-no-date": (0.0, {"no_date": True}, {"date_created": "YESTERDAY"}, 0.0),
}


@pytest.mark.parametrize("case", list(REPLAYED))
async def test_a_replayed_2xx_naming_a_refund_of_the_cut_wait_is_not_returned(case: str) -> None:
    """Review 35's story (tests/test_review35_2xx_after_mark.py): the repeat 126.5 s
    after a cut in a 429 wait, its POST answered 200 with the refund another system
    made in the wait (nothing of the repeat applied), in variants that hold."""
    step, options, relabel, after_cut = REPLAYED[case]
    label = relabel.get("date_created")
    if label == "LATER":
        relabel = {"date_created": _in(3600.0)}
    elif label == "YESTERDAY":
        relabel = {"date_created": _in(-86400.0)[:10] + "T00:00:00Z"}
    got, other = await replay_after_step_back(step, dict(options), relabel, after_cut)
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund, made in the cut call's wait, returned as the repeat's"
    )


async def replay_after_step_back(
    step: float,
    options: dict[str, Any],
    relabel: dict[str, Any] | None = None,
    step_after_cut: float = 0.0,
    repeat: Step | None = None,
) -> tuple[OrderRefund | AmbiguousOutcomeError, int]:
    """The cut call (after a wall clock step of ``step`` s the client saw), another
    system's refund 0.3 s before the cut, and the repeat 126.5 s after the cut whose
    POST Violet answers 200 with that refund's record (``relabel``: keys overwritten
    in it; ``step_after_cut``: a step between the cut and the repeat): what the
    repeat got, and the other refund's id."""
    clock = FakeClock()
    cls = NoDate if options.pop("no_date", False) else Hostile
    script = [Step(429, commit_after=None, headers={"Retry-After": "20"})]
    server = cls(clock, script=script, **options)
    async with (
        serve(server) as url,
        VioletClient(
            APP_ID,
            SECRET,
            username="hostile-user",
            password="hostile-password-0123",
            base_url=url,
            clock=clock,
            retry=RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0),
            store=MemoryStore(),
        ) as client,
    ):
        clock.advance(1.0)
        clock.step_wall(step)  # seen by the client: its monotonic clock went on
        clock.advance(1.0)
        call = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        clock.call_later(19.5, lambda: server.add_refund(AMOUNT))
        clock.call_later(19.8, call.cancel)
        with pytest.raises(asyncio.CancelledError):
            await call
        other = {k: v for k, v in server.refunds[0].items() if not k.startswith("_")}
        replay = Step(200, commit_after=None, answer={**other, **(relabel or {})})
        server.script = [repeat or replay]
        clock.step_wall(step_after_cut)
        clock.advance(126.5)
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.posts >= 2
    if repeat is None:
        assert server.posts == 2
        assert len(server.ours) == 0
    return got, other["id"]


async def test_a_genuine_2xx_after_a_step_back_that_put_the_clock_right_is_returned() -> None:
    """This machine's clock 10 minutes ahead of Violet's when the client was made, then
    stepped back to Violet's (NTP): the call's genuine 2xx is its refund, sent once
    (returned at once on 3d424f2; a fix judging ``not_before`` by the clock as it was
    when the client was made would read it back first and find it)."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200)], server_skew=-600.0)
    async with hostile_client(server, retry=RETRY, store=MemoryStore()) as client:
        clock.advance(1.0)
        clock.step_wall(-600.0)
        clock.advance(1.0)
        got = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
    assert server.posts == 1
    assert server.ours == [got.id]


@pytest.mark.parametrize("case", ["violet-50s-behind", "step-back-1h-during-post", "day-dates"])
async def test_a_batch_rows_genuine_2xx_is_its_refund(case: str, tmp_path: Path) -> None:
    """A batch row (journal, one row) answered with its own refund under the clocks of
    :data:`GENUINE`: succeeded, its refund, one POST, no read-back of the answer (the
    row's first send reads the bag first: one read)."""
    options, before, during = GENUINE[case]
    clock = FakeClock()
    server = _server(clock, options, [Step(200, wall_step=during)])
    item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=AMOUNT))
    async with hostile_client(server, retry=RETRY) as client:
        clock.step_wall(before)
        rows = [r async for r in run_batch(client, [item], journal=tmp_path / "run.jsonl")]
    assert server.posts == 1
    assert [(str(r.outcome), r.refund_id) for r in rows] == [("succeeded", server.ours[0])]


async def test_a_keyed_genuine_2xx_read_back_is_never_sent_again_from_another_process(
    tmp_path: Path,
) -> None:
    """This machine 70 s ahead of Violet: a keyed call's genuine 2xx is read back and
    ends for review. The key's repeat from another process sharing the SQLite store,
    at once and an hour later, never sends it again."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(200)], server_skew=-70.0)
    key = "rma-review36-two-processes"
    path = tmp_path / "keys.db"
    outcomes: list[object] = []
    async with (
        SQLiteStore(path, monotonic=clock.monotonic) as one_store,
        hostile_client(server, retry=RETRY, store=one_store) as one,
        SQLiteStore(path, monotonic=clock.monotonic) as two_store,
        hostile_client(server, retry=RETRY, store=two_store) as two,
    ):
        for client, wait in ((one, 0.0), (two, 1.0), (two, 3600.0), (one, 1.0)):
            clock.advance(wait)
            try:
                outcomes.append(
                    await client.refund_bag(
                        ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=key
                    )
                )
            except AmbiguousOutcomeError as exc:
                outcomes.append(exc)
    assert server.posts == 1, f"sent twice: {outcomes}"
    assert len(server.ours) == 1
    for got in outcomes:
        if isinstance(got, OrderRefund):
            assert got.id == server.ours[0]


@pytest.mark.parametrize("step", [-600.0, 600.0])
@pytest.mark.parametrize("no_date", [False, True])
async def test_after_a_step_before_the_cut_a_repeat_answered_500_never_takes_the_cut_waits_refund(
    step: float, no_date: bool
) -> None:
    """Review 35's story with a wall clock step (seen) before the cut, the repeat sent
    126.5 s after the cut (mark lapsed) and answered Violet's 500 (nothing applied):
    the read-back never takes the refund another system made in the cut wait."""
    options: dict[str, Any] = {"no_date": no_date}
    repeat = Step(500, body=VIOLET_500, commit_after=None)
    got, other = await replay_after_step_back(step, options, repeat=repeat)
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund, made in the cut call's wait, returned as the repeat's"
    )
