"""A virtual clock: backoff waits advance it instantly and are recorded."""

from __future__ import annotations

import asyncio

__all__ = ["FakeClock"]


class FakeClock:
    """Pass as ``VioletClient(clock=FakeClock())``: retries wait zero real time, and
    ``sleeps`` records every wait the client asked for, in seconds."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    @property
    def slept(self) -> float:
        """Total virtual seconds waited."""
        return sum(self.sleeps)
