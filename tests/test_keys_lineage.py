"""A key's entry remembers the earlier asks it held for the same request (its
lineage): a pending record of one of them, resumed after a later ask of the key
applied, is the key's own call and gets the key's refund with no request; a record of
an ask the key never held (same request, its key edited or written by someone else)
is refused, even when it does not name the key's refund as another call's. Two
clients on one SQLite file (two processes); POSTs counted by the scripted server."""

from __future__ import annotations

from pathlib import Path

import pytest

from violet_async import (
    AmbiguousOutcomeError,
    RefundBagRequest,
    RequestValidationError,
    RetryPolicy,
    VioletClient,
    VioletError,
)
from violet_async._ask import sent_once
from violet_async._engine import Outcome, outcome_of
from violet_async._transport import Timeouts
from violet_async.stores import RecordStore, SQLiteStore
from violet_async.stores._base import LINEAGE, KeyEntry
from violet_async.testing import FakeClock

from .test_review10_findings import ORDER, Counting, _serve

KEY = "order-12-r1"
REQUEST = RefundBagRequest(amount_refunded=500)


def _client(url: str, clock: FakeClock, store: RecordStore, deadline: float) -> VioletClient:
    return VioletClient(
        4242,
        "lineage-app-secret-0123456789abcdef",
        username="lineage-user",
        password="lineage-password-0123",
        base_url=url,
        clock=clock,
        store=store,
        retry=RetryPolicy(initial_delay=0.5, max_delay=1.0, deadline=deadline, max_attempts=1),
        timeouts=Timeouts(connect=1.0, read=2.0),
    )


async def test_the_keys_earlier_ask_resumed_in_either_process_gets_the_keys_refund(
    tmp_path: Path,
) -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Counting(clock)
    server.script = ["lost", "lost"]
    path = tmp_path / "keys.db"
    async with (
        _serve(server) as url,
        SQLiteStore(path) as one_store,
        SQLiteStore(path) as two_store,
        _client(url, clock, one_store, 3.0) as one,
        _client(url, clock, two_store, 600.0) as two,
    ):
        with pytest.raises(AmbiguousOutcomeError) as info:
            await one.refund_bag(ORDER, 22, REQUEST, idempotency_key=KEY)
        pending = info.value.pending
        assert pending is not None
        clock.advance(2_000.0)
        with pytest.raises(VioletError) as again:
            await two.refund_bag(ORDER, 22, REQUEST, idempotency_key=KEY)
        assert outcome_of(again.value) is Outcome.FAILED
        refund = await two.refund_bag(ORDER, 22, REQUEST, idempotency_key=KEY)
        assert server.posts[22] == 3
        stored = await one_store.load(f"{two._keys.scope} {KEY}")
        assert stored is not None
        assert pending.ask_id in stored.lineage
        assert stored.ask.ask_id not in stored.lineage
        # The other process first (nothing of the key in its memory), then the one that
        # applied it (its memory), then again (each a job delivered twice).
        for resumer in (one, two, one):
            assert (await resumer.resume(pending)).id == refund.id
        # A record of an ask the key never held, same request and key, naming no
        # refund as another call's: refused, nothing sent (only the lineage tells it).
        stranger = sent_once(
            "refund", ORDER, 22, REQUEST, pending.first_sent_at, idempotency_key=KEY
        )
        assert not stranger.others
        for resumer in (one, two):
            with pytest.raises(RequestValidationError) as refused:
                await resumer.resume(stranger)
            assert refused.value.field == "pending.idempotency_key"
    assert server.posts[22] == 3


def test_a_key_entrys_lineage_survives_json_and_a_written_one_is_bounded() -> None:
    ask = sent_once("refund", ORDER, 22, REQUEST, 1_700_000_000.0, idempotency_key=KEY)
    entry = KeyEntry("scope " + KEY, ask, lineage=("a1", "a2"))
    assert KeyEntry.from_json(entry.to_json()).lineage == ("a1", "a2")
    long = KeyEntry("scope " + KEY, ask, lineage=tuple(f"a{n}" for n in range(LINEAGE + 5)))
    assert KeyEntry.from_json(long.to_json()).lineage == long.lineage[-LINEAGE:]
    for written in (b'"a1"', b"[1, 2]", b"null"):
        raw = entry.to_json().replace(b'["a1","a2"]', written)
        assert KeyEntry.from_json(raw).lineage == ()
