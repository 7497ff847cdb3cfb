"""The refund protocol's decisions, table by table: pure ``step`` calls, no server, no
clock, no waiting."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from violet_async import (
    APIConnectionError,
    CancelBagRequest,
    PendingRefund,
    RefundBagRequest,
    RequestValidationError,
    ShippingRefund,
    SkuRefund,
)
from violet_async._converter import converter
from violet_async._matching import judge
from violet_async._protocol import (
    Do,
    Observation,
    Phase,
    ProtocolError,
    Settings,
    clock_stepped,
    match,
    start,
    step,
)
from violet_async.exceptions import ResponseFormatError, api_error_from_response
from violet_async.models import OrderBag, OrderRefund

from .samples import refund_body

T0 = 1_800_000_000.0
SETTINGS = Settings(max_attempts=3, settle_running=60.0, settle_lag=5.0, settle_delay=1.0)
BAG = 7


def refund(id: int, amount: int = 300, *, age: float = 0.0, **extra: Any) -> OrderRefund:
    created = datetime.fromtimestamp(T0 - age, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Of the order the asks below ask of (``sent``): a record naming another order is
    # another bag's (review 25).
    fields = {
        "id": id,
        "order_id": 1,
        "bag_id": BAG,
        "amount": amount,
        "date_created": created,
        **extra,
    }
    return converter.structure(refund_body(**fields), OrderRefund)


def sent(request: Any = None, **changes: Any) -> PendingRefund:
    ask = PendingRefund(
        "refund",
        1,
        BAG,
        request or RefundBagRequest(amount_refunded=300),
        Phase.SENT,
        sends=1,
        first_sent_at=T0,
        last_sent_at=T0,
    )
    return attrs.evolve(ask, **changes)


def failed_with(status: int, body: bytes = b"") -> Observation:
    error = api_error_from_response(status, body, {}, method="POST", path="/p")
    return Observation.send_failed(T0, error, received_at=T0 + 1)


def test_a_gateway_timeout_opens_the_long_window_and_reads_at_once() -> None:
    """A gateway 504: may still be running; read now, absence only after 60 s."""
    ask, action = step(sent(), failed_with(504, b"<html>"), SETTINGS, T0 + 1, 100.0)
    assert action.do is Do.READ
    assert action.delay == 0
    assert ask.settle_until == T0 + 1 + 60.0
    assert ask.doubted


def test_violets_own_500_waits_as_long_as_no_answer() -> None:
    """Violet's JSON 500: its application answered, but the platform call behind it may
    still be running (a timeout inside Violet; seen committing 20 s later), so the
    whole running window, not only list lag."""
    body = b'{"status": 500, "message": "boom", "error_code": 1}'
    ask, action = step(sent(), failed_with(500, body), SETTINGS, T0 + 1, 100.0)
    assert action.do is Do.READ
    assert ask.settle_until == T0 + 1 + SETTINGS.settle_running


def test_a_miss_inside_the_window_reads_again_never_sends() -> None:
    """Quick reads that miss are not evidence: the next action is another read."""
    ask, _ = step(sent(), failed_with(504), SETTINGS, T0 + 1, 100.0)
    for n in range(5):
        now = T0 + 2 + n
        ask, action = step(ask, Observation.read(now, []), SETTINGS, now, 100.0)
        assert action.do is Do.READ
        assert now + action.delay <= ask.settle_until + 1e-9  # (settle_until is set)


def test_thousands_of_reads_inside_a_long_window_keep_reading() -> None:
    """A window hours long (a wall clock stepped back mid-call, no deadline) makes
    thousands of reads: the backoff stays capped instead of overflowing (the simulator's
    seed 300280 with clock_steps raised OverflowError out of refund_bag)."""
    ask, _ = step(sent(), failed_with(504), SETTINGS, T0 + 1, None)
    ask = attrs.evolve(ask, reads=5_000, settle_until=T0 + 10_800.0)
    ask, action = step(ask, Observation.read(T0 + 2, []), SETTINGS, T0 + 2, None)
    assert action.do is Do.READ
    assert action.delay == SETTINGS.max_settle_delay


def _dated(at: float, refunds: list[OrderRefund]) -> Observation:
    """A read whose answer carried Violet's ``Date`` (its clock as this one's)."""
    return Observation.read(at, refunds, server_time=at, received_at=at + 0.5)


def test_a_miss_started_after_the_window_proves_absence_and_re_sends() -> None:
    """Only a read started after the window proves absence: then one re-send."""
    ask, _ = step(sent(), failed_with(504), SETTINGS, T0 + 1, 100.0)
    end = ask.settle_until
    assert end is not None
    old = refund(1, age=100_000)  # an identical refund from the day before
    ask, action = step(ask, _dated(end - 0.1, [old]), SETTINGS, end, 9.0)
    assert action.do is Do.READ  # started a hair too early
    ask, action = step(ask, _dated(end, [old]), SETTINGS, end, 9.0)
    assert action.do is Do.SEND
    assert ask.sends == 2
    assert ask.baseline == frozenset({1})


def test_without_a_date_a_refund_a_day_before_the_send_is_for_review() -> None:
    """With no ``Date`` header, this machine's wall clock alone dates the send, and it
    may be a day off with nothing to tell (a step before the process was made): an
    identical refund dated a day before the send by it may be the send's own. Review,
    never proof of absence (the rest of simulator seed 1079285)."""
    ask, _ = step(sent(), failed_with(504), SETTINGS, T0 + 1, 100.0)
    end = ask.settle_until
    assert end is not None
    old = refund(1, age=100_000)
    ask, action = step(ask, Observation.read(end, [old]), SETTINGS, end, 9.0)
    assert action.do is Do.PARK
    assert ask.needs_review
    assert ask.sends == 1


def test_the_deadline_ending_first_parks_the_ask() -> None:
    """A settle wait the deadline cannot hold: PENDING, not absent, not failed."""
    ask, _ = step(sent(), failed_with(504), SETTINGS, T0 + 1, 3.0)
    ask, action = step(ask, Observation.read(T0 + 1, []), SETTINGS, T0 + 1, 0.5)
    assert action.do is Do.PARK
    assert ask.phase is Phase.PENDING
    assert not ask.needs_review


def test_patience_parks_instead_of_waiting() -> None:
    """A batch's patience: a long settle wait parks the ask right away."""
    ask, _ = step(sent(), failed_with(504), SETTINGS, T0 + 1, 100.0)
    ask, action = step(ask, Observation.read(T0 + 1, []), SETTINGS, T0 + 1, 100.0, patience=0.5)
    assert action.do is Do.PARK
    assert ask.settle_until == T0 + 61


def test_one_match_returns_it_reconciled() -> None:
    """Exactly one new matching refund: returned, reconciled."""
    ask, _ = step(sent(), failed_with(504), SETTINGS, T0 + 1, 100.0)
    ask, action = step(ask, Observation.read(T0 + 2, [refund(5)]), SETTINGS, T0 + 2, 100.0)
    assert action.do is Do.RETURN
    assert action.refund is not None
    assert action.refund.reconciled
    assert ask.phase is Phase.APPLIED
    assert ask.refund_id == 5


@pytest.mark.parametrize(
    ("refunds", "why"),
    [
        ([refund(5, reason="ours"), refund(6, reason="ours ")], "match this request"),
        ([refund(5, reason="other")], "almost matches"),
        ([refund(5, reason="ours", date_created="2026-01-01T10:00:00")], "no offset"),
        ([refund(5, reason="ours", date_created=None)], "it has no date"),
        ([refund(5, reason="ours", age=3 * 3600)], "earlier than the send"),
    ],
)
def test_conflicting_evidence_parks_for_review(refunds: list[OrderRefund], why: str) -> None:
    """Several matches, a near match, an undated match: pending for a person."""
    asked = sent(RefundBagRequest(amount_refunded=300, reason="ours"))
    ask, _ = step(asked, failed_with(504), SETTINGS, T0 + 1, 100.0)
    ask, action = step(ask, Observation.read(T0 + 2, refunds), SETTINGS, T0 + 2, 100.0)
    assert action.do is Do.PARK
    assert ask.needs_review
    assert why in ask.note


def test_known_and_old_refunds_are_not_candidates() -> None:
    """A refund handed to a caller before is never claimed, but being known is not
    absence (OWNED); one made a day before the first send, by Violet's clock as the
    ``Date`` headers read it, is not ours (MISS). By this machine's clock alone (no
    ``Date``) it may be ours: undated, for review."""
    ask = sent(server_offset=0.0)
    verdict, found = match(ask, [refund(5), refund(6, age=100_000)], None, {5}, SETTINGS)
    assert (verdict.value, [r.id for r in found]) == ("owned", [5])
    verdict, _ = match(ask, [refund(6, age=100_000)], None, {5}, SETTINGS)
    assert verdict.value == "miss"
    verdict, _ = match(sent(), [refund(6, age=100_000)], None, {5}, SETTINGS)
    assert verdict.value == "undated"


def test_a_server_clock_behind_ours_is_estimated_and_its_refund_reviewed() -> None:
    """Violet's clock 2 minutes behind: the Date header's offset is learned, and the
    refund it dates after the send keeps it in (never a miss, never a re-send); but
    it is before the send by this machine's clock, and a Date header behind the clock
    that dates refunds looks the same (remaining risk (e)): a person confirms it."""
    ask = sent()
    late = refund(5, age=120)  # created "before" our send by our clock
    obs = Observation.read(T0 + 2, [late], server_time=T0 + 2 - 120, received_at=T0 + 2)
    ask2, action = step(ask, obs, SETTINGS, T0 + 2, 100.0)
    assert action.do is Do.PARK
    assert [r.id for r in action.candidates] == [5]
    assert ask2.needs_review
    assert ask2.server_offset == pytest.approx(-119.5)
    ahead = refund(6, age=-120)  # Violet's clock 2 minutes ahead: after the send by both
    obs = Observation.read(T0 + 2, [ahead], server_time=T0 + 2 + 120, received_at=T0 + 2)
    assert step(ask, obs, SETTINGS, T0 + 2, 100.0)[1].do is Do.RETURN


def test_whole_bag_refund_needs_the_bag_refunded_and_the_rest_amount() -> None:
    """A full refund claims a refund of what was left, whatever the bag's status says
    (the platform moves it minutes later); another amount is not it."""
    ask = sent(RefundBagRequest())
    before, ours = refund(1, 300, age=100_000), refund(2, 700)
    refunded = converter.structure({"id": BAG, "status": "REFUNDED", "total": 1000}, OrderBag)
    partly = converter.structure(
        {"id": BAG, "status": "PARTIALLY_REFUNDED", "total": 1000}, OrderBag
    )
    assert match(ask, [before, ours], refunded, (), SETTINGS)[0].value == "match"
    assert match(ask, [before, ours], partly, (), SETTINGS)[0].value == "match"
    other_actor = refund(3, 300, age=1)
    assert match(ask, [other_actor], partly, (), SETTINGS)[0].value == "miss"


def test_sku_and_shipping_details_must_agree() -> None:
    """SKU lines and shipping are compared; a mismatch is near, not a match."""
    request = RefundBagRequest(
        amount_refunded=300,
        skus=[SkuRefund(order_sku_id=1, quantity_refunded=2)],
        shipping=ShippingRefund(amount=50),
    )
    ask = sent(request)
    same = refund(5, skus=[{"order_sku_id": 1, "quantity_refunded": 2}], shipping={"amount": 50})
    other = refund(6, skus=[{"order_sku_id": 1, "quantity_refunded": 1}])
    no_lines = refund(7, skus=[])
    assert match(ask, [same], None, (), SETTINGS)[0].value == "match"
    assert match(ask, [other], None, (), SETTINGS)[0].value == "near"
    assert match(ask, [no_lines], None, (), SETTINGS)[0].value == "near"


def test_a_cancel_needs_the_bag_cancelled_and_the_rest_refunded() -> None:
    """A cancel's refund is the one that refunds what was left, whether or not the bag
    reads CANCELED yet (another amount on a CANCELED bag is for review); a CANCELED bag
    with no refund after the window is pending, never re-sent."""
    ask = sent(CancelBagRequest(), kind="cancel")
    cancelled = converter.structure({"id": BAG, "status": "CANCELED", "total": 300}, OrderBag)
    open_bag = converter.structure({"id": BAG, "status": "COMPLETED", "total": 300}, OrderBag)
    assert match(ask, [refund(5)], cancelled, (), SETTINGS)[0].value == "match"
    assert match(ask, [refund(5)], open_bag, (), SETTINGS)[0].value == "match"
    assert match(ask, [refund(5, 100)], open_bag, (), SETTINGS)[0].value == "miss"
    foreign = refund(6, 75)  # another system's partial refund, listed before ours
    assert match(ask, [foreign], cancelled, (), SETTINGS)[0].value == "near"
    # On a closed bag every refund "is what the others left": only the last one closed it.
    full = converter.structure({"id": BAG, "status": "CANCELED", "total": 375}, OrderBag)
    ours = refund(7, 300)
    assert match(ask, [foreign, ours], full, {7}, SETTINGS)[0].value == "near"
    ask, _ = step(ask, failed_with(504), SETTINGS, T0 + 1, 100.0)
    end = ask.settle_until or 0
    ask, action = step(ask, Observation.read(end, [], cancelled), SETTINGS, end, 100.0)
    assert action.do is Do.PARK


def test_a_refusal_after_a_doubted_send_is_never_a_definite_failure() -> None:
    """Re-sent after a 500, refused 400: read back, and pending if still unseen."""
    ask, _ = step(sent(), failed_with(500, b'{"message": "x", "status": 500}'), SETTINGS, T0, 100.0)
    end = ask.settle_until or 0
    ask, action = step(ask, Observation.read(end, []), SETTINGS, end, 100.0)
    assert action.do is Do.SEND
    ask, action = step(ask, failed_with(400, b'{"message": "exceeds"}'), SETTINGS, end + 1, 90.0)
    assert action.do is Do.READ
    assert ask.refused_after_doubt
    later = (ask.settle_until or 0) + 1
    ask, action = step(ask, Observation.read(later, []), SETTINGS, later, 80.0)
    assert action.do is Do.PARK


def test_a_first_refusal_is_a_definite_failure() -> None:
    """A 4xx to a send nothing doubts: not applied, FAIL."""
    ask, action = step(sent(), failed_with(400), SETTINGS, T0, 100.0)
    assert action.do is Do.FAIL
    assert ask.phase is Phase.FAILED


def test_never_left_and_429_re_send_after_backoff_within_budget() -> None:
    """Provably not sent: re-send after the drawn backoff; out of budget: FAIL."""
    never = APIConnectionError("refused", request_sent=False)
    obs = Observation.send_failed(T0, never, backoff=2.0)
    ask, action = step(sent(), obs, SETTINGS, T0, 100.0)
    assert action.do is Do.SEND
    assert action.delay == 2.0
    assert ask.sends == 2
    ask, action = step(sent(sends=3), obs, SETTINGS, T0, 100.0)
    assert action.do is Do.FAIL
    ask, action = step(sent(), obs, SETTINGS, T0, 1.0)
    assert action.do is Do.FAIL


def test_read_before_send_reads_a_baseline_first() -> None:
    """NEW with read_before_send: read, then send with that baseline."""
    settings = attrs.evolve(SETTINGS, read_before_send=True)
    new = PendingRefund("refund", 1, BAG, RefundBagRequest(amount_refunded=1))
    ask, action = start(new, settings, T0, attempt_timeout=35)
    assert action.do is Do.READ
    ask, action = step(ask, Observation.read(T0, [refund(1)]), settings, T0, 100.0)
    assert action.do is Do.SEND
    assert ask.baseline == frozenset({1})
    assert ask.sends == 1


def test_resuming_a_send_that_crashed_waits_out_the_longest_window() -> None:
    """A record journaled as sent, with no outcome: read back, absence only after the
    longest the send could have run plus the running window."""
    crashed = attrs.evolve(sent(), settle_until=None)
    ask, action = start(crashed, SETTINGS, T0 + 5, attempt_timeout=35)
    assert action.do is Do.READ
    assert ask.settle_until == T0 + 35 + 60


def test_impossible_moves_fail_loudly() -> None:
    """An answer to an ask that was never sent is a bug, not a branch."""
    new = PendingRefund("refund", 1, BAG, RefundBagRequest())
    with pytest.raises(ProtocolError):
        step(new, Observation.answered(T0, refund(1)), SETTINGS, T0, 1.0)
    with pytest.raises(ProtocolError):
        start(attrs.evolve(new, phase=Phase.APPLIED), SETTINGS, T0, attempt_timeout=1)


@given(
    sends=st.integers(0, 10),
    baseline=st.none() | st.frozensets(st.integers(1, 10**9), max_size=5),
    offset=st.none() | st.floats(-1e5, 1e5),
    reason=st.none() | st.text(max_size=20),
)
def test_pending_round_trips_through_json(
    sends: int, baseline: frozenset[int] | None, offset: float | None, reason: str | None
) -> None:
    """Any record survives to_json / from_json unchanged."""
    ask = sent(
        RefundBagRequest(amount_refunded=5, reason=reason),
        sends=sends,
        baseline=baseline,
        server_offset=offset,
        phase=Phase.PENDING,
        settle_until=T0 + 60,
        note="why",
    )
    assert PendingRefund.from_json(ask.to_json()) == ask


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ("[]", "pending"),
        ('{"kind": "refund"}', "pending.request"),
        ('{"kind": "x", "request": {}}', "pending.kind"),
        (
            '{"kind": "refund", "order_id": 1, "bag_id": 2, "sends": 1, "request": {"amount": 5}}',
            "request",
        ),
        ("not json", "pending"),
    ],
)
def test_a_malformed_record_is_a_typed_error(data: str, field: str) -> None:
    """A stored record that does not read back is refused naming the field; a
    misspelt request field is never ignored."""
    with pytest.raises(RequestValidationError) as info:
        PendingRefund.from_json(data)
    assert info.value.field.startswith(field)


def test_old_refunds_by_the_date_tolerance() -> None:
    """Without a Date estimate, a refund up to clock_skew older than the send counts;
    older by less than a day's worth of time zones (a date under a wrong offset could
    be ours) it is for a person to confirm; older still, it is not ours."""
    ask = sent()
    assert match(ask, [refund(5, age=30)], None, (), SETTINGS)[0].value == "match"
    assert match(ask, [refund(5, age=90)], None, (), SETTINGS)[0].value == "undated"
    with_estimate = attrs.evolve(ask, server_offset=0.0)
    assert match(with_estimate, [refund(5, age=30)], None, (), SETTINGS)[0].value == "undated"
    assert match(with_estimate, [refund(5, age=100_000)], None, (), SETTINGS)[0].value == "miss"


def test_a_failed_refund_is_never_this_asks_outcome() -> None:
    """A FAILED refund that matches (another attempt's) is for a person, never returned
    as this ask's refund."""
    ask = sent()
    verdict, found = match(ask, [refund(5, status="FAILED")], None, (), SETTINGS)
    assert verdict.value == "near"
    assert found[0].id == 5


def test_sku_lines_are_compared_by_units_per_sku() -> None:
    """Two 1-unit lines of a SKU are the 2 units asked for; overlapping SKUs with other
    units are near, never another refund."""
    ask = sent(RefundBagRequest(skus=[SkuRefund(order_sku_id=10, quantity_refunded=2)]))
    split = refund(5, 400, skus=[{"order_sku_id": 10, "quantity_refunded": 1}] * 2)
    fewer = refund(6, 200, skus=[{"order_sku_id": 10, "quantity_refunded": 1}])
    other = refund(7, 200, skus=[{"order_sku_id": 11, "quantity_refunded": 2}])
    assert match(ask, [split], None, (), SETTINGS)[0].value == "match"
    assert match(ask, [fewer], None, (), SETTINGS)[0].value == "near"
    assert match(ask, [other], None, (), SETTINGS)[0].value == "miss"


def test_a_record_resumed_on_another_clock_keeps_its_instants() -> None:
    """Times written by another process (its clock 30 s ahead, offset known) are moved
    onto this clock when this process learns its own offset. The two processes' Date
    headers disagree by 30 s; this machine's clock agrees with its own Date, and our
    refund is after the send by both: found."""
    foreign = attrs.evolve(sent(), clock="another-process", server_offset=-30.0)
    foreign = attrs.evolve(foreign, first_sent_at=T0 + 30, settle_until=T0 + 90)
    obs = Observation.read(T0 + 5, [refund(5)], server_time=T0 + 5, received_at=T0 + 5)
    ask, action = step(foreign, obs, SETTINGS, T0 + 5, 100.0)
    assert action.do is Do.RETURN
    assert ask.first_sent_at == pytest.approx(T0 - 0.5)
    assert ask.settle_until == pytest.approx(T0 + 59.5)


@pytest.mark.parametrize("writer", ["p1@box", "p2@box"])
def test_a_record_of_this_machine_is_not_moved_by_a_date_that_jumped(writer: str) -> None:
    """Simulator seed 931604: a record written by another process on this machine (or
    this one), whose Date said Violet's clock is this machine's, read back by this
    process with a Date 3 h ahead (one answer's header jumped). The two processes read
    one wall clock: the jumped Date is a disagreeing reading, never a reason to move
    the record's times (moved, its send landed 3 h early, and another system's refund
    made 10 s before the send was claimed). The refund is not claimed."""
    settings = attrs.evolve(SETTINGS, clock_id="p2@box")
    mine = sent(clock=writer, server_offset=0.0, wall_mono=(T0, 100.0), settle_until=T0 + 60)
    jumped = Observation.read(
        T0 + 70, [refund(5, age=10)], server_time=T0 + 70 + 10_800, received_at=T0 + 70
    )
    ask, action = step(mine, jumped, settings, T0 + 70, 100.0)
    assert ask.first_sent_at == T0
    assert action.do is not Do.RETURN, ask
    assert ask.clock_unsure


def test_a_record_of_another_machine_is_still_moved_by_the_date() -> None:
    """The other side: another machine's record (its clock may differ from this one's
    by the difference of the Date readings) is moved onto this clock, as before."""
    settings = attrs.evolve(SETTINGS, clock_id="p2@box")
    theirs = sent(clock="p1@other", server_offset=-30.0, settle_until=T0 + 60)
    theirs = attrs.evolve(theirs, first_sent_at=T0 + 30)
    obs = Observation.read(T0 + 5, [refund(5)], server_time=T0 + 5, received_at=T0 + 5)
    ask, action = step(theirs, obs, settings, T0 + 5, 100.0)
    assert action.do is Do.RETURN
    assert ask.first_sent_at == pytest.approx(T0 - 0.5)


def test_a_record_from_a_clock_never_measured_is_compared_widely() -> None:
    """A record whose writer never learned Violet's offset resumes with the wide
    clock_skew tolerance and a settle window stretched by it."""
    foreign = attrs.evolve(sent(), clock="another-process", settle_until=T0 + 60)
    ask, action = start(foreign, SETTINGS, T0 + 1, attempt_timeout=35)
    assert ask.clock_unsure
    assert ask.settle_until == T0 + 60 + SETTINGS.clock_skew
    assert action.do is Do.READ


def test_another_pending_ask_on_the_bag_turns_a_match_into_review() -> None:
    """While another ask on the bag is pending, a matching refund could be that one's:
    a person confirms, the SDK never claims it."""
    settings = attrs.evolve(SETTINGS, others_pending=True)
    ask, _ = step(sent(), failed_with(504), settings, T0 + 1, 100.0)
    ask, action = step(ask, Observation.read(T0 + 2, [refund(5)]), settings, T0 + 2, 100.0)
    assert action.do is Do.PARK
    assert ask.needs_review


def test_hold_if_present_keeps_a_row_already_refunded_from_being_sent() -> None:
    """With hold_if_present, a baseline holding exactly this refund (not handed to a
    caller) means HOLD, not send; a different amount or a known refund does not."""
    settings = attrs.evolve(SETTINGS, read_before_send=True, hold_if_present=True)
    new = PendingRefund("refund", 1, BAG, RefundBagRequest(amount_refunded=300))
    ask, _ = start(new, settings, T0, attempt_timeout=35)
    held, action = step(ask, Observation.read(T0, [refund(5, age=999)]), settings, T0, 100.0)
    assert action.do is Do.HOLD
    assert held.phase is Phase.FAILED
    assert [r.id for r in action.candidates] == [5]
    _, action = step(ask, Observation.read(T0, [refund(5, 200)]), settings, T0, 100.0)
    assert action.do is Do.SEND
    _, action = step(ask, Observation.read(T0, [refund(5)]), settings, T0, 100.0, known={5})
    assert action.do is Do.SEND


def test_the_guard_read_of_a_whole_bag_refund_or_cancel_reads_the_bag() -> None:
    """hold_if_present on a whole-bag refund or a cancel (a fleet item re-run after Redis
    lost its record, once it had applied): when the guard read lists a refund, only the
    bag's total tells whether it is this one, so the bag is read once more; it is held,
    not sent (a send would be refused, "Bag is REFUNDED", and reported failed for a
    refund that was made: the simulator's redis_loss seeds 600005 and 600126). A bag
    with no refund, a plain baseline or an amount need the list alone."""
    guard = attrs.evolve(SETTINGS, read_before_send=True, hold_if_present=True)
    baseline_only = attrs.evolve(SETTINGS, read_before_send=True)
    whole = PendingRefund("refund", 1, BAG, RefundBagRequest())
    cancel = PendingRefund("cancel", 1, BAG, CancelBagRequest())
    amount = PendingRefund("refund", 1, BAG, RefundBagRequest(amount_refunded=300))
    done = refund(5, 300, age=999)
    for ask in (whole, cancel):
        first, action = start(ask, guard, T0, attempt_timeout=35)
        assert (action.do, action.read_bag) == (Do.READ, False)
        _, action = step(first, Observation.read(T0, []), guard, T0, 100.0)
        assert action.do is Do.SEND  # an empty bag: no second read
        again, action = step(first, Observation.read(T0, [done]), guard, T0, 100.0)
        assert (action.do, action.read_bag) == (Do.READ, True), ask.kind
        _, action = step(first, Observation.read(T0, [done]), guard, T0, 100.0, known={5})
        assert action.do is Do.SEND  # a refund handed to another call is not this one
        status = "REFUNDED" if ask.kind == "refund" else "CANCELED"
        bag = converter.structure({"id": BAG, "status": status, "total": 300}, OrderBag)
        held, action = step(again, Observation.read(T0, [done], bag), guard, T0, 100.0)
        assert (action.do, held.sends) == (Do.HOLD, 0), ask.kind
        assert [r.id for r in action.candidates] == [5]
        # A second read that still has no bag does not ask again: it goes on as before.
        _, action = step(again, Observation.read(T0, [done]), guard, T0, 100.0)
        assert action.do is not Do.READ
        sent_ask, action = step(again, Observation.read(T0, []), guard, T0, 100.0)
        assert (action.do, sent_ask.reads) == (Do.SEND, 0)
    for ask, settings in ((amount, guard), (whole, baseline_only), (cancel, baseline_only)):
        first, _ = start(ask, settings, T0, attempt_timeout=35)
        _, action = step(first, Observation.read(T0, [refund(6, 100)]), settings, T0, 100.0)
        assert action.do is not Do.READ, (ask.kind, settings)


# -- round 3: unreadable records, stale reads, review, clocks, the record format ------


def test_unreadable_records_never_claim_and_never_prove_absence() -> None:
    """A read with records it could not read: a match is for review, not a claim; a miss
    after the window is for review, not absence (never a re-send)."""
    ask, _ = step(sent(), failed_with(504), SETTINGS, T0 + 1, 100.0)
    end = ask.settle_until or 0.0
    obs = Observation.read(end, [refund(5, age=-2)], unreadable=1)
    parked, action = step(ask, obs, SETTINGS, end, 100.0)
    assert (action.do, parked.needs_review) == (Do.PARK, True)
    parked, action = step(ask, Observation.read(end, [], unreadable=2), SETTINGS, end, 100.0)
    assert (action.do, parked.needs_review) == (Do.PARK, True)


def test_a_candidate_seen_then_missing_is_a_stale_read() -> None:
    """A refund seen by an earlier read (or in the baseline) is missing from a later
    one: inside the window the ask reads again; after it, it parks; never absence."""
    ask, _ = step(sent(seen=frozenset({5})), failed_with(504), SETTINGS, T0 + 1, 100.0)
    end = ask.settle_until or 0.0
    _, action = step(ask, Observation.read(T0 + 2, []), SETTINGS, T0 + 2, 100.0)
    assert action.do is Do.READ
    _, action = step(ask, Observation.read(end, []), SETTINGS, end, 100.0)
    assert action.do is Do.PARK
    based, _ = step(sent(baseline=frozenset({1, 2})), failed_with(504), SETTINGS, T0 + 1, 100.0)
    _, action = step(based, Observation.read(end, [refund(1, 50)]), SETTINGS, end, 100.0)
    assert action.do is Do.PARK


def test_review_is_sticky_and_never_re_sends() -> None:
    """A record parked for review, resumed: a clean miss after the window parks it for
    review again, never a send."""
    ask = sent(phase=Phase.PENDING, needs_review=True, settle_until=T0 + 5)
    ask, action = start(ask, SETTINGS, T0 + 10, attempt_timeout=1.0)
    assert action.do is Do.READ
    parked, action = step(ask, Observation.read(T0 + 10, []), SETTINGS, T0 + 10, 100.0)
    assert (action.do, parked.needs_review) == (Do.PARK, True)


def test_an_applied_answer_is_never_re_sent() -> None:
    """A 2xx that could not be read: read back, and a miss after the window parks for
    review; the record says so through JSON."""
    error = ResponseFormatError("x", body=b"{", status=200)
    ask, action = step(sent(), Observation.send_failed(T0, error), SETTINGS, T0 + 1, 100.0)
    assert (action.do, ask.answered) == (Do.READ, True)
    end = ask.settle_until or 0.0
    parked, action = step(ask, Observation.read(end, []), SETTINGS, end, 100.0)
    assert (action.do, parked.needs_review) == (Do.PARK, True)
    assert PendingRefund.from_json(parked.to_json()) == parked


def test_with_a_baseline_dates_never_rule_a_new_refund_out() -> None:
    """With a baseline, a new refund dated a day before the send, or by a clock 15 h
    off, is never ruled out (never absence): it goes to review, as does a precise date
    shortly before the send by a sure clock. Only a date after the send by every
    reading of the clock is claimed."""
    ask = sent(baseline=frozenset({1}))
    assert match(ask, [refund(5, age=86_000)], None, (), SETTINGS)[0].value == "undated"
    unsure = attrs.evolve(ask, server_offset=15 * 3600.0)
    assert match(unsure, [refund(5, age=-1)], None, (), SETTINGS)[0].value == "undated"
    sure = attrs.evolve(ask, server_offset=0.0)
    assert match(sure, [refund(5, age=30)], None, (), SETTINGS)[0].value == "undated"
    assert match(sure, [refund(5, age=-1)], None, (), SETTINGS)[0].value == "match"
    assert match(sure, [refund(1, age=-1)], None, (), SETTINGS)[0].value == "miss"


@pytest.mark.parametrize(
    ("changes", "extra", "why"),
    [
        ({}, {"date_created": "2026-03-04T00:00:00Z"}, "the day only"),
        ({}, {"date_created": "2026-03-04T20:00:01"}, "no offset"),
        ({}, {"date_created": None}, "it has no date"),
        ({}, {"id": None}, "it has no id"),
        ({"server_offset": 0.0}, {"status": "EXTERNAL"}, "made on the merchant's platform"),
        ({"first_sent_at": None}, {}, "first sent is not known"),
        ({"server_offset": 0.0}, {"age": 30.0}, "earlier than the send"),
        ({"server_offset": 3 * 3600.0}, {"age": -1.0}, "some reading of Violet's clock"),
    ],
)
def test_new_since_the_baseline_alone_is_never_a_claim(
    changes: dict[str, Any], extra: dict[str, Any], why: str
) -> None:
    """The baseline may have come from a replica behind: a refund it did not list may
    be another system's, made before the send. Claimed only when its date places it
    after the send; otherwise review, with the reason in the note."""
    ask = sent(baseline=frozenset({1}), **changes)
    ask, _ = step(ask, failed_with(504), SETTINGS, T0 + 1, 100.0)
    fields = {"id": 5, "age": -1.0, **extra}
    found = refund(fields.pop("id"), age=fields.pop("age"), **fields)
    ask, action = step(ask, Observation.read(T0 + 2, [found]), SETTINGS, T0 + 2, 100.0)
    assert action.do is Do.PARK
    assert ask.needs_review
    assert why in ask.note
    assert "did not list it proves nothing" in ask.note


@pytest.mark.parametrize(
    ("offset", "age", "verdict"),
    [
        (0.0, -2.0, "match"),  # made during the read: fine
        (0.0, -3600.0, "undated"),  # an hour after the read that listed it: a wrong offset
        (0.0, -20.0, "undated"),
    ],
)
def test_a_date_later_than_the_read_that_listed_it_places_nothing(
    offset: float, age: float, verdict: str
) -> None:
    """A refund cannot be made after the read that listed it. A date that says so, by
    every reading of the clock (this machine's too), has a wrong offset (a local time
    marked UTC): it places the refund nowhere, and a person looks."""
    ask = sent(server_offset=offset)
    ask = attrs.evolve(ask, baseline=frozenset({1}))  # with a baseline too
    reading = judge(ask, [refund(5, age=age)], None, (), SETTINGS, read_at=T0 + 1.0)
    assert reading.verdict.value == verdict
    if verdict == "undated":
        assert "later than the read that listed it" in reading.doubt


def test_a_day_precision_date_is_a_span_of_a_day() -> None:
    """A date at midnight UTC carries the day only: without a baseline it can place a
    refund neither before nor after the send (a day old is not "long before")."""
    midnight = (T0 // 86_400) * 86_400
    ask = sent(first_sent_at=midnight + 20 * 3600, server_offset=0.0)
    dated = refund(5, age=T0 - midnight)
    assert match(ask, [dated], None, (), SETTINGS)[0].value == "undated"


def test_a_wall_clock_step_moves_the_record_and_makes_the_clock_unsure() -> None:
    """A step of -15 h: the record's times move with it and its offset too, so the
    instants on Violet's clock stay the same; dates are judged as unsure from then."""

    ask = sent(server_offset=2.0, settle_until=T0 + 60)
    moved = clock_stepped(ask, -15 * 3600.0)
    assert moved.first_sent_at == T0 - 15 * 3600.0
    assert moved.settle_until == T0 + 60 - 15 * 3600.0
    assert moved.server_offset == 2.0 + 15 * 3600.0
    assert moved.clock_unsure


def test_disagreeing_date_readings_keep_the_range() -> None:
    """Two Date readings 3 h apart: both are kept, and the clock is unsure."""
    ask = sent()
    one = Observation.read(T0 + 1, [], server_time=T0 + 1, received_at=T0 + 1)
    two = Observation.read(T0 + 2, [], server_time=T0 + 2 - 3 * 3600, received_at=T0 + 2)
    ask, _ = step(ask, one, SETTINGS, T0 + 1, 100.0)
    ask, _ = step(ask, two, SETTINGS, T0 + 2, 100.0)
    assert ask.offsets == pytest.approx((0.5 - 3 * 3600, 0.5))
    assert ask.clock_unsure


def test_an_old_record_without_the_new_fields_still_loads() -> None:
    """A record written before ask ids, seen candidates and answered existed loads, and
    every load of it names the same ask."""
    old = sent(phase=Phase.PENDING).to_dict()
    for key in ("ask_id", "seen", "answered", "offsets"):
        del old[key]
    one, two = PendingRefund.from_dict(old), PendingRefund.from_dict(dict(old))
    assert one.ask_id == two.ask_id
    assert (one.seen, one.answered, one.offsets) == (frozenset(), False, None)
    with pytest.raises(RequestValidationError, match="offsets"):
        PendingRefund.from_dict({**old, "offsets": [1, "x"]})


def test_a_guard_read_with_unreadable_records_never_sends() -> None:
    """hold_if_present (a batch's guard against a row an earlier run refunded): records
    it could not read might be that refund, so nothing is sent: review."""
    new = PendingRefund("refund", 1, BAG, RefundBagRequest(amount_refunded=300))
    guard = attrs.evolve(SETTINGS, read_before_send=True, hold_if_present=True)
    parked, action = step(new, Observation.read(T0, [], unreadable=1), guard, T0, 100.0)
    assert (action.do, parked.needs_review, parked.sends) == (Do.PARK, True, 0)
    _, action = step(new, Observation.read(T0, [], unreadable=1), SETTINGS, T0, 100.0)
    assert action.do is Do.SEND
