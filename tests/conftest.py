from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from violet_async import RetryPolicy, VioletClient
from violet_async.testing import FakeClock, FakeViolet

from . import _aioresponses_compat

_aioresponses_compat.install()

# Fast, deterministic retries: the clock is virtual, so these waits cost no real time.
TEST_POLICY = RetryPolicy(initial_delay=0.5, max_delay=4.0, settle_delay=1.0, deadline=60.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake() -> AsyncIterator[FakeViolet]:
    async with FakeViolet(orders=20, seed=3) as server:
        yield server


def make_client(fake: FakeViolet, clock: FakeClock, **kwargs: Any) -> VioletClient:
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
