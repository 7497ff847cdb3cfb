"""The second adversarial review's findings (batch journal, batch runner, webhook
queue, Redis dedup), each reproduced and asserting the safe outcome now."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

import violet_async._journal as journal_module
import violet_async.batch as batch_module
from violet_async import AmbiguousOutcomeError, RefundBagRequest
from violet_async._ask import PendingRefund, Phase
from violet_async._journal import Journal, JournalWriteError
from violet_async.batch import BatchItem, run_batch
from violet_async.testing import FakeViolet
from violet_async.webhooks import SQLiteEventStore, StoredEvent, WebhookReceiver, WebhookWorker

from .conftest import make_client
from .test_webhooks import SECRET, order_body, signed_headers


async def test_after_a_failed_write_the_journal_writes_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails halfway (a full disk) leaves part of a line: every later
    record is refused, so none is glued onto the fragment and lost (its POST would then
    be sent again by the next run)."""
    path = tmp_path / "j.jsonl"
    log = await Journal.open(path, input_id="x")
    real_write = journal_module.os.write
    calls = {"n": 0}

    def write(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(journal_module.os, "write", write)
    with pytest.raises(JournalWriteError):
        await log.record("refund:a#0", 1, "sent", ask={})
    with pytest.raises(JournalWriteError):
        await log.record("refund:b#0", 2, "sent", ask={})  # so b's POST never leaves
    await log.aclose()
    monkeypatch.setattr(journal_module.os, "write", real_write)
    again = await Journal.open(path, input_id="x")
    try:
        assert again.repaired > 0  # the fragment is cut on the next open
        assert again.entry("refund:a#0") is None
        assert again.entry("refund:b#0") is None
    finally:
        await again.aclose()


async def test_a_journal_failure_ending_a_parked_item_stops_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal fails while recording a parked item's end: the batch raises it (the
    item and the next one on its bag never vanish behind a clean finish)."""
    async with FakeViolet(orders=2, seed=1) as fake:
        order_id, bag_id = fake.seeded[0]
        first = BatchItem.refund(1, order_id, bag_id, RefundBagRequest(amount_refunded=100))
        second = BatchItem.refund(2, order_id, bag_id, RefundBagRequest(amount_refunded=200))
        original = batch_module._process

        async def parked_first(*args: Any, **kwargs: Any) -> Any:
            item, key = args[1], args[2]
            if item.line != 1:
                return await original(*args, **kwargs)
            pending = PendingRefund(
                "refund", order_id, bag_id, item.request, Phase.PENDING, sends=1, needs_review=True
            )
            error = AmbiguousOutcomeError("conflicting", request=item.request, attempts=1)
            error.pending = pending
            return batch_module._Parked(item, key, pending, 0, error, kwargs["stats"])

        monkeypatch.setattr(batch_module, "_process", parked_first)
        real_record = Journal.record

        async def record(self: Journal, key: str, line: int, state: str, **fields: Any) -> None:
            if state == "unknown":
                raise JournalWriteError("disk full")
            await real_record(self, key, line, state, **fields)

        monkeypatch.setattr(Journal, "record", record)
        async with make_client(fake, None) as client:
            with pytest.raises(JournalWriteError):
                _ = [r async for r in run_batch(client, [first, second], journal=tmp_path / "j")]


def _stored(receiver: WebhookReceiver, body: bytes, event_id: str) -> StoredEvent:
    headers = signed_headers(body, event_id)
    return StoredEvent.of(receiver.parse(headers, body), headers, body, now=1000.0)


async def test_a_store_error_never_starts_a_running_callback_again(tmp_path: Path) -> None:
    """Queued mode: recording one event's failure raises once (a locked database); the
    other event's slow callback is not started a second time while it runs."""
    receiver = WebhookReceiver(SECRET, max_age=None)

    class Flaky(SQLiteEventStore):
        fail_once = True

        async def failed(self, record: Any, next_at: float, error: str) -> None:
            if self.fail_once:
                self.fail_once = False
                raise OSError("database is locked")
            await super().failed(record, next_at, error)

    store = Flaky(tmp_path / "hooks.db")
    running: dict[int | None, int] = {}
    peak: dict[int | None, int] = {}

    async def callback(event: Any) -> None:
        if event.order_id == 1:
            raise RuntimeError("fast failure")
        running[event.order_id] = running.get(event.order_id, 0) + 1
        peak[event.order_id] = max(peak.get(event.order_id, 0), running[event.order_id])
        try:
            await asyncio.sleep(0.3)
        finally:
            running[event.order_id] -= 1

    assert await store.put(_stored(receiver, order_body(1), "evt-a"))
    assert await store.put(_stored(receiver, order_body(2), "evt-b"))
    worker = WebhookWorker(store, receiver, callback, poll_interval=0.05, clock=lambda: 1000.0)
    worker.start()
    await asyncio.sleep(0.25)
    await worker.stop()
    await store.aclose()
    assert peak.get(2) == 1
