"""Review 35: an adversarial review of today's three changes, each scenario on a
server scripted in its test (tests/hostile.py: one order with one bag on 127.0.0.1,
port 0, on a FakeClock shared with the client; no FakeViolet, no simulator):

1. the bag's read-first mark now holds for a time (``Engine.mark_bag``: twice
   ``clock_skew`` plus ``date_tolerance`` plus a second, on both clocks);
2. a record moved onto a stepped wall clock is stamped anew (``WallWatch.settle``);
3. a keyed call's new ask takes this client's pending records of the key's earlier
   asks off the bag (``KeyedAsks._own`` ``on_earlier``).

Each test's docstring tells its story; those that hold are kept as guards."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    RateLimitError,
    RecordStoreError,
    RetryPolicy,
    Timeouts,
    VioletClient,
)
from violet_async.batch import run_batch
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .hostile import APP_ID, BAG_ID, ORDER_ID, SECRET, VIOLET_500, Hostile, Step, serve
from .test_review27_findings import NoDate
from .test_step_in_resend_backoff import GoneAfterRead, SteppedInBackoff, _item
from .test_step_in_resend_backoff import _client as _backoff_client

AMOUNT = 300
KEY = "rma-review35"


def _client(
    url: str, clock: FakeClock, store: MemoryStore | None = None, **retry: Any
) -> VioletClient:
    policy = RetryPolicy(**{"initial_delay": 0.5, "max_delay": 4.0, "deadline": 600.0, **retry})
    return VioletClient(
        APP_ID,
        SECRET,
        username="hostile-user",
        password="hostile-password-0123",
        base_url=url,
        clock=clock,
        retry=policy,
        store=store if store is not None else MemoryStore(),
    )


class DayDates(Hostile):
    """Refund dates carry the day only."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.day_dates = True


# (server class, server options, clock_skew, wall step at the cut)
MARK_CASES: dict[str, tuple[type[Hostile], dict[str, Any], float, float]] = {
    "date": (Hostile, {}, 60.0, 0.0),
    "no-date": (NoDate, {}, 60.0, 0.0),
    "no-date-violet-59s-ahead": (NoDate, {"server_skew": 59.0}, 60.0, 0.0),
    "no-date-violet-59s-behind": (NoDate, {"server_skew": -59.0}, 60.0, 0.0),
    "date-header-170s-behind": (Hostile, {"header_skew": -170.0}, 60.0, 0.0),
    "date-header-170s-ahead": (Hostile, {"header_skew": 170.0}, 60.0, 0.0),
    "date-header-1000s-behind": (Hostile, {"header_skew": -1000.0}, 60.0, 0.0),
    "violet-100s-ahead-with-date": (Hostile, {"server_skew": 100.0}, 60.0, 0.0),
    "day-dates": (DayDates, {}, 60.0, 0.0),
    "skew-0-date": (Hostile, {}, 0.0, 0.0),
    "skew-0-no-date": (NoDate, {}, 0.0, 0.0),
    "skew-0-header-behind": (Hostile, {"header_skew": -170.0}, 0.0, 0.0),
    "wall-back-1h-at-cut": (Hostile, {}, 60.0, -3600.0),
    "wall-forward-1h-at-cut": (Hostile, {}, 60.0, 3600.0),
    "wall-forward-1h-at-cut-no-date": (NoDate, {}, 60.0, 3600.0),
}


async def _repeat_after_cut(case: str, later: float | None = None) -> None:
    cls, options, skew, wall_step = MARK_CASES[case]
    clock = FakeClock()
    script = [
        Step(429, commit_after=None, headers={"Retry-After": "20"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    server = cls(clock, script=script, **options)
    async with serve(server) as url, _client(url, clock, clock_skew=skew) as client:
        call = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        clock.call_later(19.5, lambda: server.add_refund(AMOUNT))
        clock.call_later(19.8, call.cancel)
        with pytest.raises(asyncio.CancelledError):
            await call
        other = server.refunds[0]["id"]
        if wall_step:
            clock.step_wall(wall_step)
        clock.advance(2 * skew + 5.0 + 1.0 + 0.5 if later is None else later)
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    if isinstance(got, OrderRefund):
        assert got.id != other, "another system's refund handed over as the repeat's own"
        assert got.id in server.ours
    assert len(server.ours) <= 1, f"refunded twice: {server.ours}"


@pytest.mark.parametrize("case", list(MARK_CASES))
async def test_a_repeat_sent_after_the_mark_lapsed_never_takes_a_refund_made_in_the_wait(
    case: str,
) -> None:
    """A call waits out a 429 (Retry-After 20 s); another system refunds the same
    amount 0.3 s before the caller cuts the call as the wait ends. The repeat comes just after
    the mark's life (2 x clock_skew + 5 s + 1 s, + 0.5 s) and so sends unread; its POST
    is answered 500 and never applies. Its read-back lists the other system's refund:
    whatever the clocks and dates (a Date header behind or ahead of Violet's clock, none
    at all, day-only dates, a RetryPolicy with clock_skew=0, a wall clock stepped at the
    cut), that refund is never returned as the repeat's, and at most one refund is ours."""
    await _repeat_after_cut(case)


@pytest.mark.parametrize("later", [10.0, 127.0, 3600.0], ids=["in-life", "lapsed", "an-hour"])
@pytest.mark.parametrize("how", ["cut", "rate-limited"])
async def test_a_keyed_repeat_through_the_store_after_a_429_wait_never_takes_anothers_refund(
    how: str, later: float
) -> None:
    """A keyed call's POST is answered 429; another system refunds the same amount (no
    Date header: this machine's clock alone, within ``clock_skew``) during the wait:
    the call is cut 0.3 s after it, as its 20 s wait ends (``cut``), or (a Retry-After
    of 3 s, the refund 2.5 s in) its re-send after its read is answered 429 again, its
    last attempt (``max_attempts=2``): RateLimitError (``rate-limited``). The caller repeats
    with the key in the same client ``later`` seconds after (within the mark's life, after it, an
    hour after; a repeat in another client is a new ask without the mark, known): the
    repeat goes through the key's entry (a resume of the ABSENT record, or a new ask
    of the key), its POST answered 500 and never applied. The other system's refund
    is never returned as the key's, and at most one refund is ours."""
    clock = FakeClock()
    script = [
        Step(429, commit_after=None, headers={"Retry-After": "20"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    if how == "rate-limited":
        script = [
            Step(429, commit_after=None, headers={"Retry-After": "3"}),
            Step(429, commit_after=None, headers={"Retry-After": "3"}),
            Step(500, body=VIOLET_500, commit_after=None),
        ]
    server = NoDate(clock, script=script)
    store = MemoryStore()
    attempts = 2 if how == "rate-limited" else 4
    async with serve(server) as url, _client(url, clock, store, max_attempts=attempts) as client:
        call = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        )
        clock.call_later(2.5 if how == "rate-limited" else 19.5, lambda: server.add_refund(AMOUNT))
        if how == "cut":
            clock.call_later(19.8, call.cancel)
        with pytest.raises((asyncio.CancelledError, RateLimitError)):
            await call
        other = server.refunds[0]["id"]
        clock.advance(later)
        before = server.posts
        try:
            got: OrderRefund | Exception = await client.refund_bag(
                ORDER_ID,
                BAG_ID,
                amount_refunded=AMOUNT,
                idempotency_key=KEY,
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.posts > before, "the repeat sent (answered 500)"
    if isinstance(got, OrderRefund):
        assert got.id != other, "another system's refund handed over as the key's"
    assert len(server.ours) <= 1, f"refunded twice: {server.ours}"


@pytest.mark.parametrize("where", ["settle", "429-wait"])
@pytest.mark.parametrize(
    "step", [-54_000.0, 54_000.0, -600.0], ids=["back-15h", "fwd-15h", "back-10m"]
)
async def test_a_step_in_one_clients_wait_is_counted_once_by_the_keys_repeat_in_another(
    step: float, where: str
) -> None:
    """Two clients on one machine (one FakeClock) share a key's store. Client A's keyed
    call sends; its POST is answered 500 and commits 30 s later (``settle``), or is
    first answered 429 (Retry-After 5 s) and its re-send is the 500 (``429-wait``).
    While A waits, the wall clock steps (15 h back, 15 h forward, 10 minutes back);
    A's deadline (8 s) ends it pending. Client B repeats the key: it resumes A's record
    from the store, moving its times by the step once (A's stamp). Counted twice, a
    step back put the settle window in the past, the read at once missed the late
    commit and proved it absent: sent again, two refunds; counted twice forward, the
    window ended 15 h ahead and B waited its whole deadline. B returns A's refund,
    with one POST of A's and none of its own, within its deadline."""
    clock = FakeClock(wall_start=1_750_000_000.0)
    if where == "settle":
        script = [Step(500, body=VIOLET_500, commit_after=30.0)]
        at = 3.0
    else:
        script = [
            Step(429, commit_after=None, headers={"Retry-After": "5"}),
            Step(500, body=VIOLET_500, commit_after=30.0),
        ]
        at = 2.0
    server = Hostile(clock, script=script)
    store = MemoryStore()
    async with serve(server) as url:
        async with _client(url, clock, store, deadline=8.0) as client:
            clock.call_later(at, lambda: clock.step_wall(step))
            with pytest.raises(AmbiguousOutcomeError):
                await client.refund_bag(
                    ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY
                )
        posts = server.posts
        async with _client(url, clock, store) as client:
            began = clock.monotonic()
            got = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY
            )
            took = clock.monotonic() - began
    assert server.posts == posts, f"sent again: {server.ours}"
    assert got.id in server.ours
    assert len(server.ours) == 1
    assert took < 600.0


async def test_a_keys_new_ask_after_its_earlier_ask_ended_in_another_client_reads_first() -> None:
    """Clients X and Y share a key's store (one machine, one FakeClock; no Date header:
    this machine's clock within ``clock_skew``). X's keyed call sends; its POST is
    answered 500 and never applies; X's deadline (8 s) ends it pending (X holds the
    record on its bag). Y repeats the key: it resumes the record, waits out the settle
    window, proves the send absent and sends again: 429 (Retry-After 10 s), during
    which another system refunds the same amount, then 429 again, its last attempt:
    RateLimitError, the ask ended definitely not applied (the key's entry: FAILED). X's
    caller repeats the key 5 s later: a new ask of the key; X takes its pending record
    of the earlier ask off the bag, and its new ask reads the bag first. Its POST is
    answered 500 and never applies: the other system's refund, listed by the read
    before it, is never returned as the key's, and one refund is ours."""
    clock = FakeClock()
    server = NoDate(
        clock,
        script=[
            Step(500, body=VIOLET_500, commit_after=None),
            *[Step(429, commit_after=None, headers={"Retry-After": "30"})] * 40,
        ],
    )
    store = MemoryStore()
    async with (
        serve(server) as url,
        _client(url, clock, store, deadline=8.0) as x,
        _client(url, clock, store, deadline=400.0) as y,
    ):
        with pytest.raises(AmbiguousOutcomeError):
            await x.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        with pytest.raises(RateLimitError):
            await y.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        server.script = [Step(500, body=VIOLET_500, commit_after=None)]
        server.add_refund(AMOUNT)
        other = server.refunds[0]["id"]
        clock.advance(5.0)
        before = server.posts
        try:
            got: OrderRefund | AmbiguousOutcomeError = await x.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.posts > before, "the new ask was sent"
    if isinstance(got, OrderRefund):
        assert got.id != other, "another system's refund handed over as the key's"
    assert len(server.ours) <= 1


class FailsTheResend(MemoryStore):
    """A store whose write of the key's re-send (its second send stamped "sent" as it
    leaves) fails once: a disk full, a lock timeout."""

    failed = False

    async def save(self, entry: Any, owner: str) -> bool:
        if not self.failed and entry.ask.sends == 2 and entry.ask.phase.value == "sent":
            self.failed = True
            raise OSError("database is locked")
        return await super().save(entry, owner)


async def test_a_keyed_call_ended_by_a_failed_store_write_after_a_429_wait_is_read_first() -> None:
    """A keyed call's POST is answered 429 (Retry-After 20 s); another system refunds
    the same amount 18 s into the wait (no Date header: this machine's clock within
    ``clock_skew``). After the wait the call reads the bag, and its re-send's "sent"
    write to the store fails: nothing is sent, the call ends RecordStoreError
    ("nothing was sent"); it is not a VioletError ending a FAILED record, so the
    engine does not mark the bag. Its caller repeats the key 1 s later, its POST
    answered 500 (never applied): the key's entry still holds the ask proven not
    applied (ABSENT), so the repeat resumes it and reads the bag before its send
    (review 27), and the other system's refund is never returned as the key's."""
    clock = FakeClock()
    server = NoDate(
        clock,
        script=[
            Step(429, commit_after=None, headers={"Retry-After": "20"}),
            Step(500, body=VIOLET_500, commit_after=None),
        ],
    )
    store = FailsTheResend()
    async with serve(server) as url, _client(url, clock, store) as client:
        clock.call_later(18.0, lambda: server.add_refund(AMOUNT))
        with pytest.raises(RecordStoreError, match="nothing was sent"):
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY)
        assert store.failed
        assert server.posts == 1
        other = server.refunds[0]["id"]
        clock.advance(1.0)
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=KEY
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.posts >= 2, "the repeat was sent"
    if isinstance(got, OrderRefund):
        assert got.id != other, "another system's refund handed over as the key's"
    assert len(server.ours) <= 1


@pytest.mark.parametrize("step", [-54_000.0, 54_000.0], ids=["back-15h", "fwd-15h"])
async def test_a_pending_record_stepped_in_its_settle_wait_resumed_in_another_client(
    step: float,
) -> None:
    """Client A's call (no key) is answered 500; its POST commits 30 s later. 3 s into
    A's settle wait the wall clock steps 15 h (back or forward); A's deadline (8 s)
    ends it pending. Its record goes out as JSON and client B (same machine, one
    FakeClock) resumes it: the step is counted once (the record moved by A and
    stamped anew), so B waits out the settle window, finds the commit and returns it,
    with no POST of its own. Counted twice back, the window was over at once, the
    read missed the commit and proved it absent: a second refund; twice forward, B
    waited 15 h."""
    clock = FakeClock(wall_start=1_750_000_000.0)
    server = Hostile(clock, script=[Step(500, body=VIOLET_500, commit_after=30.0)])
    async with serve(server) as url:
        async with _client(url, clock, deadline=8.0) as a:
            clock.call_later(3.0, lambda: clock.step_wall(step))
            with pytest.raises(AmbiguousOutcomeError) as pending:
                await a.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        record = pending.value.pending
        assert record is not None
        text = record.to_json()
        async with _client(url, clock) as b:
            began = clock.monotonic()
            got = await b.resume(type(record).from_json(text))
            took = clock.monotonic() - began
    assert server.posts == 1, f"sent again: {server.ours}"
    assert got.id in server.ours
    assert took < 600.0


@pytest.mark.parametrize(
    "later", [-54_000.0, -100_000.0, 3600.0], ids=["put-back", "back-past", "fwd-again"]
)
async def test_a_batch_row_stepped_in_its_backoff_then_stepped_again_before_its_resume(
    tmp_path: Path, later: float
) -> None:
    """Simulator seed 2093912's story with a second step: a batch row's read, its POST
    refused (the connection never opened), the wall clock steps 15 h forward in the
    backoff, the re-send leaves (answered 500, never applied) and the process dies as
    it leaves (the journal copied then). Before the next run the wall clock steps
    again (put back by the operator: -15 h; further back: -27.8 h; forward another
    hour). The next run resumes the row from the journal: each step is counted once
    (the record moved by the first and stamped anew, the second seen from that stamp),
    so the row settles within minutes (no refund listed: proven absent, sent again)
    and succeeds with one refund; counted twice or not at all, its settle window sat
    hours ahead (parked) or behind."""
    clock = SteppedInBackoff(wall_start=1_750_000_000.0)
    server = GoneAfterRead(clock)
    server.script = [Step(500, body=VIOLET_500, commit_after=None)]
    server.journal = tmp_path / "run.jsonl"
    server.snapshot = tmp_path / "died.jsonl"
    runner = web.AppRunner(server.app())
    await runner.setup()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server.site = web.TCPSite(runner, "127.0.0.1", port)
    await server.site.start()
    try:
        async with _backoff_client(port, clock) as client:
            [r async for r in run_batch(client, [_item()], journal=server.journal)]
        assert server.away is not None
        await server.away
        clock.advance(60.0)
        clock.step_wall(later)
        async with _backoff_client(port, clock) as client:
            began = clock.monotonic()
            second = [r async for r in run_batch(client, [_item()], journal=server.snapshot)]
            took = clock.monotonic() - began
    finally:
        server._stopping.set()
        await runner.cleanup()
    assert took < 600.0, f"the resumed row waited {took:.0f}s"
    assert [r.outcome for r in second] == ["succeeded"], second[0].error
    assert len(server.ours) == 1


class BackInBackoff(GoneAfterRead):
    """:class:`GoneAfterRead` whose step in the backoff is 15 h back."""

    async def _away(self) -> None:
        assert self.site is not None
        assert isinstance(self.clock, SteppedInBackoff)
        await asyncio.sleep(0)
        await self.site.stop()
        armed = self.clock.armed = asyncio.get_running_loop().create_future()
        await armed
        self.clock.step_wall(-54_000.0)
        await self.listen()


async def test_a_batch_row_stepped_back_in_its_backoff_never_settles_early(
    tmp_path: Path,
) -> None:
    """As seed 2093912, the step 15 h back: the row's re-send leaves (answered 500; it
    commits 40 s later) and the process dies as it leaves. The next run starts 5 s
    later and resumes the row from the journal. Counted twice, the step put the
    record's settle window 15 h in the past: the first read, before the commit,
    proved the re-send absent and the row was sent again, two refunds. Counted once,
    the row waits out the window, finds its refund and succeeds with no POST more."""
    clock = SteppedInBackoff(wall_start=1_750_000_000.0)
    server = BackInBackoff(clock)
    server.script = [Step(500, body=VIOLET_500, commit_after=40.0)]
    server.journal = tmp_path / "run.jsonl"
    server.snapshot = tmp_path / "died.jsonl"
    runner = web.AppRunner(server.app())
    await runner.setup()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server.site = web.TCPSite(runner, "127.0.0.1", port)
    await server.site.start()
    try:
        async with _backoff_client(port, clock) as client:
            [r async for r in run_batch(client, [_item()], journal=server.journal)]
        assert server.away is not None
        await server.away
        posts = server.posts
        clock.advance(5.0)
        async with _backoff_client(port, clock) as client:
            second = [r async for r in run_batch(client, [_item()], journal=server.snapshot)]
    finally:
        server._stopping.set()
        await runner.cleanup()
    assert len(server.ours) == 1, f"refunded twice: {server.ours}"
    assert server.posts == posts
    assert [r.outcome for r in second] == ["succeeded"], second[0].error


async def test_within_the_marks_life_a_2xx_naming_a_refund_made_in_the_cut_wait_is_read_back() -> (
    None
):
    """A call waits out a 429 (Retry-After 20 s); another system refunds the same
    amount 0.3 s before the caller cuts the call as the wait ends. The caller repeats
    100 s after the cut (the mark holds), with a Date header 100 s behind Violet's
    clock, and Violet answers its POST 200 with that other refund's record (a replayed
    or cached answer: nothing of the repeat applied). The repeat read the bag first:
    the refund is in its baseline, and the answer is read back, never returned (see
    tests/test_review35_2xx_after_mark.py and tests/test_review36_undated_replay.py for
    the same answer after the mark lapsed)."""
    got, other = await replayed_after_cut(100.0, {"header_skew": -100.0})
    assert not (isinstance(got, OrderRefund) and got.id == other), (
        "another system's refund, made in the cut call's wait, returned as the repeat's"
    )


async def replayed_after_cut(
    later: float, options: dict[str, Any], timeouts: Timeouts | None = None
) -> tuple[OrderRefund | AmbiguousOutcomeError, int]:
    """The cut call, another system's refund 0.3 s before the cut, and the repeat
    ``later`` seconds after the cut whose POST Violet answers 200 with that refund's
    record (nothing applied): what the repeat got, and the other refund's id."""
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
            timeouts=timeouts,
            store=MemoryStore(),
        ) as client,
    ):
        call = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        clock.call_later(19.5, lambda: server.add_refund(AMOUNT))
        clock.call_later(19.8, call.cancel)
        with pytest.raises(asyncio.CancelledError):
            await call
        other = {k: v for k, v in server.refunds[0].items() if not k.startswith("_")}
        server.script = [Step(200, commit_after=None, answer=other)]
        clock.advance(later)
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.posts == 2
    assert len(server.ours) == 0
    return got, other["id"]
