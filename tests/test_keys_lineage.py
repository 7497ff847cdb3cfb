"""A key's entry remembers the earlier asks it held for the same request (its
lineage): a pending record of one of them, resumed after a later ask of the key
applied, is the key's own call and gets the key's refund with no request; a record of
an ask the key never held (same request, its key edited or written by someone else)
goes to review, even when it does not name the key's refund as another call's. Two
clients on one SQLite file (two processes); POSTs counted by the scripted server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from violet_async import (
    AmbiguousOutcomeError,
    PendingRefund,
    RefundBagRequest,
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

from .conftest import serve
from .samples import refund_body
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
        # refund as another call's: for review, nothing sent (only the lineage tells
        # it; a record whose key's entry was swept looks the same, and its own request
        # may have applied: never a definite failure, never the key's refund).
        stranger = sent_once(
            "refund", ORDER, 22, REQUEST, pending.first_sent_at, idempotency_key=KEY
        )
        assert not stranger.others
        for resumer in (one, two):
            with pytest.raises(AmbiguousOutcomeError) as refused:
                await resumer.resume(stranger)
            assert outcome_of(refused.value) is Outcome.REVIEW
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


class Hiding:
    """Violet behind a replica that may hide the bag's refunds (``hide``) and a POST
    whose answer may be lost after it applied. Each POST takes the next of ``script``:
    "lost" (not applied, 500), "applied_lost" (applied, 500), then "ok" (applied,
    200). ``gate``, when set, holds every read of the list until it opens."""

    def __init__(self, clock: FakeClock, script: list[str]) -> None:
        self.clock = clock
        self.script = script
        self.hide = False
        self.gate: asyncio.Event | None = None
        self.posts = 0
        self.made: list[dict[str, object]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/login", self._login)
        app.router.add_post("/v1/orders/{o}/bags/{b}/refunds", self._refund)
        app.router.add_get("/v1/orders/{o}/bags/{b}/refunds", self._list)
        return app

    def _headers(self) -> dict[str, str]:
        return {"Date": formatdate(self.clock.time(), usegmt=True)}

    async def _login(self, request: web.Request) -> web.Response:
        data = {"token": "lineage-token-0123456789", "refresh_token": "lineage-refresh-0123"}
        return web.json_response(data, headers=self._headers())

    async def _list(self, request: web.Request) -> web.Response:
        if self.gate is not None:
            await self.gate.wait()
        shown = [] if self.hide else self.made
        return web.Response(
            body=orjson.dumps(shown), content_type="application/json", headers=self._headers()
        )

    async def _refund(self, request: web.Request) -> web.Response:
        self.posts += 1
        body = await request.json()
        step = self.script.pop(0) if self.script else "ok"
        if step != "lost":
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock.time()))
            self.made.append(
                refund_body(
                    id=9_100 + len(self.made),
                    order_id=int(request.match_info["o"]),
                    bag_id=int(request.match_info["b"]),
                    amount=body["amount_refunded"],
                    status="COMPLETED",
                    skus=[],
                    date_created=stamp,
                    date_last_modified=stamp,
                )
            )
        if step == "ok":
            return web.json_response(self.made[-1], headers=self._headers())
        return web.json_response({"message": "Internal error"}, status=500, headers=self._headers())


@contextlib.asynccontextmanager
async def _hiding(server: Hiding) -> AsyncIterator[str]:
    async with serve(server.app()) as base:
        yield base + "/v1"


async def _earlier_and_later(
    one: VioletClient, two: VioletClient, three: VioletClient, clock: FakeClock, server: Hiding
) -> tuple[PendingRefund, PendingRefund]:
    """The key's first ask ends pending (X); a later call takes it over and it fails
    for good; a third call asks anew (Y, X in the key's lineage): it applies, its answer
    is lost and the replica hides it, so Y ends pending too."""
    with pytest.raises(AmbiguousOutcomeError) as first:
        await one.refund_bag(ORDER, 22, REQUEST, idempotency_key=KEY)
    earlier = first.value.pending
    assert earlier is not None
    clock.advance(2_000.0)
    with pytest.raises(VioletError) as again:
        await two.refund_bag(ORDER, 22, REQUEST, idempotency_key=KEY)
    assert outcome_of(again.value) is Outcome.FAILED
    server.hide = True
    with pytest.raises(AmbiguousOutcomeError) as third:
        await three.refund_bag(ORDER, 22, REQUEST, idempotency_key=KEY)
    later = third.value.pending
    assert later is not None
    assert later.ask_id != earlier.ask_id
    assert server.posts == 3
    assert len(server.made) == 1
    return earlier, later


async def test_an_earlier_asks_record_resumed_while_the_keys_later_ask_is_pending_gets_its_refund(
    tmp_path: Path,
) -> None:
    """Before: the resume was refused (``RequestValidationError``, a definite failure
    to every driver) though the key's later ask had made the refund."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hiding(clock, ["lost", "lost", "applied_lost"])
    path = tmp_path / "keys.db"
    async with (
        _hiding(server) as url,
        SQLiteStore(path) as one_store,
        SQLiteStore(path) as two_store,
        SQLiteStore(path) as three_store,
        _client(url, clock, one_store, 3.0) as one,
        _client(url, clock, two_store, 600.0) as two,
        _client(url, clock, three_store, 3.0) as three,
    ):
        earlier, _ = await _earlier_and_later(one, two, three, clock, server)
        server.hide = False
        clock.advance(2_000.0)
        # Another process than the later ask's, with nothing of the key in memory.
        refund = await one.resume(earlier)
        assert refund.id == server.made[0]["id"]
        # The key's repeat and a second delivery of the record: the same refund.
        assert (await two.refund_bag(ORDER, 22, REQUEST, idempotency_key=KEY)).id == refund.id
        assert (await three.resume(earlier)).id == refund.id
    assert server.posts == 3
    assert len(server.made) == 1


async def test_an_earlier_asks_record_joins_the_keys_later_ask_running_in_this_process(
    tmp_path: Path,
) -> None:
    clock = FakeClock(wall_start=1_700_000_000.0)
    server = Hiding(clock, ["lost", "lost", "applied_lost"])
    path = tmp_path / "keys.db"
    async with (
        _hiding(server) as url,
        SQLiteStore(path) as one_store,
        SQLiteStore(path) as two_store,
        SQLiteStore(path) as three_store,
        _client(url, clock, one_store, 3.0) as one,
        _client(url, clock, two_store, 600.0) as two,
        _client(url, clock, three_store, 3.0) as three,
    ):
        earlier, later = await _earlier_and_later(one, two, three, clock, server)
        server.hide = False
        clock.advance(2_000.0)
        server.gate = asyncio.Event()
        running = asyncio.ensure_future(two.resume(later))
        for _ in range(50):
            if two._keys._flights:
                break
            await asyncio.sleep(0)
        assert two._keys._flights
        joining = asyncio.ensure_future(two.resume(earlier))
        for _ in range(20):
            await asyncio.sleep(0)
        server.gate.set()
        got = await asyncio.gather(running, joining)
        assert got[0].id == got[1].id == server.made[0]["id"]
    assert server.posts == 3
    assert len(server.made) == 1
