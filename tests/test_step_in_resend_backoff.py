"""A batch row's re-send after a connection that never opened waits out a backoff; the
wall clock steps forward hours (NTP) during that wait. The record saved as the
re-send leaves (the journal's "sent" line) had its times moved by the step but kept
the stamp (``wall_mono``) taken before it, so the next run, resuming the row after the
process died, moved its times by the same step once more: its settle window ended 15 h
ahead and the row was parked for 15 h (simulator seed 2093912: the run never ended)."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from violet_async import RetryPolicy, VioletClient
from violet_async.batch import BatchItem, run_batch
from violet_async.models import RefundBagRequest
from violet_async.testing import FakeClock

from .hostile import APP_ID, BAG_ID, ORDER_ID, SECRET, VIOLET_500, Hostile, Step

STEP = 54_000.0  # 15 h forward
AMOUNT = 250


class SteppedInBackoff(FakeClock):
    """A FakeClock whose next sleep, once ``armed``, first resolves it (the server's
    waiter then steps the wall clock and listens again, while the client waits)."""

    armed: asyncio.Future[None] | None = None

    async def sleep(self, seconds: float) -> None:
        hook, self.armed = self.armed, None
        if hook is not None:
            hook.set_result(None)
            await asyncio.sleep(0)
        await super().sleep(seconds)


class GoneAfterRead(Hostile):
    """Its first refund list read closes the connection and stops listening (the
    row's POST then finds the connection refused) until the client's next sleep (the
    backoff before its re-send), in which the client's wall clock steps ``STEP``. The
    first POST that reaches it (the re-send) is where the process dies: the journal is
    copied as it stands."""

    site: web.TCPSite | None = None
    journal: Path | None = None
    snapshot: Path | None = None
    away: asyncio.Task[None] | None = None

    async def _list(self, request: web.Request) -> web.Response:
        response = await super()._list(request)
        if self.away is None:
            response.headers["Connection"] = "close"
            self.away = asyncio.ensure_future(self._away())
        return response

    async def _away(self) -> None:
        assert self.site is not None
        assert isinstance(self.clock, SteppedInBackoff)
        await asyncio.sleep(0)  # the answer leaves first
        await self.site.stop()
        armed = self.clock.armed = asyncio.get_running_loop().create_future()
        await armed
        self.clock.step_wall(STEP)
        await self.listen()

    async def listen(self) -> None:
        assert self.site is not None
        self.site = web.TCPSite(self.site._runner, "127.0.0.1", self.site._port)
        await self.site.start()

    async def _post(self, request: web.Request, *, cancel: bool) -> web.StreamResponse:
        if self.snapshot is not None and self.journal is not None and self.posts == 0:
            shutil.copyfile(self.journal, self.snapshot)  # the process dies here
        return await super()._post(request, cancel=cancel)


def _client(port: int, clock: FakeClock) -> VioletClient:
    return VioletClient(
        APP_ID,
        SECRET,
        username="hostile-user",
        password="hostile-password-0123",
        base_url=f"http://127.0.0.1:{port}/v1",
        clock=clock,
        retry=RetryPolicy(max_attempts=2, initial_delay=2.0, jitter=False, deadline=600.0),
    )


def _item() -> BatchItem:
    return BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=AMOUNT))


async def test_a_step_during_a_resends_backoff_never_parks_the_resumed_row_for_hours(
    tmp_path: Path,
) -> None:
    clock = SteppedInBackoff(wall_start=1_750_000_000.0)
    server = GoneAfterRead(clock)
    server.script = [Step(500, body=VIOLET_500, commit_after=None)]
    server.journal = tmp_path / "run.jsonl"
    server.snapshot = tmp_path / "died.jsonl"
    runner = web.AppRunner(server.app())
    await runner.setup()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server.site = web.TCPSite(runner, "127.0.0.1", port)
    await server.site.start()
    try:
        async with _client(port, clock) as client:
            # Run 1: the read, the refused POST, the backoff (the step), the re-send.
            [r async for r in run_batch(client, [_item()], journal=server.journal)]
        assert server.away is not None
        await server.away
        assert server.posts >= 1
        assert server.refunded == 0
        posts = server.posts
        # The line the process died after: the re-send leaving, its times and its stamp
        # on the wall clock after the step.
        died = orjson.loads(server.snapshot.read_bytes().splitlines()[-1])
        clock.advance(60.0)
        # Run 2 resumes the row from the journal the process left as it died.
        async with _client(port, clock) as client:
            began = clock.monotonic()
            second = [r async for r in run_batch(client, [_item()], journal=server.snapshot)]
            took = clock.monotonic() - began
    finally:
        server._stopping.set()
        await runner.cleanup()
    assert took < 600.0, f"the resumed row waited {took:.0f}s (the step counted twice)"
    assert [r.outcome for r in second] == ["succeeded"], second[0].error
    assert server.refunded == AMOUNT
    assert server.posts == posts + 1
    ask = died["ask"]
    assert (died["state"], ask["sends"], ask["stepped"]) == ("sent", 2, STEP)
    wall, mono = ask["wall_mono"]
    assert wall - mono == pytest.approx(clock.wall_start - clock.start, abs=1e-6)
    assert wall - 5.0 <= ask["last_sent_at"] <= wall + 5.0
