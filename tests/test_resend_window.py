"""Where the window of an ask's refund starts, and which records an id-less refund
another call got binds: pure ``step`` / ``judge`` / ``merged`` calls, no server, no
clock (review 14's findings 2 and 8 are the scripted-server versions)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import attrs
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    APIConnectionError,
    PendingRefund,
    RefundBagRequest,
)
from violet_async._ask import merged
from violet_async._converter import converter
from violet_async._matching import Verdict, idless_fits, judge
from violet_async._protocol import (
    RESEND_READ_FAILED,
    Do,
    Observation,
    Phase,
    Settings,
    start,
    step,
)
from violet_async.exceptions import api_error_from_response
from violet_async.models import OrderRefund
from violet_async.testing import FakeClock

from .samples import refund_body
from .test_review11_findings import _ended, _stamp
from .test_review14_findings import ORDER, REQUEST, Scripted, _client, _serve

T0 = 1_800_000_000.0
SETTINGS = Settings(max_attempts=4, settle_running=60.0, settle_lag=5.0, settle_delay=1.0)
BAG = 7


def refund(id: int | None, at: float, amount: int = 300) -> OrderRefund:
    created = datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = refund_body(id=id, order_id=1, bag_id=BAG, amount=amount, date_created=created)
    if id is None:
        del body["id"]
    return converter.structure(body, OrderRefund)


def sent(**changes: Any) -> PendingRefund:
    ask = PendingRefund(
        "refund",
        1,
        BAG,
        RefundBagRequest(amount_refunded=300),
        Phase.SENT,
        sends=1,
        first_sent_at=T0,
        last_sent_at=T0,
    )
    return attrs.evolve(ask, **changes)


def busy() -> Observation:
    error = api_error_from_response(429, b'{"message": "slow down"}', {}, method="POST", path="/p")
    return Observation.send_failed(T0, error, backoff=20.0, received_at=T0)


def lost(at: float) -> Observation:
    body = b'{"message": "Internal error", "status": 500}'
    error = api_error_from_response(500, body, {}, method="POST", path="/p")
    return Observation.send_failed(at, error, received_at=at + 1)


@pytest.mark.parametrize(
    "failure",
    [
        busy(),
        Observation.send_failed(
            T0, APIConnectionError("refused", request_sent=False), backoff=20.0
        ),
    ],
    ids=["429", "never-left"],
)
def test_a_send_proven_not_applied_moves_the_window_to_the_re_send(failure: Observation) -> None:
    """A 429 (or a connection never opened) proves nothing of the ask applied: its
    refund can only be dated from the re-send on (20 s later), not from the first send.
    After a 429 the bag is read when the wait is over, and the re-send leaves then."""
    ask, action = step(sent(), failure, SETTINGS, T0, 100.0)
    assert action.delay == 20.0
    if failure.error is not None and getattr(failure.error, "status", None) == 429:
        assert action.do is Do.READ
        assert ask.phase is Phase.ABSENT
        assert ask.sends == 1
        ask, action = step(ask, Observation.read(T0 + 20.0, []), SETTINGS, T0 + 20.0, 80.0)
        assert action.delay == 0.0
    assert action.do is Do.SEND
    assert ask.first_sent_at == ask.last_sent_at == T0 + 20.0
    assert ask.sends == 2


def after_429(ask: PendingRefund, at: float, listed: list[OrderRefund]) -> PendingRefund:
    """``ask`` answered 429 at T0 and re-sent at ``at``, the read before it listing
    ``listed``."""
    ask, action = step(ask, busy(), SETTINGS, T0, 100.0)
    assert action.do is Do.READ
    ask, action = step(ask, Observation.read(at, listed), SETTINGS, at, 100.0)
    assert action.do is Do.SEND
    return ask


def test_a_refund_listed_before_the_re_send_after_a_429_is_never_this_asks() -> None:
    """Simulator seeds 1141662, 1145746: another system's identical refund made during
    the wait, and readings of the clock that disagree (its date cannot rule it out).
    The read before the re-send lists it: it is in the baseline, and a read after the
    re-send's 500 proves this ask absent once the window is over (sent again), never
    takes it for this ask's."""
    other = refund(9_999, T0 + 10.0)
    ask = after_429(sent(), T0 + 20.0, [other])
    assert ask.baseline is not None
    assert 9_999 in ask.baseline
    assert judge(ask, [other], None, (), SETTINGS).verdict is not Verdict.MATCH
    ask, action = step(ask, lost(T0 + 20.0), SETTINGS, T0 + 21.0, 500.0)
    assert action.do is Do.READ
    after = T0 + 90.0
    ask, action = step(ask, Observation.read(after, [other]), SETTINGS, after, 400.0)
    assert action.do is Do.SEND
    assert ask.sends == 3


def test_a_failed_read_before_the_re_send_after_a_429_reads_again_never_sends() -> None:
    """The read after the wait failed (after its own retries) and listed nothing: the
    ask is not sent until a read answers (simulator seed 5062095: sent at once, another
    system's identical refund made in the wait, within ``date_tolerance`` of the
    re-send, was taken for its own). It reads again after the backoff; when the
    deadline leaves no room, it fails as a failed baseline read does: every send was
    proven not applied, and nothing more was sent."""
    ask, action = step(sent(), busy(), SETTINGS, T0, 100.0)
    failed = Observation.read_failed(T0 + 20.0, APIConnectionError("refused"), backoff=1.0)
    again, action = step(ask, failed, SETTINGS, T0 + 21.0, 79.0)
    assert (action.do, action.delay) == (Do.READ, 1.0)
    assert again == ask
    ended, action = step(ask, failed, SETTINGS, T0 + 21.0, 0.5)
    assert action.do is Do.FAIL
    assert ended.phase is Phase.FAILED
    assert ended.note == RESEND_READ_FAILED
    assert ended.sends == ask.sends


def test_a_refund_made_while_the_429_waited_is_never_claimed() -> None:
    """Another system's refund of the same amount 10 s after the 429'd send, the
    re-send at +20 s answered 500: a read after the window lists only that refund. It
    predates the only send that could have applied: review, never a claim, never
    absence (``Date`` headers in agreement with this machine's clock). A refund dated
    after the re-send is claimed as before."""
    ask = after_429(sent(server_offset=0.0), T0 + 20.0, [])  # the read missed it (a replica)
    ask, action = step(ask, lost(T0 + 20.0), SETTINGS, T0 + 21.0, 500.0)
    assert action.do is Do.READ
    other = refund(9_999, T0 + 10.0)
    assert judge(ask, [other], None, (), SETTINGS).verdict is Verdict.UNDATED
    after = T0 + 90.0
    ask, action = step(ask, Observation.read(after, [other]), SETTINGS, after, 400.0)
    assert action.do is Do.PARK
    assert ask.needs_review
    ours = refund(9_998, T0 + 21.0)
    assert judge(ask, [ours], None, (), SETTINGS).verdict is Verdict.MATCH


def test_a_deferred_ask_sent_again_starts_its_window_then() -> None:
    """A batch or fleet deferral after a 429 (ABSENT) sent again an hour later: the
    window starts at that send."""
    deferring = attrs.evolve(SETTINGS, defer_rate_limited=True)
    ask, action = step(sent(), busy(), deferring, T0, 100.0)
    assert action.do is Do.DEFER
    assert ask.phase is Phase.ABSENT
    later = T0 + 3_600.0
    ask, action = start(attrs.evolve(ask, server_offset=0.0), deferring, later, attempt_timeout=3.0)
    assert action.do is Do.READ  # the bag first (review 28), then the send
    ask, action = step(ask, Observation.read(later, []), deferring, later, 100.0)
    assert action.do is Do.SEND
    assert ask.first_sent_at == later
    assert judge(ask, [refund(9_999, T0 + 60.0)], None, (), SETTINGS).verdict is not Verdict.MATCH


def test_a_re_send_after_a_read_back_proved_absence_keeps_the_first_send() -> None:
    """Absence proven by reads (not by Violet's own answer) moves nothing: a refund of
    the first send that shows late is still this ask's (the baseline keeps out what the
    proving read listed)."""
    ask = sent(doubted=True, settle_until=T0 + 61.0)
    after = T0 + 62.0
    ask, action = step(ask, Observation.read(after, []), SETTINGS, after, 400.0)
    assert action.do is Do.SEND
    assert ask.first_sent_at == T0
    assert ask.last_sent_at == after


def test_an_older_copy_of_the_record_does_not_move_the_window_back() -> None:
    """A resume delivered with the record from before the 429 and the record after the
    re-send: the one with more sends says where the window starts."""
    before = sent()
    after = after_429(before, T0 + 20.0, [])
    for one, other in ((before, after), (after, before)):
        assert merged(one, other).first_sent_at == T0 + 20.0
    twin = attrs.evolve(before, first_sent_at=T0 - 5.0)
    assert merged(before, twin).first_sent_at == T0 - 5.0  # as many sends: the earliest


def test_every_record_the_next_ask_could_claim_fits_an_idless_refund() -> None:
    """An id-less answer dated 90 s after the record its refund is listed as (two
    clocks of Violet's): beyond IDLESS_EARLIER, but within what the judging ask could
    claim (``since``), the record fits it."""
    answer = T0 + 90.0
    listed = [refund(9_400, T0), refund(9_401, T0, amount=700), refund(9_402, T0 - 400.0)]
    assert idless_fits(300, answer, listed) == []
    assert idless_fits(300, answer, listed, since=T0 - 50.0) == [0]


def test_the_next_ask_never_claims_a_refund_another_call_got_without_its_id() -> None:
    """No ``Date``: X was handed an id-less 3.00 (answer dated T0 + 90, listed at T0);
    Y's 3.00, sent at T0 + 10, may have applied. Y's read lists only X's record: it is
    X's for Y (OWNED, review), whether Y's record carries X's refund or only the calls'
    shared knowledge (``known.unnamed``) does."""
    mine = sent(first_sent_at=T0 + 10.0, last_sent_at=T0 + 10.0, doubted=True)
    listed = [refund(9_400, T0)]
    assert judge(mine, listed, None, (), SETTINGS).verdict is Verdict.MATCH  # unbound
    carried = attrs.evolve(mine, unnamed=((300, T0 + 90.0),))
    assert judge(carried, listed, None, (), SETTINGS).verdict is Verdict.OWNED

    class Known:
        def __contains__(self, refund_id: object) -> bool:
            return False

        def unnamed(self, bag_id: int) -> tuple[tuple[int | None, float | None], ...]:
            return ((300, T0 + 90.0),) if bag_id == BAG else ()

    mine = attrs.evolve(mine, settle_until=T0 + 70.0)
    at = T0 + 75.0
    ask, action = step(mine, Observation.read(at, listed), SETTINGS, at, 400.0, Known())
    assert action.do is Do.PARK
    assert ask.needs_review
    assert ask.unnamed == ((300, T0 + 90.0),)


class _Other(Scripted):
    """Another system's refund of the same amount is listed from the third POST on
    (made after the read that proved the first send absent, before the re-send)."""

    other: dict[str, object] | None = None

    async def _list(self, request: web.Request) -> web.Response:
        if self.other is not None and self.posts >= 3 and self.other not in self.made:
            self.made.insert(0, self.other)
        return await super()._list(request)


async def test_a_refund_made_during_a_429_wait_after_a_proven_absence_is_not_the_resends() -> None:
    """A first send answered 500 (did not apply), proven absent after the window (60 s);
    the re-send is answered 429 (``Retry-After: 20``); another system refunds the same
    5.00 ten seconds into that wait; the third send is answered 500 and did not apply.
    The refund is dated after the first send but before the only send that could have
    applied since the proof: review, never this call's (the call used to return it)."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = _Other(clock, ["lost", "busy", "lost"])
    server.retry_after = "20"
    bag = 41
    at = clock.time() + 70.0  # the proving read is at +60, the third send at +80
    server.other = refund_body(
        id=9_999,
        order_id=ORDER,
        bag_id=bag,
        amount=500,
        status="COMPLETED",
        skus=[],
        errors=[],
        date_created=_stamp(at),
        date_last_modified=_stamp(at),
    )
    async with _serve(server) as url, _client(url, clock, deadline=900.0, attempts=4) as client:
        got = await _ended(client.refund_bag(ORDER, bag, REQUEST))
    assert server.posts == 3
    assert server.on_bag(bag) == [9_999]  # the other system's refund only
    assert not isinstance(got, OrderRefund), f"the call took refund {got.id} for its own"
    assert isinstance(got, AmbiguousOutcomeError), repr(got)
    assert got.pending is not None
    assert got.pending.needs_review
