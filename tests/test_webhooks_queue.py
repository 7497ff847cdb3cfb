"""Queued webhooks: an event is committed to SQLite before the 200, a worker runs the
callback until it succeeds (backoff on an injected clock), and ``kill -9`` between the
200 and the end of the callback replays it on restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from violet_async.webhooks import (
    SQLiteEventStore,
    StoredEvent,
    WebhookEvent,
    WebhookReceiver,
    WebhookWorker,
    webhook_handler,
)

from .test_webhooks import SECRET, Recorder, hook, order_body, post, signed_headers


def record(receiver: WebhookReceiver, body: bytes, event_id: str = "evt-1") -> StoredEvent:
    headers = signed_headers(body, event_id)
    return StoredEvent.of(receiver.parse(headers, body), headers, body, now=1000.0)


async def test_queued_handler_acknowledges_once_stored_and_worker_runs_it(
    tmp_path: Path,
) -> None:
    """200 ``queued`` once committed; the worker loop runs the callback; a redelivery or
    a replay under a fresh id is a 200 duplicate with no second callback."""
    callback = Recorder()
    handler = webhook_handler(
        WebhookReceiver(SECRET),
        callback,
        queue=tmp_path / "hooks.db",
        worker_options={"poll_interval": 0.01},
    )
    assert handler.mode == "queued"
    body = order_body()
    async with hook(handler) as url:
        await handler.start()
        status, answer = await post(url, body, signed_headers(body))
        assert (status, answer["queued"]) == (200, True)
        await callback.wait_done(1)
        for event_id in ("evt-1", "evt-fresh"):
            status, answer = await post(url, body, signed_headers(body, event_id))
            assert (status, answer["duplicate"]) == (200, True)
    assert [e.event_id for e in callback.events] == ["evt-1"]


async def test_worker_retries_with_backoff_until_success(tmp_path: Path) -> None:
    """A failing callback keeps the event queued, retried after 1 s then 2 s (injected
    clock); after success it leaves the store and its keys are remembered."""
    now = [1000.0]
    receiver = WebhookReceiver(SECRET)
    store = SQLiteEventStore(tmp_path / "hooks.db")
    callback = Recorder(fail=2)
    worker = WebhookWorker(store, receiver, callback, clock=lambda: now[0])
    assert await store.put(record(receiver, order_body()))
    assert await worker.run_once() == 1  # fails
    assert (await store.pending(), await worker.run_once()) == (1, 0)  # not due yet
    now[0] += 1
    assert await worker.run_once() == 1  # fails again
    now[0] += 1
    assert await worker.run_once() == 0  # backoff doubled to 2 s
    now[0] += 1
    assert await worker.run_once() == 1
    assert (await store.pending(), len(callback.events)) == (0, 1)
    assert not await store.put(record(receiver, order_body(), "evt-other"))
    await store.aclose()
    reopened = SQLiteEventStore(tmp_path / "hooks.db")
    assert not await reopened.put(record(receiver, order_body()))  # remembered on disk
    await reopened.aclose()
    assert worker.backoff(40) == 300.0
    with pytest.raises(ValueError, match="backoff_base"):
        WebhookWorker(store, receiver, callback, backoff_base=0)


async def test_store_failure_is_503(tmp_path: Path) -> None:
    """If the event cannot be committed the answer is 503, never 200."""

    class Broken(SQLiteEventStore):
        async def put(self, record: StoredEvent) -> bool:
            raise OSError("disk full")

    body = order_body()
    handler = webhook_handler(WebhookReceiver(SECRET), Recorder(), queue=Broken(tmp_path / "x"))
    async with hook(handler) as url:
        assert (await post(url, body, signed_headers(body)))[0] == 503


async def test_worker_loop_survives_a_store_outage_and_stop_keeps_the_event(
    tmp_path: Path,
) -> None:
    """A store that fails while polling is logged and retried; a callback cut short by
    stop() leaves its event queued for the next start."""
    receiver = WebhookReceiver(SECRET)

    class Flaky(SQLiteEventStore):
        failures = 1

        async def due(self, now: float, limit: int) -> list[StoredEvent]:
            if self.failures:
                self.failures -= 1
                raise OSError("locked")
            return await super().due(now, limit)

    store = Flaky(tmp_path / "hooks.db")
    callback = Recorder()
    callback.gate = asyncio.Event()
    worker = WebhookWorker(store, receiver, callback, poll_interval=0.01)
    assert await store.put(record(receiver, order_body()))
    worker.start()
    await callback.wait_running(1)
    await worker.stop()
    assert await store.pending() == 1
    await store.aclose()


KILLABLE_APP = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from aiohttp import web
    from violet_async.webhooks import WebhookReceiver, webhook_handler

    db, marker = sys.argv[1], Path(sys.argv[2])

    async def callback(event):
        marker.write_text(event.event_id)   # the callback has started...
        await asyncio.sleep(3600)           # ...and never finishes before kill -9

    async def main():
        handler = webhook_handler(WebhookReceiver(sys.argv[3]), callback, queue=db)
        app = web.Application()
        app.router.add_post("/violet", handler.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        await handler.start()
        print(site._server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_kill_9_after_the_200_replays_the_event_on_restart(tmp_path: Path) -> None:
    """A process killed after answering 200 but before the callback finished loses
    nothing: the restarted worker replays the event from the SQLite file."""
    db, marker, script = tmp_path / "hooks.db", tmp_path / "started", tmp_path / "app.py"
    script.write_text(KILLABLE_APP)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        str(db),
        str(marker),
        SECRET,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
        body = order_body()
        status, answer = await post(f"http://127.0.0.1:{port}/violet", body, signed_headers(body))
        assert (status, answer["queued"]) == (200, True)
        for _ in range(2000):  # wait for the callback to start (5 ms steps, 10 s at most)
            if marker.exists():
                break
            await asyncio.sleep(0.005)
        assert marker.read_text() == "evt-1"
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    events: list[WebhookEvent] = []

    async def record_event(event: WebhookEvent) -> None:
        events.append(event)

    store = SQLiteEventStore(db)
    worker = WebhookWorker(store, WebhookReceiver(SECRET), record_event)
    assert await worker.run_once() == 1
    assert [(e.event_id, e.order_id) for e in events] == [("evt-1", 11)]
    assert await store.pending() == 0
    await store.aclose()


async def test_the_queue_and_its_wal_files_are_private(tmp_path: Path) -> None:
    """Round 2, row 10: the SQLite queue holds customers' emails: the database and its
    ``-wal`` / ``-shm`` files are 0600 whatever the umask, and a queue file left wider
    by an older version is narrowed before it is used."""
    import stat

    old = os.umask(0o022)
    try:
        path = tmp_path / "hooks.db"
        store = SQLiteEventStore(path)
        try:
            assert await store.put(record(WebhookReceiver(SECRET), order_body()))
            for name in ("hooks.db", "hooks.db-wal", "hooks.db-shm"):
                assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        finally:
            await store.aclose()
        wide = tmp_path / "old.db"
        wide.write_bytes(b"")
        wide.chmod(0o644)
        again = SQLiteEventStore(wide)
        try:
            assert await again.put(record(WebhookReceiver(SECRET), order_body()))
        finally:
            await again.aclose()
        assert stat.S_IMODE(wide.stat().st_mode) == 0o600
    finally:
        os.umask(old)
