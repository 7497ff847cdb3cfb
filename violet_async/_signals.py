"""Ctrl-C (and SIGTERM) for the command line, the same on every OS.

``loop.add_signal_handler`` exists only on Unix event loops; Windows' loops raise
``NotImplementedError``. There, Python's own handler (which runs in the main thread)
hands the callback to the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

__all__ = ["on_signals"]


def on_signals(
    callback: Callable[[], object], signals: tuple[signal.Signals, ...] = (signal.SIGINT,)
) -> Callable[[], None]:
    """Run ``callback`` on the running loop when one of ``signals`` arrives; returns
    the function that restores the previous handling (call it in a ``finally``)."""
    loop = asyncio.get_running_loop()
    on_loop: list[signal.Signals] = []
    replaced: list[tuple[signal.Signals, Any]] = []

    def handler(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(callback)

    for sig in signals:
        try:
            loop.add_signal_handler(sig, callback)
            on_loop.append(sig)
        except NotImplementedError:
            replaced.append((sig, signal.signal(sig, handler)))

    def restore() -> None:
        for sig in on_loop:
            loop.remove_signal_handler(sig)
        for sig, previous in replaced:
            signal.signal(sig, previous)

    return restore
