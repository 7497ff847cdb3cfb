"""Virtual time for the simulator: an asyncio event loop whose clock only moves when
nothing can run, and then straight to the next timer.

Every ``asyncio.sleep``, ``wait_for`` and ``call_later`` (the SDK's waits, its per-bag
lock's timeout, the simulated Violet's late commits) runs on that clock, so a schedule
that spans minutes of Violet time takes milliseconds, and the same inputs give the same
interleaving every time: asyncio runs ready callbacks in FIFO order, there are no
sockets, and work the SDK hands to a thread (the batch journal's fsync) runs inline.
"""

from __future__ import annotations

import asyncio
import functools
import selectors
from collections.abc import Callable
from typing import Any

__all__ = ["SimClock", "SimDeadlock", "VirtualTimeLoop"]

#: Unix time at virtual time ``START``: fixed, so dates in a trace replay byte for byte.
WALL_START = 1_750_000_000.0
START = 1_000.0


class SimDeadlock(RuntimeError):
    """Nothing can run and no timer is due: some await waits forever."""


class _VirtualSelector(selectors.BaseSelector):
    """The loop's selector: real for the loop's own wake-up pipe, and when the loop
    would block it advances virtual time by the timeout instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._real = selectors.DefaultSelector()
        self._loop = loop

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise SimDeadlock("nothing can run and no timer is set: an await waits forever")
        self._loop._advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (see the module docstring). ``executor_hook`` sees
    every function handed to ``run_in_executor`` first (the simulator uses it to tear a
    journal write); it returns True when it took care of the call itself."""

    def __init__(self, start: float = START) -> None:
        self._vt = self._start = start
        #: Virtual seconds after which a run counts as stuck (a livelock).
        self.horizon = 20_000.0
        super().__init__(selector=_VirtualSelector(self))
        self.executor_hook: Callable[[Callable[..., Any], asyncio.Future[Any]], bool] | None = None

    def time(self) -> float:
        return self._vt

    def _advance(self, seconds: float) -> None:
        self._vt += max(seconds, 0.0)
        if self._vt - self._start > self.horizon:
            raise SimDeadlock(f"livelock: still running after {self.horizon:g} virtual seconds")

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., Any], *args: Any
    ) -> asyncio.Future[Any]:
        # Inline, so the interleaving never depends on a thread's timing.
        future: asyncio.Future[Any] = self.create_future()
        call: Callable[[], Any] = func if not args else functools.partial(func, *args)
        if self.executor_hook is not None and self.executor_hook(call, future):
            return future
        try:
            future.set_result(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            future.set_exception(exc)
        return future


class SimClock:
    """The SDK's clock (``monotonic``, ``time``, ``sleep``) and the simulated server's
    (``call_later``) on one virtual-time loop; ``skew`` shifts only the server's wall."""

    def __init__(self, loop: VirtualTimeLoop, wall_start: float = WALL_START) -> None:
        self._loop = loop
        self._start = loop.time()
        self.wall_start = wall_start
        #: One simulated machine: every process on it shares its monotonic clock.
        self.machine = f"sim{id(self):x}"

    def monotonic(self) -> float:
        return self._loop.time()

    def time(self) -> float:
        return self.wall_start + (self._loop.time() - self._start)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    def call_later(self, delay: float, fn: Callable[[], object]) -> asyncio.TimerHandle:
        return self._loop.call_later(max(delay, 0.0), fn)
