"""Two findings on the key path, each a scripted hostile server and a FakeClock:

- a keyed call cut off while it waited for the bag, repeated later with its key on a
  bag where another ask of the client is pending, is refused like a call without a
  key (BagPendingError carrying that record, nothing sent); and a refund claimed by
  one ask is that ask's: a second resume of the same ask gets it again (never a second
  POST), another ask never claims it (simulator seed 400724);
- keys are scoped by app and base URL: a sandbox client and a production client with
  one store and one key never get each other's refund.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import attrs
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    BagPendingError,
    Environment,
    PendingRefund,
    RecordStoreError,
    RefundBagRequest,
    RetryPolicy,
    VioletClient,
)
from violet_async._ask import Phase, sent_once
from violet_async.stores import KeyEntry, MemoryStore, SQLiteStore
from violet_async.testing import FakeClock

from .hostile import (
    BAG_ID,
    GATEWAY_502,
    GATEWAY_504,
    ORDER_ID,
    Hostile,
    Step,
    hostile_client,
    serve,
)

#: The policy of seed 400724: two attempts, a 15 s deadline, a 60 s settle window.
SHORT = RetryPolicy(
    initial_delay=0.5, max_delay=4.0, deadline=15.0, max_attempts=2, settle_running=60.0
)


@attrs.define
class FirstHeld(Hostile):
    """The hostile server with its first POST held (once arrived) until a gate opens."""

    gate: asyncio.Event = attrs.Factory(asyncio.Event)
    held: int = 0

    async def _post(self, request: web.Request, *, cancel: bool) -> web.StreamResponse:
        if self.held == 0:
            self.held = 1
            self.post_arrived.set()
            await self.gate.wait()
        return await super()._post(request, cancel=cancel)


async def test_a_keyed_repeat_is_refused_on_a_pending_bag_and_one_ask_owns_its_refund() -> None:
    """Seed 400724 on a scripted server. Ask X (no key) is answered 502 and left pending;
    a keyed call cut off while it waited for the bag is repeated 70 s later: refused
    with X's record, nothing sent. The caller resumes that record (its POST is answered 504 and
    commits: pending again, a fresher record of X); then X's first record is resumed
    (it finds X's refund) and the fresher one too: the same refund, one POST of it."""
    clock = FakeClock()
    server = FirstHeld(
        clock,
        script=[
            Step(status=502, body=GATEWAY_502, commit_after=None),
            Step(status=504, body=GATEWAY_504, commit_after=20.0),  # lands after the deadline
        ],
    )
    async with hostile_client(server, retry=SHORT) as client:
        x = asyncio.ensure_future(client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250))
        await server.post_arrived.wait()
        keyed = asyncio.ensure_future(
            client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250, idempotency_key="k-a1")
        )
        for _ in range(20):
            await asyncio.sleep(0)  # the keyed call waits for the bag X holds
        assert not keyed.done()
        keyed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await keyed
        server.gate.set()
        with pytest.raises(AmbiguousOutcomeError) as first:
            await x
        pending_x = first.value.pending
        assert pending_x is not None
        await clock.sleep(70.0)
        posts = server.posts
        with pytest.raises(BagPendingError) as refused:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250, idempotency_key="k-a1")
        assert server.posts == posts  # nothing sent
        assert list(refused.value.pending) == [pending_x]
        # The caller resumes the record it was handed: 504, committed after its deadline.
        with pytest.raises(AmbiguousOutcomeError) as again:
            await client.resume(refused.value.pending[0])
        fresher = again.value.pending
        assert fresher is not None
        assert fresher.first_sent_at == pending_x.first_sent_at
        await clock.sleep(200.0)
        found = await client.resume(pending_x)
        assert found.id == server.ours[0]
        # The fresher record of the same ask: its refund is its own, claimed again.
        assert (await client.resume(fresher)).id == found.id
        # Delivered twice: still the one refund.
        assert (await client.resume(pending_x)).id == found.id
    assert len(server.ours) == 1
    assert server.refunded == 250


async def test_an_owned_refund_is_never_claimed_by_another_ask() -> None:
    """Two asks of one request on a bag, each left pending: the refund one of them made
    is its own; the other's resume never takes it (it proves its own absence, sends,
    and gets its own refund)."""
    clock = FakeClock()
    server = Hostile(
        clock,
        script=[
            Step(status=502, body=GATEWAY_502, commit_after=None),  # X: not applied
        ],
    )
    async with hostile_client(server, retry=SHORT) as client:
        with pytest.raises(AmbiguousOutcomeError) as first:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250)
        record_x = first.value.pending
        assert record_x is not None
        await clock.sleep(100.0)
        made = await client.resume(record_x)
        assert made.id == server.ours[0]
        # Another ask of the same request, sent later: its refund is not X's.
        other = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250)
        assert other.id != made.id
        # X again (a job delivered twice): its own refund, not the other's, no POST.
        posts = server.posts
        assert (await client.resume(record_x)).id == made.id
        assert server.posts == posts
    assert len(server.ours) == 2


@pytest.mark.parametrize("differ", ["app_id", "base_url"])
async def test_keys_are_scoped_by_app_and_base_url(tmp_path: Path, differ: str) -> None:
    """A sandbox client and a production client (another app id, or another base URL)
    on one SQLiteStore, one key, one order and bag: each makes its own refund; neither
    is handed the other's."""
    clock = FakeClock()
    sandbox, production = Hostile(clock), Hostile(clock)
    production._next_id = 5000  # its refund ids differ from the sandbox's
    path = tmp_path / "shared.db"
    async with (
        serve(sandbox) as sandbox_url,
        serve(production) as production_url,
        SQLiteStore(path) as store,
    ):
        # Another host (both on this machine): what tells sandbox from production.
        other_url = (
            production_url.replace("127.0.0.1", "localhost")
            if differ == "base_url"
            else sandbox_url
        )
        other_app = 11 if differ == "base_url" else 12
        options = {"username": "u", "password": "p-0123456789", "clock": clock, "store": store}
        async with (
            VioletClient(11, "secret-a", base_url=sandbox_url, retry=SHORT, **options) as a,
            VioletClient(other_app, "secret-b", base_url=other_url, retry=SHORT, **options) as b,
        ):
            first = await a.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250, idempotency_key="k")
            second = await b.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250, idempotency_key="k")
            assert second.id != first.id
            # Each client's repeat: its own refund again, nothing sent.
            posts = sandbox.posts + production.posts
            assert (
                await a.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250, idempotency_key="k")
            ).id == first.id
            assert (
                await b.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250, idempotency_key="k")
            ).id == second.id
            assert sandbox.posts + production.posts == posts
    made = sandbox.ours + production.ours
    assert len(made) == 2
    assert first.id in sandbox.ours
    assert second.id in (production.ours if differ == "base_url" else sandbox.ours)


@pytest.mark.parametrize("phase", ["sent", "applied"])
async def test_a_row_written_before_keys_were_scoped_is_refused(tmp_path: Path, phase: str) -> None:
    """A row under the bare key (no scope: written by an earlier release), sent or
    applied: whose app or environment it was cannot be told, so the call is refused
    (RecordStoreError, nothing sent, nothing returned); once a finished one passes
    retention, the key is free again."""
    clock = FakeClock()
    server = Hostile(clock)
    store = MemoryStore(retention=600.0, monotonic=clock.monotonic)
    async with hostile_client(server, retry=SHORT, store=store) as client:
        made = await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250)
        entry = await store.load(f"{client._key_scope()} unused")
        assert entry is None
        ask = PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=250))
        if phase == "sent":
            old = KeyEntry(
                "legacy", sent_once("refund", ORDER_ID, BAG_ID, ask.request, clock.time())
            )
        else:
            applied = attrs.evolve(ask, phase=Phase.APPLIED, refund_id=made.id)
            old = KeyEntry("legacy", applied, refund=made, finished_at=clock.time())
        await store.claim(old, clock.time())
        assert (await store.load("legacy")) is not None
        posts = server.posts
        with pytest.raises(RecordStoreError, match="before keys were scoped") as info:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250, idempotency_key="legacy")
        assert "nothing was sent" in str(info.value)
        assert info.value.key == "legacy"
        assert server.posts == posts
        if phase == "applied":
            await clock.sleep(601.0)
            again = await client.refund_bag(
                ORDER_ID, BAG_ID, amount_refunded=250, idempotency_key="legacy"
            )
            assert again.id != made.id  # a new ask of its own, not the old row's refund
            assert server.posts == posts + 1


async def test_a_resume_delivered_twice_gets_its_refund_again_with_no_request() -> None:
    """Simulator seed 207 (resume_twice): a pending ask's resume proves absence and
    sends; the same resume job, delivered again at once, reads a list that does not
    show the new refund yet (it lags): it returns the refund its ask was handed, with
    no request, never proves absence and sends a second."""
    clock = FakeClock()
    server = Hostile(clock, script=[Step(status=500, body=b"", commit_after=None)], list_lag=2.0)
    async with hostile_client(server, retry=SHORT) as client:
        with pytest.raises(AmbiguousOutcomeError) as first:
            await client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=250)
        record = first.value.pending
        assert record is not None
        await clock.sleep(100.0)
        made = await client.resume(record)
        posts, reads = server.posts, server.reads
        again = await client.resume(record)
        assert again.id == made.id
        assert (server.posts, server.reads) == (posts, reads)
    assert len(server.ours) == 1


def test_sandbox_and_production_keys_have_different_scopes() -> None:
    """Violet's two hosts scope keys apart (and so do two app ids); a port or a path
    does not (a restarted process on the same host finds what the last one left)."""

    def scope(app_id: int = 1, **options: object) -> str:
        return VioletClient(app_id, "s", token="t", **options)._key_scope()  # type: ignore[arg-type]

    sandbox = scope(environment=Environment.SANDBOX)
    assert sandbox != scope(environment=Environment.PRODUCTION)
    assert sandbox != scope(2, environment=Environment.SANDBOX)
    assert scope(base_url="http://127.0.0.1:1/v1") == scope(base_url="http://127.0.0.1:2/v2")


async def test_a_resume_that_times_out_waiting_for_its_bag_stays_pending() -> None:
    """A resume job delivered twice at once (simulator seed 182): the second waits for
    the bag while the first reads it back, and its deadline passes. The ask it resumes
    was sent before and may have applied, so the answer is the record again
    (AmbiguousOutcomeError), never "nothing was sent" (which reads as: did not apply)."""
    clock = FakeClock()
    server = Hostile(clock, hang_reads=True)
    request = RefundBagRequest(amount_refunded=300)
    async with hostile_client(server) as client:
        record = sent_once("refund", ORDER_ID, BAG_ID, request, clock.time())
        first = asyncio.ensure_future(client.resume(record))
        for _ in range(500):  # until the first resume holds the bag, reading it back
            if server.reads:
                break
            await asyncio.sleep(0.01)
        assert server.reads
        short = client.with_options(retry=RetryPolicy(deadline=0.2))
        with pytest.raises(AmbiguousOutcomeError) as caught:
            await short.resume(record)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    assert caught.value.pending is not None
    assert caught.value.pending.ask_id == record.ask_id
    assert server.posts == 0
