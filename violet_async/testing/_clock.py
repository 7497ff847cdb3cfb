"""Clocks for tests: a virtual clock shared by the client and FakeViolet, and the real
clock FakeViolet falls back to."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["FakeClock", "FakeTimer", "RealClock", "ServerClock", "Timer"]


class Timer(Protocol):
    """What ``call_later`` returns: something that can be cancelled."""

    def cancel(self) -> None: ...


class ServerClock(Protocol):
    """The time FakeViolet runs on: wall time, monotonic time and timers."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def call_later(self, delay: float, fn: Callable[[], object]) -> Timer: ...


class FakeTimer:
    """A timer on a :class:`FakeClock`; ``cancel()`` keeps it from running."""

    def __init__(self, when: float, fn: Callable[[], object]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Virtual time for the client and FakeViolet at once.

    Pass the same instance as ``VioletClient(clock=clock)`` (or ``fake.client(clock=
    clock)``) and ``FakeViolet(clock=clock)``: the client's backoff and settle waits
    advance it instantly (``sleeps`` records each), and the server's timers (late
    commits, list lag, hangs) fire as it passes them, so "Violet commits 2.5 s later"
    happens inside the client's own waits, at no real cost.

    ``start`` is the monotonic reading at construction; ``wall_start`` the Unix time
    it corresponds to (None: the real ``time.time()`` at construction).
    """

    def __init__(self, start: float = 1_000.0, wall_start: float | None = None) -> None:
        self.start = start
        self.now = start
        self.wall_start = time.time() if wall_start is None else wall_start
        self.sleeps: list[float] = []
        #: The machine whose clocks these are: clients on one FakeClock are processes
        #: on one machine (one monotonic clock), as records name their clocks.
        self.machine = f"fake{id(self):x}"
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._serial = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        """Wall-clock (Unix) seconds: ``wall_start`` plus the virtual time elapsed."""
        return self.wall_start + (self.now - self.start)

    def call_at(self, when: float, fn: Callable[[], object]) -> FakeTimer:
        """Run ``fn`` once virtual time reaches ``when`` (a :meth:`monotonic` reading)."""
        timer = FakeTimer(when, fn)
        heapq.heappush(self._timers, (when, next(self._serial), timer))
        return timer

    def call_later(self, delay: float, fn: Callable[[], object]) -> FakeTimer:
        """Run ``fn`` once ``delay`` virtual seconds have passed."""
        return self.call_at(self.now + max(0.0, delay), fn)

    def advance(self, seconds: float) -> None:
        """Move time forward, running timers that fall due in time order (each sees
        the clock at its own due time; timers they add run too if due)."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        target = self.now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, timer = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not timer.cancelled:
                timer.fn()
        self.now = target

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock (``time()``) by ``seconds``, forward or back, as NTP or an
        operator would, while monotonic time goes on undisturbed."""
        self.wall_start += seconds

    def run_due(self) -> None:
        """Run every timer due at the current time."""
        self.advance(0.0)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)

    @property
    def slept(self) -> float:
        """Total virtual seconds waited."""
        return sum(self.sleeps)

    @property
    def pending_timers(self) -> int:
        """Timers not yet run or cancelled."""
        return sum(1 for _, _, timer in self._timers if not timer.cancelled)


class RealClock:
    """FakeViolet's clock when none is given: real wall and monotonic time, timers on
    the running event loop."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, fn: Callable[[], object]) -> Timer:
        return asyncio.get_running_loop().call_later(max(0.0, delay), fn)
