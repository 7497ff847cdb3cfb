from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Generator
from types import FrameType
from typing import Any

import pytest
from aiohttp import web
from hypothesis import settings

from violet_async import RetryPolicy, VioletClient
from violet_async.testing import FakeClock, FakeViolet

from . import _aioresponses_compat


@pytest.hookimpl(hookwrapper=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Generator[None, Any, None]:
    """A test stuck past pytest-timeout's limit: before it fails, print every task of its
    event loop with the line each waits on (a stuck test waits in ``select``; its tasks
    say on what)."""
    yield
    before = signal.getsignal(signal.SIGALRM)
    if not callable(before):
        return

    def tasks_then_fail(signum: int, frame: FrameType | None) -> None:
        loop = asyncio._get_running_loop()
        for task in asyncio.all_tasks(loop) if loop is not None else ():
            print(f"\n-- {task!r}", file=sys.stderr)
            task.print_stack(file=sys.stderr)
        before(signum, frame)

    signal.signal(signal.SIGALRM, tasks_then_fail)


_aioresponses_compat.install()

# Deterministic examples (the same on every run and in CI), no per-example deadline:
# a loaded 2-core CI machine must not turn slowness into a failure.
settings.register_profile("violet", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("violet")

# Fast, deterministic retries: the clock is virtual, so these waits cost no real time.
TEST_POLICY = RetryPolicy(initial_delay=0.5, max_delay=4.0, settle_delay=1.0, deadline=60.0)
#: Long enough for every settle window (virtual time costs nothing).
ROOMY_POLICY = RetryPolicy(initial_delay=0.5, max_delay=4.0, settle_delay=1.0, deadline=300.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fake(clock: FakeClock) -> AsyncIterator[FakeViolet]:
    """A FakeViolet on the same virtual clock as ``client``."""
    async with FakeViolet(orders=20, seed=3, clock=clock) as server:
        yield server


def make_client(fake: FakeViolet, clock: FakeClock | None, **kwargs: Any) -> VioletClient:
    """A client on ``fake`` with the test retry policy; ``clock=None`` is the real clock."""
    return fake.client(**{"retry": TEST_POLICY, "clock": clock, **kwargs})


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


def ours(fake: FakeViolet, bag_id: int) -> list[int]:
    """Refund ids the fake committed on ``bag_id`` from API requests (not other actors)."""
    return [
        c.refund_id for c in fake.ledger.commits_per_bag.get(bag_id, []) if c.route != "external"
    ]


def wrong_reports(fake: FakeViolet, seen: dict[int, object]) -> list[str]:
    """Outcomes a caller saw that the ledger contradicts (one ask per bag): a refund
    returned that is not the bag's one refund, or a definite failure on a bag that was
    refunded. Pending outcomes (AmbiguousOutcomeError) contradict nothing."""
    from violet_async import AmbiguousOutcomeError, OrderRefund

    wrong = []
    for bag_id, outcome in seen.items():
        made = ours(fake, bag_id)
        if isinstance(outcome, OrderRefund):
            if made != [outcome.id]:
                wrong.append(f"bag {bag_id}: returned {outcome.id}, ledger {made}")
        elif not isinstance(outcome, AmbiguousOutcomeError) and made:
            wrong.append(f"bag {bag_id}: {type(outcome).__name__} but ledger {made}")
    return wrong


@pytest.fixture(autouse=True)
def _close_sqlite_stores(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Close every SQLiteStore a test made when it ends. A store passed to a client
    is the caller's to close; a test that hands one over and checks what it recorded
    may leave it open, and Python 3.13 warns (ResourceWarning) when its connection is
    collected later, in another test."""
    from violet_async.stores import SQLiteStore

    made: list[SQLiteStore] = []
    original = SQLiteStore.__init__

    def init(self: SQLiteStore, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SQLiteStore, "__init__", init)
    yield
    for store in made:
        store.close()
