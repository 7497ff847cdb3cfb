"""A 429 to a batch row's read (the baseline before its send, or the read before a
resumed row's re-send) proves nothing was applied, like a 429 to its POST: the row
never ends failed (simulator seed 1321726: "fix the rows" for a row with nothing
wrong)."""

from __future__ import annotations

from pathlib import Path

import orjson
from aiohttp import web

from violet_async import RateLimitError, RetryPolicy
from violet_async.batch import MAX_DEFERRALS, BatchItem, run_batch
from violet_async.models import RefundBagRequest
from violet_async.testing import FakeClock

from .hostile import BAG_ID, ORDER_ID, Hostile, Step, hostile_client

TOO_MANY = orjson.dumps({"status": 429, "message": "Too Many Requests", "error_code": 4290})


class ReadsLimited(Hostile):
    """Its refund list answers 429 while ``limited_reads`` lasts."""

    limited_reads: int = 0

    async def _list(self, request: web.Request) -> web.Response:
        if self.limited_reads > 0:
            self.limited_reads -= 1
            self.reads += 1
            return web.Response(status=429, body=TOO_MANY, content_type="application/json")
        return await super()._list(request)


def _item() -> BatchItem:
    return BatchItem.refund(1, ORDER_ID, BAG_ID, RefundBagRequest(amount_refunded=100))


async def test_a_429_to_the_baseline_read_never_fails_the_row(tmp_path: Path) -> None:
    """The baseline read before the first send keeps answering 429: nothing is sent,
    the row ends not_sent (resumable), and the next run sends it once."""
    server = ReadsLimited(FakeClock())
    server.limited_reads = 1000
    journal = tmp_path / "run.jsonl"
    async with hostile_client(server, retry=RetryPolicy(jitter=False)) as client:
        first = [r async for r in run_batch(client, [_item()], journal=journal)]
        assert [r.outcome for r in first] == ["not_sent"], first[0].error
        assert isinstance(first[0].error, RateLimitError)
        assert (server.posts, server.refunded) == (0, 0)
        server.limited_reads = 0
        second = [r async for r in run_batch(client, [_item()], journal=journal)]
    assert [r.outcome for r in second] == ["succeeded"]
    assert (server.posts, server.refunded) == (1, 100)


async def test_a_429_to_a_resumed_rows_first_read_never_fails_it(tmp_path: Path) -> None:
    """Seed 1321726's shape: a row whose sends were all answered 429 ends not_sent
    (the run's waits for it spent); the next run's read before its re-send is answered
    429 too: still not_sent, never failed, nothing sent; a third run sends it once."""
    server = ReadsLimited(FakeClock())
    server.script = [Step(429, TOO_MANY, commit_after=None)] * (MAX_DEFERRALS + 1)
    journal = tmp_path / "run.jsonl"
    async with hostile_client(server, retry=RetryPolicy(max_attempts=1, jitter=False)) as client:
        first = [r async for r in run_batch(client, [_item()], journal=journal)]
        assert [r.outcome for r in first] == ["not_sent"]
        posts = server.posts
        server.limited_reads = 1000
        second = [r async for r in run_batch(client, [_item()], journal=journal)]
        assert [r.outcome for r in second] == ["not_sent"], second[0].error
        assert isinstance(second[0].error, RateLimitError)
        assert (server.posts, server.refunded) == (posts, 0)
        server.limited_reads = 0
        third = [r async for r in run_batch(client, [_item()], journal=journal)]
    assert [r.outcome for r in third] == ["succeeded"]
    assert (server.posts, server.refunded) == (posts + 1, 100)
