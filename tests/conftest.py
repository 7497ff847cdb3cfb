from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import settings

from violet_async import RetryPolicy, VioletClient
from violet_async.testing import FakeClock, FakeViolet

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
    """A client on ``fake``; ``clock=None`` uses the real clock."""
    options: dict[str, Any] = {
        "username": fake.username,
        "password": fake.password,
        "base_url": fake.base_url,
        "retry": TEST_POLICY,
        "clock": clock,
    }
    options.update(kwargs)
    return VioletClient(fake.app_id, fake.app_secret, **options)


@pytest.fixture
async def client(fake: FakeViolet, clock: FakeClock) -> AsyncIterator[VioletClient]:
    async with make_client(fake, clock) as c:
        yield c
