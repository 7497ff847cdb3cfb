"""One record per ask across the key path and ``client.resume``: a pending record of a
keyed call carries its key (through JSON, as a job queue would carry it), and resuming
it goes through the key's own entry in the store. A resume in one client and a repeat
of the keyed call in another (two engines on one SQLite file, as two processes would
be) are one ask under one lease: one re-send at most, one refund, and both callers get
it. Refunds are counted from the scripted server's own record (tests/hostile.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import attrs
import pytest

from violet_async import (
    AmbiguousOutcomeError,
    OrderRefund,
    PendingRefund,
    RefundBagRequest,
    RequestValidationError,
    RetryPolicy,
    VioletClient,
)
from violet_async._ask import Phase, merged
from violet_async.stores import SQLiteStore
from violet_async.testing import FakeClock

from .hostile import BAG_ID, GATEWAY_504, ORDER_ID, Hostile, Step, hostile_client

SHORT = RetryPolicy(deadline=20.0)
ROOMY = RetryPolicy(initial_delay=0.5, max_delay=4.0, deadline=300.0)
KEY = "rma-25"


def _json(record: PendingRefund) -> PendingRefund:
    """The record as a job queue hands it back."""
    return PendingRefund.from_json(record.to_json())


async def _pending(call: Awaitable[OrderRefund]) -> PendingRefund:
    with pytest.raises(AmbiguousOutcomeError) as info:
        await call
    assert info.value.pending is not None
    return info.value.pending


def _keyed(client: VioletClient) -> Awaitable[OrderRefund]:
    return client.refund_bag(ORDER_ID, BAG_ID, amount_refunded=300, idempotency_key=KEY)


@contextlib.asynccontextmanager
async def _two(
    server: Hostile, path: Path, **options: Any
) -> AsyncIterator[tuple[VioletClient, VioletClient]]:
    """Two clients, each with its own engine and its own SQLiteStore on one file."""
    async with (
        SQLiteStore(path) as one_store,
        SQLiteStore(path) as two_store,
        hostile_client(server, store=one_store, **options) as one,
        hostile_client(server, store=two_store, **options) as two,
    ):
        yield one, two


async def _settled(call: Awaitable[OrderRefund], again: Any) -> OrderRefund:
    """The call's refund; if it ended pending (its deadline came while another owner
    held the ask), the outcome of calling ``again()`` until it is known."""
    try:
        return await call
    except AmbiguousOutcomeError:
        for _ in range(5):
            with contextlib.suppress(AmbiguousOutcomeError):
                return await again()  # type: ignore[no-any-return]
        raise


# -- the record carries its key ------------------------------------------------------


async def test_a_keyed_calls_pending_record_carries_its_key_through_json() -> None:
    clock = FakeClock()
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None)])
    async with hostile_client(server, retry=SHORT) as client:
        pending = await _pending(_keyed(client))
    assert pending.idempotency_key == KEY
    assert _json(pending).idempotency_key == KEY
    assert _json(pending) == pending


def test_a_record_without_a_key_writes_and_reads_as_before() -> None:
    record = PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=1))
    assert "idempotency_key" not in record.to_dict()
    assert PendingRefund.from_dict(record.to_dict()).idempotency_key is None


@pytest.mark.parametrize("bad", [7, "", "x" * 256, "a\nb"])
def test_a_record_with_a_bad_key_is_refused_naming_the_field(bad: object) -> None:
    data = PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest()).to_dict()
    data["idempotency_key"] = bad
    with pytest.raises(RequestValidationError) as info:
        PendingRefund.from_dict(data)
    assert info.value.field == "pending.idempotency_key"


async def test_resume_refuses_a_record_built_with_a_bad_key_sending_nothing() -> None:
    server = Hostile(FakeClock())
    record = attrs.evolve(
        PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(), phase=Phase.PENDING),
        idempotency_key="a\x00b",
    )
    async with hostile_client(server) as client:
        with pytest.raises(RequestValidationError) as info:
            await client.resume(record)
    assert info.value.field == "pending.idempotency_key"
    assert (server.posts, server.reads) == (0, 0)


def test_merged_keeps_the_key_either_record_has() -> None:
    base = PendingRefund("refund", ORDER_ID, BAG_ID, RefundBagRequest(), phase=Phase.PENDING)
    keyed = attrs.evolve(base, idempotency_key=KEY, sends=2)
    assert merged(base, keyed).idempotency_key == KEY
    assert merged(keyed, base).idempotency_key == KEY


# -- a resume and a repeat of the keyed call: one ask ------------------------------------


@pytest.mark.parametrize("resend", ["answered", "dropped"])
async def test_a_resume_and_a_keyed_repeat_in_two_clients_refund_once(
    tmp_path: Path, resend: str
) -> None:
    """The keyed call ends pending (its POST never committed). Past the settle window,
    client one resumes the record (through JSON) while client two repeats the keyed
    call, at once: one re-send, one refund, and both get it. ``dropped``: the re-send
    commits and its answer is lost (a 504), so it is found by reading back."""
    clock = FakeClock()
    second = Step() if resend == "answered" else Step(504, GATEWAY_504, commit_after=0.0)
    server = Hostile(clock, script=[Step(504, GATEWAY_504, commit_after=None), second])
    async with _two(server, tmp_path / "k.db", retry=SHORT) as (one, two):
        pending = await _pending(_keyed(one))
        clock.advance(120.0)
        record = _json(pending)
        got = await asyncio.gather(
            _settled(one.resume(record), lambda: one.resume(record)),
            _settled(_keyed(two), lambda: _keyed(two)),
        )
        again = await _keyed(one), await two.resume(record)
    assert len(server.ours) == 1, f"{len(server.ours)} refunds, {server.posts} POSTs"
    assert server.posts == 2
    assert {r.id for r in (*got, *again)} == {server.ours[0]}
