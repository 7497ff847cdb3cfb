"""Review 28: an adversarial review of the 429 wait and its read, the kept POST of a
cancelled call, the fleet's pipelined applied write and reviews 25-27's guards, each
shown on a server scripted in its test (tests/hostile.py: one order with one bag on
127.0.0.1, port 0, on a FakeClock shared with the client) or on the pure protocol."""

from __future__ import annotations

import traceback

import attrs
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    APIConnectionError,
    OrderRefund,
    RefundFailedError,
    RefundWaitTimeoutError,
    RequestValidationError,
    RetryPolicy,
    VioletClient,
)
from violet_async._protocol import Do, Observation, Phase, start, step
from violet_async.batch import BatchItem, run_batch
from violet_async.models import RefundBagRequest
from violet_async.stores import MemoryStore
from violet_async.testing import FakeClock

from .conftest import serve
from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, VIOLET_500, Hostile, Step, hostile_client
from .test_resend_window import SETTINGS, T0, busy, lost, refund, sent
from .test_review27_findings import NoDate

AMOUNT = 300
DEFER = attrs.evolve(SETTINGS, defer_rate_limited=True)


def test_a_deferred_429_is_resumed_with_a_read_of_the_bag_before_its_re_send() -> None:
    """A batch or fleet defers a 429 (``defer_rate_limited``) and resumes the ABSENT
    record when its merchant's turn comes: the re-send went at once, without the read
    a call that waits in place makes. Another system's refund of the same amount made
    during the deferral, no ``Date`` to date it by (this machine's clock within
    ``clock_skew``), the re-send answered with nothing: the read after the window took
    that refund for the ask's own. Resumed, it is read first, as in place."""
    other = refund(9_999, T0 + 10.0)
    deferred, action = step(sent(), busy(), DEFER, T0, 500.0)
    assert (deferred.phase, action.do) == (Phase.ABSENT, Do.DEFER)
    ask, action = start(deferred, DEFER, T0 + 20.0, attempt_timeout=5.0)
    assert action.do is Do.READ
    assert not action.read_bag
    ask, action = step(ask, Observation.read(T0 + 20.0, [other]), DEFER, T0 + 20.0, 480.0)
    assert action.do is Do.SEND
    assert ask.baseline is not None
    assert 9_999 in ask.baseline
    ask, action = step(ask, lost(T0 + 20.0), DEFER, T0 + 21.0, 480.0)
    after = T0 + 100.0
    ask, action = step(ask, Observation.read(after, [other]), DEFER, after, 400.0)
    assert action.do is Do.SEND, ask.note  # proven absent: never the other's refund


async def test_a_batch_row_deferred_after_a_429_never_takes_anothers_refund() -> None:
    """A batch row's POST is answered 429 (Retry-After 20 s); another system refunds
    the same amount 3 s later; the row's turn comes and its re-send is answered 500
    (Violet's own, nothing applied). With no ``Date`` to date refunds by, the read-back
    reported the other system's refund as the row's (succeeded, reconciled): the
    shopper never refunded. The row reads the bag before its re-send now."""
    clock = FakeClock()
    server = NoDate(clock)
    server.script = [
        Step(429, commit_after=None, headers={"Retry-After": "20"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    clock.call_later(3.0, lambda: server.add_refund(AMOUNT))
    item = BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=AMOUNT))
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0, jitter=False)
    async with hostile_client(server, retry=retry) as client:
        results = [r async for r in run_batch(client, [item], patience=600.0)]
    other = server.refunds[0]["id"]
    assert len(results) == 1
    got = results[0]
    assert got.refund is None or got.refund.id != other, (
        "another system's refund reported as the row's"
    )
    assert got.outcome == "succeeded", got
    assert got.refund is not None
    assert server.ours == [got.refund.id]
    # The 429, the re-send answered 500 (the bag read first), the send once that one
    # was proven absent after its window.
    assert server.posts == 3


def _read_proven_then(answer: Observation) -> tuple[object, object]:
    """An ask whose first send (T0) got no answer and whose reads proved it absent after
    its window (its refund not listed yet: a list behind by more than the window), then
    sent again, that re-send answered ``answer``."""
    ask, action = step(sent(), lost(T0), SETTINGS, T0 + 1.0, 1_000.0)
    proving = (ask.settle_until or 0.0) + 1.0
    ask, action = step(ask, Observation.read(proving, []), SETTINGS, proving, 1_000.0)
    assert action.do is Do.SEND
    assert ask.first_sent_at == T0  # a refund of the first send shown late is still its own
    return step(ask, attrs.evolve(answer, at=proving), SETTINGS, proving + 0.5, 1_000.0)


def test_a_429_after_absence_proven_by_reads_never_takes_the_first_sends_refund_as_anothers() -> (
    None
):
    """The first send's refund shows only after the reads proved it absent; the re-send
    is answered 429. The read after the wait listed that refund, and it joined the
    baseline as "not this ask's": the re-send after it, answered 500, was proven absent
    and the ask sent a third time (two refunds). Without the 429 the refund is claimed
    (the window kept from the first send). Listed after a 429 it may be the first
    send's or another system's made in the wait: parked for review, never sent."""
    ask, action = _read_proven_then(busy())
    assert (ask.phase, action.do) == (Phase.ABSENT, Do.READ)
    mine = refund(9_001, T0 + 1.0)  # the first send's, shown late
    at = T0 + 100.0
    ask, action = step(ask, Observation.read(at, [mine]), SETTINGS, at, 1_000.0)
    assert action.do is Do.PARK, (action.do, ask.note)
    assert ask.needs_review
    assert [r.id for r in action.candidates] == [9_001]


def test_a_refused_connection_after_absence_proven_by_reads_keeps_the_first_sends_window() -> None:
    """As above, the re-send's connection refused (never left): the send after it opened
    the window anew, so the first send's refund, listed late and dated at that send,
    was "made before the send"; the read after the window proved the ask absent and it
    was sent a fourth time (two refunds). The window stays at the first send."""
    refused = Observation.send_failed(
        T0, APIConnectionError("refused", request_sent=False), backoff=1.0
    )
    ask, action = _read_proven_then(refused)
    assert action.do is Do.SEND
    assert ask.first_sent_at == T0
    ask, action = step(ask, lost(T0 + 70.0), SETTINGS, T0 + 71.0, 1_000.0)
    mine = refund(9_001, T0 + 1.0)
    at = T0 + 200.0
    ask, action = step(ask, Observation.read(at, [mine]), SETTINGS, at, 1_000.0)
    assert action.do is Do.RETURN, (action.do, ask.note)
    assert action.refund is not None
    assert action.refund.id == 9_001


async def test_a_refund_listed_late_after_a_429_is_never_sent_for_again() -> None:
    """On a server: the first POST times out at the gateway (504) and commits, its
    refund listed only 75 s later (beyond the 60 s window); the reads prove it absent
    and the re-send is answered 429 (Retry-After 20 s); the read after the wait lists
    the first refund, then the re-send is answered 500. The call sent a fourth POST and
    refunded the shopper twice. It ends for review now: one refund, two POSTs after
    the first (the 429'd one) and none after the read."""
    clock = FakeClock()
    server = Hostile(clock, list_lag=75.0)
    server.script = [
        Step(504, body=GATEWAY_504, commit_after=0.0),
        Step(429, commit_after=None, headers={"Retry-After": "20"}),
        Step(500, body=VIOLET_500, commit_after=None),
    ]
    retry = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=600.0, jitter=False)
    async with hostile_client(server, retry=retry) as client:
        try:
            got: OrderRefund | AmbiguousOutcomeError = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=AMOUNT
            )
        except AmbiguousOutcomeError as exc:
            got = exc
    assert server.refunded == AMOUNT, f"refunded {server.refunded} for one ask of {AMOUNT}"
    assert server.posts == 2
    assert isinstance(got, AmbiguousOutcomeError), got
    assert got.pending is not None
    assert got.pending.needs_review


APP_SECRET = "review28-app-secret-0123"
TOKEN = "review28-token-abcdef-4567"


def _failed_refund(message: str, status: str = "FAILED") -> dict[str, object]:
    return {
        "id": 9_100,
        "order_id": ORDER_ID,
        "bag_id": BAG_ID,
        "amount": AMOUNT,
        "status": status,
        "errors": [{"error_code": 1, "error_message": message}],
    }


@pytest.mark.parametrize("kind", ["refund", "cancel"])
async def test_a_failed_refunds_reason_echoing_a_secret_is_redacted_from_the_error(
    kind: str,
) -> None:
    """Violet answers 2xx with a refund whose status is FAILED and whose error message
    quotes the request (the app secret, the token): ``RefundFailedError`` put that
    message in its own text verbatim, which a log line or an error tracker keeps. Every
    other error built from an answer hides the client's secrets; this one does now."""
    body = _failed_refund(f"gateway said: bad key {APP_SECRET} for token {TOKEN}")

    async def answer(request: web.Request) -> web.Response:
        if kind == "cancel":
            bag = {"bag_id": BAG_ID, "order_id": ORDER_ID, "status": "CANCELED", "refund": body}
            return web.json_response(
                {"order_id": ORDER_ID, "status": "CANCELED", "cancelled_bags": [bag]}
            )
        return web.json_response(body)

    app = web.Application()
    action = "refunds" if kind == "refund" else "cancel"
    app.router.add_post(f"/v1/orders/{ORDER_ID}/bags/{BAG_ID}/{action}", answer)
    async with (
        serve(app) as root,
        VioletClient(1, APP_SECRET, token=TOKEN, base_url=f"{root}/v1") as c,
    ):
        call = (
            c.cancel_bag(ORDER_ID, BAG_ID)
            if kind == "cancel"
            else c.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT)
        )
        with pytest.raises(RefundFailedError) as caught:
            await call
    shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value)
    assert APP_SECRET not in shown
    assert TOKEN not in shown
    assert "[REDACTED]" in str(caught.value)


async def test_a_refund_status_echoing_a_secret_is_redacted_from_the_wait_timeout() -> None:
    """``wait_for_refund`` ran out with the last status read in its message: a status
    Violet does not document is kept as written, and one quoting the app secret put it
    in ``RefundWaitTimeoutError``'s text."""
    clock = FakeClock()

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(_failed_refund("", status=f"PENDING {APP_SECRET}"))

    app = web.Application()
    app.router.add_get(f"/v1/orders/{ORDER_ID}/refunds/9100", answer)
    async with (
        serve(app) as root,
        VioletClient(1, APP_SECRET, token=TOKEN, base_url=f"{root}/v1", clock=clock) as c,
    ):
        with pytest.raises(RefundWaitTimeoutError) as caught:
            await c.wait_for_refund(ORDER_ID, BAG_ID, 9_100, timeout=2.0, poll_interval=1.0)
    shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value)
    assert APP_SECRET not in shown


def test_a_record_under_review_is_never_sent_by_a_late_429_kept_in_another_client() -> None:
    """A cancelled call's POST answered 429 late, kept in this client (the ask's record
    ABSENT here: ``KnownRefunds.proven_late``); meanwhile another client on the key's
    store resumed the ask, sent nothing, and parked it for a person to look at (a
    refund on the bag it could not tell). This client's next resume merged the two and
    resumed the ABSENT one, review and all, and sent the ask again while a person was
    looking at the bag. Review is sticky: it parks for review, nothing is sent."""
    from violet_async._reconcile import KnownRefunds

    known = KnownRefunds()
    cancelled = sent()
    late = attrs.evolve(cancelled, phase=Phase.ABSENT, settle_until=None, note="429, late")
    assert known.proven_late(late)
    reviewed = attrs.evolve(
        cancelled, phase=Phase.PENDING, needs_review=True, note="a refund that may be it"
    )
    resumed = known.recall(reviewed)
    assert resumed.needs_review
    ask, action = start(resumed, SETTINGS, T0 + 100.0, attempt_timeout=5.0)
    if action.do is Do.READ:
        ask, action = step(ask, Observation.read(T0 + 100.0, []), SETTINGS, T0 + 100.0, 400.0)
    assert action.do is Do.PARK, (action.do, ask.note)
    assert ask.needs_review


#: A gateway's password whose first part, up to a ``/``, is digits: the URL parser
#: reads it as the port of a host named by the user name, and the URL parses.
DIGITS_FIRST = "2024/Gw9PassTail"


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_a_base_url_whose_password_parses_as_a_port_is_refused(
    via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``https://gateway:2024/Gw9PassTail@api.violet.io/v1`` (a password with ``/``, not
    percent-encoded) parses as host ``gateway``, port 2024, path ``/Gw9PassTail@api...``:
    review 25 refused such a URL only when the part before the ``/`` is no number.
    This one was taken: the app secret and token went to the host ``gateway`` on port
    2024, ``repr(client)`` showed ``https://***@api.violet.io/v1`` (the host it did not
    send to), and the whole password reached OpenTelemetry's ``url.full``. A base URL
    with an ``@`` after its host is refused now, the password never quoted."""
    url = f"https://gateway:{DIGITS_FIRST}@api.violet.io/v1"
    monkeypatch.setenv("VIOLET_APP_ID", "11")
    monkeypatch.setenv("VIOLET_APP_SECRET", APP_SECRET)
    monkeypatch.setenv("VIOLET_TOKEN", TOKEN)
    monkeypatch.setenv("VIOLET_BASE_URL", url)

    def make() -> VioletClient:
        if via == "environment":
            return VioletClient.from_env()
        return VioletClient(11, APP_SECRET, token=TOKEN, base_url=url)

    with pytest.raises(RequestValidationError) as info:
        make()
    assert info.value.field == "base_url"
    shown = str(info.value) + repr(info.value)
    assert "Gw9PassTail" not in shown
    assert "2024" not in shown


async def test_a_late_429_kept_in_one_client_never_sends_what_another_parked_for_review() -> None:
    """On a server, two clients on one key store: client A keeps cancelled sends. A's
    keyed POST is cut by its caller, its 429 held back; B repeats the key, reads the
    bag, finds a refund of the same amount with no date (another system's: whether it
    is the ask's cannot be told) and parks the ask for review. A's 429 then lands
    (kept: not applied), and A's repeat of the key sent the ask again while a person
    was asked to look at the bag. It stays parked for review: one POST."""
    from .test_cancelled_answer import KEEP, Held, _cut, _landed

    clock = FakeClock()
    held = Held()
    server = Hostile(
        clock,
        script=[Step(429, commit_after=None, headers={"Retry-After": "1"})],
        on_answer=held,
        null_dates=True,
    )
    store = MemoryStore(lease=5.0)
    short = RetryPolicy(max_attempts=3, deadline=20.0, jitter=False)
    key = "rma-review28-review-is-sticky"
    async with hostile_client(server, **KEEP, retry=short, store=store) as first:
        await _cut(first, server, idempotency_key=key)
        server.add_refund(AMOUNT)  # another system's, undated
        clock.advance(6.0)  # A's lease on the key is over: B takes the ask over
        async with hostile_client(server, retry=short, store=store) as second:
            with pytest.raises(AmbiguousOutcomeError) as parked:
                await second.refund_bag(
                    ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=key
                )
        assert parked.value.pending is not None
        assert parked.value.pending.needs_review
        await _landed(first, held, server)
        clock.advance(2.0)
        with pytest.raises(AmbiguousOutcomeError) as again:
            await first.refund_bag(ORDER_ID, BAG_ID, amount_refunded=AMOUNT, idempotency_key=key)
    assert server.posts == 1, "sent again while parked for review"
    assert server.ours == []
    assert again.value.pending is not None
    assert again.value.pending.needs_review
