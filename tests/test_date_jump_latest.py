"""Date headers that disagree, the latest being the one that jumped (simulator seed
973571).

Violet's clock is ahead of this machine's. Another system refunds the same amount on
the bag 8 s before our send; our send is answered with Violet's own 500 (nothing
applied, "may have applied"). The call's read-backs see that refund 8 s before the
send by every ``Date`` (they agree): for review, never claimed. A resume minutes later
reads the bag with an answer whose ``Date`` is 120 s behind the others (a CDN
stamping its own, a clock that jumped): the record's readings of Violet's clock now
disagree. The claim's bar was ``date_tolerance`` below the latest reading (the jumped
one, review 21) but ``clock_skew`` (60 s) below the earlier, right one, and this
machine's clock's 5 s: the other system's refund passed, and was handed to the caller
as theirs (a false success: the refund they asked for never made). Each reading a
``Date`` header gave on this clock now places the send within ``date_tolerance``.

Refunds are counted by the server's own record (tests/hostile.py); time is a FakeClock
shared with the client."""

from __future__ import annotations

import attrs
import pytest

from violet_async import AmbiguousOutcomeError, OrderRefund, RetryPolicy
from violet_async._protocol import Do, Observation, step
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, VIOLET_500, Hostile, Step, hostile_client

AMOUNT = 300
RETRY = RetryPolicy(max_attempts=1, deadline=60.0)


async def _outcome(call: object) -> OrderRefund | AmbiguousOutcomeError:
    try:
        return await call  # type: ignore[misc,no-any-return]
    except AmbiguousOutcomeError as exc:
        return exc


@pytest.mark.parametrize("violet_ahead", [46.0, 264.0])
async def test_another_systems_refund_before_the_send_is_not_claimed_after_a_date_jumped(
    violet_ahead: float,
) -> None:
    clock = FakeClock()
    server = Hostile(
        clock, script=[Step(500, VIOLET_500, commit_after=None)], server_skew=violet_ahead
    )
    theirs = server.add_refund(AMOUNT)["id"]
    clock.advance(8.0)  # our send leaves 8 s after the other system's refund
    async with hostile_client(server, retry=RETRY) as client:
        first = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        assert isinstance(first, AmbiguousOutcomeError), first
        assert first.pending is not None
        clock.advance(400.0)
        server.header_skew = -120.0  # every later answer's Date 120 s behind
        got = await _outcome(client.resume(first.pending))
    if isinstance(got, OrderRefund):
        assert got.id != theirs, "another system's refund handed over as this call's"
    assert server.posts == 1, "nothing of this call applied, and nothing proved it absent"
    assert server.ours == []


async def test_our_own_refund_is_still_found_after_a_date_jumped() -> None:
    """The other side: our send applied 5 s after its 500 was answered (Violet 46 s
    ahead); the call ended pending before it committed. The resume, reading the bag
    with a ``Date`` 120 s behind, finds it by every reading and returns it."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(500, VIOLET_500, commit_after=70.0)], server_skew=46.0)
    async with hostile_client(server, retry=RETRY) as client:
        first = await _outcome(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT))
        assert isinstance(first, AmbiguousOutcomeError), first
        assert first.pending is not None
        clock.advance(400.0)
        server.header_skew = -120.0
        got = await client.resume(first.pending)
    assert server.ours == [got.id]
    assert server.posts == 1


@pytest.mark.parametrize(("before_send", "claimed"), [(8.0, False), (-1.0, True)])
def test_the_bar_is_date_tolerance_below_every_reading_of_this_clock(
    before_send: float, claimed: bool
) -> None:
    """The same rule, one ``step``: Violet's clock 46 s ahead, the latest ``Date`` 120 s behind
    the earlier ones (readings -74 s and 46 s, both this clock's). A refund 8 s before
    the send by the earlier reading is for review; one 1 s after it is the ask's."""
    from .test_protocol import SETTINGS, T0, refund, sent

    record = sent(server_offset=-74.0, offsets=(-74.0, 46.0), clock_unsure=True)
    record = attrs.evolve(record, settle_until=T0 + 60.0)
    theirs = refund(5, age=-(46.0 - before_send))  # Violet's date, 46 s ahead
    read = Observation.read(T0 + 100.0, [theirs], server_time=T0 + 26.0, received_at=T0 + 100.5)
    ask, action = step(record, read, SETTINGS, T0 + 100.5, 100.0)
    assert (action.do is Do.RETURN) is claimed, (action, ask.note)


def test_only_a_record_moved_from_another_clock_keeps_the_wider_bar() -> None:
    """A record of another process (its clock 30 s ahead) moved onto this clock by
    Date headers 30 s apart holds a reading no header gave (its times as they were):
    it says so (``offsets_moved``), in its JSON too, and keeps ``clock_skew`` below
    its earlier readings (``tests/test_protocol.py``: our refund is found). Readings
    of this clock alone never set it."""
    from violet_async._ask import PendingRefund

    from .test_protocol import SETTINGS, T0, refund, sent

    foreign = attrs.evolve(sent(), clock="another-process", server_offset=-30.0)
    foreign = attrs.evolve(foreign, first_sent_at=T0 + 30, settle_until=T0 + 90)
    obs = Observation.read(T0 + 5, [refund(5)], server_time=T0 + 5, received_at=T0 + 5)
    moved, _ = step(foreign, obs, SETTINGS, T0 + 5, 100.0)
    assert moved.offsets is not None
    assert moved.offsets_moved
    assert PendingRefund.from_json(moved.to_json()).offsets_moved
    ours = sent(server_offset=46.0)
    jumped = Observation.read(T0 + 100, [], server_time=T0 - 20, received_at=T0 + 100.5)
    widened, _ = step(attrs.evolve(ours, settle_until=T0 + 60), jumped, SETTINGS, T0 + 101, 100.0)
    assert widened.offsets is not None
    assert not widened.offsets_moved
    assert "offsets_moved" not in ours.to_dict()
